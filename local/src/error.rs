//! The runtime's error type.

use std::path::PathBuf;

use thiserror::Error;

/// What went wrong running local processes.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// etcd is not installed.
    #[error(
        "etcd not found on PATH; install it with scripts/setup, or `apt install etcd-server` (Debian/Ubuntu)"
    )]
    EtcdMissing,
    /// A process could not be started.
    #[error("cannot start {what} ({program}): {source}")]
    Spawn {
        /// Which process.
        what: String,
        /// Its program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// A started process did not become ready in time, or exited early.
    #[error("{what} is not ready after {seconds:.1} s: {detail}")]
    NotReady {
        /// Which process.
        what: String,
        /// How long we waited.
        seconds: f64,
        /// What we saw (its log tail, its exit status).
        detail: String,
    },
    /// A file or directory of the run.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An etcd request of the run failed.
    #[error("etcd ({what}): {detail}")]
    Etcd {
        /// The request.
        what: String,
        /// The client's error.
        detail: String,
    },
    /// The brain refused its input (corrupt record or placement, invalid spec).
    #[error("recovery brain: {0}")]
    Brain(String),
    /// A child id that this supervisor did not hand out.
    #[error("no supervised process with id {0}")]
    UnknownChild(usize),
}

impl RuntimeError {
    /// Wraps an I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io { path: path.into(), source }
    }
}
