//! The owner side of the expert all-to-all: runs routed experts for whoever routed tokens here,
//! and keeps the experts' weight gradients per (micro-batch, expert) for the ordered reduction.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, RwLock};

use crate::error::{Result, WorkerError};
use crate::experts::{SwigluSaved, insert_expert_grads, swiglu_backward, swiglu_forward};
use crate::model::{ExpertCall, ExpertId};
use crate::optim::Gradients;
use crate::trainer::Trainer;

/// Weight gradients of served expert calls, by (micro-batch, expert).
pub type ServedGrads = BTreeMap<(u32, ExpertId), Gradients>;

#[derive(Default)]
struct Served {
    /// Forwards awaiting their backward.
    graphs: HashMap<ExpertCall, SwigluSaved>,
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
        trainer: &RwLock<Option<Trainer>>,
        call: ExpertCall,
        rows: usize,
        x: Vec<f32>,
    ) -> Result<Vec<f32>> {
        let guard = trainer.read().map_err(|_| poisoned())?;
        let trainer = guard.as_ref().ok_or_else(|| WorkerError::Aborted("no model loaded".into()))?;
        let model = trainer.model();
        let hidden = model.dims().hidden_size as usize;
        if rows.checked_mul(hidden) != Some(x.len()) {
            return Err(WorkerError::Rendezvous(format!(
                "expert request with {} values for {rows} rows of {hidden}",
                x.len()
            )));
        }
        let (out, saved) = swiglu_forward(x, rows, &model.expert_weights(call.expert_id())?)?;
        drop(guard);
        self.inner.lock().map_err(|_| poisoned())?.graphs.insert(call, saved);
        Ok(out)
    }

    /// Backward of an earlier [`ExpertService::forward`] of `call`: returns the input gradient
    /// and keeps the weight gradients.
    pub fn backward(
        &self,
        trainer: &RwLock<Option<Trainer>>,
        call: ExpertCall,
        rows: usize,
        dy: Vec<f32>,
    ) -> Result<Vec<f32>> {
        let saved = self
            .inner
            .lock()
            .map_err(|_| poisoned())?
            .graphs
            .remove(&call)
            .ok_or_else(|| WorkerError::Aborted(format!("backward of {call:?} without its forward")))?;
        if saved.rows() != rows || rows.checked_mul(saved.hidden()) != Some(dy.len()) {
            return Err(WorkerError::Rendezvous(format!("output gradient of {call:?} has the wrong size")));
        }
        let guard = trainer.read().map_err(|_| poisoned())?;
        let trainer = guard.as_ref().ok_or_else(|| WorkerError::Aborted("no model loaded".into()))?;
        let weights = trainer.model().expert_weights(call.expert_id())?;
        drop(guard);
        // The same kernel as a local expert's backward: the same bits wherever it runs.
        let (dx, per_weight) = swiglu_backward(&saved, &weights, dy)?;
        let mut grads = Gradients::new();
        insert_expert_grads(&mut grads, BTreeMap::from([(call.expert_id(), per_weight)]));
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
