//! The worker's one error type.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can stop the training worker. Each variant names the step that failed.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// The job's model, data or training section cannot be run by this worker.
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// A dataset path could not be read.
    #[error("dataset {path}: {source}")]
    Dataset {
        /// The file or directory.
        path: PathBuf,
        /// What the filesystem said.
        source: std::io::Error,
    },
    /// The dataset holds too little text for one training sequence.
    #[error("dataset too small: {bytes} bytes of text, need at least {needed} (seq_len + 1)")]
    DatasetTooSmall {
        /// Bytes found.
        bytes: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// A tensor operation failed (shape mismatch, unsupported op, ...).
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Training diverged: the loss or gradient norm is not finite.
    #[error("training diverged at step {step}: {what}")]
    Diverged {
        /// The step that produced the non-finite value.
        step: u64,
        /// Which value.
        what: String,
    },
    /// Reading or writing a checkpoint file failed.
    #[error("checkpoint I/O on {path}: {source}")]
    CheckpointIo {
        /// The file or directory.
        path: PathBuf,
        /// What the filesystem said.
        source: std::io::Error,
    },
    /// A checkpoint exists but cannot be used (bad checksum, bad manifest, missing tensor).
    #[error("checkpoint {path} is corrupt: {reason}")]
    CorruptCheckpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Checkpoints exist but none of them is usable.
    #[error("no usable checkpoint in {dir}: {tried} found, all torn or corrupt")]
    NoUsableCheckpoint {
        /// The checkpoint directory.
        dir: PathBuf,
        /// How many candidate checkpoints were examined.
        tried: usize,
    },
    /// A checkpoint was written for a different model than the one being trained.
    #[error("checkpoint {path} does not fit this job: {reason}")]
    IncompatibleCheckpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// Which setting differs.
        reason: String,
    },
    /// The background checkpoint writer failed or vanished.
    #[error("background checkpoint writer failed: {0}")]
    CheckpointWriter(String),
    /// Registering a Prometheus metric failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The compute thread pool could not be built.
    #[error("thread pool: {0}")]
    ThreadPool(String),
    /// An expert-parallel step was abandoned (a peer was lost or a new generation began); the
    /// worker discards the step's partial work and waits for the next generation.
    #[error("step aborted: {0}")]
    Aborted(String),
    /// Rendezvous through etcd or the peer connections failed.
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    /// An etcd request failed or did not answer within its deadline.
    #[error("etcd {op}: {reason}")]
    Etcd {
        /// The request (`get`, `put`, `lease-grant`, ...).
        op: &'static str,
        /// What the client or server said.
        reason: String,
        /// Whether trying again may succeed (unreachable, paused, timed out, no leader) rather
        /// than never (permission denied, bad argument): a member waits out the first kind.
        transient: bool,
    },
    /// A peer restore needs state of `step` that neither this member's memory nor any reachable
    /// member holds (the brain then falls back to a disk checkpoint).
    #[error("no peer snapshot of step {step} holds {missing}")]
    NoPeerSnapshot {
        /// The step to restore.
        step: u64,
        /// What is missing (this member's own snapshot, the dense parameters, experts).
        missing: String,
    },
}

impl WorkerError {
    /// Whether this is an etcd error that trying again may cure.
    pub fn is_transient_etcd(&self) -> bool {
        matches!(self, WorkerError::Etcd { transient: true, .. })
    }

    /// A short label for metrics and events.
    pub fn label(&self) -> &'static str {
        match self {
            WorkerError::InvalidJob(_) => "invalid_job",
            WorkerError::Dataset { .. } | WorkerError::DatasetTooSmall { .. } => "dataset",
            WorkerError::Tensor(_) => "tensor",
            WorkerError::Diverged { .. } => "diverged",
            WorkerError::CheckpointIo { .. } => "checkpoint_io",
            WorkerError::CorruptCheckpoint { .. } | WorkerError::NoUsableCheckpoint { .. } => {
                "checkpoint_corrupt"
            }
            WorkerError::IncompatibleCheckpoint { .. } => "checkpoint_incompatible",
            WorkerError::CheckpointWriter(_) => "checkpoint_writer",
            WorkerError::Metrics(_) => "metrics",
            WorkerError::ThreadPool(_) => "thread_pool",
            WorkerError::Aborted(_) => "aborted",
            WorkerError::Rendezvous(_) => "rendezvous",
            WorkerError::Etcd { .. } => "etcd",
            WorkerError::NoPeerSnapshot { .. } => "peer_snapshot_missing",
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
