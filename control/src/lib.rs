//! # ninelives-control
//!
//! The one control loop around the recovery brain. Both runtimes drive a job through it: the
//! Kubernetes operator (effects: Pods, Events, status) and the local runtime behind
//! `ninelives demo` (effects: child processes). Each [`ControlLoop::step`] is
//!
//! 1. **observe** — read the job's keys and the node keys from a [`BrainStore`] (etcd in
//!    production, [`MemoryStore`] in tests) into an [`Observation`](ninelives_core::recovery::Observation);
//! 2. **decide** — the pure [`decide`](ninelives_core::recovery::decide), called here and
//!    nowhere else;
//! 3. **apply** — write the new generation (`control`, `placement` as the members'
//!    [`DistPlan`](ninelives_core::generation::DistPlan), `recovery`) or the changed record in
//!    one transaction guarded by the record's revision, so a writer that read a stale record
//!    (a paused or deposed driver) writes nothing;
//! 4. **effects** — hand what is not a store write to the adapter's [`Effects`].
//!
//! The loop owns no timer and no clock: the adapter calls `step` with the time, at its own pace.

pub mod access;
mod control_loop;
mod effects;
mod error;
mod etcd;
mod event;
mod memory;
mod store;
mod view;

#[cfg(test)]
mod tests;

pub use control_loop::{ControlLoop, JobIdentity, Progress, Round};
pub use effects::{EffectError, Effects};
pub use error::ControlError;
pub use etcd::EtcdStore;
pub use event::{OutageEvent, RecoveryEvent};
pub use memory::MemoryStore;
pub use store::{BrainStore, Changes, Mirror, Written};

/// The wall clock as unix seconds (the brain takes time as a value; adapters read it here).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}
