//! # ninelives-observability
//!
//! What an SRE gets to watch ninelives with, and the machinery that keeps it honest:
//! - [`catalogue`]: METRICS.md, parsed (the tests compare it with every registry in the code);
//! - [`dashboard`]: the Grafana dashboards of `dashboards/` and their PromQL;
//! - [`promql`]: metric names of an expression, Grafana variable substitution;
//! - [`rules`]: the alerting rules and `promtool`;
//! - [`fleet`]: real ninelives processes (etcd, node agents with simulated chips and injected
//!   faults, a training worker) under a real Prometheus, and every dashboard query evaluated
//!   against it;
//! - [`render`]: PNG snapshots of panels from those query results (`cargo run -p
//!   ninelives-observability --bin snapshot` writes `docs/dashboards/`).

use std::path::{Path, PathBuf};

pub mod catalogue;
pub mod dashboard;
pub mod fleet;
pub mod promql;
pub mod render;
pub mod rules;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Read(String, std::io::Error),
    /// METRICS.md is malformed.
    #[error("METRICS.md line {line}: {message}")]
    Catalogue {
        /// 1-based line (0: the whole file).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A dashboard is malformed.
    #[error("dashboard {0}")]
    Dashboard(String),
    /// The rules file is malformed.
    #[error("rules: {0}")]
    Rules(String),
    /// An external tool failed or is missing.
    #[error("{0}")]
    Tool(String),
    /// Drawing a panel failed.
    #[error("render: {0}")]
    Render(String),
}

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}
