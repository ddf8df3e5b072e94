//! The control loop's errors, one variant per step.

use ninelives_core::generation::{GenerationError, StoredPlanError};
use ninelives_core::recovery::BrainError;
use ninelives_core::writer::WriterRecord;
use thiserror::Error;

use crate::effects::EffectError;

/// Why a [`step`](crate::ControlLoop::step) did not complete. The job's state in the store is
/// unchanged unless the error says otherwise; the adapter retries after a pause.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The store could not be read or written.
    #[error("etcd {op} under {prefix}: {source}")]
    Etcd {
        /// What was being done (`read`, `publish`, `record`).
        op: &'static str,
        /// The keys concerned.
        prefix: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// A user or role could not be set up (see [`crate::access`]).
    #[error("etcd {op} of {name}: {source}")]
    Access {
        /// What was being done (`role-add`, `role-grant`, `user-add`, ...).
        op: &'static str,
        /// The user or role.
        name: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// A store call did not answer within its deadline.
    #[error("etcd {op} did not answer within {seconds} s")]
    Timeout {
        /// What was being done.
        op: &'static str,
        /// The deadline.
        seconds: u64,
    },
    /// Another driver claimed the job with a newer (or the same) leadership epoch: this one is
    /// deposed, wrote nothing, and must stop driving the job.
    #[error("deposed from {job}: {} holds it (this driver: {ours})", current.as_ref().map_or_else(|| "nobody".to_string(), ToString::to_string))]
    Fenced {
        /// The job's key prefix.
        job: String,
        /// This driver's claim.
        ours: WriterRecord,
        /// What the writer key holds now (`None`: deleted, e.g. the job's keys were removed).
        current: Option<WriterRecord>,
    },
    /// A value the brain needs cannot be read (the job is stuck, not restarted).
    #[error("malformed {key}: {reason}")]
    Malformed {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The brain refused its inputs.
    #[error(transparent)]
    Brain(#[from] BrainError),
    /// The published generation cannot be turned into the members' agreement.
    #[error("generation: {0}")]
    Generation(#[from] GenerationError),
    /// The generation could not be encoded.
    #[error("encoding the generation: {0}")]
    Encode(#[from] serde_json::Error),
    /// The generation cannot be stored in bounded values, or its stored values do not read back.
    #[error("stored plan: {0}")]
    StoredPlan(#[from] StoredPlanError),
    /// An adapter could not carry out an effect.
    #[error(transparent)]
    Effect(#[from] EffectError),
}

impl ControlError {
    /// Whether the store did not answer (an outage), as opposed to answering with something
    /// wrong.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ControlError::Etcd { .. } | ControlError::Timeout { .. })
    }

    /// Whether this driver is deposed ([`ControlError::Fenced`]): it must stop driving the job.
    pub fn is_fenced(&self) -> bool {
        matches!(self, ControlError::Fenced { .. })
    }

    /// A short stable label, for metrics and Events.
    pub fn label(&self) -> &'static str {
        match self {
            ControlError::Etcd { .. } | ControlError::Timeout { .. } => "etcd",
            ControlError::Access { .. } => "etcd-access",
            ControlError::Fenced { .. } => "fenced",
            ControlError::Malformed { .. } => "malformed",
            ControlError::Brain(_)
            | ControlError::Generation(_)
            | ControlError::Encode(_)
            | ControlError::StoredPlan(_) => "brain",
            ControlError::Effect(e) => e.effect,
        }
    }
}
