//! Why the brain refuses a rung and why it gives a job up: typed, stored in the record, and
//! mapped to condition reasons by `match`, never by reading the message.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::rung::Rung;

/// Why one rung of the ladder does not apply to a fault.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "refusal", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Refusal {
    /// The job's `failurePolicy.allowedTiers` leaves it out.
    NotAllowed,
    /// A node of the job is lost: only replace or shrink can help.
    NodeLost {
        /// The node.
        node: String,
    },
    /// Workers lost their in-memory state: only a rollback can help.
    WorkersLostState {
        /// How many.
        count: usize,
    },
    /// No lost or faulty node to replace.
    NothingToReplace,
    /// Every spare is used.
    NoSpareLeft,
    /// Spares remain but none is alive.
    NoSpareAlive,
    /// No lost or faulty node to drop.
    NothingToDrop,
    /// Dropping would leave no node.
    NoNodeLeft,
    /// An expert lost its last live replica (a reroute moves nothing).
    LastReplicaLost,
    /// The planner found no feasible placement.
    Infeasible {
        /// The planner's reason.
        reason: String,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotAllowed => f.write_str("not in failurePolicy.allowedTiers"),
            Refusal::NodeLost { node } => write!(f, "node {node} is lost"),
            Refusal::WorkersLostState { count } => write!(f, "{count} worker(s) lost their state"),
            Refusal::NothingToReplace => f.write_str("no lost or faulty node to replace"),
            Refusal::NoSpareLeft => f.write_str("no spare node left"),
            Refusal::NoSpareAlive => f.write_str("no spare node is alive"),
            Refusal::NothingToDrop => f.write_str("no lost or faulty node to drop"),
            Refusal::NoNodeLeft => f.write_str("no node would be left"),
            Refusal::LastReplicaLost => f.write_str("an expert lost its last live replica"),
            Refusal::Infeasible { reason } => f.write_str(reason),
        }
    }
}

/// A rung and why it was refused.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RungRefusal {
    /// The rung.
    pub rung: Rung,
    /// Why not.
    #[serde(flatten)]
    pub refusal: Refusal,
}

impl fmt::Display for RungRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.rung.as_str(), self.refusal)
    }
}

/// Why the brain failed a job (the record's `failure`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "reason", rename_all_fields = "camelCase")]
pub enum JobFailure {
    /// A new fault arrived with `failurePolicy.maxRecoveries` used up.
    MaxRecoveriesExceeded {
        /// The new faults.
        triggers: Vec<String>,
        /// The policy's limit.
        max: u32,
    },
    /// The last rung's attempt failed too.
    LadderExhausted {
        /// Why the last attempt was abandoned.
        last: String,
    },
    /// No rung applies to the fault.
    NoRecoveryApplies {
        /// Each rung tried, and why not.
        refusals: Vec<RungRefusal>,
    },
    /// A fault arrived before any placement was published.
    NoPlacement,
    /// Members had not joined the first generation by `failurePolicy.startTimeoutSeconds` and
    /// `maxRecoveries` left no recovery to start.
    StartTimedOut {
        /// The nodes whose members never joined.
        missing: Vec<String>,
    },
}

impl JobFailure {
    /// The `Failed` condition's reason (CamelCase, as Kubernetes reasons are).
    pub fn condition_reason(&self) -> &'static str {
        match self {
            JobFailure::MaxRecoveriesExceeded { .. } => "MaxRecoveriesExceeded",
            JobFailure::LadderExhausted { .. } => "RecoveryLadderExhausted",
            JobFailure::NoRecoveryApplies { .. } => "NoRecoveryApplies",
            JobFailure::NoPlacement => "NoPlacement",
            JobFailure::StartTimedOut { .. } => "StartTimeout",
        }
    }
}

impl fmt::Display for JobFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobFailure::MaxRecoveriesExceeded { triggers, max } => {
                write!(f, "{}: failurePolicy.maxRecoveries {max} already used", triggers.join(", "))
            }
            JobFailure::LadderExhausted { last } => write!(f, "recovery ladder exhausted: {last}"),
            JobFailure::NoRecoveryApplies { refusals } => {
                let each: Vec<String> = refusals.iter().map(ToString::to_string).collect();
                write!(f, "no recovery applies ({})", each.join("; "))
            }
            JobFailure::NoPlacement => f.write_str("no placement published; cannot plan a recovery"),
            JobFailure::StartTimedOut { missing } => write!(
                f,
                "members on {} did not join within failurePolicy.startTimeoutSeconds and no recovery is left",
                missing.join(", ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn failures_read_as_before_and_round_trip_through_the_record() {
        let f = JobFailure::NoRecoveryApplies {
            refusals: vec![
                RungRefusal { rung: Rung::Replace, refusal: Refusal::NoSpareAlive },
                RungRefusal { rung: Rung::Shrink, refusal: Refusal::NoNodeLeft },
            ],
        };
        assert_eq!(
            f.to_string(),
            "no recovery applies (replace: no spare node is alive; shrink: no node would be left)"
        );
        assert_eq!(f.condition_reason(), "NoRecoveryApplies");
        let json = serde_json::to_string(&f).unwrap();
        assert!(
            json.contains(r#""reason":"NoRecoveryApplies""#) && json.contains(r#""refusal":"noSpareAlive""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<JobFailure>(&json).unwrap(), f);
        let max = JobFailure::MaxRecoveriesExceeded { triggers: vec!["chip n1/2".into()], max: 2 };
        assert_eq!(max.condition_reason(), "MaxRecoveriesExceeded");
        assert_eq!(serde_json::from_str::<JobFailure>(&serde_json::to_string(&max).unwrap()).unwrap(), max);
    }
}
