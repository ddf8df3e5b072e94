//! A whole ninelives system on this machine: etcd, one agent per node (and spare) on simulated
//! chips, one expert-parallel worker member per node, and the recovery brain — driven together,
//! with scheduled faults.
//!
//! The brain is the same pure function the operator uses ([`ninelives_core::recovery::decide`],
//! with [`BrainConfig::for_expert_parallel`]); this loop is its local driver, the counterpart of
//! the operator's `driver.rs` plus the part of its reconcile that starts workers. Every 100 ms it
//! reads the job's keys and the node keys from etcd, decides, and carries the actions out:
//!
//! - `PublishPlacement` → one etcd transaction writing `control`, `placement` (as the members'
//!   [`DistPlan`], built by [`from_brain`]) and `recovery`;
//! - `StartMember` → the member process of the rank is started once its node is up (a member
//!   ordered onto a node this run killed waits until the brain moves the rank to a spare);
//! - `BringInSpare` / `DropNode` → the node table; `RecordRecovery` → the report.
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

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, GetOptions, Txn, TxnOp};
use ninelives_core::TrainingJob;
use ninelives_core::fault_schedule::{
    FLAP_HALF_PERIOD_S, FLAP_ONSETS, FaultKind, FaultSchedule, ScheduledFault,
};
use ninelives_core::keyspace::{JobKeys, Keyspace};
use ninelives_core::placement::Placement;
use ninelives_core::recovery::{
    Action, BrainConfig, BrainPhase, CompletedRecovery, Observation, RecoveryState, decide,
};
use ninelives_worker::dist::plan::{DistPlan, from_published_generation, generation_writes};

use crate::error::RuntimeError;
use crate::etcd::LocalEtcd;
use crate::live::{ChipCell, LiveState, NodeRow};
use crate::metrics::{RecoveryMetrics, RecoveryObservation};
use crate::processes::{MemberSpec, WorkerLine, agent_command, inject_command, parse_worker_line};
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
    /// CPU threads shared by the worker members (each gets `threads / nodes`, at least 1).
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

/// A running member process and its stdout.
struct Member {
    id: ChildId,
    lines: mpsc::Receiver<String>,
    /// The newest generation it said it joined (0: none yet).
    generation: u64,
}

/// How long a member waits inside a step for a live peer. A dead peer's sockets close at once,
/// and a new generation aborts the step anyway; this bounds a peer that hangs.
const STEP_TIMEOUT_S: u64 = 30;

/// Runs the job with its fault schedule until it succeeds, fails, hits the deadline or
/// `interrupt` resolves; `view` is called with the live state after every poll.
pub async fn run_local(
    cfg: &LocalRunConfig,
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
    let mut brain_cfg = BrainConfig::from_spec(&cfg.job.spec)
        .map_err(|e| RuntimeError::Brain(e.to_string()))?
        .for_expert_parallel();
    brain_cfg.total_steps = cfg.steps;
    let topo = &cfg.job.spec.topology;
    let ttl = cfg.job.spec.failure_policy.heartbeat_ttl_seconds.max(1);
    let (names, spares) = node_names(topo.nodes, topo.spare_nodes);
    let metrics = cfg.metrics.as_ref();
    let min_healthy_fraction = cfg.job.spec.failure_policy.min_healthy_fraction;
    if let Some(m) = metrics {
        m.recovery.job_started(NAMESPACE, &name);
    }

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
        if let Some(addr) = metrics.and_then(|m| m.agents.get(node)) {
            cmd.args(["--metrics-addr", &addr.to_string()]);
        }
        let id = sup.spawn(&format!("agent-{node}"), cmd)?;
        agents.insert(node.clone(), (id, chips_dir));
    }
    wait_for_agents(&mut client, &keys, agents.keys().cloned().collect(), &mut sup, &agents).await?;

    let checkpoint_dir = cfg.work_dir.join("checkpoints");
    let every = cfg.job.spec.checkpoint.interval_steps.max(1);
    let member_threads = (cfg.threads / topo.nodes.max(1) as usize).max(1);
    let member_spec = |rank: u32| MemberSpec {
        rank,
        manifest: cfg.manifest.clone(),
        etcd: etcd.endpoint.clone(),
        checkpoint_dir: checkpoint_dir.clone(),
        steps: cfg.steps,
        checkpoint_every: every,
        threads: member_threads,
        step_timeout_seconds: STEP_TIMEOUT_S,
        metrics_addr: metrics.and_then(|m| m.workers.get(&rank).copied()),
    };
    let mut members: BTreeMap<u32, Member> = BTreeMap::new();
    // Ranks whose member exited successfully (the job's end), and ranks the brain ordered started.
    let mut done: BTreeSet<u32> = BTreeSet::new();
    let mut wanted: BTreeSet<u32> = BTreeSet::new();
    // Nodes this run killed: nothing is started on them again.
    let mut dead_nodes: BTreeSet<String> = BTreeSet::new();
    let mut state: Option<RecoveryState> = None;
    let mut previous_plan: Option<DistPlan> = None;
    let mut samples: Vec<Sample> = Vec::new();
    // (generation, step) of the newest step line taken: members print every step, and after a
    // rollback the steps start lower again under a newer generation.
    let mut newest_line = (0u64, 0u64);
    let mut events: Vec<String> = Vec::new();
    let mut injected: Vec<Injected> = Vec::new();
    let mut timed: Vec<(f64, String, u32, &'static str)> = Vec::new();
    let mut resuming: Vec<Resuming> = Vec::new();
    let mut entries: Vec<RecoveryEntry> = Vec::new();
    let mut fired = 0usize;
    let mut last_step = 0u64;
    let mut last_loss: Option<f64> = None;
    let mut last_tps: Option<f64> = None;
    let mut newest_checkpoint: Option<u64> = None;
    let mut digest: Option<String> = None;
    let mut failure: Option<String> = None;
    let mut interrupted = false;
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

        // 1. Member output and liveness.
        let mut exited = Vec::new();
        for (&rank, m) in members.iter_mut() {
            while let Ok(line) = m.lines.try_recv() {
                match parse_worker_line(&line) {
                    Some(WorkerLine::Joined { generation, .. }) => {
                        m.generation = m.generation.max(generation)
                    }
                    // Every member prints every step; the first line of a (generation, step)
                    // counts.
                    Some(WorkerLine::Step { step, loss, tokens_per_s })
                        if (m.generation, step) > newest_line =>
                    {
                        newest_line = (m.generation, step);
                        samples.push(Sample { t, step, loss, tokens_per_s });
                        last_step = step;
                        last_loss = Some(loss);
                        last_tps = Some(tokens_per_s);
                    }
                    Some(WorkerLine::Digest(hex)) => digest = Some(hex),
                    Some(WorkerLine::Step { .. }) | None => {}
                }
            }
            if let Some(status) = sup.exited(m.id)? {
                exited.push((rank, status));
            }
        }
        for (rank, status) in exited {
            members.remove(&rank);
            if status.success() {
                // Finished: its key stays until its lease runs out, so the end of the job is
                // never mistaken for a loss.
                done.insert(rank);
            } else {
                events.push(format!("{t:7.1}s member {rank} exited ({status})"));
                client.delete(job_keys.member(rank), None).await.map_err(|e| etcd_err("delete member", e))?;
            }
        }

        // 2. Faults that are due.
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
                        if let Some(m) = members.get(&fault.node) {
                            sup.kill(m.id)?;
                        }
                        dead_nodes.insert(node);
                    }
                    FaultKind::Worker => {
                        if let Some(m) = members.get(&fault.node) {
                            sup.kill(m.id)?;
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

        // 3. Observe, decide, act.
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
        let placement_bytes = kvs.iter().find(|(k, _)| *k == placement_key).map(|(_, v)| v.as_slice());
        let placement: Option<Placement> = placement_bytes.and_then(|v| serde_json::from_slice(v).ok());
        if previous_plan.is_none() {
            previous_plan = placement_bytes.and_then(|v| serde_json::from_slice(v).ok());
        }
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
        for action in &decision.actions {
            match action {
                Action::PublishPlacement { placement, control } => {
                    let plan = from_published_generation(
                        &brain_cfg.shape,
                        &decision.state,
                        placement,
                        control,
                        previous_plan.as_ref(),
                    )
                    .map_err(RuntimeError::Brain)?;
                    publish(&mut client, &job_keys, &plan, control, &decision.state).await?;
                    events.push(format!(
                        "{t:7.1}s generation {} ({}, restore {:?}) published",
                        placement.generation, plan.tier, plan.restore
                    ));
                    previous_plan = Some(plan);
                    published = true;
                }
                Action::StartMember { rank, .. } => {
                    wanted.insert(*rank);
                }
                Action::BringInSpare { spare, replaces, index } => {
                    events.push(format!("{t:7.1}s spare {spare} replaces {replaces} (node {index})"));
                }
                Action::DropNode { node, index } => {
                    events.push(format!("{t:7.1}s node {node} (index {index}) dropped; continuing degraded"));
                    wanted.remove(index);
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
        if !published && decision.state != prior {
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
        let current = decision.state;

        // 4. Members the brain wants that do not run: start them where their node is up.
        for rank in wanted.clone() {
            let Some(node) = current.node_names.get(rank as usize) else {
                wanted.remove(&rank);
                continue;
            };
            if done.contains(&rank)
                || members.contains_key(&rank)
                || !current.expected_ranks().any(|r| r == rank)
            {
                // Finished, already running (the brain restarts only members it saw gone), or
                // no longer part of the job.
                wanted.remove(&rank);
            } else if !dead_nodes.contains(node) {
                members.insert(rank, start_member(&cfg.ninelives, &mut sup, &member_spec(rank))?);
                events.push(format!("{t:7.1}s start member {rank} on {node}"));
                wanted.remove(&rank);
            }
        }

        if let Some(m) = metrics {
            m.recovery.brain(NAMESPACE, &name, &current, &obs, topo.chips_per_node, min_healthy_fraction);
            if !samples.is_empty() {
                m.recovery.progress(NAMESPACE, &name, last_step, last_loss, Some(goodput(&samples, t)));
            }
            let newest = obs.checkpoints.last().copied();
            if newest > newest_checkpoint
                && let Some(step) = newest
            {
                // The leader writes the record right after the commit: seen within a poll.
                m.recovery.checkpoint(NAMESPACE, &name, step, now);
            }
        }
        newest_checkpoint = newest_checkpoint.max(obs.checkpoints.last().copied());
        state = Some(current);

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
        // Every member exited, some at the job's end, and none is waiting to be started.
        let finished = !done.is_empty() && members.is_empty() && wanted.is_empty();
        if finished && digest.is_none() {
            failure = Some("the workers finished without reporting the final parameter digest".into());
        }
        if failure.is_some() || finished {
            break;
        }
    }
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
    plan: &DistPlan,
    control: &ninelives_core::recovery::ControlRecord,
    state: &RecoveryState,
) -> Result<(), RuntimeError> {
    let writes = generation_writes(keys, plan, control, state)
        .map_err(|e| RuntimeError::Brain(format!("cannot encode the generation: {e}")))?;
    let txn = Txn::new().and_then(writes.map(|(key, value)| TxnOp::put(key, value, None)).to_vec());
    client.txn(txn).await.map_err(|e| etcd_err("publish generation", e))?;
    Ok(())
}

fn start_member(ninelives: &Path, sup: &mut Supervisor, member: &MemberSpec) -> Result<Member, RuntimeError> {
    let name = format!("worker-{}", member.rank);
    let (id, stdout) = sup.spawn_piped(&name, member.command(ninelives))?;
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
    Ok(Member { id, lines: rx, generation: 0 })
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
