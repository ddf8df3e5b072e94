//! The goodput simulator: days of a job's life under a fault trace, in seconds of wall time,
//! decided by the real brain.
//!
//! A discrete-event simulation (no processes, no etcd, no clock): a seeded [`trace`] of chip
//! faults, node losses, worker crashes and flapping chips is replayed against each [`Policy`].
//! For ninelives policies every change the agents would publish is written into a synthetic
//! [`crate::recovery::Observation`] and handed to [`crate::recovery::decide`] (with
//! [`crate::recovery::BrainConfig::from_spec`], or `for_expert_parallel()` without peer copies),
//! whose published placements come from the real planner's `replan`; the simulator only charges
//! each attempt its cost ([`Costs`]) and lets the members join when it is done. The
//! checkpoint-restart baseline needs no brain: every fault restarts the job from the newest
//! committed disk checkpoint.
//!
//! ```text
//!  fault ──► training halts ──(detection)──► decide ──► attempt (commit, starts, loads, reload)
//!                                               ▲                          │
//!                                               └──── members joined ◄─────┘ → resume at the
//!                                                                      rollback point
//! ```
//!
//! Peer copies follow issue 21's design, which the brain does not implement yet: when a
//! recovery rolls back and no lost host's buddy (the node one rack further on in its group) was
//! lost too, the job resumes from the newest complete in-memory snapshot instead of the disk
//! checkpoint.
//!
//! Results ([`PolicyOutcome`]): ETTR = time of the steps kept / wall time, goodput, steps lost,
//! and where the rest of the time went (detection, each tier, lost work, checkpoint pauses).
//! Pure: the caller measures wall time and formats output.

mod cluster;
mod engine;
mod model;
mod outcome;
mod trace;
mod training;

#[cfg(test)]
mod tests;

use serde::Serialize;
use thiserror::Error;

pub use engine::simulate_policy;
pub use model::{
    Costs, DEFAULT_MIX, FaultModel, GB, LLAMA3_FAULTS_PER_CHIP_SECOND, Policy, Recovery, SaveMode, SimParams,
    StateSizes, derived_step_s, policy_spec,
};
pub use outcome::{PolicyOutcome, TierTime};
pub use trace::{Fault, generate};

use crate::job::TrainingJobSpec;
use crate::recovery::BrainError;
use crate::validate::JobShape;

/// Why a simulation cannot run.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SimError {
    /// The manifest (or a policy's change to it) does not validate.
    #[error("invalid job: {0}")]
    Spec(String),
    /// A parameter is out of range.
    #[error("invalid simulation parameter: {0}")]
    Params(String),
    /// The brain refused its input.
    #[error("brain: {0}")]
    Brain(String),
}

impl From<BrainError> for SimError {
    fn from(e: BrainError) -> Self {
        SimError::Brain(e.to_string())
    }
}

/// Every policy's outcome on one trace, with what went in.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Parameters.
    pub params: SimParams,
    /// State sizes of the manifest's job.
    pub sizes: StateSizes,
    /// Faults in the trace, by kind.
    pub faults: std::collections::BTreeMap<String, u64>,
    /// One outcome per policy, in the order given.
    pub outcomes: Vec<PolicyOutcome>,
}

/// The trace every policy of a run sees.
pub fn trace_for(spec: &TrainingJobSpec, params: &SimParams) -> Vec<Fault> {
    generate(&params.faults, params.horizon_s, spec.topology.nodes, spec.topology.chips_per_node, params.seed)
}

/// Runs every policy on the same trace.
pub fn simulate(spec: &TrainingJobSpec, policies: &[Policy], params: &SimParams) -> Result<Report, SimError> {
    params.validate()?;
    let job = JobShape::resolve(spec)
        .map_err(|v| SimError::Spec(v.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")))?;
    let trace = trace_for(spec, params);
    let outcomes =
        policies.iter().map(|p| simulate_policy(spec, p, params, &trace)).collect::<Result<_, _>>()?;
    Ok(Report { params: params.clone(), sizes: StateSizes::of(&job), faults: count_kinds(&trace), outcomes })
}

/// Faults of a trace by kind.
pub fn count_kinds(trace: &[Fault]) -> std::collections::BTreeMap<String, u64> {
    let mut by_kind = std::collections::BTreeMap::new();
    for f in trace {
        *by_kind.entry(f.kind.as_str().to_string()).or_insert(0) += 1;
    }
    by_kind
}
