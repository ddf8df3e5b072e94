//! The owner side of the expert all-to-all: runs routed experts for whoever routed tokens here,
//! and keeps the experts' weight gradients per (micro-batch, expert) for the ordered reduction.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{Result, WorkerError};
use crate::experts::{SwigluSaved, insert_expert_grads, swiglu_backward, swiglu_forward};
use crate::model::{ExpertCall, ExpertId};
use crate::optim::Gradients;
use crate::trainer::Trainer;

/// Weight gradients of served expert calls, by (micro-batch, expert).
pub type ServedGrads = BTreeMap<(u32, ExpertId), Gradients>;

#[derive(Default)]
struct Served {
    /// Forwards awaiting their backward, and each requester's last answered backward.
    graphs: HashMap<ExpertCall, Arc<SwigluSaved>>,
    grads: ServedGrads,
    /// The last backward answered for each requester, its graph kept: a requester whose
    /// connection broke before the reply arrived asks again (on a new connection), and gets the
    /// same bits. A requester sends one request at a time, so its next request means the reply
    /// arrived and the graph is freed.
    answered: HashMap<u32, ExpertCall>,
}

impl Served {
    /// `client` sent a request other than a repeat of its last backward: that one's reply arrived.
    fn moved_on(&mut self, client: u32, call: ExpertCall) {
        if let Some(last) = self.answered.get(&client).copied()
            && last != call
        {
            self.answered.remove(&client);
            self.graphs.remove(&last);
        }
    }
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

    /// Runs `call`'s expert on `x` (`[rows, hidden]`) for member `client` and keeps the graph for
    /// the backward. Idempotent: a repeated forward computes and keeps the same values.
    pub fn forward(
        &self,
        trainer: &RwLock<Option<Trainer>>,
        client: u32,
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
        let mut served = self.inner.lock().map_err(|_| poisoned())?;
        served.moved_on(client, call);
        served.graphs.insert(call, Arc::new(saved));
        Ok(out)
    }

    /// Backward of an earlier [`ExpertService::forward`] of `call` for member `client`: returns
    /// the input gradient and keeps the weight gradients. Idempotent: the graph of `client`'s last
    /// backward is kept until its next request, so a repeat (its reply was lost with a broken
    /// connection) returns the same bits and keeps the same gradients.
    pub fn backward(
        &self,
        trainer: &RwLock<Option<Trainer>>,
        client: u32,
        call: ExpertCall,
        rows: usize,
        dy: Vec<f32>,
    ) -> Result<Vec<f32>> {
        let saved = {
            let mut served = self.inner.lock().map_err(|_| poisoned())?;
            served.moved_on(client, call);
            let saved =
                served.graphs.get(&call).cloned().ok_or_else(|| {
                    WorkerError::Aborted(format!("backward of {call:?} without its forward"))
                })?;
            served.answered.insert(client, call);
            saved
        };
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
        s.answered.clear();
        Ok(std::mem::take(&mut s.grads))
    }
}
