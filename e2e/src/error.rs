//! The harness's one error type.

use thiserror::Error;

/// Why the harness could not start or drive the control plane.
#[derive(Debug, Error)]
pub enum Error {
    /// A tool binary is missing from the cache.
    #[error("{tool} not found at {path}; build the e2e tools with `e2e/tools/build.sh` (see e2e/README.md)")]
    MissingTool {
        /// Tool name.
        tool: &'static str,
        /// Where it was looked for.
        path: String,
    },
    /// Building the `ninelives` binary failed.
    #[error("cargo build -p ninelives failed:\n{0}")]
    Build(String),
    /// Generating certificates failed.
    #[error("certificates: {0}")]
    Certificate(#[source] rcgen::Error),
    /// etcd could not be started.
    #[error("etcd: {0}")]
    Etcd(#[from] ninelives_testkit::TestkitError),
    /// A process did not become healthy in time.
    #[error("{what} did not become ready within {seconds} s; its log:\n{log}")]
    Unhealthy {
        /// What was started.
        what: String,
        /// How long we waited.
        seconds: u64,
        /// The tail of its log.
        log: String,
    },
    /// A command exited unsuccessfully.
    #[error("`{command}` failed ({status}):\n{output}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// Its stdout and stderr.
        output: String,
    },
    /// A wait ran out of time.
    #[error("timed out after {seconds} s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The timeout.
        seconds: u64,
    },
    /// An apiserver call failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// Reading the kubeconfig failed.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// A TrainingJob manifest does not deserialise.
    #[error("TrainingJob manifest: {0}")]
    Manifest(#[source] serde_json::Error),
    /// I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Convenience alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
