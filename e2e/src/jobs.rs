//! TrainingJobs on the test bed: a small valid manifest to start from, and reads of what the
//! operator made of it (phase, pods, the leader Lease). Shared by the scenarios and by the
//! observability crate's control-plane run.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use ninelives_core::TrainingJob;
use ninelives_core::job::JobPhase;

use crate::error::{Error, Result};
use crate::{Harness, wait_for};

/// Namespace of the jobs (and of the operators' Lease).
pub const NAMESPACE: &str = "default";

/// Name of the operators' leader Lease.
pub const LEASE: &str = "ninelives-operator";

/// A valid `tiny` job on `nodes` nodes with `spares` spare pods; the stand-in worker
/// ([`crate::WorkerCommand::StandIn`]) runs `steps / 10` seconds.
pub fn job_manifest(name: &str, nodes: u32, spares: u32, steps: u64) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "ninelives.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": { "name": name, "namespace": NAMESPACE },
        "spec": {
            "model": { "preset": "tiny" },
            "topology": { "nodes": nodes, "chipsPerNode": 8, "spareNodes": spares, "chipMemory": "1Gi" },
            "data": { "datasets": ["/usr/share/common-licenses"], "globalBatchSize": 16, "microBatchSize": 4 },
            "training": { "steps": steps, "learningRate": { "peak": 0.003 } },
            "checkpoint": { "path": format!("/tmp/ninelives-e2e/{name}"), "intervalSteps": 10 },
            "failurePolicy": {
                "heartbeatTtlSeconds": 3, "maxRecoveries": 3, "minHealthyFraction": 0.5,
                "allowedTiers": ["reroute", "reshard", "restore", "replace"], "recoveryTimeoutSeconds": 60
            }
        }
    })
}

impl Harness {
    fn jobs(&self) -> Api<TrainingJob> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }

    /// Creates the TrainingJob `manifest` (see [`job_manifest`]).
    pub async fn create_job(&self, manifest: serde_json::Value) -> Result<TrainingJob> {
        let job: TrainingJob = serde_json::from_value(manifest).map_err(Error::Manifest)?;
        Ok(self.jobs().create(&PostParams::default(), &job).await?)
    }

    /// The phase the operator gave job `name`, if any.
    pub async fn job_phase(&self, name: &str) -> Option<JobPhase> {
        self.jobs().get_opt(name).await.ok().flatten()?.status?.phase
    }

    /// Waits (bounded) until job `name` is in phase `want`; the error tells the phase and the
    /// pods it is in instead.
    pub async fn wait_job_phase(&self, name: &str, want: JobPhase, timeout: Duration) -> Result<()> {
        let waited = wait_for(&format!("{name} to be {want:?}"), timeout, || async {
            (self.job_phase(name).await == Some(want)).then_some(())
        })
        .await;
        if let Err(Error::Timeout { what, seconds }) = waited {
            let what = format!(
                "{what} (phase is {:?}; pods: {:?})",
                self.job_phase(name).await,
                self.pod_phases(name).await
            );
            return Err(Error::Timeout { what, seconds });
        }
        waited
    }

    /// The worker pods of job `name`.
    pub async fn pods_of(&self, name: &str) -> Vec<Pod> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        api.list(&ListParams::default().labels(&format!("ninelives.io/job={name}")))
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }

    /// Pod name → phase, of job `name`'s pods.
    pub async fn pod_phases(&self, name: &str) -> BTreeMap<String, String> {
        self.pods_of(name)
            .await
            .iter()
            .map(|p| (p.name_any(), p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default()))
            .collect()
    }

    /// The identity holding the operators' leader Lease, if any.
    pub async fn lease_holder(&self) -> Option<String> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), NAMESPACE);
        api.get_opt(LEASE).await.ok()??.spec?.holder_identity.filter(|h| !h.is_empty())
    }
}
