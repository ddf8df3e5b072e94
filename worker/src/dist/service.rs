//! The owner side of the expert all-to-all: runs routed experts for whoever routed tokens here,
//! and keeps the experts' weight gradients per (micro-batch, expert) for the ordered reduction.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use candle_core::{Device, Tensor, Var};

use super::transport::Shared;
use crate::error::{Result, WorkerError};
use crate::model::{ExpertCall, ExpertId};
use crate::optim::Gradients;

/// Weight gradients of served expert calls, by (micro-batch, expert).
pub type ServedGrads = BTreeMap<(u32, ExpertId), Gradients>;

#[derive(Default)]
struct Served {
    /// Forward graphs awaiting their backward: the input leaf and the output.
    graphs: HashMap<ExpertCall, (Var, Tensor)>,
    grads: ServedGrads,
}

/// Expert calls served during the current step.
#[derive(Default)]
pub struct ExpertService {
    inner: Mutex<Served>,
}

fn poisoned() -> WorkerError {
    WorkerError::Rendezvous("expert service lock poisoned".into())
}

impl ExpertService {
    /// Forgets everything (a new step, or an abandoned one).
    pub fn clear(&self) {
        if let Ok(mut s) = self.inner.lock() {
            *s = Served::default();
        }
    }

    /// Runs `call`'s expert on `x` (`[rows, hidden]`) and keeps the graph for the backward.
    pub fn forward(
        &self,
        shared: &Shared,
        _generation: u64,
        _step: u64,
        call: ExpertCall,
        rows: usize,
        x: Vec<f32>,
    ) -> Result<Vec<f32>> {
        let guard = shared.trainer.read().map_err(|_| poisoned())?;
        let trainer = guard.as_ref().ok_or_else(|| WorkerError::Aborted("no model loaded".into()))?;
        let model = trainer.model();
        let hidden = model.dims().hidden_size as usize;
        if x.len() != rows * hidden {
            return Err(WorkerError::Rendezvous(format!(
                "expert request with {} values for {rows} rows of {hidden}",
                x.len()
            )));
        }
        let input = Var::from_tensor(&Tensor::from_vec(x, (rows, hidden), &Device::Cpu)?)?;
        let y = model.expert_forward(call.expert_id(), input.as_tensor())?;
        let out = y.flatten_all()?.to_vec1::<f32>()?;
        drop(guard);
        self.inner.lock().map_err(|_| poisoned())?.graphs.insert(call, (input, y));
        Ok(out)
    }

    /// Backward of an earlier [`ExpertService::forward`] of `call`: returns the input gradient
    /// and keeps the weight gradients.
    pub fn backward(
        &self,
        shared: &Shared,
        _generation: u64,
        _step: u64,
        call: ExpertCall,
        rows: usize,
        dy: Vec<f32>,
    ) -> Result<Vec<f32>> {
        let (input, y) = self
            .inner
            .lock()
            .map_err(|_| poisoned())?
            .graphs
            .remove(&call)
            .ok_or_else(|| WorkerError::Aborted(format!("backward of {call:?} without its forward")))?;
        if dy.len() != y.elem_count() || y.dim(0)? != rows {
            return Err(WorkerError::Rendezvous(format!("output gradient of {call:?} has the wrong size")));
        }
        let dy = Tensor::from_vec(dy, y.shape().clone(), &Device::Cpu)?;
        // d/dθ Σ(y ⊙ dy) is exactly the vector-Jacobian product the requester's graph needs.
        let store = (&y * &dy)?.sum_all()?.backward()?;
        let dx = store
            .get(input.as_tensor())
            .ok_or_else(|| WorkerError::Rendezvous("expert input received no gradient".into()))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let guard = shared.trainer.read().map_err(|_| poisoned())?;
        let trainer = guard.as_ref().ok_or_else(|| WorkerError::Aborted("no model loaded".into()))?;
        let prefix = call.expert_id().prefix();
        let mut grads = Gradients::new();
        for (name, var) in trainer.model().params().range(prefix.clone()..) {
            if !name.starts_with(&prefix) {
                break;
            }
            if let Some(g) = store.get(var.as_tensor()) {
                grads.insert(name.clone(), g.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        drop(guard);
        self.inner.lock().map_err(|_| poisoned())?.grads.insert((call.micro, call.expert_id()), grads);
        Ok(dx)
    }

    /// Takes the weight gradients of every served call of the step.
    pub fn take_grads(&self) -> Result<ServedGrads> {
        let mut s = self.inner.lock().map_err(|_| poisoned())?;
        s.graphs.clear();
        Ok(std::mem::take(&mut s.grads))
    }
}
