//! What the loop asks its adapter to do: everything that is not a write to the store.

use std::future::Future;

use ninelives_core::generation::DistPlan;
use ninelives_core::recovery::{CompletedRecovery, Outage, RecoveryState};
use thiserror::Error;

/// An effect the adapter could not carry out.
#[derive(Debug, Error)]
#[error("{effect}: {source}")]
pub struct EffectError {
    /// Which effect (`node-table`, `start-member`, ...), also the metric label.
    pub effect: &'static str,
    /// Why.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl EffectError {
    /// An error of `effect`.
    pub fn new(effect: &'static str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self { effect, source: source.into() }
    }
}

/// The side effects of one job's control loop, implemented once per runtime: the operator with
/// Pods, Events and status; the local runtime with child processes and its report.
///
/// Every method but [`Effects::node_table`] has a default that does nothing, so an adapter
/// states only what it acts on. Methods are called after the store write of the same round
/// committed, in the order of the brain's actions, then [`Effects::phase_changed`].
pub trait Effects: Send {
    /// The brain's first record (its node table), before any exists in the store; `None`
    /// while it cannot be built yet (Kubernetes: pods not all scheduled).
    fn node_table(&mut self) -> impl Future<Output = Result<Option<RecoveryState>, EffectError>> + Send;

    /// A generation was published.
    fn published(&mut self, plan: &DistPlan) -> impl Future<Output = Result<(), EffectError>> + Send {
        let _ = plan;
        async { Ok(()) }
    }

    /// The member of `rank` must run on `node` (start or restart it); `restore_step` is the
    /// checkpoint it starts from (0: the seeded initial state).
    fn start_member(
        &mut self,
        rank: u32,
        node: &str,
        restore_step: Option<u64>,
    ) -> impl Future<Output = Result<(), EffectError>> + Send {
        let _ = (rank, node, restore_step);
        async { Ok(()) }
    }

    /// The spare `spare` takes over node index `index` from `replaces`.
    fn bring_in_spare(
        &mut self,
        spare: &str,
        replaces: &str,
        index: u32,
    ) -> impl Future<Output = Result<(), EffectError>> + Send {
        let _ = (spare, replaces, index);
        async { Ok(()) }
    }

    /// Node index `index` (`node`) leaves the job; its member, if any, is stopped.
    fn drop_node(&mut self, index: u32, node: &str) -> impl Future<Output = Result<(), EffectError>> + Send {
        let _ = (index, node);
        async { Ok(()) }
    }

    /// A recovery finished.
    fn record_recovery(
        &mut self,
        recovery: &CompletedRecovery,
    ) -> impl Future<Output = Result<(), EffectError>> + Send {
        let _ = recovery;
        async { Ok(()) }
    }

    /// The phase or the active recovery changed (a recovery began or moved up the ladder, the
    /// job succeeded or failed: `state.failure` says why).
    fn phase_changed(
        &mut self,
        prior: &RecoveryState,
        state: &RecoveryState,
    ) -> impl Future<Output = Result<(), EffectError>> + Send {
        let _ = (prior, state);
        async { Ok(()) }
    }

    /// The control plane became degraded (`Some`: decisions are frozen; also when its cause
    /// changes) or healthy again (`None`). The operator sets its `ControlPlaneDegraded`
    /// condition and records an Event.
    fn control_plane(
        &mut self,
        outage: Option<&Outage>,
    ) -> impl Future<Output = Result<(), EffectError>> + Send {
        let _ = outage;
        async { Ok(()) }
    }
}
