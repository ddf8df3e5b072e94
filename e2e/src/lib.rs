//! # ninelives-e2e
//!
//! The end-to-end test bed: a real etcd and kube-apiserver on loopback ([`cluster`]), a test-only
//! node runner that schedules Pods onto fake Nodes and runs them as local processes ([`nodes`]),
//! the operator as a separate `ninelives operator` process ([`operator`]), and TrainingJobs to
//! create and watch ([`jobs`]), and for jobs of the recovery brain, node agents on simulated chips
//! and the members' progress and results ([`members`]).
//!
//! The control-plane binaries are built from the Kubernetes and Helm Go modules by
//! `e2e/tools/build.sh` into `.e2e-cache/bin`. `cargo test -p ninelives-e2e` runs every scenario;
//! `cargo run -p ninelives-e2e -- up` starts the same control plane to explore by hand.

use std::future::Future;
use std::time::{Duration, Instant};

pub mod certs;
pub mod cluster;
pub mod error;
pub mod jobs;
pub mod members;
pub mod nodes;
pub mod operator;
pub mod tools;

pub use cluster::ControlPlane;
pub use error::{Error, Result};
pub use nodes::NodeRunner;
pub use operator::{OperatorProcess, WorkerCommand};

/// A control plane with fake nodes running pods; operators are started by the caller.
pub struct Harness {
    /// The node runner (dropped first: it kills pod processes).
    pub nodes: NodeRunner,
    /// etcd + kube-apiserver.
    pub plane: ControlPlane,
    /// Admin client.
    pub client: kube::Client,
    /// How the operators started by [`Harness::operator`] run workers.
    pub worker: WorkerCommand,
}

impl Harness {
    /// Starts the control plane and `node_count` fake nodes named `node-0`, `node-1`, ...
    pub async fn start(node_count: usize) -> Result<Self> {
        let ninelives = tools::ninelives()?;
        // The lifecycle scenarios time pods by the stand-in; until expert-parallel training
        // (issue 7) runs one model across the pods, N real workers would each train the whole
        // model on 2 cores. NINELIVES_E2E_WORKER=real opts into the real worker.
        let worker = if std::env::var("NINELIVES_E2E_WORKER").is_ok_and(|w| w == "real") {
            WorkerCommand::detect(&ninelives)
        } else {
            WorkerCommand::StandIn
        };
        let plane = tokio::task::spawn_blocking(ControlPlane::start)
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        let client = plane.client().await?;
        let names: Vec<String> = (0..node_count).map(|i| format!("node-{i}")).collect();
        let bin_dir = ninelives.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
        let nodes = NodeRunner::start(client.clone(), &names, &bin_dir, &plane.dir().join("pods")).await?;
        Ok(Self { nodes, plane, client, worker })
    }

    /// Starts an operator replica named `identity` with a `lease_seconds` leader Lease.
    pub fn operator(&self, identity: &str, lease_seconds: u64) -> Result<OperatorProcess> {
        OperatorProcess::start(&self.plane, identity, &self.worker, lease_seconds)
    }
}

/// Polls `check` every 200 ms until it returns `Some`, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if start.elapsed() > timeout {
            return Err(Error::Timeout { what: what.into(), seconds: timeout.as_secs() });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
