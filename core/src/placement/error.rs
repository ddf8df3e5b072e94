//! Why the planner refused its input.
//!
//! A [`PlanError`] means the input cannot be interpreted (a zero-sized topology, a failure naming a
//! chip that does not exist, a load table or placement of the wrong shape). A valid input that the
//! cluster cannot satisfy is not an error: it yields a plan of tier
//! [`Tier::Infeasible`](super::Tier::Infeasible) with the reason, which the operator turns into a
//! condition and an escalation.

use thiserror::Error;

use super::ids::{ChipId, ExpertId};

/// Bad planner input. Every variant names the offending value.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum PlanError {
    /// A size that must be positive is zero (`layers`, `routedExperts`, `nodes`, ...).
    #[error("{what} must be at least 1")]
    Zero {
        /// The field that is zero.
        what: &'static str,
    },
    /// Sizes that do not fit together (group size vs node size vs chip count, memory vs state).
    #[error("inconsistent shape: {0}")]
    InconsistentShape(String),
    /// A failure or move names a chip outside the topology.
    #[error("chip {chip} is outside the topology ({nodes} nodes x {chips_per_node} chips)")]
    UnknownChip {
        /// The chip named.
        chip: ChipId,
        /// Nodes in the job.
        nodes: u32,
        /// Chips per node.
        chips_per_node: u32,
    },
    /// A failure names a node outside the topology.
    #[error("node {node} is outside the topology ({nodes} nodes)")]
    UnknownNode {
        /// The node named.
        node: u32,
        /// Nodes in the job.
        nodes: u32,
    },
    /// A failure names a rack, but racks are not modelled or the rack does not exist.
    #[error("rack {rack} does not exist ({racks} racks; set topology.nodesPerRack to model racks)")]
    UnknownRack {
        /// The rack named.
        rack: u32,
        /// Racks in the job (0 when racks are not modelled).
        racks: u32,
    },
    /// More chips reported failed than the job has.
    #[error("{failed} failed chips reported but the job has only {chips}")]
    TooManyFailures {
        /// Distinct failed chips reported.
        failed: u64,
        /// Chips in the job.
        chips: u64,
    },
    /// A failure description that does not parse (`chip:<node>/<chip>`, `node:<n>`, `rack:<r>`).
    #[error("bad failure {0:?}: expected chip:<node>/<chip>, node:<node> or rack:<rack>")]
    BadFailure(String),
    /// A load table with the wrong number of layers or experts.
    #[error("load table has {found} where the model has {expected}")]
    LoadShape {
        /// What the model needs, e.g. `60 layers`.
        expected: String,
        /// What the table has.
        found: String,
    },
    /// A per-expert load that is negative, NaN or infinite.
    #[error("load of expert {expert} is {value}; loads must be finite and non-negative")]
    BadLoad {
        /// The expert.
        expert: ExpertId,
        /// The value given.
        value: f64,
    },
    /// Even a healthy cluster cannot hold one replica of every expert.
    #[error(
        "an expert-parallel group needs {needed} expert slots for one replica of every expert but its chips hold {available}"
    )]
    Capacity {
        /// Replicas one group must hold.
        needed: u64,
        /// Replica slots the group's chips have.
        available: u64,
    },
    /// A placement that does not belong to this shape or breaks an invariant (e.g. read from etcd
    /// for another job, or corrupted).
    #[error("placement does not match the job: {0}")]
    PlacementMismatch(String),
}
