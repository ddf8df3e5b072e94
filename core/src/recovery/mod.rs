//! The recovery state machine: the brain that turns failures into recoveries.
//!
//! Pure: [`decide`] takes the job's [`BrainConfig`], the persisted [`RecoveryState`] (etcd key
//! `jobs/<ns>/<job>/recovery`), an [`Observation`] (chip, node and member states, committed
//! checkpoints, progress and acknowledgements, as read from etcd, with the clock as a value) and
//! the placement in force, and returns the next state and the [`Action`]s to carry out. The
//! operator (Kubernetes) and the local runtime (`ninelives demo`) are two drivers of the same
//! function.
//!
//! ```text
//!  Starting ──all members──► Running ──fault──► Recovering ──acks + members──► Running
//!     │ publish gen 1           │ step ≥ steps      │ timeout / failed ack: next rung
//!     │ start members           ▼                   │ new fault: fold in, re-plan
//!                            Succeeded              ▼ no rung applies / maxRecoveries
//!                                                 Failed
//! ```
//!
//! The ladder ([`Rung`], cheapest first): reroute → reshard → restore → replace → shrink → fail.
//! A fault starts at the first rung that can work for it (chip: reroute; lost worker: restore;
//! lost node: replace) and climbs when a rung is not allowed, not applicable (the planner says a
//! reroute would leave an expert without a live replica, no spare is left, `minHealthyFraction`
//! would be crossed), or its attempt times out or is refused by an agent. Each attempt publishes
//! a new placement generation with a [`ControlRecord`] (the agents' local-execution protocol).
//!
//! Hysteresis: a chip that failed is *excluded* and stays out of placements until it has been
//! usable for `rejoinAfterSeconds` without relapse; a flapping chip therefore causes one
//! recovery, not one per flap (and the agent quarantines it after its third onset).
//!
//! Restart safety: every fact a later decision needs (phase, generation, node table, spares,
//! excluded chips, the active recovery with its deadline, rollback target and attempts) is in the
//! record; an operator that restarts mid-recovery reads it back and continues the same attempt.

mod brain;
pub mod control;
mod load;
mod observe;
mod outage;
mod reasons;
mod rung;
mod state;

#[cfg(test)]
mod tests;

pub use brain::{
    Action, BrainConfig, BrainError, DEFAULT_REJOIN_AFTER_SECONDS, Decision, Feedback, START_TIMEOUT_CODE,
    decide, decide_with,
};
pub use control::{
    Ack, AckOutcome, ApplyKind, ControlRecord, DEFAULT_APPLY_TIMEOUT, InvalidTimeout, LoadSource, LocalLoad,
};
pub use load::{
    LOAD_SMOOTHING, LoadRecord, LoadRejection, LoadTracker, MAX_LOAD_ENTRIES, MIN_REBALANCE_GAIN,
    RebalanceHold, RebalancePolicy, RebalanceRecord, Rebalanced, STALE_AFTER_WINDOWS, moves_between,
    rebalance,
};
pub use observe::{
    CheckpointRecord, InForce, LiveObservation, MemberAck, NodeView, Observation, PeerRecord, ProgressRecord,
    StaleReason, StaleWrite,
};
pub use outage::{DEFAULT_MAX_VANISHED_FRACTION, Outage, OutageCause, OutageGuard, OutagePolicy, Verdict};
pub use reasons::{JobFailure, Refusal, RungRefusal};
pub use rung::Rung;
pub use state::{
    ActiveRecovery, Attempt, BrainPhase, CompletedRecovery, Exclusion, HISTORY_LIMIT, MAX_CLOCK_LEAD_SECONDS,
    MAX_REPORT_LAG_SECONDS, RecoveryState, RestoreSource, STATE_VERSION, StampRejected, Trigger, TriggerKind,
};
