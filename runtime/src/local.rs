//! A whole ninelives system on this machine: etcd, one agent per node (and spare) on simulated
//! chips, the training worker, and the recovery brain — driven together, with scheduled faults.
//!
//! The brain is the same pure function the operator uses ([`ninelives_core::recovery::decide`]);
//! this loop is its local driver. Every 100 ms it reads the job's keys and the node keys from
//! etcd, decides, and carries the actions out:
//!
//! - `PublishPlacement` → one etcd transaction writing `control`, `placement` and `recovery`;
//! - `StartMember` → the worker process is (re)started with `--resume` when it is not running
//!   (so it restores the newest committed checkpoint — the brain's rollback target), and the
//!   member key of the rank is put under the runtime's lease once the worker trains;
//! - a published `restoreStep` while the worker runs → the worker is restarted with `--resume`:
//!   the single-process worker has no command endpoint, so a restart is how it rolls back;
//! - `BringInSpare` / `DropNode` → the node table; `RecordRecovery` → the report.
//!
//! The runtime also plays rank 0's reporter: it writes `progress` from the worker's step lines
//! and a `checkpoints/<step>` record for every committed checkpoint directory it finds (a
//! directory with its `manifest.json`, which the worker renames into place last).
//!
//! Worker model until the distributed worker (issue 7) is merged: ONE process trains the whole
//! job and stands for the workers of every node; it holds the member keys of all ranks. A
//! `worker:` or `node:` fault kills it (SIGKILL), which really loses its in-memory state; the
//! brain sees the members vanish and orders the restart. Reported numbers are measured from
//! what the processes did (step lines, restarts), not taken from the brain's plan.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};
use ninelives_core::TrainingJob;
use ninelives_core::fault_schedule::{
    FLAP_HALF_PERIOD_S, FLAP_ONSETS, FaultKind, FaultSchedule, ScheduledFault,
};
use ninelives_core::keyspace::{JobKeys, Keyspace};
use ninelives_core::placement::Placement;
use ninelives_core::recovery::{
    Action, BrainConfig, BrainPhase, CheckpointRecord, CompletedRecovery, Observation, ProgressRecord,
    RecoveryState, decide,
};

use crate::endpoint::{self, CommandRequest, WorkerCommand};
use crate::error::RuntimeError;
use crate::etcd::LocalEtcd;
use crate::live::{ChipCell, LiveState, NodeRow};
use crate::metrics::{RecoveryMetrics, RecoveryObservation};
use crate::processes::{
    MemberSpec, WorkerLaunch, WorkerLine, agent_command, inject_command, parse_worker_line,
};
use crate::report::{RecoveryEntry, Report, Sample, goodput};
use crate::supervisor::{ChildId, Supervisor};

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
    /// CPU threads of the worker.
    pub threads: usize,
    /// Upper bound on the whole run.
    pub deadline: Duration,
    /// Metrics: where agents and the worker serve `/metrics`, and the brain's own families.
    pub metrics: Option<MetricsPlan>,
}

/// Where the processes of a run serve their metrics, and the driver's own metrics.
#[derive(Clone, Debug)]
pub struct MetricsPlan {
    /// The recovery brain's and the job's metrics, updated by the driver (served by the caller).
    pub recovery: RecoveryMetrics,
    /// `/metrics` address of each agent, by node name (see [`node_names`]).
    pub agents: BTreeMap<String, SocketAddr>,
    /// `/metrics` address of the worker (each restart binds it again).
    pub worker: SocketAddr,
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

const POLL: Duration = Duration::from_millis(100);

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn etcd_err(what: &str, e: etcd_client::Error) -> RuntimeError {
    RuntimeError::Etcd { what: what.to_string(), detail: e.to_string() }
}

/// The committed checkpoints in `dir`: `step-<n>` directories holding `manifest.json`.
pub fn committed_checkpoints(dir: &Path) -> BTreeSet<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else { return BTreeSet::new() };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("manifest.json").is_file())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect()
}

/// A fault as injected, for matching it to the recovery it caused.
#[derive(Clone, Debug)]
struct Injected {
    fault: ScheduledFault,
    at: f64,
    matched: bool,
}

/// A recovery waiting for training to really resume.
struct Resuming {
    record: CompletedRecovery,
    trigger: String,
    detect_s: Option<f64>,
}

struct RunningWorker {
    id: ChildId,
    lines: mpsc::Receiver<String>,
    trained: bool,
}

/// Runs the job with its fault schedule until it succeeds, fails, hits the deadline or
/// `interrupt` resolves; `view` is called with the live state after every poll.
pub async fn run_local(
    cfg: &LocalRunConfig,
    launcher: &dyn WorkerLaunch,
    interrupt: impl Future<Output = ()>,
    mut view: impl FnMut(&LiveState),
) -> Result<RunOutcome, RuntimeError> {
    let t0 = Instant::now();
    let start_unix = unix_now();
    let mut sup = Supervisor::new(cfg.work_dir.join("logs"))?;
    let etcd = match &cfg.metrics {
        Some(m) => LocalEtcd::start_with_metrics(&mut sup, &cfg.work_dir, m.etcd)?,
        None => LocalEtcd::start(&mut sup, &cfg.work_dir)?,
    };
    let mut client =
        Client::connect([etcd.endpoint.as_str()], None).await.map_err(|e| etcd_err("connect", e))?;
    let keys = Keyspace::default();
    let name = cfg.job.metadata.name.clone().unwrap_or_else(|| "job".into());
    let job_keys = keys.job(NAMESPACE, &name);
    let mut brain_cfg =
        BrainConfig::from_spec(&cfg.job.spec).map_err(|e| RuntimeError::Brain(e.to_string()))?;
    brain_cfg.total_steps = cfg.steps;
    let topo = &cfg.job.spec.topology;
    let ttl = cfg.job.spec.failure_policy.heartbeat_ttl_seconds.max(1);
    let (names, spares) = node_names(topo.nodes, topo.spare_nodes);
    let metrics = cfg.metrics.as_ref();
    let min_healthy_fraction = cfg.job.spec.failure_policy.min_healthy_fraction;
    if let Some(m) = metrics {
        m.recovery.job_started(NAMESPACE, &name);
    }

    // The worker's command endpoint, which every agent is bound to for this job.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| RuntimeError::io("command endpoint", e))?;
    let endpoint = listener.local_addr().map_err(|e| RuntimeError::io("command endpoint", e))?;
    let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::channel::<CommandRequest>(64);
    let server = tokio::spawn(endpoint::serve(listener, cmd_tx));
    let binding = format!("{NAMESPACE}/{name}=http://{endpoint}");

    // Agents, one per node and spare.
    let mut agents: BTreeMap<String, (ChildId, PathBuf)> = BTreeMap::new();
    for node in names.iter().chain(&spares) {
        let chips_dir = cfg.work_dir.join("chips").join(node);
        let mut cmd = agent_command(
            &cfg.ninelives,
            node,
            &etcd.endpoint,
            &chips_dir,
            topo.chips_per_node,
            ttl,
            keys.prefix(),
        );
        cmd.args(["--worker", &binding]);
        if let Some(addr) = metrics.and_then(|m| m.agents.get(node)) {
            cmd.args(["--metrics-addr", &addr.to_string()]);
        }
        let id = sup.spawn(&format!("agent-{node}"), cmd)?;
        agents.insert(node.clone(), (id, chips_dir));
    }
    wait_for_agents(&mut client, &keys, agents.keys().cloned().collect(), &mut sup, &agents).await?;

    // The runtime's lease holds the member keys of the worker it supervises.
    let lease = client.lease_grant(i64::from(ttl), None).await.map_err(|e| etcd_err("lease", e))?.id();
    let (mut keeper, mut keep_stream) =
        client.lease_keep_alive(lease).await.map_err(|e| etcd_err("keepalive", e))?;

    let checkpoint_dir = cfg.work_dir.join("checkpoints");
    let every = cfg.job.spec.checkpoint.interval_steps.max(1);
    let member_spec = |rank: u32| MemberSpec {
        rank,
        world_size: topo.nodes,
        node: String::new(),
        manifest: cfg.manifest.clone(),
        etcd: etcd.endpoint.clone(),
        checkpoint_dir: checkpoint_dir.clone(),
        steps: cfg.steps,
        checkpoint_every: every,
        // Always from the newest committed checkpoint (none: step 0): the brain's rollback target.
        resume: true,
        threads: cfg.threads,
        metrics_addr: metrics.map(|m| m.worker),
    };
    let mut worker: Option<RunningWorker> = None;
    let mut state: Option<RecoveryState> = None;
    let mut samples: Vec<Sample> = Vec::new();
    let mut events: Vec<String> = Vec::new();
    let mut injected: Vec<Injected> = Vec::new();
    let mut timed: Vec<(f64, String, u32, &'static str)> = Vec::new();
    let mut resuming: Vec<Resuming> = Vec::new();
    let mut entries: Vec<RecoveryEntry> = Vec::new();
    let mut fired = 0usize;
    let mut last_step = 0u64;
    let mut last_loss: Option<f64> = None;
    let mut last_tps: Option<f64> = None;
    let mut written_progress = None;
    let mut written_checkpoints: BTreeSet<u64> = BTreeSet::new();
    let mut digest: Option<String> = None;
    let mut failure: Option<String> = None;
    let mut restored_generation = 0u64;
    let mut pending_restores: Vec<tokio::sync::oneshot::Sender<Result<(), String>>> = Vec::new();
    let mut members_up: BTreeSet<u32> = BTreeSet::new();
    let mut last_keepalive = Instant::now();
    let mut interrupted = false;
    let mut finished = false;
    tokio::pin!(interrupt);

    loop {
        tokio::select! {
            _ = &mut interrupt => { interrupted = true; break; }
            _ = tokio::time::sleep(POLL) => {}
        }
        let t = t0.elapsed().as_secs_f64();
        let now = start_unix + t;
        if t0.elapsed() > cfg.deadline {
            failure = Some(format!("the run did not finish within {} s", cfg.deadline.as_secs()));
            break;
        }
        if last_keepalive.elapsed() > Duration::from_secs(u64::from(ttl)) / 3 {
            keeper.keep_alive().await.map_err(|e| etcd_err("keepalive", e))?;
            let _ = keep_stream.message().await;
            last_keepalive = Instant::now();
        }

        // 1. Worker output and liveness.
        let mut worker_died = false;
        if let Some(w) = worker.as_mut() {
            while let Ok(line) = w.lines.try_recv() {
                match parse_worker_line(&line) {
                    Some(WorkerLine::Step { step, loss, tokens_per_s }) => {
                        samples.push(Sample { t, step, loss, tokens_per_s });
                        last_step = step;
                        last_loss = Some(loss);
                        last_tps = Some(tokens_per_s);
                        w.trained = true;
                    }
                    Some(WorkerLine::Digest(hex)) => digest = Some(hex),
                    None => {}
                }
            }
            if let Some(status) = sup.exited(w.id)? {
                if status.success() && digest.is_some() {
                    finished = true;
                } else {
                    events.push(format!("{t:7.1}s worker exited ({status})"));
                }
                worker_died = true;
            }
        }
        if worker_died {
            worker = None;
            for rank in std::mem::take(&mut members_up) {
                let _ = client.delete(job_keys.member(rank), None).await;
            }
        }
        if worker.as_ref().is_some_and(|w| w.trained) {
            let expected: Vec<u32> = state.as_ref().map_or_else(Vec::new, |s| s.expected_ranks().collect());
            for rank in expected {
                if members_up.insert(rank) {
                    let value = format!("{{\"rank\":{rank},\"pid\":{}}}", std::process::id());
                    client
                        .put(job_keys.member(rank), value, Some(PutOptions::new().with_lease(lease)))
                        .await
                        .map_err(|e| etcd_err("put member", e))?;
                }
            }
        }

        // Commands from the agents (the local-execution protocol).
        while let Ok(req) = cmd_rx.try_recv() {
            match req.command {
                WorkerCommand::Restore { generation, checkpoint_step } => {
                    if generation > restored_generation {
                        // Roll back: restart from the newest committed checkpoint (the brain's
                        // target). Member keys stay: this is an ordered restart, not a loss.
                        restored_generation = generation;
                        if let Some(w) = worker.take() {
                            sup.kill(w.id)?;
                        }
                        worker = Some(start_worker(launcher, &mut sup, &member_spec(0))?);
                        events.push(format!("{t:7.1}s generation {generation}: restore step {checkpoint_step} (worker restarted)"));
                    }
                    pending_restores.push(req.reply);
                }
                WorkerCommand::LoadExperts { .. } | WorkerCommand::Reroute { .. } => {
                    let _ = req.reply.send(Ok(()));
                }
            }
        }
        if worker.as_ref().is_some_and(|w| w.trained) {
            for reply in pending_restores.drain(..) {
                let _ = reply.send(Ok(()));
            }
        }

        // 2. Progress and committed checkpoints, as rank 0 reports them.
        if written_progress != Some(last_step) && !samples.is_empty() {
            let p = ProgressRecord { step: last_step, loss: last_loss };
            let v = serde_json::to_string(&p).unwrap_or_default();
            client.put(job_keys.progress(), v, None).await.map_err(|e| etcd_err("put progress", e))?;
            written_progress = Some(last_step);
        }
        let committed = committed_checkpoints(&checkpoint_dir);
        for &step in committed.difference(&written_checkpoints) {
            let record = CheckpointRecord {
                step,
                location: Some(checkpoint_dir.join(format!("step-{step:010}")).display().to_string()),
            };
            let v = serde_json::to_string(&record).unwrap_or_default();
            client
                .put(job_keys.checkpoint(step), v, None)
                .await
                .map_err(|e| etcd_err("put checkpoint", e))?;
        }
        for &step in written_checkpoints.difference(&committed) {
            let _ = client.delete(job_keys.checkpoint(step), None).await;
        }
        if let (Some(m), Some(&newest)) = (metrics, committed.last())
            && written_checkpoints.last() != Some(&newest)
        {
            let manifest = checkpoint_dir.join(format!("step-{newest:010}")).join("manifest.json");
            let at = std::fs::metadata(&manifest)
                .and_then(|md| md.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(now, |d| d.as_secs_f64());
            m.recovery.checkpoint(NAMESPACE, &name, newest, at);
        }
        written_checkpoints = committed;

        // 3. Faults that are due.
        if state.as_ref().is_some_and(|s| s.phase != BrainPhase::Starting) {
            let due: Vec<ScheduledFault> = cfg.schedule.due(fired, last_step).to_vec();
            for fault in due {
                fired += 1;
                let current = state.as_ref().and_then(|s| s.node_names.get(fault.node as usize).cloned());
                let Some(node) = current else { continue };
                events.push(format!("{t:7.1}s inject {fault} (node {node})"));
                injected.push(Injected { fault, at: now, matched: false });
                match fault.kind {
                    FaultKind::Chip => inject(cfg, &mut sup, &agents, &node, fault.chip.unwrap_or(0), "ecc")?,
                    FaultKind::Hang => {
                        inject(cfg, &mut sup, &agents, &node, fault.chip.unwrap_or(0), "hang")?
                    }
                    FaultKind::Flap => {
                        let chip = fault.chip.unwrap_or(0);
                        for onset in 0..FLAP_ONSETS {
                            let start = now + f64::from(onset) * 2.0 * FLAP_HALF_PERIOD_S;
                            timed.push((start, node.clone(), chip, "ecc"));
                            timed.push((start + FLAP_HALF_PERIOD_S, node.clone(), chip, "recover"));
                        }
                    }
                    FaultKind::Node => {
                        if let Some((id, _)) = agents.get(&node) {
                            sup.kill(*id)?;
                        }
                        if let Some(w) = worker.as_ref() {
                            sup.kill(w.id)?;
                        }
                    }
                    FaultKind::Worker => {
                        if let Some(w) = worker.as_ref() {
                            sup.kill(w.id)?;
                        }
                    }
                }
            }
        }
        let (ready, later): (Vec<_>, Vec<_>) = timed.drain(..).partition(|(at, ..)| *at <= now);
        timed = later;
        for (_, node, chip, fault) in ready {
            inject(cfg, &mut sup, &agents, &node, chip, fault)?;
        }

        // 4. Observe, decide, act.
        let resp = client
            .get(keys.prefix(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| etcd_err("read keyspace", e))?;
        let kvs: Vec<(String, Vec<u8>)> = resp
            .kvs()
            .iter()
            .filter_map(|kv| Some((kv.key_str().ok()?.to_string(), kv.value().to_vec())))
            .collect();
        let (obs, _malformed) = Observation::from_kvs(
            &keys,
            NAMESPACE,
            &name,
            now,
            kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        );
        let placement_key = job_keys.placement();
        let placement: Option<Placement> =
            kvs.iter().find(|(k, _)| *k == placement_key).and_then(|(_, v)| serde_json::from_slice(v).ok());
        let prior = match state.take() {
            Some(s) => s,
            None => match kvs.iter().find(|(k, _)| *k == job_keys.recovery()) {
                Some((k, v)) => RecoveryState::parse(k, v).map_err(|e| RuntimeError::Brain(e.to_string()))?,
                None => RecoveryState::new(names.clone(), spares.clone()),
            },
        };
        let decision = match decide(&brain_cfg, &prior, &obs, placement.as_ref()) {
            Ok(d) => d,
            Err(e) => {
                events.push(format!("{t:7.1}s brain: {e}"));
                state = Some(prior);
                continue;
            }
        };
        let mut published = false;
        let mut published_generation = 0u64;
        for action in &decision.actions {
            match action {
                Action::PublishPlacement { placement, control } => {
                    publish(&mut client, &job_keys, placement, control, &decision.state).await?;
                    published = true;
                    published_generation = placement.generation;
                    let _ = control;
                }
                Action::StartMember { rank, restore_step, .. } => {
                    if worker.is_none() && !finished {
                        // It resumes from the newest committed checkpoint: that satisfies the
                        // restore of the generation published with this order.
                        restored_generation = restored_generation.max(published_generation);
                        let member = member_spec(*rank);
                        worker = Some(start_worker(launcher, &mut sup, &member)?);
                        events.push(format!(
                            "{t:7.1}s start worker (rank {rank}{})",
                            restore_step.map(|s| format!(", from step {s}")).unwrap_or_default()
                        ));
                    }
                }
                Action::BringInSpare { spare, replaces, index } => {
                    events.push(format!("{t:7.1}s spare {spare} replaces {replaces} (node {index})"));
                }
                Action::DropNode { node, index } => {
                    events.push(format!("{t:7.1}s node {node} (index {index}) dropped; continuing degraded"));
                    if members_up.remove(index) {
                        let _ = client.delete(job_keys.member(*index), None).await;
                    }
                }
                Action::RecordRecovery(r) => {
                    let (trigger, detect_s) = match_fault(&mut injected, r);
                    events.push(format!(
                        "{t:7.1}s recovered {trigger} by {} (generation {})",
                        r.tier, r.generation
                    ));
                    resuming.push(Resuming { record: r.clone(), trigger, detect_s });
                }
                Action::JobSucceeded => events.push(format!("{t:7.1}s job succeeded")),
                Action::FailJob { reason } => {
                    events.push(format!("{t:7.1}s job FAILED: {reason}"));
                    failure = Some(reason.clone());
                }
            }
        }
        if !published && Some(&decision.state) != Some(&prior) {
            let v = decision.state.to_json();
            client.put(job_keys.recovery(), v, None).await.map_err(|e| etcd_err("put recovery", e))?;
        }
        if prior.phase != BrainPhase::Recovering
            && decision.state.phase == BrainPhase::Recovering
            && let Some(a) = &decision.state.active
        {
            let what: Vec<String> = a.triggers.iter().map(ToString::to_string).collect();
            events.push(format!("{t:7.1}s detected {} → {}", what.join(", "), a.rung));
        }
        state = Some(decision.state);
        if let (Some(m), Some(s)) = (metrics, state.as_ref()) {
            m.recovery.brain(NAMESPACE, &name, s, &obs, topo.chips_per_node, min_healthy_fraction);
            if !samples.is_empty() {
                m.recovery.progress(NAMESPACE, &name, last_step, last_loss, Some(goodput(&samples, t)));
            }
        }

        // 5. Recoveries whose training really resumed: measure from the step lines.
        resuming.retain(|r| {
            let unix = |s: &Sample| start_unix + s.t;
            let Some(i) = samples.iter().position(|s| unix(s) >= r.record.resumed_at) else { return true };
            let first = samples[i];
            // Work thrown away: the newest step reached before the fault was detected, minus the
            // step training went on from. Split
            // at detection, not at completion: a restore is acknowledged only after the
            // restarted worker's first step, so that step belongs to "after".
            let d = samples.iter().position(|s| unix(s) >= r.record.detected_at).unwrap_or(i);
            let before = samples[..d].iter().map(|s| s.step).max().unwrap_or(0);
            // The lowest step between detection and resume: a worker may still finish a step
            // after detection before it is restarted from an older checkpoint.
            let resumed_from =
                samples[d.min(i)..=i].iter().map(|s| s.step).min().unwrap_or(first.step).saturating_sub(1);
            let entry = RecoveryEntry {
                trigger: r.trigger.clone(),
                tier: r.record.tier.as_str().to_string(),
                detect_s: r.detect_s,
                resume_s: (unix(&first) - r.record.detected_at).max(0.0),
                steps_lost: before.saturating_sub(resumed_from),
                at_s: first.t,
            };
            if let Some(m) = metrics {
                // The kind, never the chip: `chip:1/3` (a matched fault) or `chip node-1/3 …`.
                let kind = entry.trigger.split([':', ' ']).next().unwrap_or_default();
                m.recovery.recovery(
                    NAMESPACE,
                    &name,
                    &RecoveryObservation {
                        tier: &entry.tier,
                        trigger: kind,
                        detect_s: entry.detect_s,
                        resume_s: entry.resume_s,
                        steps_lost: entry.steps_lost,
                    },
                );
            }
            entries.push(entry);
            false
        });

        view(&live_state(
            &name,
            cfg.steps,
            t,
            last_step,
            last_loss,
            last_tps,
            state.as_ref(),
            &obs,
            &agents,
            topo.chips_per_node,
            &events,
        ));
        let terminal = state.as_ref().is_some_and(|s| s.phase.is_terminal());
        if failure.is_some() || (finished && (terminal || worker.is_none())) {
            break;
        }
    }
    server.abort();
    let _ = client.lease_revoke(lease).await;
    sup.shutdown();
    let wall_s = t0.elapsed().as_secs_f64();
    let report = Report {
        recoveries: entries,
        goodput: goodput(&samples, wall_s),
        final_loss: last_loss,
        params_match: None,
        max_abs_diff: None,
        steps: last_step,
        wall_s,
        params_sha256: digest,
        reference_sha256: None,
        faults: cfg.schedule.faults().iter().map(ToString::to_string).collect(),
    };
    Ok(RunOutcome { report, samples, failure, interrupted })
}

async fn wait_for_agents(
    client: &mut Client,
    keys: &Keyspace,
    names: BTreeSet<String>,
    sup: &mut Supervisor,
    agents: &BTreeMap<String, (ChildId, PathBuf)>,
) -> Result<(), RuntimeError> {
    let started = Instant::now();
    loop {
        let resp = client
            .get(keys.nodes(), Some(GetOptions::new().with_prefix().with_keys_only()))
            .await
            .map_err(|e| etcd_err("read nodes", e))?;
        let alive: BTreeSet<String> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                keys.parse_node_key(kv.key_str().ok()?)
                    .filter(|(_, t)| *t == "alive")
                    .map(|(n, _)| n.to_string())
            })
            .collect();
        if names.is_subset(&alive) {
            return Ok(());
        }
        for (node, (id, _)) in agents {
            if let Some(status) = sup.exited(*id)? {
                return Err(RuntimeError::NotReady {
                    what: format!("agent {node}"),
                    seconds: started.elapsed().as_secs_f64(),
                    detail: format!("exited ({status}); log:\n{}", sup.log_tail(*id, 20)),
                });
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            let missing: Vec<&String> = names.difference(&alive).collect();
            return Err(RuntimeError::NotReady {
                what: "agents".into(),
                seconds: started.elapsed().as_secs_f64(),
                detail: format!("no presence in etcd from {missing:?}"),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

fn inject(
    cfg: &LocalRunConfig,
    sup: &mut Supervisor,
    agents: &BTreeMap<String, (ChildId, PathBuf)>,
    node: &str,
    chip: u32,
    fault: &str,
) -> Result<(), RuntimeError> {
    let Some((id, chips_dir)) = agents.get(node) else { return Ok(()) };
    if sup.exited(*id)?.is_some() {
        return Ok(()); // the node is gone; nothing to inject into
    }
    let out = inject_command(&cfg.ninelives, chips_dir, chip, fault).output().map_err(|source| {
        RuntimeError::Spawn {
            what: "agent inject".into(),
            program: cfg.ninelives.display().to_string(),
            source,
        }
    })?;
    if !out.status.success() {
        return Err(RuntimeError::NotReady {
            what: format!("inject {fault} into {node}/{chip}"),
            seconds: 0.0,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

async fn publish(
    client: &mut Client,
    keys: &JobKeys,
    placement: &Placement,
    control: &ninelives_core::recovery::ControlRecord,
    state: &RecoveryState,
) -> Result<(), RuntimeError> {
    // control before placement in the same transaction (agents read both on a placement change).
    let txn = Txn::new().and_then(vec![
        TxnOp::put(keys.control(), serde_json::to_string(control).unwrap_or_default(), None),
        TxnOp::put(keys.placement(), serde_json::to_string(placement).unwrap_or_default(), None),
        TxnOp::put(keys.recovery(), state.to_json(), None),
    ]);
    client.txn(txn).await.map_err(|e| etcd_err("publish generation", e))?;
    Ok(())
}

fn start_worker(
    launcher: &dyn WorkerLaunch,
    sup: &mut Supervisor,
    member: &MemberSpec,
) -> Result<RunningWorker, RuntimeError> {
    let name = if launcher.per_member() { format!("worker-{}", member.rank) } else { "worker".to_string() };
    let (id, stdout) = sup.spawn_piped(&name, launcher.command(member))?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("{name}-stdout"))
        .spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| RuntimeError::io("worker stdout thread", e))?;
    Ok(RunningWorker { id, lines: rx, trained: false })
}

/// The scheduled fault behind a recovery: by node (and chip) and kind, injected before the
/// brain detected it. Returns the report's trigger label and the measured detection time.
fn match_fault(injected: &mut [Injected], r: &CompletedRecovery) -> (String, Option<f64>) {
    use ninelives_core::recovery::TriggerKind;
    let fits = |i: &Injected| {
        i.at <= r.detected_at + 0.5
            && r.triggers.iter().any(|t| match t.kind {
                TriggerKind::Node => i.fault.kind == FaultKind::Node && i.fault.node == t.node,
                TriggerKind::Worker => matches!(i.fault.kind, FaultKind::Worker | FaultKind::Node),
                TriggerKind::Chip | TriggerKind::Hang | TriggerKind::Flap => {
                    i.fault.kind.targets_chip() && i.fault.node == t.node && i.fault.chip == t.chip
                }
            })
    };
    // Prefer a fault not yet explained; a node loss can explain two recoveries (its worker,
    // seen at once, and its lease, seen after the TTL).
    let pick =
        injected.iter().position(|i| !i.matched && fits(i)).or_else(|| injected.iter().rposition(fits));
    match pick {
        Some(k) => {
            let i = &mut injected[k];
            i.matched = true;
            let label = i.fault.to_string();
            let label = label.split('@').next().unwrap_or_default().to_string();
            (label, Some((r.detected_at - i.at).max(0.0)))
        }
        None => (r.trigger.clone(), r.detect_s),
    }
}

#[allow(clippy::too_many_arguments)]
fn live_state(
    job: &str,
    steps: u64,
    elapsed_s: f64,
    step: u64,
    loss: Option<f64>,
    tokens_per_s: Option<f64>,
    state: Option<&RecoveryState>,
    obs: &Observation,
    agents: &BTreeMap<String, (ChildId, PathBuf)>,
    chips: u32,
    events: &[String],
) -> LiveState {
    let mut nodes = Vec::new();
    for name in agents.keys() {
        let index = state.and_then(|s| s.node_names.iter().position(|n| n == name));
        let role = match (index, state) {
            (Some(i), Some(s)) if s.dropped.contains(&(i as u32)) => "dropped".to_string(),
            (Some(i), _) => format!("rank {i}"),
            (None, Some(s)) if s.spares.contains(name) => "spare".to_string(),
            _ => "out".to_string(),
        };
        let view = obs.nodes.get(name).filter(|v| v.alive);
        let cells = (0..chips)
            .map(|c| match view {
                None => ChipCell::Down,
                Some(v) => v.chips.get(&c).map_or(ChipCell::Healthy, |r| ChipCell::of(r.state)),
            })
            .collect();
        nodes.push(NodeRow { name: name.clone(), role, chips: cells });
    }
    LiveState {
        job: job.to_string(),
        phase: state.map_or("starting", |s| s.phase.as_str()).to_string(),
        step,
        steps,
        loss,
        tokens_per_s,
        elapsed_s,
        generation: state.map_or(0, |s| s.generation),
        nodes,
        events: events.to_vec(),
    }
}
