//! The recovery brain's driver on Kubernetes: one task per running job (leader only).
//!
//! Every [`POLL`] it reads the job's keys and the node keys from etcd into an
//! [`Observation`], calls the pure [`decide`], and carries the actions out:
//!
//! - `PublishPlacement` → one etcd transaction writing `control`, `placement` (as the members'
//!   [`DistPlan`]: the brain's placement plus members, experts per rank and how to restore) and
//!   the new `recovery` record, so a restarted operator never sees one without the other;
//! - anything that changes which pods should exist or the job's status (`StartMember`,
//!   `BringInSpare`, `DropNode`, `JobSucceeded`, `FailJob`, a new phase) → a reconcile of the
//!   job is triggered; the reconcile reads the record back and does the pod and status writes
//!   ([`crate::lifecycle::plan_with`]), so every apiserver write has one author;
//! - `RecordRecovery` → one Event on the job;
//! - every round → the recovery brain's metrics (`ninelives_recoveries_total`, detection and
//!   resume histograms, job phase, chips, generation, step, checkpoint age), served with the
//!   operator's own on its admin endpoint.
//!
//! Apiserver writes are therefore O(1) per failure (a status write, an Event, the pods that
//! really change), never per chip or per step. Before the record exists the driver waits for
//! every pod to be scheduled and builds the brain's node table from their nodes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, GetOptions, Txn, TxnOp};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use ninelives_core::TrainingJob;
use ninelives_core::keyspace::{JobKeys, Keyspace};
use ninelives_core::placement::Placement;
use ninelives_core::recovery::{
    Action, BrainConfig, CompletedRecovery, Observation, ProgressRecord, RecoveryState, decide,
};
use ninelives_telemetry::recovery::RecoveryObservation;
use ninelives_worker::dist::plan::{DistPlan, from_published_generation, generation_writes};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::controller::Context;
use crate::error::{Error, Result};
use crate::lifecycle::BrainView;
use crate::resources::{RANK_LABEL, ROLE_LABEL, Role, job_selector};

/// How often a job's keys are read and the brain consulted.
pub const POLL: Duration = Duration::from_millis(200);
/// Pause after a failed tick (etcd or apiserver unreachable, malformed record).
const RETRY: Duration = Duration::from_secs(1);

/// The running driver tasks, by `namespace/name`.
#[derive(Default)]
pub struct Drivers {
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl Drivers {
    /// Starts the driver of `job` unless it runs already.
    pub fn ensure(&self, ctx: &Arc<Context>, job: &TrainingJob) {
        let Some(namespace) = job.namespace() else { return };
        let key = format!("{namespace}/{}", job.name_any());
        let Ok(mut tasks) = self.tasks.lock() else { return };
        if tasks.get(&key).is_some_and(|t| !t.is_finished()) {
            return;
        }
        let config = match BrainConfig::from_spec(&job.spec) {
            Ok(c) => c.for_expert_parallel(),
            Err(e) => {
                warn!(job = %key, error = %e, "no recovery brain for this job");
                return;
            }
        };
        info!(job = %key, "starting the recovery driver");
        let driver = Driver {
            ctx: ctx.clone(),
            reference: ObjectRef::from_obj(job),
            object: job.object_ref(&()),
            keys: Keyspace::new(&ctx.etcd.prefix),
            namespace,
            name: job.name_any(),
            nodes: job.spec.topology.nodes,
            spares: job.spec.topology.spare_nodes,
            config,
            trigger: ctx.trigger.clone(),
            chips_per_node: job.spec.topology.chips_per_node,
            min_healthy_fraction: job.spec.failure_policy.min_healthy_fraction,
            checkpoint: None,
        };
        tasks.insert(key, tokio::spawn(driver.run()));
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

struct Driver {
    ctx: Arc<Context>,
    reference: ObjectRef<TrainingJob>,
    object: k8s_openapi::api::core::v1::ObjectReference,
    keys: Keyspace,
    namespace: String,
    name: String,
    nodes: u32,
    spares: u32,
    config: BrainConfig,
    trigger: UnboundedSender<ObjectRef<TrainingJob>>,
    chips_per_node: u32,
    min_healthy_fraction: f64,
    /// Newest committed checkpoint seen (its metric is set when a newer one appears).
    checkpoint: Option<u64>,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Driver {
    async fn run(mut self) {
        self.ctx.recovery.job_started(&self.namespace, &self.name);
        loop {
            match self.tick().await {
                Ok(true) => {
                    info!(job = %self.reference, "the recovery brain finished with the job");
                    let _ = self.trigger.send(self.reference.clone());
                    return;
                }
                Ok(false) => tokio::time::sleep(POLL).await,
                Err(e) => {
                    warn!(job = %self.reference, error = %e, "recovery driver");
                    self.ctx.metrics.reconcile_failed(e.label());
                    self.ctx.reconnect_etcd();
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// One observe–decide–act round; `true` once the brain's phase is terminal.
    async fn tick(&mut self) -> Result<bool> {
        let mut client = self.ctx.etcd_client().await?;
        let job_keys = self.keys.job(&self.namespace, &self.name);
        let etcd_err = |source| Error::Etcd { prefix: job_keys.root().to_string(), source };
        let prefix = GetOptions::new().with_prefix();
        let job_kvs = client.get(job_keys.root(), Some(prefix.clone())).await.map_err(etcd_err)?;
        let node_kvs = client.get(self.keys.nodes(), Some(prefix)).await.map_err(etcd_err)?;
        let kvs: Vec<(String, Vec<u8>)> = job_kvs
            .kvs()
            .iter()
            .chain(node_kvs.kvs())
            .filter_map(|kv| Some((kv.key_str().ok()?.to_string(), kv.value().to_vec())))
            .collect();
        let value = |key: String| kvs.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_slice());

        let (obs, malformed) = Observation::from_kvs(
            &self.keys,
            &self.namespace,
            &self.name,
            unix_now(),
            kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        );
        for m in &malformed {
            debug!(key = %m.key, reason = %m.reason, "ignoring a malformed value");
        }
        // The placement is untrusted input: unreadable means the job is stuck, not restarted.
        let (placement, previous) = match value(job_keys.placement()) {
            None => (None, None),
            Some(bytes) => {
                let placement: Placement = serde_json::from_slice(bytes)
                    .map_err(|e| Error::Brain(format!("malformed {}: {e}", job_keys.placement())))?;
                (Some(placement), serde_json::from_slice::<DistPlan>(bytes).ok())
            }
        };
        let prior = match value(job_keys.recovery()) {
            Some(bytes) => {
                RecoveryState::parse(&job_keys.recovery(), bytes).map_err(|e| Error::Brain(e.to_string()))?
            }
            None => match self.node_table().await? {
                Some(state) => state,
                None => return Ok(false), // pods not all scheduled yet
            },
        };
        if prior.phase.is_terminal() {
            return Ok(true);
        }
        let decision = decide(&self.config, &prior, &obs, placement.as_ref())
            .map_err(|e| Error::Brain(e.to_string()))?;
        let state = &decision.state;
        self.observe(state, &obs);
        let mut published = false;
        let mut previous = previous;
        let mut reconcile = state.phase != prior.phase || state.active != prior.active;
        for action in &decision.actions {
            match action {
                Action::PublishPlacement { placement, control } => {
                    let plan = from_published_generation(
                        &self.config.shape,
                        state,
                        placement,
                        control,
                        previous.as_ref(),
                    )
                    .map_err(Error::Brain)?;
                    publish(&mut client, &job_keys, &plan, control, state).await?;
                    info!(
                        job = %self.reference,
                        generation = placement.generation,
                        tier = %plan.tier,
                        restore = ?plan.restore,
                        "published a generation"
                    );
                    previous = Some(plan);
                    published = true;
                }
                Action::RecordRecovery(r) => {
                    self.ctx.recovery.recovery(
                        &self.namespace,
                        &self.name,
                        &RecoveryObservation {
                            tier: r.tier.as_str(),
                            trigger: r.kind.as_str(),
                            detect_s: r.detect_s,
                            resume_s: r.resume_s,
                            steps_lost: r.steps_lost,
                        },
                    );
                    self.recovered(r).await;
                    reconcile = true;
                }
                Action::StartMember { .. }
                | Action::BringInSpare { .. }
                | Action::DropNode { .. }
                | Action::JobSucceeded
                | Action::FailJob { .. } => reconcile = true,
            }
        }
        if !published && *state != prior {
            client.put(job_keys.recovery(), state.to_json(), None).await.map_err(etcd_err)?;
        }
        if reconcile {
            let _ = self.trigger.send(self.reference.clone());
        }
        Ok(state.phase.is_terminal())
    }

    /// The job's gauges: phase, chips, generation, step, newest checkpoint.
    fn observe(&mut self, state: &RecoveryState, obs: &Observation) {
        let (ns, name) = (&self.namespace, &self.name);
        self.ctx.recovery.brain(ns, name, state, obs, self.chips_per_node, self.min_healthy_fraction);
        if let Some(step) = obs.step {
            self.ctx.recovery.progress(ns, name, step, None, None);
        }
        let newest = obs.checkpoints.last().copied();
        if newest > self.checkpoint
            && let Some(step) = newest
        {
            // The record appears within a poll of the commit: its time is when it was seen.
            self.ctx.recovery.checkpoint(ns, name, step, unix_now());
            self.checkpoint = newest;
        }
    }

    /// The brain's first record: rank `r` on the node its pod was scheduled to, spares in the
    /// order of their pods. `None` until every pod is bound to a node.
    async fn node_table(&self) -> Result<Option<RecoveryState>> {
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let listed = pods
            .list(&ListParams::default().labels(&job_selector(&self.name)))
            .await
            .map_err(|source| Error::Read { what: "pods", source })?;
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
        let complete =
            workers.iter().map(|(r, _)| *r).eq(0..self.nodes) && spares.len() == self.spares as usize;
        if !complete {
            return Ok(None);
        }
        let names = workers.into_iter().map(|(_, n)| n).collect();
        let spares = spares.into_iter().map(|(_, n)| n).collect();
        info!(job = %self.reference, ?names, ?spares, "node table from the scheduled pods");
        Ok(Some(RecoveryState::new(names, spares)))
    }

    async fn recovered(&self, r: &CompletedRecovery) {
        let detected = r.detect_s.map(|d| format!("detected in {d:.1} s, ")).unwrap_or_default();
        let note = format!(
            "{} recovered by {} in {:.1} s ({detected}{} steps lost, generation {})",
            r.trigger, r.tier, r.resume_s, r.steps_lost, r.generation
        );
        info!(job = %self.reference, "{note}");
        // The node where it happened is the Event's related object: `kubectl describe node`
        // shows it, and recoveries on different nodes stay separate Events (the recorder folds
        // repeats of the same reason, action and objects into one Event's series).
        let secondary = r.triggers.first().map(|t| k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(t.node_name.clone()),
            ..Default::default()
        });
        let event = Event {
            type_: EventType::Normal,
            reason: "Recovered".into(),
            note: Some(note),
            action: "Recover".into(),
            secondary,
        };
        if let Err(e) = self.ctx.recorder.publish(&event, &self.object).await {
            warn!(error = %e, "recording the recovery event");
        }
    }
}

async fn publish(
    client: &mut Client,
    keys: &JobKeys,
    plan: &DistPlan,
    control: &ninelives_core::recovery::ControlRecord,
    state: &RecoveryState,
) -> Result<()> {
    let ops = generation_writes(keys, plan, control, state)?.map(|(key, value)| TxnOp::put(key, value, None));
    client
        .txn(Txn::new().and_then(ops.to_vec()))
        .await
        .map_err(|source| Error::Etcd { prefix: keys.root().to_string(), source })?;
    Ok(())
}

/// The brain's record and progress as the reconcile needs them (two reads).
pub async fn read_view(ctx: &Context, namespace: &str, name: &str) -> Result<BrainView> {
    let keys = Keyspace::new(&ctx.etcd.prefix).job(namespace, name);
    let mut client = ctx.etcd_client().await?;
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
    Ok(BrainView { state, progress })
}
