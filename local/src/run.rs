//! A whole ninelives system on this machine: etcd, one agent per node (and spare) on simulated
//! chips, one expert-parallel worker member per node, and the job's control loop — driven
//! together, with scheduled faults.
//!
//! The decisions are the operator's: the same [`ControlLoop`] (observe etcd, the pure brain,
//! one guarded transaction per generation) with this runtime's [`Effects`](ninelives_control::Effects)
//! (`LocalEffects`): a member the brain orders started is started as a child process once its
//! node is up (a member ordered onto a node this run killed waits until the brain moves the rank
//! to a spare).
//!
//! The members do the rest themselves, as in pods: each joins every generation (restoring from
//! memory, or from the checkpoint the plan names), acknowledges it at `acks/<gen>/<rank>`, keeps
//! its `members/<rank>` key alive under its own lease, and the generation's leader writes
//! `progress` and a `checkpoints/<step>` record for every committed checkpoint. When the runtime
//! sees a member process die it deletes the member's key at once (as a kubelet reports a dead
//! container): the brain need not wait for the lease to expire. A `worker:` fault kills the
//! node's member (SIGKILL, its memory is really lost); a `node:` fault kills the node's agent and
//! its member. Reported numbers are measured from what the processes did (step lines), not taken
//! from the brain's plan.
//!
//! [`run_local`] drives a [`LocalRun`], one method per phase of a round: drain member output,
//! fire due faults, the loop step, start wanted members, metrics, measure resumed recoveries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use ninelives_control::{ControlLoop, EtcdStore, JobIdentity, Progress, RecoveryEvent, unix_now};
use ninelives_core::TrainingJob;
use ninelives_core::fault_schedule::{
    FLAP_HALF_PERIOD_S, FLAP_ONSETS, FaultKind, FaultSchedule, ScheduledFault,
};
use ninelives_core::keyspace::{JobKeys, Keyspace};
use ninelives_core::placement::{FailedChips, LoadStats};
use ninelives_core::recovery::{
    BrainConfig, BrainPhase, Observation, OutagePolicy, RebalancePolicy, RecoveryState,
};

use crate::cluster::{AgentPlan, Cluster};
use crate::effects::{Injected, LocalEffects};
use crate::error::RuntimeError;
use crate::etcd::LocalEtcd;
use crate::live::{ChipCell, LiveState, NodeRow};
use crate::metrics::RecoveryMetrics;
use crate::processes::MemberSpec;
use crate::report::{Report, Sample, goodput};
use crate::supervisor::Supervisor;
use crate::training::Training;

/// Everything a local run needs.
#[derive(Clone, Debug)]
pub struct LocalRunConfig {
    /// The `ninelives` binary (agents, injection, workers).
    pub ninelives: PathBuf,
    /// The manifest file.
    pub manifest: PathBuf,
    /// The parsed job.
    pub job: TrainingJob,
    /// Steps to train.
    pub steps: u64,
    /// Faults to inject.
    pub schedule: FaultSchedule,
    /// Directory for etcd data, chips, checkpoints and logs.
    pub work_dir: PathBuf,
    /// CPU threads shared by the worker members (each gets `threads / nodes`, at least 1).
    pub threads: usize,
    /// Upper bound on the whole run.
    pub deadline: Duration,
    /// Metrics: where agents and the worker serve `/metrics`, and the brain's own families.
    pub metrics: Option<MetricsPlan>,
    /// Environment of every member process: the training worker's own (its thread pools and
    /// allocator), which the caller that links the worker knows; set up front so a member need
    /// not re-execute itself.
    pub member_env: Vec<(String, String)>,
    /// Members of the run's etcd cluster (1: a single etcd; 3 survives the loss of one). Every
    /// component — this driver, the agents, the workers — gets every member's client URL and
    /// fails over between them.
    pub etcd_members: usize,
    /// Extra environment of one node's processes (its agent and the member on it), by node name:
    /// e.g. libfaketime's, to skew that node's wall clock (the clock-skew nemesis of the chaos
    /// suite).
    pub node_env: BTreeMap<String, Vec<(String, String)>>,
    /// How the member on a node reaches etcd and its peers when not as every other member does,
    /// by node name: the chaos suite's partition nemesis routes one node's member through
    /// loopback proxies it controls.
    pub member_routing: BTreeMap<String, MemberRouting>,
}

/// The etcd endpoints and peer addresses of the member on one node, when not the run's own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberRouting {
    /// etcd client URLs, comma-separated, instead of the run's (e.g. a proxy's).
    pub etcd: Option<String>,
    /// Address its peer listener binds instead of loopback port 0.
    pub listen: Option<SocketAddr>,
    /// Host it registers for its peers (with the listener's port) instead of the listen address:
    /// e.g. `127.0.0.2`, where a proxy listens on the same port.
    pub advertise: Option<String>,
}

/// Where the processes of a run serve their metrics, and the driver's own metrics.
#[derive(Clone, Debug)]
pub struct MetricsPlan {
    /// The recovery brain's and the job's metrics, updated by the driver (served by the caller).
    pub recovery: RecoveryMetrics,
    /// `/metrics` address of each agent, by node name (see [`node_names`]).
    pub agents: BTreeMap<String, SocketAddr>,
    /// `/metrics` address of each worker member, by rank (a restarted member binds it again).
    pub workers: BTreeMap<u32, SocketAddr>,
    /// etcd's `/metrics` address.
    pub etcd: SocketAddr,
}

/// The namespace every local job runs in.
pub const NAMESPACE: &str = "default";

/// Names of a run's training nodes and spares: `node-<i>`, `spare-<i>`.
pub fn node_names(nodes: u32, spares: u32) -> (Vec<String>, Vec<String>) {
    ((0..nodes).map(|i| format!("node-{i}")).collect(), (0..spares).map(|i| format!("spare-{i}")).collect())
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// The report (without the reference comparison, which the caller adds).
    pub report: Report,
    /// Every step line seen, in order.
    pub samples: Vec<Sample>,
    /// Why the job failed, if it did.
    pub failure: Option<String>,
    /// Whether the run was interrupted (Ctrl-C).
    pub interrupted: bool,
}

/// How often a round runs.
const POLL: Duration = Duration::from_millis(100);

/// How long a member waits inside a step for a live peer. A dead peer's sockets close at once,
/// and a new generation aborts the step anyway; this bounds a peer that hangs.
const STEP_TIMEOUT_S: u64 = 30;

/// The committed checkpoints in `dir`: `step-<n>` directories holding `manifest.json`.
pub fn committed_checkpoints(dir: &Path) -> BTreeSet<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else { return BTreeSet::new() };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("manifest.json").is_file())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect()
}

/// Runs the job with its fault schedule until it succeeds, fails, hits the deadline or
/// `interrupt` resolves; `view` is called with the live state after every round.
pub async fn run_local(
    cfg: &LocalRunConfig,
    interrupt: impl Future<Output = ()>,
    mut view: impl FnMut(&LiveState),
) -> Result<RunOutcome, RuntimeError> {
    let mut run = LocalRun::start(cfg).await?;
    tokio::pin!(interrupt);
    let interrupted = loop {
        tokio::select! {
            _ = &mut interrupt => break true,
            _ = tokio::time::sleep(POLL) => {}
        }
        let finished = run.round().await?;
        view(&run.live_state());
        if finished {
            break false;
        }
    };
    Ok(run.finish(interrupted))
}

/// Faults of the schedule not fired yet, and flap onsets waiting for their time.
#[derive(Default)]
struct FaultClock {
    /// Faults of the schedule fired so far.
    fired: usize,
    /// (unix time, node, chip, fault) of flap onsets and recoveries still to inject.
    timed: Vec<(f64, String, u32, &'static str)>,
}

/// One local run in progress.
/// The job's key in the work directory, shared by its members (the operator's Secret, locally).
const JOB_KEY_FILE: &str = "job-key";

struct LocalRun<'c> {
    cfg: &'c LocalRunConfig,
    name: String,
    t0: Instant,
    start_unix: f64,
    /// The kubelet's part: deletes a dead member's key at once.
    client: Client,
    /// etcd's client URLs, comma-separated, for the members.
    etcd_endpoint: String,
    job_keys: JobKeys,
    control: ControlLoop<EtcdStore>,
    fx: LocalEffects,
    cluster: Cluster,
    training: Training,
    faults: FaultClock,
    entries: Vec<crate::report::RecoveryEntry>,
    state: Option<RecoveryState>,
    obs: std::sync::Arc<Observation>,
    /// The last control-loop error journaled.
    last_error: Option<String>,
}

impl<'c> LocalRun<'c> {
    /// Starts etcd and the agents and waits for their presence.
    async fn start(cfg: &'c LocalRunConfig) -> Result<Self, RuntimeError> {
        let t0 = Instant::now();
        let mut sup = Supervisor::new(cfg.work_dir.join("logs"))?;
        let key = cfg.work_dir.join(JOB_KEY_FILE);
        crate::processes::create_job_key(&key)
            .map_err(|source| RuntimeError::Io { path: key.clone(), source })?;
        let etcd = LocalEtcd::start_cluster(
            &mut sup,
            &cfg.work_dir,
            cfg.etcd_members,
            cfg.metrics.as_ref().map(|m| m.etcd),
        )?;
        let endpoints: Vec<String> = etcd.iter().map(|m| m.endpoint.clone()).collect();
        let etcd_urls = endpoints.join(",");
        let connect_err =
            |e: etcd_client::Error| RuntimeError::Etcd { what: "connect".into(), detail: e.to_string() };
        // Bounded connects and keep-alive pings: a killed or stopped member is left for another
        // one within seconds instead of a TCP timeout.
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let mut client = Client::connect(&endpoints, Some(options)).await.map_err(connect_err)?;
        let keys = Keyspace::default();
        let name = cfg.job.metadata.name.clone().unwrap_or_else(|| "job".into());
        let mut brain = BrainConfig::from_spec(&cfg.job.spec)
            .map_err(|e| RuntimeError::Brain(e.to_string()))?
            .for_expert_parallel();
        brain.total_steps = cfg.steps;
        let topo = &cfg.job.spec.topology;
        let (names, spares) = node_names(topo.nodes, topo.spare_nodes);
        let mut cluster = Cluster::new(sup);
        let plan = |node: &str| AgentPlan {
            ninelives: &cfg.ninelives,
            etcd: &etcd_urls,
            chips_per_node: topo.chips_per_node,
            ttl_seconds: cfg.job.spec.failure_policy.heartbeat_ttl_seconds.max(1),
            keys: &keys,
            metrics_addr: cfg.metrics.as_ref().and_then(|m| m.agents.get(node).copied()),
            env: cfg.node_env.get(node).map_or(&[], Vec::as_slice),
        };
        for node in names.iter().chain(&spares) {
            cluster.start_agent(node, cfg.work_dir.join("chips").join(node), &plan(node))?;
        }
        cluster.wait_for_agents(&mut client, &keys).await?;
        let job = JobIdentity {
            keys: keys.clone(),
            namespace: NAMESPACE.into(),
            name: name.clone(),
            chips_per_node: topo.chips_per_node,
            min_healthy_fraction: cfg.job.spec.failure_policy.min_healthy_fraction,
        };
        let store = EtcdStore::new(client.clone(), keys.clone(), NAMESPACE, &name);
        let metrics = cfg.metrics.as_ref().map(|m| m.recovery.clone());
        let ttl = f64::from(cfg.job.spec.failure_policy.heartbeat_ttl_seconds.max(1));
        Ok(Self {
            control: ControlLoop::new(brain, job, store, metrics)
                .with_outage_policy(OutagePolicy::for_ttl(ttl))
                .with_writer(demo_writer())
                .with_rebalance(cfg.job.spec.parallelism.rebalance.as_ref().map(RebalancePolicy::of)),
            fx: LocalEffects::new(RecoveryState::new(names, spares)),
            job_keys: keys.job(NAMESPACE, &name),
            start_unix: unix_now() - t0.elapsed().as_secs_f64(),
            etcd_endpoint: etcd_urls,
            client,
            t0,
            name,
            cfg,
            cluster,
            training: Training::default(),
            faults: FaultClock::default(),
            entries: Vec::new(),
            state: None,
            obs: Default::default(),
            last_error: None,
        })
    }

    /// One round; `true` once the run is over (finished or failed).
    async fn round(&mut self) -> Result<bool, RuntimeError> {
        let t = self.t0.elapsed().as_secs_f64();
        let now = self.start_unix + t;
        self.fx.journal.t = t;
        if self.t0.elapsed() > self.cfg.deadline {
            self.fx.failure =
                Some(format!("the run did not finish within {} s", self.cfg.deadline.as_secs()));
            return Ok(true);
        }
        self.drain_members(t).await?;
        self.fire_faults(now)?;
        self.decide(now).await;
        self.start_wanted()?;
        self.update_metrics(t);
        self.measure_resumes();
        // Every member exited, some at the job's end, and none is waiting to be started.
        let finished =
            !self.cluster.done.is_empty() && self.cluster.members.is_empty() && self.fx.wanted.is_empty();
        if finished && self.training.digest.is_none() {
            self.fx.failure =
                Some("the workers finished without reporting the final parameter digest".into());
        }
        Ok(self.fx.failure.is_some() || finished)
    }

    /// Takes the members' output lines and notices members that exited.
    async fn drain_members(&mut self, t: f64) -> Result<(), RuntimeError> {
        let mut exited = Vec::new();
        for (&rank, m) in self.cluster.members.iter_mut() {
            while let Ok(line) = m.lines.try_recv() {
                if let Some(joined) = self.training.take(m.generation, &line, t) {
                    m.generation = m.generation.max(joined);
                }
            }
            if let Some(status) = self.cluster.sup.exited(m.id)? {
                exited.push((rank, status));
            }
        }
        for (rank, status) in exited {
            self.cluster.members.remove(&rank);
            if status.success() {
                // Finished: its key stays until its lease runs out, so the end of the job is
                // never mistaken for a loss.
                self.cluster.done.insert(rank);
            } else {
                self.fx.journal.note(format!("member {rank} exited ({status})"));
                let delete = self.client.delete(self.job_keys.member(rank), None).await;
                delete.map_err(|e| RuntimeError::Etcd {
                    what: "delete member".into(),
                    detail: e.to_string(),
                })?;
            }
        }
        Ok(())
    }

    /// Fires the faults that are due (by step) and the flap onsets that are due (by time).
    fn fire_faults(&mut self, now: f64) -> Result<(), RuntimeError> {
        if self.state.as_ref().is_some_and(|s| s.phase != BrainPhase::Starting) {
            let due: Vec<ScheduledFault> =
                self.cfg.schedule.due(self.faults.fired, self.training.last_step).to_vec();
            for fault in due {
                self.faults.fired += 1;
                let node = self.state.as_ref().and_then(|s| s.node_names.get(fault.node as usize).cloned());
                let Some(node) = node else { continue };
                self.fx.journal.note(format!("inject {fault} (node {node})"));
                self.fx.injected.push(Injected { fault, at: now, matched: false });
                self.fire(&fault, &node, now)?;
            }
        }
        let (ready, later) =
            std::mem::take(&mut self.faults.timed).into_iter().partition(|(at, ..)| *at <= now);
        self.faults.timed = later;
        for (_, node, chip, fault) in ready {
            self.cluster.inject(&self.cfg.ninelives, &node, chip, fault)?;
        }
        Ok(())
    }

    fn fire(&mut self, fault: &ScheduledFault, node: &str, now: f64) -> Result<(), RuntimeError> {
        let chip = fault.chip.unwrap_or(0);
        match fault.kind {
            FaultKind::Chip => self.cluster.inject(&self.cfg.ninelives, node, chip, "ecc"),
            FaultKind::Hang => self.cluster.inject(&self.cfg.ninelives, node, chip, "hang"),
            FaultKind::Flap => {
                for onset in 0..FLAP_ONSETS {
                    let start = now + f64::from(onset) * 2.0 * FLAP_HALF_PERIOD_S;
                    self.faults.timed.push((start, node.to_string(), chip, "ecc"));
                    self.faults.timed.push((start + FLAP_HALF_PERIOD_S, node.to_string(), chip, "recover"));
                }
                Ok(())
            }
            FaultKind::Node => self.cluster.kill_node(node, fault.node),
            FaultKind::Worker => self.cluster.kill_member(fault.node),
        }
    }

    /// The control loop's round. A [`ControlError::Fenced`](ninelives_control::ControlError)
    /// (another driver claimed the job) repeats every round and publishes nothing. An error is
    /// journaled and the next round tries again (the run's deadline bounds a store that stays
    /// unreachable).
    async fn decide(&mut self, now: f64) {
        let outcome = self.control.step(&mut self.fx, now).await;
        if outcome.is_ok() {
            self.last_error = None;
        }
        match outcome {
            Ok(Progress::Ran(round)) => {
                self.obs = round.observation;
                self.state = Some(round.state);
            }
            Ok(Progress::Finished(state)) => self.state = Some(*state),
            Ok(Progress::NotStarted | Progress::Fenced | Progress::Frozen(_)) => {}
            Err(e) => {
                // Once per distinct error: an outage repeats the same one every round.
                let text = e.to_string();
                if self.last_error.as_deref() != Some(text.as_str()) {
                    self.fx.journal.note(format!("control loop: {text}"));
                    self.last_error = Some(text);
                }
            }
        }
    }

    /// Members the brain wants that do not run: started where their node is up.
    fn start_wanted(&mut self) -> Result<(), RuntimeError> {
        let Some(state) = &self.state else { return Ok(()) };
        for rank in self.fx.wanted.clone() {
            let Some(node) = state.node_names.get(rank as usize) else {
                self.fx.wanted.remove(&rank);
                continue;
            };
            if self.cluster.done.contains(&rank)
                || self.cluster.members.contains_key(&rank)
                || !state.expected_ranks().any(|r| r == rank)
            {
                // Finished, already running (the brain restarts only members it saw gone), or
                // no longer part of the job.
                self.fx.wanted.remove(&rank);
            } else if !self.cluster.dead_nodes.contains(node) {
                self.cluster.start_member(&self.cfg.ninelives, &self.member_spec(rank, node))?;
                self.fx.journal.note(format!("start member {rank} on {node}"));
                self.fx.wanted.remove(&rank);
            }
        }
        Ok(())
    }

    /// The member of `rank`, started on `node` (whose extra environment it gets).
    fn member_spec(&self, rank: u32, node: &str) -> MemberSpec {
        let cfg = self.cfg;
        let mut env = cfg.member_env.clone();
        env.extend(cfg.node_env.get(node).into_iter().flatten().cloned());
        let nodes = usize::try_from(cfg.job.spec.topology.nodes.max(1)).unwrap_or(1);
        let routing = cfg.member_routing.get(node).cloned().unwrap_or_default();
        MemberSpec {
            rank,
            manifest: cfg.manifest.clone(),
            etcd: routing.etcd.unwrap_or_else(|| self.etcd_endpoint.clone()),
            checkpoint_dir: cfg.work_dir.join("checkpoints"),
            steps: cfg.steps,
            checkpoint_every: cfg.job.spec.checkpoint.interval_steps.max(1),
            threads: (cfg.threads / nodes).max(1),
            step_timeout_seconds: STEP_TIMEOUT_S,
            job_key_file: cfg.work_dir.join(JOB_KEY_FILE),
            metrics_addr: cfg.metrics.as_ref().and_then(|m| m.workers.get(&rank).copied()),
            env,
            listen: routing.listen,
            advertise: routing.advertise,
        }
    }

    /// The job's progress gauges (the brain's own come from the loop).
    fn update_metrics(&self, t: f64) {
        let Some(m) = &self.cfg.metrics else { return };
        let tr = &self.training;
        if !tr.samples.is_empty() {
            m.recovery.progress(
                NAMESPACE,
                &self.name,
                tr.last_step,
                tr.last_loss,
                Some(goodput(&tr.samples, t)),
            );
        }
    }

    /// Recoveries whose training really resumed: measured from the step lines, reported once.
    fn measure_resumes(&mut self) {
        let metrics = self.cfg.metrics.as_ref().map(|m| &m.recovery);
        let mut waiting = Vec::new();
        for r in std::mem::take(&mut self.fx.resuming) {
            let Some(entry) = self.training.resumed(&r, self.start_unix) else {
                waiting.push(r);
                continue;
            };
            let event = RecoveryEvent {
                trigger: entry.trigger.clone(),
                kind: r.record.kind,
                tier: r.record.tier,
                detect_s: entry.detect_s,
                resume_s: entry.resume_s,
                steps_lost: entry.steps_lost,
                generation: r.record.generation,
                source: r.record.source,
            };
            event.emit(NAMESPACE, &self.name, metrics);
            self.entries.push(entry);
        }
        self.fx.resuming = waiting;
    }

    /// The live view: job, progress, a chip map row per node, recent events.
    fn live_state(&self) -> LiveState {
        let state = self.state.as_ref();
        let chips = self.cfg.job.spec.topology.chips_per_node;
        let nodes = self
            .cluster
            .agents
            .keys()
            .map(|name| {
                let index = state.and_then(|s| s.node_names.iter().position(|n| n == name));
                let role = match (index.and_then(|i| u32::try_from(i).ok()), state) {
                    (Some(i), Some(s)) if s.dropped.contains(&i) => "dropped".to_string(),
                    (Some(i), _) => format!("rank {i}"),
                    (None, Some(s)) if s.spares.contains(name) => "spare".to_string(),
                    _ => "out".to_string(),
                };
                let view = self.obs.nodes.get(name).filter(|v| v.alive);
                let cells = (0..chips)
                    .map(|c| match view {
                        None => ChipCell::Down,
                        Some(v) => v.chips.get(&c).map_or(ChipCell::Healthy, |r| ChipCell::of(r.state)),
                    })
                    .collect();
                NodeRow { name: name.clone(), role, chips: cells }
            })
            .collect();
        let tr = &self.training;
        LiveState {
            job: self.name.clone(),
            phase: state.map_or("starting", |s| s.phase.as_str()).to_string(),
            step: tr.last_step,
            steps: self.cfg.steps,
            loss: tr.last_loss,
            tokens_per_s: tr.last_tps,
            elapsed_s: self.t0.elapsed().as_secs_f64(),
            generation: state.map_or(0, |s| s.generation),
            nodes,
            events: self.fx.journal.lines.clone(),
        }
    }

    /// Stops every process and writes the report.
    fn finish(mut self, interrupted: bool) -> RunOutcome {
        self.cluster.sup.shutdown();
        let wall_s = self.t0.elapsed().as_secs_f64();
        let rebalances = self.rebalance_entries();
        let tr = self.training;
        let report = Report {
            recoveries: self.entries,
            goodput: goodput(&tr.samples, wall_s),
            final_loss: tr.last_loss,
            params_match: None,
            max_abs_diff: None,
            steps: tr.last_step,
            wall_s,
            params_sha256: tr.digest,
            reference_sha256: None,
            faults: self.cfg.schedule.faults().iter().map(ToString::to_string).collect(),
            rebalances,
            control_plane_outages: self.fx.outages,
        };
        RunOutcome { report, samples: tr.samples, failure: self.fx.failure, interrupted }
    }
}

impl LocalRun<'_> {
    /// The rebalances the brain published, each with its step inflation before (as the brain
    /// measured it) and after (the rebalanced placement under the load measured to the end), and
    /// the members' throughput on either side.
    fn rebalance_entries(&self) -> Vec<crate::report::RebalanceEntry> {
        let Some(state) = &self.state else { return Vec::new() };
        let shape = &self.control.brain().shape;
        let load = self.control.measured_load().table();
        let failed = FailedChips::from_chips(shape, state.excluded.keys().copied()).unwrap_or_default();
        let placement = self.control.placement();
        let span =
            self.cfg.job.spec.parallelism.rebalance.as_ref().map_or(20, |r| r.min_interval_steps.max(1));
        let mean_tps = |from: u64, to: u64| {
            let picked: Vec<f64> = self
                .training
                .samples
                .iter()
                .filter(|s| s.step > from && s.step <= to)
                .map(|s| s.tokens_per_s)
                .collect();
            (!picked.is_empty()).then(|| picked.iter().sum::<f64>() / picked.len() as f64)
        };
        let entries: Vec<_> = state.rebalances.iter().collect();
        entries
            .iter()
            .enumerate()
            .map(|(i, r)| {
                // "After": what the brain measured on this placement when it next decided to
                // rebalance, else the placement in force at the end under the load measured to
                // the end (no fault since), else what it predicted.
                let last = placement.filter(|p| p.generation == r.generation);
                let after = match (entries.get(i + 1), last, &load) {
                    (Some(next), _, _) => next.before,
                    (None, Some(p), Some(load)) => LoadStats::measure(shape, p, &failed, load).step_inflation,
                    _ => r.predicted,
                };
                // The step of the decision and the one after (the members' join) are left out.
                let next = entries.get(i + 1).map_or(u64::MAX, |n| n.step);
                crate::report::RebalanceEntry {
                    generation: r.generation,
                    step: r.step,
                    step_inflation_before: r.before,
                    step_inflation_after: after,
                    predicted: r.predicted,
                    replicas_moved: r.replicas_moved,
                    tokens_per_s_before: mean_tps(r.step.saturating_sub(span), r.step),
                    tokens_per_s_after: mean_tps(r.step + 2, (r.step + 2 + span).min(next)),
                }
            })
            .collect()
    }
}

/// This demo process as the job's writer: its epoch is its start time, so a later driver of the
/// same keys supersedes it and it can never overwrite what that one published.
fn demo_writer() -> ninelives_core::writer::WriterRecord {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let epoch = ninelives_core::writer::epoch_at(since);
    ninelives_core::writer::WriterRecord::new(format!("demo-{}", std::process::id()), epoch)
}
