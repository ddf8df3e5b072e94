//! The agent's error type.
//!
//! It wraps the errors of the agent's leaf modules ([`FaultTableError`], [`ProbeError`]); those
//! modules never depend on this one, so the crate's modules form no import cycle.

use std::path::PathBuf;

use thiserror::Error;

use crate::faults::FaultTableError;
use crate::probe::ProbeError;

/// Everything that can stop the agent or one of its steps.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The fault table file could not be read or parsed.
    #[error(transparent)]
    FaultTable(#[from] FaultTableError),
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
    Probe(#[from] ProbeError),
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
            AgentError::FaultTable(_) => "fault-table",
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

impl AgentError {
    /// True when etcd answered that the lease no longer exists (expired or revoked): retrying
    /// with that lease can never succeed, a new one must be granted.
    pub fn lease_gone(&self) -> bool {
        matches!(
            self,
            AgentError::LeaseLost(_)
                | AgentError::Etcd { source: etcd_client::Error::LeaseKeepAliveError(_), .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultTable;

    #[test]
    fn fault_table_errors_keep_their_message_and_label() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("faults.yaml");
        std::fs::write(&path, "link-down: reboot-the-datacenter\n").unwrap();
        let error = AgentError::from(FaultTable::load(&path).unwrap_err());
        assert!(error.to_string().starts_with(&format!("fault table {}: ", path.display())), "{error}");
        assert_eq!(error.metric_label(), "fault-table");
        let missing = AgentError::from(FaultTable::load(&tmp.path().join("absent.yaml")).unwrap_err());
        assert_eq!(missing.metric_label(), "fault-table");
    }
}
