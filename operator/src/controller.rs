//! The kube-runtime controller: I/O around [`crate::lifecycle::plan`].
//!
//! Pipeline per reconcile: validate (no client) → build desired pods and service (no client) →
//! list what exists → plan (no client) → apply service and pods → delete orphans and replaced
//! pods → write status (only when changed) → record Events. `finalizer()` is the one top-level
//! action, so deletion runs the cleanup (pods, service, etcd keys) before the job disappears.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::jiff::Timestamp;
use kube::api::DynamicObject;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use ninelives_core::TrainingJob;
use ninelives_core::validate::{validate_name, validate_spec};
use ninelives_telemetry::recovery::RecoveryMetrics;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{info, warn};

use crate::admission::{Admission, ClaimLookup, checkpoint_violation, needs_claim};
use crate::backoff::ObjectBackoff;
use crate::driver::{DriverEnv, Drivers, read_view};
use crate::error::{Error, Result};
use crate::etcd::{EtcdConfig, SharedEtcd};
use crate::leader::Leadership;
use crate::lifecycle::{JobEvent, Plan, Severity, plan_with};
use crate::metrics::Metrics;
use crate::resources::{
    Assignment, Recovery, WorkerTemplate, assigned_pods, desired_network_policy, desired_pods,
    desired_service, job_selector,
};

/// Finalizer that keeps a deleted job until its pods, service and etcd keys are gone.
pub const FINALIZER: &str = "ninelives.io/cleanup";
/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "ninelives-operator";
/// Periodic resync of a healthy job (pod events trigger reconciles in between).
const RESYNC: Duration = Duration::from_secs(300);
/// Re-check of a job refused for its checkpoint claim: creating or changing a PVC does not
/// trigger a reconcile of the job.
const CLAIM_RECHECK: Duration = Duration::from_secs(30);

/// Shared state of the reconcilers.
pub struct Context {
    /// Apiserver client.
    pub client: Client,
    /// How worker pods are started.
    pub template: WorkerTemplate,
    /// What the operator refuses beyond the core validator.
    pub admission: Admission,
    /// The coordination etcd (one client for the drivers and the reconciles' brain reads).
    pub etcd: Arc<SharedEtcd>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Per-object backoff of transient errors.
    pub backoff: ObjectBackoff,
    /// Event recorder.
    pub recorder: Recorder,
    /// The recovery brain's driver tasks ([`Recovery::Brain`]).
    pub drivers: Drivers,
    /// The jobs' etcd users this term has set up (`--etcd-auth`).
    pub identities: crate::etcd_auth::Identities,
    triggered: Mutex<Option<UnboundedReceiver<ObjectRef<TrainingJob>>>>,
}

impl Context {
    /// A context; `instance` names this replica in Events; `leadership` is its term (drivers run
    /// only within it).
    #[allow(clippy::too_many_arguments)] // the clients, the flags' parts, the metrics and the term
    pub fn new(
        client: Client,
        template: WorkerTemplate,
        admission: Admission,
        etcd: EtcdConfig,
        metrics: Arc<Metrics>,
        recovery: RecoveryMetrics,
        instance: &str,
        leadership: Leadership,
    ) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(instance.into()) };
        let (trigger, triggered) = tokio::sync::mpsc::unbounded_channel();
        let recorder = Recorder::new(client.clone(), reporter);
        let etcd = Arc::new(SharedEtcd::new(etcd));
        let drivers = Drivers::new(DriverEnv {
            client: client.clone(),
            etcd: etcd.clone(),
            recorder: recorder.clone(),
            metrics: metrics.clone(),
            recovery,
            trigger,
            control_plane: Mutex::default(),
            leadership,
        });
        Self {
            drivers,
            identities: crate::etcd_auth::Identities::default(),
            triggered: Mutex::new(Some(triggered)),
            recorder,
            client,
            template,
            admission,
            etcd,
            metrics,
            backoff: ObjectBackoff::new(Duration::from_secs(1), Duration::from_secs(60)),
        }
    }
}

fn key(job: &TrainingJob) -> String {
    format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any())
}

/// Runs the controller until `shutdown` completes (then finishes reconciles in flight).
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let jobs: Api<TrainingJob> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client);
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=ninelives-operator");
    let triggered = ctx.triggered.lock().ok().and_then(|mut t| t.take());
    let triggers = futures::stream::unfold(triggered, |rx| async move {
        let mut rx = rx?;
        let next = rx.recv().await?;
        Some((next, Some(rx)))
    });
    Controller::new(jobs, watcher::Config::default().any_semantic())
        .owns(pods, owned)
        .reconcile_on(triggers)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "reconcile stream");
            }
        })
        .await;
}

async fn reconcile(job: Arc<TrainingJob>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    let namespace = job.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<TrainingJob> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = key(&job);
    let inner = ctx.clone();
    let action = finalizer(&api, FINALIZER, job, |event| async move {
        match event {
            FinalizerEvent::Apply(job) => apply(&job, &inner).await,
            FinalizerEvent::Cleanup(job) => {
                inner.drivers.stop(&self::key(&job));
                cleanup(&job, &inner).await
            }
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })?;
    ctx.backoff.reset(&key);
    Ok(action)
}

fn error_policy(job: Arc<TrainingJob>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff.next_delay(&key(&job));
    ctx.metrics.reconcile_failed(error.label());
    warn!(job = %key(&job), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The validators' verdict: `Some(message)` when the job cannot run as specified (the core
/// validator, the operator's allow-list, and whether its members can share its checkpoints).
async fn invalid_message(job: &TrainingJob, ctx: &Context, namespace: &str) -> Result<Option<String>> {
    let mut violations: Vec<String> =
        validate_name(&job.name_any()).into_iter().map(|v| v.to_string()).collect();
    violations.extend(validate_spec(&job.spec).iter().map(ToString::to_string));
    violations.extend(ctx.admission.allow_list.violations(job));
    let claim = match needs_claim(job) {
        Some(name) => {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
            claims
                .get_opt(name)
                .await
                .map_err(|source| Error::Read { what: "persistentvolumeclaim", source })?
        }
        None => None,
    };
    let lookup = match (&claim, needs_claim(job)) {
        (Some(found), _) => ClaimLookup::Found(found),
        (None, Some(_)) => ClaimLookup::Missing,
        (None, None) => ClaimLookup::NotNeeded,
    };
    violations.extend(checkpoint_violation(job, lookup, ctx.admission.shared_checkpoint_paths));
    Ok((!violations.is_empty()).then(|| violations.join("; ")))
}

async fn apply(job: &TrainingJob, ctx: &Arc<Context>) -> Result<Action> {
    let namespace = job.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let name = job.name_any();
    let invalid = invalid_message(job, ctx, &namespace).await?;
    let brain = match (ctx.template.recovery, &invalid) {
        (Recovery::Brain, None) => {
            let terminal = job.status.as_ref().and_then(|s| s.phase).is_some_and(|p| {
                matches!(p, ninelives_core::job::JobPhase::Succeeded | ninelives_core::job::JobPhase::Failed)
            });
            let mut view = read_view(&ctx.etcd, &namespace, &name).await?;
            view.control_plane = ctx.drivers.env().control_plane(&key(job));
            let finished = view.state.as_ref().is_some_and(|s| s.phase.is_terminal());
            if job.spec.suspend || terminal || finished {
                ctx.drivers.stop(&key(job));
            } else {
                ctx.drivers.ensure(job);
            }
            Some(view)
        }
        _ => None,
    };
    let desired = match (&invalid, brain.as_ref().and_then(|b| b.state.as_ref())) {
        (Some(_), _) => Vec::new(),
        (None, Some(state)) => {
            let assignment: Assignment =
                state.expected_ranks().map(|r| (r, state.node_names[r as usize].clone())).collect();
            assigned_pods(job, &ctx.template, &assignment)?
        }
        (None, None) => desired_pods(job, &ctx.template)?,
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let existing = pods
        .list(&ListParams::default().labels(&job_selector(&name)))
        .await
        .map_err(|source| Error::Read { what: "pods", source })?
        .items;

    let now = Timestamp::now().to_string();
    let Plan { create, delete, service, status, events } =
        plan_with(job, desired, &existing, invalid.as_deref(), &now, brain.as_ref());

    // Every write below is fenced by this replica's term: a reconcile in flight when the replica
    // was paused past its Lease must write nothing once it resumes (its etcd writes carry the
    // writer epoch; the apiserver's are checked here, just before each one).
    if service {
        still_leader(ctx)?;
        apply_service(job, ctx, &namespace).await?;
        apply_job_key(job, ctx, &namespace).await?;
        if ctx.template.etcd_auth {
            crate::etcd_auth::apply_job_identity(job, &ctx.client, &ctx.etcd, &ctx.identities).await?;
        }
        apply_network_policy(job, ctx, &namespace).await?;
        apply_pod_group(job, ctx, &namespace).await?;
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for pod in &create {
        still_leader(ctx)?;
        let pod_name = pod.name_any();
        pods.patch(&pod_name, &params, &Patch::Apply(pod))
            .await
            .map_err(|source| Error::Apply { what: format!("pod {pod_name}"), source })?;
    }
    // The nodes the brain keeps in the job (training nodes and spares).
    let in_job: Option<BTreeSet<String>> = brain
        .as_ref()
        .and_then(|b| b.state.as_ref())
        .map(|s| s.expected_nodes().chain(s.spares.iter().cloned()).collect());
    for pod_name in &delete {
        still_leader(ctx)?;
        // Only the pod this reconcile saw: a newer one of the same name is not ours to delete.
        let pod = existing.iter().find(|p| p.name_any() == *pod_name);
        let mut params = only_uid(pod.and_then(|p| p.metadata.uid.clone()));
        if let Some(pod) = pod
            && left_the_job(pod, in_job.as_ref())
        {
            params.grace_period_seconds = Some(0);
            info!(job = %key(job), pod = %pod_name, "deleting a pod on a node that left the job at once");
        }
        delete_ignoring_missing(&pods, pod_name, &params).await?;
    }
    if !delete.is_empty() {
        info!(job = %key(job), pods = ?delete, "deleted worker pods");
    }

    if job.status.as_ref() != Some(&status) {
        still_leader(ctx)?;
        let api: Api<TrainingJob> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = serde_json::json!({
            "apiVersion": ninelives_core::job::API_VERSION,
            "kind": ninelives_core::job::KIND,
            "status": status,
        });
        api.patch_status(&name, &params, &Patch::Apply(&patch)).await.map_err(Error::Status)?;
    }
    ctx.metrics.set_phase(&key(job), status.phase);
    for event in events {
        still_leader(ctx)?;
        publish(ctx, job, event).await;
    }

    // Invalid specs wait for an edit (or for their claim to appear or change); everything else
    // is driven by pod and job watches.
    Ok(match (&invalid, needs_claim(job)) {
        (Some(_), Some(_)) => Action::requeue(CLAIM_RECHECK),
        (Some(_), None) => Action::await_change(),
        (None, _) => Action::requeue(RESYNC),
    })
}

async fn apply_service(job: &TrainingJob, ctx: &Context, namespace: &str) -> Result<()> {
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
    let name = job.name_any();
    let current = services.get_opt(&name).await.map_err(|source| Error::Read { what: "service", source })?;
    if current.is_some() {
        return Ok(()); // a headless service has nothing that changes with the spec
    }
    let service = desired_service(job)?;
    services
        .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&service))
        .await
        .map_err(|source| Error::Apply { what: format!("service {name}"), source })?;
    Ok(())
}

/// The job's NetworkPolicy, written only when missing or different.
/// Creates the job's transport key Secret once (random, 32 bytes as 64 hex digits), owned by
/// the job so it goes with it. Never rewritten: members of a running generation hold the key.
async fn apply_job_key(job: &TrainingJob, ctx: &Context, namespace: &str) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let name = crate::resources::job_key_secret(&job.name_any());
    if secrets.get_opt(&name).await.map_err(|source| Error::Read { what: "secret", source })?.is_some() {
        return Ok(());
    }
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").map_err(Error::Io)?, &mut bytes)
        .map_err(Error::Io)?;
    let key: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.to_string()),
            owner_references: job.controller_owner_ref(&()).map(|o| vec![o]),
            labels: Some([(crate::resources::JOB_LABEL.to_string(), job.name_any())].into()),
            ..Default::default()
        },
        string_data: Some([(crate::resources::JOB_KEY_DATA.to_string(), key)].into()),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    match secrets.create(&kube::api::PostParams::default(), &secret).await {
        // Another replica or reconcile created it first: theirs is the key.
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(source) => Err(Error::Apply { what: format!("secret {name}"), source }),
    }
}

async fn apply_network_policy(job: &TrainingJob, ctx: &Context, namespace: &str) -> Result<()> {
    let Some(desired) = desired_network_policy(job, &ctx.template)? else { return Ok(()) };
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let name = job.name_any();
    let current =
        policies.get_opt(&name).await.map_err(|source| Error::Read { what: "networkpolicy", source })?;
    if current.is_some_and(|c| c.spec == desired.spec) {
        return Ok(());
    }
    policies
        .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&desired))
        .await
        .map_err(|source| Error::Apply { what: format!("networkpolicy {name}"), source })?;
    Ok(())
}

/// The job's PodGroup when its scheduler gang-schedules, written only when missing or
/// different. Without the scheduler's CRD this fails, and the job's pods wait: a gang job
/// scheduled pod by pod could deadlock half-placed.
async fn apply_pod_group(job: &TrainingJob, ctx: &Context, namespace: &str) -> Result<()> {
    let Some(gang) = crate::resources::gang::scheduler(job, &ctx.template) else { return Ok(()) };
    let desired = crate::resources::gang::desired_pod_group(job, gang)?;
    let groups: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), namespace, &gang.api_resource());
    let name = job.name_any();
    let current = groups.get_opt(&name).await.map_err(|source| Error::Read { what: "podgroup", source })?;
    if current.is_some_and(|c| crate::resources::gang::pod_group_matches(&c, &desired)) {
        return Ok(());
    }
    groups
        .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&desired))
        .await
        .map_err(|source| Error::Apply { what: format!("podgroup {name}"), source })?;
    Ok(())
}

/// `Err(LostLease)` unless this replica holds a leadership term that is still valid now.
fn still_leader(ctx: &Context) -> Result<()> {
    ctx.drivers.env().leadership.current().map(|_| ()).ok_or(Error::LostLease)
}

/// Whether `pod` runs on a node the brain took out of the job (`in_job`: the nodes it keeps,
/// training and spare; `None` when no brain drives the job). Such a pod has no kubelet to
/// confirm its deletion: deleted gracefully it stays Terminating under its name, and its rank's
/// replacement of the same name is never created (found on real kubelets, `scripts/real-node
/// --node-loss`). It is deleted at once; its process, if the node still runs it, is fenced by
/// the generation (not a member of it: its writes are stale, its peers refuse it).
fn left_the_job(pod: &Pod, in_job: Option<&BTreeSet<String>>) -> bool {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    matches!((node, in_job), (Some(node), Some(in_job)) if !in_job.contains(node))
}

/// Delete parameters that delete only the object with `uid` (when known), not a newer one of
/// the same name.
fn only_uid(uid: Option<String>) -> DeleteParams {
    DeleteParams {
        preconditions: uid.map(|uid| kube::api::Preconditions { uid: Some(uid), resource_version: None }),
        ..DeleteParams::default()
    }
}

/// Deletes `name` with `params`. Already gone (404 Not Found) counts as done; so does a 409
/// Conflict when `params` carries a precondition (the object of that name is no longer the one
/// the precondition names: a newer one is not ours to delete). Without a precondition a 409 is
/// an error.
async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str, params: &DeleteParams) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if deleted_already(status.code, params) => Ok(()),
        Err(source) => Err(Error::Apply { what: format!("delete {name}"), source }),
    }
}

/// Whether a delete with `params` that failed with HTTP `code` leaves nothing to delete.
fn deleted_already(code: u16, params: &DeleteParams) -> bool {
    let precondition =
        params.preconditions.as_ref().is_some_and(|p| p.uid.is_some() || p.resource_version.is_some());
    code == 404 || (code == 409 && precondition)
}

/// Deletes everything the job owns. Pods are deleted explicitly (not left to the garbage
/// collector) so the job disappears only once its workers are really gone.
async fn cleanup(job: &TrainingJob, ctx: &Context) -> Result<Action> {
    still_leader(ctx)?;
    let namespace = job.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let name = job.name_any();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let existing = pods
        .list(&ListParams::default().labels(&job_selector(&name)))
        .await
        .map_err(|source| Error::Read { what: "pods", source })?
        .items;
    for pod in &existing {
        delete_ignoring_missing(&pods, &pod.name_any(), &DeleteParams::default()).await?;
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    delete_ignoring_missing(&services, &name, &DeleteParams::default()).await?;
    if ctx.template.network_policy.is_some() {
        let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
        delete_ignoring_missing(&policies, &name, &DeleteParams::default()).await?;
    }
    if let Some(gang) = crate::resources::gang::scheduler(job, &ctx.template) {
        let groups: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &namespace, &gang.api_resource());
        delete_ignoring_missing(&groups, &name, &DeleteParams::default()).await?;
    }
    if !existing.is_empty() {
        // `finalizer()` removes the finalizer on Ok, so waiting for terminating pods is an
        // error that is retried under backoff until they are gone.
        return Err(Error::CleanupPending(existing.len()));
    }
    let deleted = ctx.etcd.config.delete_job_keys(&namespace, &name).await?;
    if ctx.template.etcd_auth {
        crate::etcd_auth::remove_job_identity(&namespace, &name, &ctx.etcd, &ctx.identities).await?;
    }
    ctx.metrics.set_phase(&key(job), None);
    info!(job = %key(job), etcd_keys = deleted, "cleaned up");
    publish(
        ctx,
        job,
        JobEvent {
            severity: Severity::Normal,
            reason: "CleanedUp",
            note: format!("deleted worker pods, service and {deleted} etcd keys"),
        },
    )
    .await;
    Ok(Action::await_change())
}

async fn publish(ctx: &Context, job: &TrainingJob, event: JobEvent) {
    let type_ = match event.severity {
        Severity::Normal => EventType::Normal,
        Severity::Warning => EventType::Warning,
    };
    let reference = job.object_ref(&());
    let event = Event {
        type_,
        reason: event.reason.into(),
        note: Some(event.note),
        action: "Reconcile".into(),
        secondary: None,
    };
    // An Event that cannot be written must not fail the reconcile that caused it.
    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
        warn!(error = %e, reason = %event.reason, "recording event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pods_on_nodes_that_left_the_job_are_deleted_at_once() {
        let on = |node: Option<&str>| Pod {
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: node.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        };
        let in_job: BTreeSet<String> = ["n0".to_string(), "spare-0".to_string()].into();
        assert!(left_the_job(&on(Some("n3")), Some(&in_job)), "a lost node's pod");
        assert!(!left_the_job(&on(Some("n0")), Some(&in_job)), "a training node's pod");
        assert!(!left_the_job(&on(Some("spare-0")), Some(&in_job)), "a spare's standby pod");
        assert!(!left_the_job(&on(None), Some(&in_job)), "an unscheduled pod");
        assert!(!left_the_job(&on(Some("n3")), None), "no brain: no judgement");
    }

    #[test]
    fn a_missing_object_is_deleted_with_or_without_a_precondition() {
        assert!(deleted_already(404, &DeleteParams::default()));
        assert!(deleted_already(404, &only_uid(Some("u1".into()))));
    }

    #[test]
    fn a_conflict_is_done_only_under_a_precondition() {
        // The pod of that name is no longer the one we saw: not ours to delete.
        assert!(deleted_already(409, &only_uid(Some("u1".into()))));
        let resource_version = DeleteParams {
            preconditions: Some(kube::api::Preconditions { uid: None, resource_version: Some("7".into()) }),
            ..DeleteParams::default()
        };
        assert!(deleted_already(409, &resource_version));
        // No precondition (or an empty one): a conflict is a real failure.
        assert!(!deleted_already(409, &DeleteParams::default()));
        assert!(!deleted_already(409, &only_uid(None)));
        let empty = DeleteParams {
            preconditions: Some(kube::api::Preconditions { uid: None, resource_version: None }),
            ..DeleteParams::default()
        };
        assert!(!deleted_already(409, &empty));
    }

    #[test]
    fn other_failures_are_errors() {
        for code in [400, 403, 422, 500, 503] {
            assert!(!deleted_already(code, &only_uid(Some("u1".into()))), "{code}");
            assert!(!deleted_already(code, &DeleteParams::default()), "{code}");
        }
    }

    #[test]
    fn only_uid_names_the_uid_it_was_given() {
        let params = only_uid(Some("u1".into()));
        let preconditions = params.preconditions.expect("a precondition");
        assert_eq!((preconditions.uid.as_deref(), preconditions.resource_version), (Some("u1"), None));
        assert!(only_uid(None).preconditions.is_none());
    }
}
