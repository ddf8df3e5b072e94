//! Desired child objects of a TrainingJob, built without a client: one worker Pod per node (plus
//! spares) and a headless Service that gives every worker a stable DNS name.
//!
//! Pods are immutable in most fields, so each carries a hash of the template it was built from
//! ([`TEMPLATE_HASH_ANNOTATION`]); the controller replaces a pod only when that hash changes, and
//! never touches a pod that already matches — which is what lets a restarted or newly elected
//! operator take over without disturbing training in flight.

pub mod gang;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, Pod, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec,
    SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Service, ServicePort,
    ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use ninelives_core::TrainingJob;
use ninelives_core::job::{API_VERSION, KIND};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Label naming the job a child object belongs to.
pub const JOB_LABEL: &str = "ninelives.io/job";
/// Label with the worker's rank (spares are numbered after the training ranks).
pub const RANK_LABEL: &str = "ninelives.io/rank";
/// Label telling training workers (`worker`) from standby ones (`spare`).
pub const ROLE_LABEL: &str = "ninelives.io/role";
/// Annotation with the hash of the template a pod was built from.
pub const TEMPLATE_HASH_ANNOTATION: &str = "ninelives.io/template-hash";
/// Where a checkpoint PVC is mounted in worker pods.
pub const CHECKPOINT_MOUNT: &str = "/var/lib/ninelives/checkpoints";
/// Port the workers use among themselves (named on the headless Service).
pub const WORKER_PORT: i32 = 29500;
/// Default port of a worker's `/metrics` (the agent has 9102, the operator 8080).
pub const DEFAULT_WORKER_METRICS_PORT: u16 = 9103;
/// Where the etcd client Secret ([`WorkerTemplate::etcd_tls_secret`]) is mounted.
pub const ETCD_TLS_MOUNT: &str = "/etc/ninelives/etcd";
/// The data key of the job's transport key Secret ([`job_key_secret`]).
pub const JOB_KEY_DATA: &str = "job-key";
/// User and group worker containers run as (the image's non-root user; PSA `restricted`).
pub const WORKER_UID: i64 = 65532;
/// Kueue's queue label; copied from the job onto its pods and PodGroup.
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";

/// Name of the Secret with the job's transport key (`<job>-transport-key`, data key
/// [`JOB_KEY_DATA`]), created by the operator before the job's pods; every worker pod gets it
/// as `NINELIVES_JOB_KEY` (peers prove they hold it before any frame is accepted).
pub fn job_key_secret(job: &str) -> String {
    format!("{job}-transport-key")
}

/// The data key of the job's etcd credentials Secret ([`etcd_credentials_secret`]).
pub const ETCD_PASSWORD_DATA: &str = "password";

/// Name of the Secret with the password of the job's etcd worker user
/// (`<job>-etcd-credentials`, data key [`ETCD_PASSWORD_DATA`]), created by the operator when etcd
/// authentication is on ([`WorkerTemplate::etcd_auth`]); worker pods get it as
/// `NINELIVES_ETCD_PASSWORD`.
pub fn etcd_credentials_secret(job: &str) -> String {
    format!("{job}-etcd-credentials")
}

/// Role of a worker pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Trains: one per node of `spec.topology.nodes`.
    Worker,
    /// Standby, replaces a failed node: one per `spec.topology.spareNodes`.
    Spare,
}

impl Role {
    /// The value of [`ROLE_LABEL`].
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Spare => "spare",
        }
    }
}

/// Who handles a failed worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The recovery brain (`ninelives_core::recovery`): the pods are the members of one
    /// expert-parallel job, the brain publishes their generations through etcd and decides which
    /// rank runs on which node; spares stand by without training.
    Brain,
    /// A failed pod is replaced and counted, nothing else (workers that do not speak the
    /// rendezvous protocol, e.g. lifecycle tests with a stand-in worker).
    RestartPods,
}

/// How worker containers are started; set by operator flags, the same for every job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerTemplate {
    /// Image used when the job does not name one.
    pub image: String,
    /// Container command (entrypoint).
    pub command: Vec<String>,
    /// Container arguments; `{steps}` and `{checkpointDir}` are replaced per job.
    pub args: Vec<String>,
    /// etcd endpoints handed to the workers (`NINELIVES_ETCD_ENDPOINTS`).
    pub etcd_endpoints: Vec<String>,
    /// Prefix of the etcd keyspace (`NINELIVES_ETCD_PREFIX`), the operator's own.
    pub etcd_prefix: String,
    /// Secret, in the job's namespace, with the etcd CA (`ca.crt`) and a client certificate
    /// (`tls.crt`, `tls.key`); mounted at [`ETCD_TLS_MOUNT`] and named to the worker through
    /// `NINELIVES_ETCD_{CA,CERT,KEY}_FILE`. `None`: plain-text etcd.
    pub etcd_tls_secret: Option<String>,
    /// etcd authentication is on: members connect as their job's worker user
    /// (`NINELIVES_ETCD_USER`, `ninelives_core::access::worker_user`) with the password from
    /// the job's [`etcd_credentials_secret`] (`NINELIVES_ETCD_PASSWORD`, never in the pod spec).
    pub etcd_auth: bool,
    /// Port of the worker's `/metrics` (`NINELIVES_METRICS_ADDR`, container port `metrics`);
    /// `None` serves none (the e2e node runner, where every pod shares one host's ports).
    pub metrics_port: Option<u16>,
    /// Who handles failures.
    pub recovery: Recovery,
    /// A NetworkPolicy per job ([`desired_network_policy`]); `None` creates none.
    pub network_policy: Option<WorkerNetworkPolicy>,
    /// Scheduler names that get a PodGroup ([`crate::resources::gang`]).
    pub gang: crate::resources::gang::GangSchedulers,
    /// Command of spare pods under [`Recovery::Brain`]: they hold their node until the brain
    /// moves a rank there (a fresh worker pod is started then).
    pub standby_command: Vec<String>,
}

/// Arguments of a worker that trains the whole job alone ([`Recovery::RestartPods`]).
pub const SINGLE_PROCESS_ARGS: [&str; 7] =
    ["worker", "train", "env:NINELIVES_JOB", "--steps", "{steps}", "--checkpoint-dir", "{checkpointDir}"];

/// Arguments of an expert-parallel member ([`Recovery::Brain`]): its rank, the rendezvous etcd,
/// and the pod IP its peers reach it on.
pub const MEMBER_ARGS: [&str; 15] = [
    "worker",
    "train",
    "env:NINELIVES_JOB",
    "--steps",
    "{steps}",
    "--checkpoint-dir",
    "{checkpointDir}",
    "--rank",
    "$(NINELIVES_RANK)",
    "--etcd",
    "$(NINELIVES_ETCD_ENDPOINTS)",
    "--listen",
    "0.0.0.0:29500",
    "--advertise",
    "$(NINELIVES_POD_IP)",
];

impl WorkerTemplate {
    /// The default template for `recovery`.
    pub fn new(recovery: Recovery) -> Self {
        let args: &[&str] = match recovery {
            Recovery::Brain => &MEMBER_ARGS,
            Recovery::RestartPods => &SINGLE_PROCESS_ARGS,
        };
        Self {
            image: "ghcr.io/ninelives/ninelives:latest".into(),
            command: vec!["ninelives".into()],
            args: args.iter().map(|a| (*a).to_string()).collect(),
            etcd_endpoints: Vec::new(),
            etcd_prefix: ninelives_core::keyspace::DEFAULT_PREFIX.into(),
            etcd_tls_secret: None,
            etcd_auth: false,
            metrics_port: Some(DEFAULT_WORKER_METRICS_PORT),
            network_policy: None,
            gang: crate::resources::gang::GangSchedulers::default(),
            recovery,
            standby_command: vec!["sleep".into(), "infinity".into()],
        }
    }
}

impl Default for WorkerTemplate {
    fn default() -> Self {
        Self::new(Recovery::RestartPods)
    }
}

/// Who may reach a job's worker pods ([`desired_network_policy`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerNetworkPolicy {
    /// Namespace whose pods may scrape the workers' metrics port (`kubernetes.io/metadata.name`);
    /// `None`: no pod may (the metrics port is closed to the network).
    pub metrics_namespace: Option<String>,
}

/// The NetworkPolicy of `job`: its worker port only from the same job's pods, its metrics port
/// only from the monitoring namespace, nothing else in. Egress (etcd, peers) is left to the
/// cluster's policy.
pub fn desired_network_policy(job: &TrainingJob, template: &WorkerTemplate) -> Result<Option<NetworkPolicy>> {
    let Some(policy) = &template.network_policy else { return Ok(None) };
    let name = job.name_any();
    let same_job = LabelSelector {
        match_labels: Some(BTreeMap::from([(JOB_LABEL.to_string(), name.clone())])),
        match_expressions: None,
    };
    let port = |port: IntOrString| NetworkPolicyPort {
        port: Some(port),
        protocol: Some("TCP".into()),
        end_port: None,
    };
    let mut ingress = vec![NetworkPolicyIngressRule {
        from: Some(vec![NetworkPolicyPeer {
            pod_selector: Some(same_job.clone()),
            ..NetworkPolicyPeer::default()
        }]),
        ports: Some(vec![port(IntOrString::Int(WORKER_PORT))]),
    }];
    if let (Some(namespace), Some(metrics)) = (&policy.metrics_namespace, template.metrics_port) {
        ingress.push(NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        "kubernetes.io/metadata.name".to_string(),
                        namespace.clone(),
                    )])),
                    match_expressions: None,
                }),
                ..NetworkPolicyPeer::default()
            }]),
            ports: Some(vec![port(IntOrString::Int(i32::from(metrics)))]),
        });
    }
    Ok(Some(NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: job.namespace(),
            labels: Some(job_labels(&name)),
            owner_references: Some(vec![owner_reference(job)?]),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(same_job),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            egress: None,
        }),
    }))
}

/// Where the recovery brain wants each training rank, from its record in etcd: rank → node.
/// Ranks the brain dropped are absent.
pub type Assignment = BTreeMap<u32, String>;

/// Name of the worker pod of `rank` (also its hostname).
pub fn pod_name(job: &str, rank: u32) -> String {
    format!("{job}-{rank}")
}

/// Labels every child object of `job` carries.
pub fn job_labels(job: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "ninelives-worker".to_string()),
        ("app.kubernetes.io/managed-by".to_string(), "ninelives-operator".to_string()),
        (JOB_LABEL.to_string(), job.to_string()),
    ])
}

/// Label selector (`key=value`) matching every child of `job`.
pub fn job_selector(job: &str) -> String {
    format!("{JOB_LABEL}={job}")
}

/// The controller owner reference every child of `job` carries.
pub fn owner_reference(job: &TrainingJob) -> Result<OwnerReference> {
    Ok(OwnerReference {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        name: job.name_any(),
        uid: job.uid().ok_or(Error::MissingField("metadata.uid"))?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// The headless Service named after the job; pods get `<pod>.<job>.<namespace>.svc` names.
pub fn desired_service(job: &TrainingJob) -> Result<Service> {
    let name = job.name_any();
    Ok(Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: job.namespace(),
            labels: Some(job_labels(&name)),
            owner_references: Some(vec![owner_reference(job)?]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(job_labels(&name)),
            // Workers rendezvous before they are Ready; DNS must resolve them from the start.
            publish_not_ready_addresses: Some(true),
            ports: Some(vec![ServicePort {
                name: Some("worker".into()),
                port: WORKER_PORT,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// The job as the workers read it from `NINELIVES_JOB`: identity and spec, no status. `suspend`
/// is always false in a running pod, so it is left at false here: suspending and resuming must
/// not change the pod template.
fn job_document(job: &TrainingJob) -> Result<String> {
    let mut spec = job.spec.clone();
    spec.suspend = false;
    let doc = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": { "name": job.name_any(), "namespace": job.namespace() },
        "spec": spec,
    });
    Ok(serde_json::to_string(&doc)?)
}

fn checkpoint_dir(job: &TrainingJob) -> String {
    match (&job.spec.checkpoint.path, &job.spec.checkpoint.pvc) {
        (Some(path), _) => path.clone(),
        (None, Some(_)) => CHECKPOINT_MOUNT.into(),
        (None, None) => String::new(),
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), value_from: None }
}

fn env_field(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: field_path.into(), api_version: None }),
            ..EnvVarSource::default()
        }),
    }
}

/// A variable read from `secret`'s `key` (the value never appears in the pod spec).
fn env_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// Every worker pod `job` should have, training ranks first, then spares.
pub fn desired_pods(job: &TrainingJob, template: &WorkerTemplate) -> Result<Vec<Pod>> {
    let topology = &job.spec.topology;
    let training = (0..topology.nodes).map(|rank| (rank, Role::Worker));
    let spares = (0..topology.spare_nodes).map(|i| (topology.nodes.saturating_add(i), Role::Spare));
    training.chain(spares).map(|(rank, role)| worker_pod(job, template, rank, role)).collect()
}

/// The worker pods of the ranks the recovery brain assigned, each pinned to its node. The pin
/// is not part of the template hash: a pod already running where the brain put it (the
/// scheduler chose the first nodes) is left alone, and only a rank the brain moved is
/// recreated. Spares are not desired any more once the brain assigned nodes: the brain's
/// record lists which of the existing ones are still standing by.
pub fn assigned_pods(
    job: &TrainingJob,
    template: &WorkerTemplate,
    assignment: &Assignment,
) -> Result<Vec<Pod>> {
    assignment
        .iter()
        .map(|(&rank, node)| {
            let mut pod = worker_pod(job, template, rank, Role::Worker)?;
            if let Some(spec) = pod.spec.as_mut() {
                spec.node_selector
                    .get_or_insert_with(BTreeMap::new)
                    .insert(HOSTNAME_LABEL.to_string(), node.clone());
            }
            Ok(pod)
        })
        .collect()
}

/// The well-known node label pods are pinned by.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

fn worker_pod(job: &TrainingJob, template: &WorkerTemplate, rank: u32, role: Role) -> Result<Pod> {
    let name = job.name_any();
    let spec = &job.spec;
    let checkpoint = checkpoint_dir(job);
    let steps = spec.training.steps.to_string();
    let args = template
        .args
        .iter()
        .map(|a| a.replace("{steps}", &steps).replace("{checkpointDir}", &checkpoint))
        .collect();

    let mut labels = job_labels(&name);
    labels.insert(RANK_LABEL.into(), rank.to_string());
    labels.insert(ROLE_LABEL.into(), role.as_str().into());
    if let Some(queue) = job.labels().get(KUEUE_QUEUE_LABEL) {
        labels.insert(KUEUE_QUEUE_LABEL.into(), queue.clone());
    }
    let mut annotations = BTreeMap::new();
    match crate::resources::gang::scheduler(job, template) {
        Some(crate::resources::gang::Gang::Volcano) => {
            annotations.insert(crate::resources::gang::VOLCANO_GROUP_ANNOTATION.to_string(), name.clone());
        }
        Some(crate::resources::gang::Gang::Coscheduling) => {
            labels.insert(crate::resources::gang::COSCHEDULING_GROUP_LABEL.to_string(), name.clone());
        }
        None => {}
    }

    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    if let Some(pvc) = &spec.checkpoint.pvc {
        volumes.push(Volume {
            name: "checkpoints".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc.claim_name.clone(),
                read_only: None,
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "checkpoints".into(),
            mount_path: CHECKPOINT_MOUNT.into(),
            sub_path: pvc.sub_path.clone(),
            ..VolumeMount::default()
        });
    }
    let mut env_vars = vec![
        env("NINELIVES_JOB", job_document(job)?),
        env("NINELIVES_RANK", rank.to_string()),
        env("NINELIVES_WORLD_SIZE", spec.topology.nodes.to_string()),
        env("NINELIVES_ROLE", role.as_str()),
        env("NINELIVES_ETCD_ENDPOINTS", template.etcd_endpoints.join(",")),
        env("NINELIVES_ETCD_PREFIX", template.etcd_prefix.clone()),
        env_field("NINELIVES_NODE", "spec.nodeName"),
        env_field("NINELIVES_POD", "metadata.name"),
        env_field("NINELIVES_NAMESPACE", "metadata.namespace"),
        env_field("NINELIVES_POD_IP", "status.podIP"),
    ];
    if let Some(secret) = &template.etcd_tls_secret {
        volumes.push(secret_volume("etcd-tls", secret, false));
        mounts.push(read_only_mount("etcd-tls", ETCD_TLS_MOUNT));
        env_vars.push(env("NINELIVES_ETCD_CA_FILE", format!("{ETCD_TLS_MOUNT}/ca.crt")));
        env_vars.push(env("NINELIVES_ETCD_CERT_FILE", format!("{ETCD_TLS_MOUNT}/tls.crt")));
        env_vars.push(env("NINELIVES_ETCD_KEY_FILE", format!("{ETCD_TLS_MOUNT}/tls.key")));
    }
    env_vars.push(env_secret("NINELIVES_JOB_KEY", &job_key_secret(&name), JOB_KEY_DATA));
    // Only members speak to etcd (a single-process worker has no --rank, which --etcd-user needs).
    if template.etcd_auth && template.recovery == Recovery::Brain {
        let namespace = job.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
        env_vars.push(env("NINELIVES_ETCD_USER", ninelives_core::access::worker_user(&namespace, &name)));
        env_vars.push(env_secret(
            "NINELIVES_ETCD_PASSWORD",
            &etcd_credentials_secret(&name),
            ETCD_PASSWORD_DATA,
        ));
    }
    let mut ports = vec![ContainerPort {
        name: Some("worker".into()),
        container_port: WORKER_PORT,
        ..ContainerPort::default()
    }];
    if let Some(port) = template.metrics_port {
        env_vars.push(env("NINELIVES_METRICS_ADDR", format!("0.0.0.0:{port}")));
        ports.push(ContainerPort {
            name: Some("metrics".into()),
            container_port: i32::from(port),
            ..ContainerPort::default()
        });
    }

    let standby = role == Role::Spare && template.recovery == Recovery::Brain;
    let container = Container {
        name: "worker".into(),
        image: Some(spec.pod.image.clone().unwrap_or_else(|| template.image.clone())),
        command: Some(if standby { template.standby_command.clone() } else { template.command.clone() }),
        args: Some(if standby { Vec::new() } else { args }),
        env: Some(env_vars),
        ports: Some(ports),
        resources: spec.pod.resources.clone(),
        volume_mounts: Some(mounts),
        // Pod Security Standards, `restricted` level.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
            run_as_non_root: Some(true),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };

    let pod_spec = PodSpec {
        hostname: Some(pod_name(&name, rank)),
        subdomain: Some(name.clone()),
        // The operator decides what a failed worker means for the job; the kubelet must not
        // restart it behind the operator's back.
        restart_policy: Some("Never".into()),
        containers: vec![container],
        volumes: Some(volumes),
        // Workers never talk to the apiserver.
        automount_service_account_token: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(WORKER_UID),
            run_as_group: Some(WORKER_UID),
            // Checkpoint volumes become writable by the worker's group.
            fs_group: Some(WORKER_UID),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
            ..PodSecurityContext::default()
        }),
        node_selector: (!spec.pod.node_selector.is_empty()).then(|| spec.pod.node_selector.clone()),
        tolerations: (!spec.pod.tolerations.is_empty()).then(|| spec.pod.tolerations.clone()),
        scheduler_name: spec.pod.scheduler_name.clone(),
        priority_class_name: spec.pod.priority_class_name.clone(),
        affinity: Some(Affinity {
            // One worker per node: a node failure must cost the job one rank, never two.
            pod_anti_affinity: Some(PodAntiAffinity {
                required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                    label_selector: Some(LabelSelector {
                        match_labels: Some(BTreeMap::from([(JOB_LABEL.to_string(), name.clone())])),
                        match_expressions: None,
                    }),
                    topology_key: HOSTNAME_LABEL.into(),
                    ..PodAffinityTerm::default()
                }]),
                preferred_during_scheduling_ignored_during_execution: None,
            }),
            ..Affinity::default()
        }),
        ..PodSpec::default()
    };

    let hash = template_hash(&pod_spec)?;
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&name, rank)),
            namespace: job.namespace(),
            labels: Some(labels),
            annotations: Some({
                annotations.insert(TEMPLATE_HASH_ANNOTATION.to_string(), hash);
                annotations
            }),
            owner_references: Some(vec![owner_reference(job)?]),
            ..ObjectMeta::default()
        },
        spec: Some(pod_spec),
        status: None,
    })
}

fn secret_volume(name: &str, secret: &str, optional: bool) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            optional: optional.then_some(true),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn read_only_mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// Hash of a pod spec; the job spec (minus `suspend`, which never reaches a running pod) is
/// inside it through `NINELIVES_JOB`.
fn template_hash(spec: &PodSpec) -> Result<String> {
    let bytes = serde_json::to_vec(spec)?;
    let digest = Sha256::digest(&bytes);
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// The template hash a pod was built from, if it carries one.
pub fn pod_template_hash(pod: &Pod) -> Option<&str> {
    pod.metadata.annotations.as_ref()?.get(TEMPLATE_HASH_ANNOTATION).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::job;

    #[test]
    fn one_pod_per_node_plus_spares_with_stable_names_and_hostnames() {
        let job = job("tiny").nodes(3).spares(1).build();
        let pods = desired_pods(&job, &WorkerTemplate::default()).unwrap();
        let names: Vec<_> = pods.iter().map(|p| p.name_any()).collect();
        assert_eq!(names, ["tiny-0", "tiny-1", "tiny-2", "tiny-3"]);
        let spec = pods[3].spec.as_ref().unwrap();
        assert_eq!(spec.hostname.as_deref(), Some("tiny-3"));
        assert_eq!(spec.subdomain.as_deref(), Some("tiny"), "subdomain is the headless service");
        assert_eq!(pods[3].labels()[ROLE_LABEL], "spare");
        assert_eq!(pods[0].labels()[ROLE_LABEL], "worker");
        let owner = &pods[0].metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("TrainingJob", Some(true)));
        assert_eq!(owner.uid, "uid-tiny");
    }

    #[test]
    fn copies_scheduling_settings_and_keeps_one_worker_per_node() {
        let job = job("tiny").scheduling().build();
        let pod = &desired_pods(&job, &WorkerTemplate::default()).unwrap()[0];
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.scheduler_name.as_deref(), Some("volcano"));
        assert_eq!(spec.priority_class_name.as_deref(), Some("training"));
        assert_eq!(spec.node_selector.as_ref().unwrap()["pool"], "accel");
        assert_eq!(spec.tolerations.as_ref().unwrap()[0].key.as_deref(), Some("ninelives.io/chip"));
        let limits = spec.containers[0].resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits["cpu"].0, "2");
        assert_eq!(spec.containers[0].image.as_deref(), Some("registry.example/worker:1"));
        let term = &spec
            .affinity
            .as_ref()
            .unwrap()
            .pod_anti_affinity
            .as_ref()
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()[0];
        assert_eq!(term.topology_key, "kubernetes.io/hostname");
        assert_eq!(term.label_selector.as_ref().unwrap().match_labels.as_ref().unwrap()[JOB_LABEL], "tiny");
    }

    #[test]
    fn worker_reads_the_job_and_its_identity_from_the_environment() {
        let job = job("tiny").build();
        let template =
            WorkerTemplate { etcd_endpoints: vec!["http://e:2379".into()], ..WorkerTemplate::default() };
        let pod = &desired_pods(&job, &template).unwrap()[1];
        let container = &pod.spec.as_ref().unwrap().containers[0];
        assert_eq!(
            container.args.as_ref().unwrap(),
            &["worker", "train", "env:NINELIVES_JOB", "--steps", "20", "--checkpoint-dir", "/tmp/ckpt"]
        );
        let env: BTreeMap<_, _> =
            container.env.as_ref().unwrap().iter().map(|e| (e.name.as_str(), e)).collect();
        assert_eq!(env["NINELIVES_RANK"].value.as_deref(), Some("1"));
        assert_eq!(env["NINELIVES_ETCD_ENDPOINTS"].value.as_deref(), Some("http://e:2379"));
        let node = env["NINELIVES_NODE"].value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
        assert_eq!(node.field_path, "spec.nodeName");
        let doc = env["NINELIVES_JOB"].value.as_deref().unwrap();
        let parsed = ninelives_core::manifest::parse_job(doc).expect("workers can parse NINELIVES_JOB");
        assert_eq!(parsed.spec, job.spec);
    }

    #[test]
    fn brain_mode_runs_members_pins_moved_ranks_and_keeps_spares_idle() {
        let job = job("tiny").nodes(2).spares(1).build();
        let template = WorkerTemplate::new(Recovery::Brain);
        let pods = desired_pods(&job, &template).unwrap();
        let args = pods[0].spec.as_ref().unwrap().containers[0].args.clone().unwrap();
        assert!(args.windows(2).any(|w| w == ["--rank", "$(NINELIVES_RANK)"]), "{args:?}");
        let spare = &pods[2].spec.as_ref().unwrap().containers[0];
        assert_eq!(spare.command.as_deref(), Some(&["sleep".to_string(), "infinity".to_string()][..]));
        let assignment = Assignment::from([(0, "node-a".to_string()), (1, "node-s".to_string())]);
        let pinned = assigned_pods(&job, &template, &assignment).unwrap();
        assert_eq!(pinned.len(), 2, "no spares once the brain assigned nodes");
        let selector = pinned[1].spec.as_ref().unwrap().node_selector.clone().unwrap();
        assert_eq!(selector[HOSTNAME_LABEL], "node-s");
        assert_eq!(pod_template_hash(&pinned[1]), pod_template_hash(&pods[1]), "the pin is not in the hash");
    }

    #[test]
    fn pvc_checkpoints_are_mounted() {
        let job = job("tiny").pvc("ckpt").build();
        let pod = &desired_pods(&job, &WorkerTemplate::default()).unwrap()[0];
        let spec = pod.spec.as_ref().unwrap();
        let volume = &spec.volumes.as_ref().unwrap()[0];
        assert_eq!(volume.persistent_volume_claim.as_ref().unwrap().claim_name, "ckpt");
        let args = spec.containers[0].args.as_ref().unwrap();
        assert_eq!(args.last().map(String::as_str), Some(CHECKPOINT_MOUNT));
    }

    #[test]
    fn template_hash_changes_with_the_spec_but_not_with_suspend() {
        let template = WorkerTemplate::default();
        let hash = |job: &TrainingJob| {
            pod_template_hash(&desired_pods(job, &template).unwrap()[0]).unwrap().to_string()
        };
        let base = job("tiny").build();
        let mut more_steps = base.clone();
        more_steps.spec.training.steps += 1;
        assert_ne!(hash(&base), hash(&more_steps));
        let mut suspended = base.clone();
        suspended.spec.suspend = true;
        assert_eq!(hash(&base), hash(&suspended), "resuming must not roll the pods");
    }

    #[test]
    fn workers_run_restricted_without_a_token_and_declare_their_ports() {
        let job = job("tiny").build();
        let pod = &desired_pods(&job, &WorkerTemplate::default()).unwrap()[0];
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        let pod_sc = spec.security_context.as_ref().unwrap();
        assert_eq!(pod_sc.run_as_non_root, Some(true));
        assert_eq!(pod_sc.run_as_user, Some(WORKER_UID));
        assert_eq!(pod_sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        let container = &spec.containers[0];
        let sc = container.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
        let ports: Vec<_> = container
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref().unwrap(), p.container_port))
            .collect();
        assert_eq!(ports, [("worker", WORKER_PORT), ("metrics", 9103)]);
        let env: BTreeMap<_, _> =
            container.env.iter().flatten().map(|e| (e.name.as_str(), e.value.as_deref())).collect();
        assert_eq!(env["NINELIVES_METRICS_ADDR"], Some("0.0.0.0:9103"));
        assert_eq!(env["NINELIVES_ETCD_PREFIX"], Some("/ninelives/"));
        assert!(!env.contains_key("NINELIVES_ETCD_CA_FILE"), "no TLS unless configured");
        let quiet = WorkerTemplate { metrics_port: None, ..WorkerTemplate::default() };
        let pod = &desired_pods(&job, &quiet).unwrap()[0];
        let container = &pod.spec.as_ref().unwrap().containers[0];
        assert_eq!(container.ports.as_ref().unwrap().len(), 1);
        assert!(!container.env.iter().flatten().any(|e| e.name == "NINELIVES_METRICS_ADDR"));
    }

    #[test]
    fn etcd_tls_secret_and_prefix_reach_the_worker_and_the_job_key_comes_from_its_secret() {
        let job = job("tiny").build();
        let template = WorkerTemplate {
            etcd_prefix: "/team-a/".into(),
            etcd_tls_secret: Some("etcd-client".into()),
            ..WorkerTemplate::default()
        };
        let pod = &desired_pods(&job, &template).unwrap()[0];
        let spec = pod.spec.as_ref().unwrap();
        let volumes: BTreeMap<_, _> = spec.volumes.iter().flatten().map(|v| (v.name.as_str(), v)).collect();
        let etcd = volumes["etcd-tls"].secret.as_ref().unwrap();
        assert_eq!((etcd.secret_name.as_deref(), etcd.optional), (Some("etcd-client"), None));
        let container = &spec.containers[0];
        let mounts: BTreeMap<_, _> = container
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), (m.mount_path.as_str(), m.read_only)))
            .collect();
        assert_eq!(mounts["etcd-tls"], (ETCD_TLS_MOUNT, Some(true)));
        let key = container.env.iter().flatten().find(|e| e.name == "NINELIVES_JOB_KEY").unwrap();
        let selector = key.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((selector.name.as_str(), selector.key.as_str()), ("tiny-transport-key", JOB_KEY_DATA));
        assert_eq!(key.value, None, "the key never appears in the pod spec");
        let env: BTreeMap<_, _> =
            container.env.iter().flatten().map(|e| (e.name.as_str(), e.value.as_deref())).collect();
        assert_eq!(env["NINELIVES_ETCD_PREFIX"], Some("/team-a/"));
        assert_eq!(env["NINELIVES_ETCD_CA_FILE"], Some("/etc/ninelives/etcd/ca.crt"));
        assert_eq!(env["NINELIVES_ETCD_CERT_FILE"], Some("/etc/ninelives/etcd/tls.crt"));
        assert_eq!(env["NINELIVES_ETCD_KEY_FILE"], Some("/etc/ninelives/etcd/tls.key"));
    }

    #[test]
    fn with_etcd_auth_members_connect_as_their_jobs_user_with_the_password_from_its_secret() {
        let job = job("tiny").spares(1).build();
        let env_of = |pod: &Pod| -> BTreeMap<String, EnvVar> {
            let container = &pod.spec.as_ref().unwrap().containers[0];
            container.env.iter().flatten().map(|e| (e.name.clone(), e.clone())).collect()
        };
        let template = WorkerTemplate { etcd_auth: true, ..WorkerTemplate::new(Recovery::Brain) };
        let pods = desired_pods(&job, &template).unwrap();
        for pod in &pods {
            let env = env_of(pod);
            assert_eq!(env["NINELIVES_ETCD_USER"].value.as_deref(), Some("ninelives-worker:default:tiny"));
            let password = &env["NINELIVES_ETCD_PASSWORD"];
            assert_eq!(password.value, None, "the password never appears in the pod spec");
            let selector = password.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
            assert_eq!(
                (selector.name.as_str(), selector.key.as_str(), selector.optional),
                ("tiny-etcd-credentials", ETCD_PASSWORD_DATA, Some(false))
            );
        }
        // Off by default, and never for single-process workers (they have no --rank).
        let off = desired_pods(&job, &WorkerTemplate::new(Recovery::Brain)).unwrap();
        let single = WorkerTemplate { etcd_auth: true, ..WorkerTemplate::new(Recovery::RestartPods) };
        for pod in off.iter().chain(&desired_pods(&job, &single).unwrap()) {
            let env = env_of(pod);
            assert!(!env.contains_key("NINELIVES_ETCD_USER") && !env.contains_key("NINELIVES_ETCD_PASSWORD"));
        }
        assert_ne!(pod_template_hash(&pods[0]), pod_template_hash(&off[0]), "turning auth on rolls the pods");
    }

    #[test]
    fn network_policy_admits_the_job_to_its_worker_port_and_monitoring_to_metrics() {
        let job = job("tiny").build();
        assert!(desired_network_policy(&job, &WorkerTemplate::default()).unwrap().is_none(), "opt-in");
        let template = WorkerTemplate {
            network_policy: Some(WorkerNetworkPolicy { metrics_namespace: Some("monitoring".into()) }),
            ..WorkerTemplate::default()
        };
        let policy = desired_network_policy(&job, &template).unwrap().unwrap();
        let spec = policy.spec.unwrap();
        assert_eq!(spec.pod_selector.unwrap().match_labels.unwrap()[JOB_LABEL], "tiny");
        assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_string()][..]));
        let rules = spec.ingress.unwrap();
        assert_eq!(rules.len(), 2);
        let peer = &rules[0].from.as_ref().unwrap()[0];
        assert_eq!(peer.pod_selector.as_ref().unwrap().match_labels.as_ref().unwrap()[JOB_LABEL], "tiny");
        assert!(peer.namespace_selector.is_none(), "same namespace only");
        assert_eq!(rules[0].ports.as_ref().unwrap()[0].port, Some(IntOrString::Int(WORKER_PORT)));
        let monitoring = rules[1].from.as_ref().unwrap()[0].namespace_selector.as_ref().unwrap();
        assert_eq!(monitoring.match_labels.as_ref().unwrap()["kubernetes.io/metadata.name"], "monitoring");
        assert_eq!(rules[1].ports.as_ref().unwrap()[0].port, Some(IntOrString::Int(9103)));
        let closed = WorkerTemplate { network_policy: Some(WorkerNetworkPolicy::default()), ..template };
        let rules = desired_network_policy(&job, &closed).unwrap().unwrap().spec.unwrap().ingress.unwrap();
        assert_eq!(rules.len(), 1, "no monitoring namespace: metrics closed");
    }

    #[test]
    fn headless_service_selects_the_job() {
        let job = job("tiny").build();
        let svc = desired_service(&job).unwrap();
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.selector.unwrap()[JOB_LABEL], "tiny");
    }
}
