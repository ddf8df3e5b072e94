//! The recovery brain on Kubernetes: one task per running job (leader only) drives the job's
//! [`ControlLoop`] every [`POLL`], with effects carried out through the apiserver.
//!
//! - the loop itself reads etcd, decides, and publishes each generation with the record in one
//!   guarded transaction (see `ninelives-control`);
//! - anything that changes which pods should exist or the job's status (start a member, bring
//!   in a spare, drop a node, a new phase, a completed recovery) → a reconcile of the job is
//!   triggered; the reconcile reads the record back and does the pod and status writes
//!   ([`crate::lifecycle::plan_with`]), so every apiserver write has one author;
//! - a completed recovery → one Event on the job, the log line and the metric
//!   ([`RecoveryEvent::emit`]).
//!
//! Apiserver writes are therefore O(1) per failure (a status write, an Event, the pods that
//! really change), never per chip or per step. Before the record exists the driver waits for
//! every pod to be scheduled and builds the brain's node table from their nodes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::ListParams;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource, ResourceExt};
use ninelives_control::{
    ControlLoop, EffectError, Effects, EtcdStore, JobIdentity, Progress, RecoveryEvent, unix_now,
};
use ninelives_core::TrainingJob;
use ninelives_core::keyspace::Keyspace;
use ninelives_core::recovery::{
    BrainConfig, CompletedRecovery, Outage, OutagePolicy, ProgressRecord, RebalancePolicy, RecoveryState,
};
use ninelives_core::writer::WriterRecord;
use ninelives_telemetry::recovery::RecoveryMetrics;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::etcd::SharedEtcd;
use crate::leader::Leadership;
use crate::lifecycle::{BrainView, ControlPlaneNote};
use crate::metrics::Metrics;
use crate::resources::{RANK_LABEL, ROLE_LABEL, Role, job_selector};

/// How often a job's loop runs.
pub const POLL: Duration = Duration::from_millis(200);
/// Pause after a failed round (etcd or apiserver unreachable, malformed record).
const RETRY: Duration = Duration::from_secs(1);

/// What every driver shares: the clients, the recorder, the metrics, the reconcile trigger.
pub struct DriverEnv {
    /// Apiserver client (pods are listed for the node table).
    pub client: Client,
    /// The coordination etcd.
    pub etcd: Arc<SharedEtcd>,
    /// Event recorder.
    pub recorder: Recorder,
    /// The operator's metrics (failed rounds count as reconcile errors).
    pub metrics: Arc<Metrics>,
    /// The recovery brain's metrics.
    pub recovery: RecoveryMetrics,
    /// Asks the controller to reconcile a job.
    pub trigger: UnboundedSender<ObjectRef<TrainingJob>>,
    /// Jobs whose driver freezes decisions (a control-plane outage), by `namespace/name`.
    pub control_plane: Mutex<HashMap<String, ControlPlaneNote>>,
    /// This replica's leadership term: drivers start only within a valid term, claim their job
    /// with its epoch, and stop as soon as it is no longer valid.
    pub leadership: Leadership,
}

impl DriverEnv {
    /// Why the driver of `namespace/name` freezes its decisions, if it does.
    pub fn control_plane(&self, key: &str) -> Option<ControlPlaneNote> {
        self.control_plane.lock().ok().and_then(|notes| notes.get(key).cloned())
    }
}

/// The running driver tasks, by `namespace/name`.
pub struct Drivers {
    env: Arc<DriverEnv>,
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl Drivers {
    /// No drivers yet.
    pub fn new(env: DriverEnv) -> Self {
        Self { env: Arc::new(env), tasks: Mutex::default() }
    }

    /// Starts the driver of `job` unless it runs already.
    pub fn ensure(&self, job: &TrainingJob) {
        let Some(namespace) = job.namespace() else { return };
        let key = format!("{namespace}/{}", job.name_any());
        let Ok(mut tasks) = self.tasks.lock() else { return };
        if tasks.get(&key).is_some_and(|t| !t.is_finished()) {
            return;
        }
        let Some(term) = self.env.leadership.current() else {
            warn!(job = %key, "no valid leadership term; not driving the job");
            return;
        };
        let brain = match BrainConfig::from_spec(&job.spec) {
            Ok(c) => c.for_expert_parallel(),
            Err(e) => {
                warn!(job = %key, error = %e, "no recovery brain for this job");
                return;
            }
        };
        info!(job = %key, "starting the recovery driver");
        let identity = JobIdentity {
            keys: Keyspace::new(&self.env.etcd.config.prefix),
            namespace: namespace.clone(),
            name: job.name_any(),
            chips_per_node: job.spec.topology.chips_per_node,
            min_healthy_fraction: job.spec.failure_policy.min_healthy_fraction,
        };
        let effects = KubeEffects {
            env: self.env.clone(),
            reference: ObjectRef::from_obj(job),
            object: job.object_ref(&()),
            namespace,
            name: job.name_any(),
            nodes: job.spec.topology.nodes,
            spares: job.spec.topology.spare_nodes,
            reconcile: false,
        };
        let ttl = f64::from(job.spec.failure_policy.heartbeat_ttl_seconds.max(1));
        let outage = OutagePolicy::for_ttl(ttl);
        let writer = WriterRecord::new(term.identity, term.epoch);
        let rebalance = job.spec.parallelism.rebalance.as_ref().map(RebalancePolicy::of);
        let driven = drive(self.env.clone(), brain, identity, outage, rebalance, writer, effects);
        tasks.insert(key, tokio::spawn(driven));
    }

    /// What every driver shares.
    pub fn env(&self) -> &DriverEnv {
        &self.env
    }

    /// Stops the driver of `namespace/name` (job deleted, suspended or finished).
    pub fn stop(&self, key: &str) {
        if let Ok(mut tasks) = self.tasks.lock()
            && let Some(task) = tasks.remove(key)
        {
            task.abort();
        }
    }

    /// Stops every driver (leadership lost or shutdown).
    pub fn stop_all(&self) {
        if let Ok(mut tasks) = self.tasks.lock() {
            for (_, task) in tasks.drain() {
                task.abort();
            }
        }
    }
}

/// Runs the job's loop as `writer` until the brain finishes with the job, the term of the
/// writer's epoch is no longer valid, or a newer writer claims the job.
async fn drive(
    env: Arc<DriverEnv>,
    brain: BrainConfig,
    job: JobIdentity,
    outage: OutagePolicy,
    rebalance: Option<RebalancePolicy>,
    writer: WriterRecord,
    mut effects: KubeEffects,
) {
    let epoch = writer.epoch;
    let client = loop {
        match env.etcd.client().await {
            Ok(c) => break c,
            Err(e) => {
                warn!(job = %job, error = %e, "connecting to etcd");
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    let store = EtcdStore::new(client, job.keys.clone(), &job.namespace, &job.name);
    let mut control = ControlLoop::new(brain, job, store, Some(env.recovery.clone()))
        .with_outage_policy(outage)
        .with_writer(writer)
        .with_rebalance(rebalance);
    loop {
        // Checked before every round: a replica paused past its renew deadline resumes here
        // and stops before it reads or writes anything (the epoch fence catches the rest).
        if !env.leadership.holds(epoch) {
            info!(job = %control.job(), epoch, "leadership term over; the recovery driver stops");
            return;
        }
        let pause = match control.step(&mut effects, unix_now()).await {
            Ok(Progress::Finished(_)) => None,
            Ok(Progress::Ran(round)) => {
                if let Some(step) = round.observation.step {
                    let job = control.job();
                    env.recovery.progress(&job.namespace, &job.name, step, None, None);
                }
                (!round.state.phase.is_terminal()).then_some(POLL)
            }
            Ok(Progress::NotStarted | Progress::Fenced | Progress::Frozen(_)) => Some(POLL),
            Err(e) if e.is_fenced() => {
                warn!(job = %control.job(), error = %e, "deposed by a newer writer; the recovery driver stops");
                env.metrics.reconcile_failed(Error::from(e).label());
                return;
            }
            Err(e) => {
                warn!(job = %control.job(), error = %e, "recovery driver");
                env.metrics.reconcile_failed(Error::from(e).label());
                env.etcd.reconnect();
                if let Ok(client) = env.etcd.client().await {
                    control.store_mut().replace_client(client);
                }
                Some(RETRY)
            }
        };
        if std::mem::take(&mut effects.reconcile) || pause.is_none() {
            let _ = env.trigger.send(effects.reference.clone());
        }
        match pause {
            Some(p) => tokio::time::sleep(p).await,
            None => {
                info!(job = %control.job(), "the recovery brain finished with the job");
                return;
            }
        }
    }
}

/// The loop's effects on Kubernetes: a reconcile of the job for anything about pods or status,
/// an Event per completed recovery.
struct KubeEffects {
    env: Arc<DriverEnv>,
    reference: ObjectRef<TrainingJob>,
    object: ObjectReference,
    namespace: String,
    name: String,
    nodes: u32,
    spares: u32,
    /// Set by an effect that needs the reconcile to act.
    reconcile: bool,
}

impl Effects for KubeEffects {
    /// Rank `r` on the node its pod was scheduled to, spares in the order of their pods;
    /// `None` until every pod is bound to a node.
    async fn node_table(&mut self) -> Result<Option<RecoveryState>, EffectError> {
        let pods: Api<Pod> = Api::namespaced(self.env.client.clone(), &self.namespace);
        let listed = pods
            .list(&ListParams::default().labels(&job_selector(&self.name)))
            .await
            .map_err(|e| EffectError::new("node-table", e))?;
        let mut workers: Vec<(u32, String)> = Vec::new();
        let mut spares: Vec<(u32, String)> = Vec::new();
        for pod in listed.items.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
            let (Some(rank), Some(node)) = (
                pod.labels().get(RANK_LABEL).and_then(|r| r.parse::<u32>().ok()),
                pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            ) else {
                continue;
            };
            if pod.labels().get(ROLE_LABEL).is_some_and(|r| r == Role::Spare.as_str()) {
                spares.push((rank, node));
            } else {
                workers.push((rank, node));
            }
        }
        workers.sort();
        spares.sort();
        let complete = workers.iter().map(|(r, _)| *r).eq(0..self.nodes)
            && u32::try_from(spares.len()).is_ok_and(|n| n == self.spares);
        if !complete {
            return Ok(None);
        }
        let names = workers.into_iter().map(|(_, n)| n).collect();
        let spares = spares.into_iter().map(|(_, n)| n).collect();
        info!(job = %self.reference, ?names, ?spares, "node table from the scheduled pods");
        Ok(Some(RecoveryState::new(names, spares)))
    }

    async fn start_member(&mut self, _: u32, _: &str, _: Option<u64>) -> Result<(), EffectError> {
        self.reconcile = true;
        Ok(())
    }

    async fn bring_in_spare(&mut self, _: &str, _: &str, _: u32) -> Result<(), EffectError> {
        self.reconcile = true;
        Ok(())
    }

    async fn drop_node(&mut self, _: u32, _: &str) -> Result<(), EffectError> {
        self.reconcile = true;
        Ok(())
    }

    async fn record_recovery(&mut self, r: &CompletedRecovery) -> Result<(), EffectError> {
        let event = RecoveryEvent::from_record(r);
        event.emit(&self.namespace, &self.name, Some(&self.env.recovery));
        // The node where it happened is the Event's related object: `kubectl describe node`
        // shows it, and recoveries on different nodes stay separate Events (the recorder folds
        // repeats of the same reason, action and objects into one Event's series).
        let secondary = r.triggers.first().map(|t| ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(t.node_name.clone()),
            ..Default::default()
        });
        let recorded = Event {
            type_: EventType::Normal,
            reason: "Recovered".into(),
            note: Some(event.note()),
            action: "Recover".into(),
            secondary,
        };
        if let Err(e) = self.env.recorder.publish(&recorded, &self.object).await {
            warn!(error = %e, "recording the recovery event");
        }
        self.reconcile = true;
        Ok(())
    }

    async fn phase_changed(&mut self, _: &RecoveryState, _: &RecoveryState) -> Result<(), EffectError> {
        self.reconcile = true;
        Ok(())
    }

    /// The `ControlPlaneDegraded` condition (written by the next reconcile that can read the
    /// record) and an Event now (the apiserver may well be reachable while etcd is not).
    async fn control_plane(&mut self, outage: Option<&Outage>) -> Result<(), EffectError> {
        let key = format!("{}/{}", self.namespace, self.name);
        let note =
            outage.map(|o| ControlPlaneNote { reason: o.cause.reason(), message: o.cause.to_string() });
        if let Ok(mut notes) = self.env.control_plane.lock() {
            match &note {
                Some(n) => notes.insert(key, n.clone()),
                None => notes.remove(&key),
            };
        }
        let (type_, reason, text) = match &note {
            Some(n) => (
                EventType::Warning,
                "ControlPlaneDegraded",
                format!("{}; recovery decisions frozen", n.message),
            ),
            None => (
                EventType::Normal,
                "ControlPlaneHealthy",
                "the control plane is healthy again; deciding".into(),
            ),
        };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(text),
            action: "Observe".into(),
            secondary: None,
        };
        if let Err(e) = self.env.recorder.publish(&event, &self.object).await {
            warn!(error = %e, "recording the control-plane event");
        }
        self.reconcile = true;
        Ok(())
    }
}

/// The brain's record and progress as the reconcile needs them (two reads).
pub async fn read_view(etcd: &SharedEtcd, namespace: &str, name: &str) -> Result<BrainView> {
    let keys = Keyspace::new(&etcd.config.prefix).job(namespace, name);
    let mut client = etcd.client().await?;
    let etcd_err = |source| Error::Etcd { prefix: keys.root().to_string(), source };
    let record = client.get(keys.recovery(), None).await.map_err(etcd_err)?;
    let state = match record.kvs().first() {
        Some(kv) => Some(
            RecoveryState::parse(&keys.recovery(), kv.value()).map_err(|e| Error::Brain(e.to_string()))?,
        ),
        None => None,
    };
    let progress = client.get(keys.progress(), None).await.map_err(etcd_err)?;
    // A malformed progress record only hides the step from the status.
    let progress =
        progress.kvs().first().and_then(|kv| serde_json::from_slice::<ProgressRecord>(kv.value()).ok());
    Ok(BrainView { state, progress, control_plane: None })
}
