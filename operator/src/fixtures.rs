//! Test objects built fluently: `job("tiny").nodes(3).spares(1).build()`.

use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated, ContainerStatus, Pod, PodStatus};
use ninelives_core::{TrainingJob, TrainingJobStatus};

use crate::resources::{WorkerTemplate, desired_pods};

/// Builder of a valid two-node TrainingJob.
pub struct JobBuilder {
    value: serde_json::Value,
    status: Option<TrainingJobStatus>,
}

/// Starts a job named `name` in namespace `default`.
pub fn job(name: &str) -> JobBuilder {
    let value = serde_json::json!({
        "apiVersion": "ninelives.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{name}"), "generation": 1 },
        "spec": {
            "model": { "preset": "tiny" },
            "topology": { "nodes": 2, "chipsPerNode": 8, "chipMemory": "1Gi" },
            "data": { "datasets": ["/usr/share/common-licenses"], "globalBatchSize": 16, "microBatchSize": 4 },
            "training": { "steps": 20, "learningRate": { "peak": 0.003 } },
            "checkpoint": { "path": "/tmp/ckpt", "intervalSteps": 10 },
            "failurePolicy": {
                "heartbeatTtlSeconds": 3, "maxRecoveries": 2, "minHealthyFraction": 0.5,
                "allowedTiers": ["reroute", "reshard", "restore", "replace"], "recoveryTimeoutSeconds": 60
            }
        }
    });
    JobBuilder { value, status: None }
}

impl JobBuilder {
    /// Training nodes.
    pub fn nodes(mut self, nodes: u32) -> Self {
        self.value["spec"]["topology"]["nodes"] = nodes.into();
        self
    }

    /// Spare nodes.
    pub fn spares(mut self, spares: u32) -> Self {
        self.value["spec"]["topology"]["spareNodes"] = spares.into();
        self
    }

    /// `spec.suspend = true`.
    pub fn suspended(mut self) -> Self {
        self.value["spec"]["suspend"] = true.into();
        self
    }

    /// Checkpoints on a PVC instead of a path.
    pub fn pvc(mut self, claim: &str) -> Self {
        let checkpoint = &mut self.value["spec"]["checkpoint"];
        checkpoint["path"] = serde_json::Value::Null;
        checkpoint["pvc"] = serde_json::json!({ "claimName": claim });
        self
    }

    /// Scheduler, priority, node selector, tolerations, resources and image.
    pub fn scheduling(mut self) -> Self {
        self.value["spec"]["pod"] = serde_json::json!({
            "image": "registry.example/worker:1",
            "schedulerName": "volcano",
            "priorityClassName": "training",
            "nodeSelector": { "pool": "accel" },
            "tolerations": [{ "key": "ninelives.io/chip", "operator": "Exists", "effect": "NoSchedule" }],
            "resources": { "limits": { "cpu": "2" } }
        });
        self
    }

    /// A spec the core validator rejects (hidden size not divisible by heads).
    pub fn invalid(mut self) -> Self {
        self.value["spec"]["model"] = serde_json::json!({ "preset": "tiny", "heads": 7 });
        self
    }

    /// Existing status.
    pub fn status(mut self, status: TrainingJobStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// The job.
    pub fn build(self) -> TrainingJob {
        let mut job: TrainingJob =
            serde_json::from_value(self.value).expect("fixture is a valid TrainingJob");
        job.status = self.status;
        job
    }
}

/// Worker pods of `job` as the apiserver would return them, every one in `phase`.
pub fn pods_in_phase(job: &TrainingJob, phase: &str) -> Vec<Pod> {
    desired_pods(job, &WorkerTemplate::default())
        .expect("fixture pods")
        .into_iter()
        .map(|pod| with_phase(pod, phase))
        .collect()
}

/// `pod` with `status.phase` set (and a terminated container state for finished phases).
pub fn with_phase(mut pod: Pod, phase: &str) -> Pod {
    let exit_code = match phase {
        "Succeeded" => Some(0),
        "Failed" => Some(1),
        _ => None,
    };
    pod.status = Some(PodStatus {
        phase: Some(phase.into()),
        container_statuses: exit_code.map(|code| {
            vec![ContainerStatus {
                name: "worker".into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated { exit_code: code, ..Default::default() }),
                    ..Default::default()
                }),
                ..Default::default()
            }]
        }),
        ..PodStatus::default()
    });
    pod
}
