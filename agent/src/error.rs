//! The agent's error type.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can stop the agent or one of its steps.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The fault table file could not be read or parsed.
    #[error("fault table {path}: {reason}")]
    FaultTable {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The chips directory could not be prepared or read.
    #[error("chips directory {path}: {source}")]
    ChipsDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A TLS file could not be read.
    #[error("etcd TLS file {path}: {source}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An etcd request failed.
    #[error("etcd {op}: {source}")]
    Etcd {
        /// The operation (`connect`, `grant`, `put`, ...), also the metric label.
        op: &'static str,
        /// The client error.
        source: etcd_client::Error,
    },
    /// The node's lease expired or was revoked behind the agent's back.
    #[error("lease {0:x} lost")]
    LeaseLost(i64),
    /// An etcd request did not answer in time.
    #[error("etcd {0} timed out")]
    EtcdTimeout(&'static str),
    /// A Kubernetes API request failed.
    #[error("kubernetes {op}: {source}")]
    Kube {
        /// The operation (`get-node`, `patch-status`, ...).
        op: &'static str,
        /// The client error.
        source: kube::Error,
    },
    /// The chip probe could not list the chips.
    #[error("chip probe: {0}")]
    Probe(#[from] crate::probe::ProbeError),
    /// The admin endpoint could not be bound.
    #[error("admin endpoint: {0}")]
    Admin(std::io::Error),
    /// A local worker did not accept a command.
    #[error("worker {endpoint}: {reason}")]
    Worker {
        /// The worker's control endpoint.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
}

impl AgentError {
    /// Short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AgentError::FaultTable { .. } => "fault-table",
            AgentError::ChipsDir { .. } => "chips-dir",
            AgentError::TlsFile { .. } => "tls-file",
            AgentError::Etcd { op, .. } => op,
            AgentError::LeaseLost(_) => "lease-lost",
            AgentError::EtcdTimeout(op) => op,
            AgentError::Kube { op, .. } => op,
            AgentError::Probe(_) => "probe",
            AgentError::Admin(_) => "admin",
            AgentError::Worker { .. } => "worker",
        }
    }
}
