//! The coordinator: publishes the first generation once every worker registered, and a new one
//! whenever a member is lost (the decision itself is [`plan::decide`](super::plan::decide)).
//! `ninelives worker launch` runs it next to the worker processes it starts.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ninelives_core::placement::PlacementShape;

use ninelives_core::generation::{DistPlan, Restore, initial_plan};

use super::plan::{Decision, decide};
use super::rendezvous::Etcd;
use super::transport::POLL;
use crate::checkpoint::CheckpointStore;
use crate::error::{Result, WorkerError};

/// Publishes generations for one job.
pub struct Coordinator {
    etcd: Arc<Etcd>,
    shape: PlacementShape,
    store: CheckpointStore,
    current: Option<DistPlan>,
    /// Checkpoint steps committed by this job (a reshard rolls back to the newest that verifies).
    committed: BTreeSet<u64>,
}

impl Coordinator {
    /// A coordinator for `shape` (one node per worker), reading checkpoints from `store`.
    pub fn new(etcd: Arc<Etcd>, shape: PlacementShape, store: CheckpointStore) -> Self {
        Self { etcd, shape, store, current: None, committed: BTreeSet::new() }
    }

    /// Deletes every key the job left in etcd from an earlier run.
    pub fn reset(&self) -> Result<()> {
        self.etcd.delete(self.etcd.keys().root(), true)
    }

    /// Waits until `workers` members registered.
    pub fn wait_registered(&self, workers: u32, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let members = self.etcd.members()?;
            if (0..workers).all(|r| members.contains_key(&r)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(WorkerError::Rendezvous(format!(
                    "only ranks {:?} of {workers} registered within {timeout:?}",
                    members.keys().collect::<Vec<_>>()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Records a checkpoint the job committed.
    pub fn committed(&mut self, step: u64) {
        self.committed.insert(step);
    }

    /// The generation in force.
    pub fn current(&self) -> Option<&DistPlan> {
        self.current.as_ref()
    }

    fn newest_checkpoint(&self) -> Option<u64> {
        self.committed.iter().rev().copied().find(|&step| {
            match self.store.verify_dir(&self.store.step_dir(step)) {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(step, "{e}; falling back to an older checkpoint");
                    false
                }
            }
        })
    }

    fn publish(&mut self, plan: DistPlan) -> Result<DistPlan> {
        let value = serde_json::to_vec(&plan).map_err(|e| WorkerError::Rendezvous(e.to_string()))?;
        self.etcd.put(&self.etcd.keys().placement(), value, None)?;
        self.current = Some(plan.clone());
        Ok(plan)
    }

    /// Publishes generation 1 (from the newest committed checkpoint when `resume`).
    pub fn start(&mut self, resume: bool) -> Result<DistPlan> {
        let restore = match resume.then(|| self.store.newest_verified()).transpose()?.flatten() {
            Some((step, _)) => {
                self.committed.insert(step);
                Restore::Checkpoint { step }
            }
            None => Restore::Fresh,
        };
        let plan = initial_plan(&self.shape, restore).map_err(|e| WorkerError::Rendezvous(e.to_string()))?;
        self.publish(plan)
    }

    /// Forgets a member at once (the launcher saw its process exit), instead of waiting for its
    /// lease to expire.
    pub fn remove_member(&self, rank: u32) -> Result<()> {
        self.etcd.delete(&self.etcd.keys().member(rank), false)
    }

    /// Compares the registered members with the generation in force and publishes the next
    /// generation when one was lost. Returns the new plan, if any.
    pub fn observe(&mut self) -> Result<Option<DistPlan>> {
        let Some(current) = &self.current else { return Ok(None) };
        let live: BTreeSet<u32> = self.etcd.members()?.into_keys().collect();
        match decide(&self.shape, current, &live, self.newest_checkpoint()) {
            Decision::Keep => Ok(None),
            Decision::Publish(mut plan) => {
                if let Restore::Checkpoint { step } = plan.restore {
                    // Checkpoints newer than the roll-back target would be overwritten anyway.
                    self.committed.retain(|&s| s <= step);
                } else if plan.restore == Restore::Fresh {
                    self.committed.clear();
                }
                plan.placement.generation = current.generation() + 1;
                self.publish(plan).map(Some)
            }
            Decision::Fail(reason) => Err(WorkerError::Rendezvous(reason)),
        }
    }
}
