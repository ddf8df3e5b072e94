//! The discrete-event loop: one policy over the shared fault trace.
//!
//! Events are ordered by time (then by insertion). A fault halts training at once (every MoE
//! layer's all-to-all is a barrier); the brain sees it after the detection delay of its kind and
//! decides; each published attempt finishes after its cost, when every member joins the
//! generation; the brain then records the recovery and training resumes from the rollback point.

use std::collections::{BTreeMap, BTreeSet};

use super::SimError;
use super::cluster::{Applied, Cluster};
use super::model::{GB, Policy, Recovery, SaveMode, SimParams, StateSizes};
use super::outcome::PolicyOutcome;
use super::trace::Fault;
use super::training::Training;
use crate::fault_schedule::FaultKind;
use crate::job::TrainingJobSpec;
use crate::keyspace::ChipState;
use crate::recovery::{BrainPhase, CompletedRecovery, Rung};

/// What the agents publish for a chip fault, and for a flapping chip once quarantined.
const CHIP_CODE: &str = "hbm-ecc-uncorrectable";
const FLAP_CODE: &str = "flapping:hbm-ecc-uncorrectable";

/// A change the brain observes.
#[derive(Clone, Debug)]
enum Change {
    Chip { node: String, chip: u32, state: ChipState, code: &'static str, since: f64 },
    NodeLost(String),
    WorkerLost(String),
    SpareBack(String),
}

#[derive(Clone, Debug)]
enum Event {
    /// Something breaks.
    Fault(Fault),
    /// A flapping chip fails again; the last onset is quarantined by its agent.
    Onset { node: u32, chip: u32, last: bool },
    /// The brain can see a change; `halting` when it reports a fault that stopped training.
    Visible { change: Change, halting: bool },
    /// The attempt that published `generation` (or the restart numbered so) is done.
    Resume(u64),
    /// The attempt that published `generation` reaches its deadline.
    Deadline(u64),
    /// A point of the progress curve.
    Sample,
}

/// Training stood still from `halted_at` until the recovery finishes.
#[derive(Clone, Debug)]
struct Episode {
    halted_at: f64,
    progress: f64,
    visible_at: Option<f64>,
    /// Node indices whose host memory was lost (node or worker gone).
    lost_hosts: BTreeSet<u32>,
}

struct Run<'a> {
    params: &'a SimParams,
    sizes: StateSizes,
    peer_copies: bool,
    nodes_per_group: u32,
    buddy_shift: u32,
    training: Training,
    cluster: Option<Cluster>,
    events: BTreeMap<(u64, u64), Event>,
    seq: u64,
    episode: Option<Episode>,
    /// Halting faults not yet visible to the brain.
    unseen: u32,
    /// Restarts started (checkpoint-restart), to ignore superseded ones.
    restart_id: u64,
    restart_at: f64,
    last_resume: f64,
    failed_at: Option<f64>,
    /// Machines that are physically down (lost, not yet repaired).
    down: BTreeSet<String>,
    out: PolicyOutcome,
}

/// Runs `policy` on `trace` (from [`super::trace::generate`]) for `params.horizon_s`.
pub fn simulate_policy(
    spec: &TrainingJobSpec,
    policy: &Policy,
    params: &SimParams,
    trace: &[Fault],
) -> Result<PolicyOutcome, SimError> {
    params.validate()?;
    let spec = super::model::policy_spec(spec, policy);
    let job = crate::validate::JobShape::resolve(&spec)
        .map_err(|v| SimError::Spec(v.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")))?;
    let sizes = StateSizes::of(&job);
    let (cluster, peer_copies) = match policy.recovery {
        Recovery::CheckpointRestart => (None, false),
        Recovery::Ninelives { peer_copies } => {
            let mut c = Cluster::new(&spec, peer_copies)?;
            c.start(0.0)?;
            (Some(c), peer_copies)
        }
    };
    let costs = &params.costs;
    let bytes = sizes.bytes_per_chip();
    let (pause, write) = match costs.save {
        SaveMode::Async => (bytes / (costs.snapshot_gbps * GB), bytes / (costs.write_gbps * GB)),
        SaveMode::Blocking => (bytes / (costs.snapshot_gbps * GB) + bytes / (costs.write_gbps * GB), 0.0),
    };
    let keep = usize::try_from(spec.checkpoint.keep_last).unwrap_or(usize::MAX);
    let nodes_per_group = job.nodes_per_group().max(1);
    let rack = job.nodes_per_rack.unwrap_or(1).max(1);
    let mut run = Run {
        params,
        sizes,
        peer_copies,
        nodes_per_group,
        buddy_shift: if rack < nodes_per_group { rack } else { 1 },
        training: Training::new(costs.step_s, spec.checkpoint.interval_steps, pause, write, keep),
        cluster,
        events: BTreeMap::new(),
        seq: 0,
        episode: None,
        unseen: 0,
        restart_id: 0,
        restart_at: 0.0,
        last_resume: 0.0,
        failed_at: None,
        down: BTreeSet::new(),
        out: PolicyOutcome {
            policy: policy.clone(),
            ettr: 0.0,
            goodput_steps_per_hour: 0.0,
            steps_kept: 0.0,
            steps_lost: 0.0,
            interruptions: 0,
            tiers: BTreeMap::new(),
            disk_rollbacks: 0,
            peer_rollbacks: 0,
            detection_s: 0.0,
            lost_work_s: 0.0,
            checkpoint_pause_s: 0.0,
            dead_s: 0.0,
            checkpoints_skipped: 0,
            job_failed: None,
            decisions: 0,
            progress: Vec::new(),
        },
    };
    for f in trace.iter().filter(|f| f.at < params.horizon_s) {
        run.push(f.at, Event::Fault(*f));
    }
    let samples = params.samples.max(1);
    for i in 1..=samples {
        run.push(params.horizon_s * f64::from(i) / f64::from(samples), Event::Sample);
    }
    run.events_loop()?;
    Ok(run.finish())
}

impl Run<'_> {
    fn push(&mut self, at: f64, event: Event) {
        self.seq += 1;
        // Microseconds order events; ties keep insertion order.
        let key = (at.max(0.0) * 1e6).round() as u64;
        self.events.insert((key, self.seq), event);
    }

    fn events_loop(&mut self) -> Result<(), SimError> {
        let horizon = self.params.horizon_s;
        while let Some(((key, _), event)) = self.events.pop_first() {
            let at = key as f64 / 1e6;
            if at > horizon {
                break;
            }
            if self.failed_at.is_some() && !matches!(event, Event::Sample) {
                continue;
            }
            match event {
                Event::Fault(f) => self.on_fault(f)?,
                Event::Onset { node, chip, last } => self.on_onset(at, node, chip, last)?,
                Event::Visible { change, halting } => self.on_visible(at, change, halting)?,
                Event::Resume(id) => self.on_resume(at, id)?,
                Event::Deadline(generation) => self.on_deadline(at, generation)?,
                Event::Sample => {
                    self.training.advance(at);
                    self.out.progress.push((at / 3600.0, self.training.progress));
                }
            }
        }
        Ok(())
    }

    fn detect_s(&self, kind: FaultKind) -> f64 {
        let c = &self.params.costs;
        match kind {
            FaultKind::Node => c.detect_node_s,
            FaultKind::Worker => c.detect_worker_s,
            FaultKind::Chip | FaultKind::Hang | FaultKind::Flap => c.detect_chip_s,
        }
    }

    fn node_name(&self, index: u32) -> String {
        match &self.cluster {
            Some(c) => c.name(index).unwrap_or_default().to_string(),
            None => format!("node-{index:05}"),
        }
    }

    /// Whether the fault interrupts training (it hits something the job uses, on a machine
    /// that is still up).
    fn interrupts(&self, kind: FaultKind, node: u32, chip: Option<u32>) -> bool {
        if self.down.contains(&self.node_name(node)) {
            return false;
        }
        match (&self.cluster, chip) {
            (None, _) => true,
            (Some(c), Some(chip)) if kind.targets_chip() => c.chip_in_use(node, chip),
            (Some(c), _) => !c.dropped(node),
        }
    }

    fn on_fault(&mut self, f: Fault) -> Result<(), SimError> {
        let name = self.node_name(f.node);
        let halting = self.interrupts(f.kind, f.node, f.chip);
        let repair = self.params.faults.repair_s;
        let seen = f.at + self.detect_s(f.kind);
        let change = match (f.kind, f.chip) {
            (FaultKind::Node, _) => {
                self.down.insert(name.clone());
                self.push(
                    f.at + repair,
                    Event::Visible { change: Change::SpareBack(name.clone()), halting: false },
                );
                Change::NodeLost(name)
            }
            (FaultKind::Worker, _) => Change::WorkerLost(name),
            (kind, Some(chip)) => {
                self.schedule_chip_life(f.at, f.node, &name, chip, kind == FaultKind::Flap);
                Change::Chip { node: name, chip, state: ChipState::Failed, code: CHIP_CODE, since: f.at }
            }
            (_, None) => return Ok(()),
        };
        if halting {
            self.interrupt(f.at, f.kind, f.node)?;
        }
        self.push(seen, Event::Visible { change, halting });
        Ok(())
    }

    /// A flapping chip's later onsets and healthy spells, and every faulty chip's repair.
    fn schedule_chip_life(&mut self, at: f64, node: u32, name: &str, chip: u32, flaps: bool) {
        let faults = &self.params.faults;
        let (half, onsets, repair) = (faults.flap_half_period_s, faults.flap_onsets, faults.repair_s);
        let healthy = |since: f64| Change::Chip {
            node: name.to_string(),
            chip,
            state: ChipState::Healthy,
            code: "ok",
            since,
        };
        if flaps {
            for i in 1..onsets.max(1) {
                let back = at + f64::from(2 * i - 1) * half;
                self.push(back, Event::Visible { change: healthy(back), halting: false });
                self.push(at + f64::from(2 * i) * half, Event::Onset { node, chip, last: i + 1 == onsets });
            }
        }
        self.push(at + repair, Event::Visible { change: healthy(at + repair), halting: false });
    }

    fn on_onset(&mut self, at: f64, node: u32, chip: u32, last: bool) -> Result<(), SimError> {
        let name = self.node_name(node);
        let halting = self.interrupts(FaultKind::Chip, node, Some(chip));
        let (state, code) =
            if last { (ChipState::Quarantined, FLAP_CODE) } else { (ChipState::Failed, CHIP_CODE) };
        if halting {
            self.interrupt(at, FaultKind::Flap, node)?;
        }
        let change = Change::Chip { node: name, chip, state, code, since: at };
        self.push(at + self.params.costs.detect_chip_s, Event::Visible { change, halting });
        Ok(())
    }

    /// Training stops at `at`; the checkpoint-restart policy schedules its restart.
    fn interrupt(&mut self, at: f64, kind: FaultKind, node: u32) -> Result<(), SimError> {
        self.out.interruptions += 1;
        self.unseen += 1;
        self.halt(at);
        if matches!(kind, FaultKind::Node | FaultKind::Worker)
            && let Some(ep) = self.episode.as_mut()
        {
            ep.lost_hosts.insert(node);
        }
        if self.cluster.is_none() {
            let c = &self.params.costs;
            let load = self.sizes.bytes_per_chip() / (c.read_gbps * GB);
            let done = at + self.detect_s(kind) + c.job_restart_s + load;
            self.restart_id += 1;
            self.restart_at = self.restart_at.max(done);
            let (when, id) = (self.restart_at, self.restart_id);
            self.push(when, Event::Resume(id));
        }
        Ok(())
    }

    fn halt(&mut self, at: f64) {
        if self.training.running {
            self.training.halt(at);
            self.episode = Some(Episode {
                halted_at: at,
                progress: self.training.progress,
                visible_at: None,
                lost_hosts: BTreeSet::new(),
            });
        }
    }

    fn on_visible(&mut self, at: f64, change: Change, halting: bool) -> Result<(), SimError> {
        if halting {
            self.unseen = self.unseen.saturating_sub(1);
            if let Some(ep) = self.episode.as_mut() {
                ep.visible_at.get_or_insert(at);
            }
        }
        if let Change::SpareBack(node) = &change {
            self.down.remove(node);
        }
        let Some(cluster) = self.cluster.as_mut() else { return Ok(()) };
        match change {
            Change::Chip { node, chip, state, code, since } => {
                cluster.set_chip(&node, chip, state, code, since)
            }
            Change::NodeLost(node) => cluster.node_lost(&node),
            Change::WorkerLost(node) => cluster.worker_lost(&node),
            Change::SpareBack(node) => cluster.spare_back(&node),
        }
        self.decide(at)?;
        let idle = self.cluster.as_ref().is_some_and(|c| c.active().is_none());
        if halting && idle && self.unseen == 0 && !self.training.running && self.failed_at.is_none() {
            // The brain saw the fault and found nothing to recover (it hit nothing placed):
            // the interrupted step is retried. Shown as its own tier so it cannot hide.
            let retry = self.episode_progress().floor();
            self.resume(at, retry, "unhandled", false);
        }
        Ok(())
    }

    fn on_resume(&mut self, at: f64, id: u64) -> Result<(), SimError> {
        if self.cluster.is_none() {
            if id == self.restart_id {
                let newest = self.training.newest() as f64;
                self.resume(at, newest, "restart", newest < self.episode_progress());
            }
            return Ok(());
        }
        let current = self.cluster.as_ref().and_then(|c| c.active()).map(|a| a.generation);
        if current == Some(id) {
            if let Some(c) = self.cluster.as_mut() {
                c.join_all();
            }
            self.decide(at)?;
        }
        Ok(())
    }

    fn on_deadline(&mut self, at: f64, generation: u64) -> Result<(), SimError> {
        let current = self.cluster.as_ref().and_then(|c| c.active()).map(|a| a.generation);
        if current == Some(generation) {
            self.decide(at)?;
        }
        Ok(())
    }

    fn episode_progress(&self) -> f64 {
        self.episode.as_ref().map_or(self.training.progress, |e| e.progress)
    }

    /// One decision of the brain at `at`, and what follows from it.
    fn decide(&mut self, at: f64) -> Result<(), SimError> {
        self.training.advance(at);
        let step = self.training.progress.floor() as u64;
        let committed = self.training.committed.clone();
        let Some(cluster) = self.cluster.as_mut() else { return Ok(()) };
        let applied = cluster.decide(at, step, &committed)?;
        let recovering = cluster.state.phase == BrainPhase::Recovering;
        if let Some(failure) = &applied.failed {
            self.out.job_failed = Some(failure.to_string());
            self.halt(at);
            self.failed_at = Some(self.episode.as_ref().map_or(at, |e| e.halted_at));
            return Ok(());
        }
        if recovering && self.training.running {
            // The brain recovers from something training had not noticed: it stops for it.
            self.halt(at);
            if let Some(ep) = self.episode.as_mut() {
                ep.visible_at = Some(at);
            }
        }
        for record in &applied.completed {
            self.complete(at, record);
        }
        if recovering && applied.published.is_some() {
            self.schedule_attempt(at, &applied);
        }
        Ok(())
    }

    fn schedule_attempt(&mut self, at: f64, applied: &Applied) {
        let Some(active) = self.cluster.as_ref().and_then(|c| c.active()).cloned() else { return };
        let duration = self.attempt_s(applied, active.rung, active.rollback_to);
        let done = at + duration;
        self.push(done, Event::Resume(active.generation));
        if done > active.deadline {
            self.push(active.deadline, Event::Deadline(active.generation));
        }
    }

    fn peer_ok(&self) -> bool {
        let Some(ep) = &self.episode else { return self.peer_copies };
        self.peer_copies && !ep.lost_hosts.iter().any(|&n| ep.lost_hosts.contains(&self.buddy(n)))
    }

    /// The node holding `node`'s peer copy: in the same group, one rack further on.
    fn buddy(&self, node: u32) -> u32 {
        let npg = self.nodes_per_group;
        let (group, local) = (node / npg, node % npg);
        group * npg + (local + self.buddy_shift) % npg
    }

    /// Seconds after a step ends until its peer snapshot is complete on every buddy: the
    /// device→host copy of the chip's state and the node's expert state over its link.
    fn snapshot_lag_s(&self) -> f64 {
        let c = &self.params.costs;
        let host = self.sizes.bytes_per_chip() / (c.snapshot_gbps * GB);
        let wire =
            self.sizes.expert_bytes_per_chip() * f64::from(self.sizes.chips_per_node) / (c.link_gbps * GB);
        host.max(wire)
    }

    /// The newest step whose peer snapshot is complete when training stood at `progress`.
    fn snapshot_step(&self, progress: f64) -> f64 {
        let step = self.params.costs.step_s;
        let lag = self.snapshot_lag_s();
        let every = (self.params.peer_interval_steps as f64).max((lag / step).ceil()).max(1.0);
        let k = ((progress - lag / step) / every).floor() * every;
        k.max(self.last_resume.floor()).min(progress.floor()).max(0.0)
    }

    /// How long an attempt takes from publication until every member joined. A reroute's loads
    /// (re-created redundancy) run in the background: training routes around them.
    fn attempt_s(&self, applied: &Applied, rung: Rung, rollback: Option<u64>) -> f64 {
        let c = &self.params.costs;
        let s = &self.sizes;
        let peer_ok = self.peer_ok();
        let cpn = f64::from(s.chips_per_node);
        let link = c.link_gbps * GB;
        let node_read = c.read_gbps * GB * cpn;
        let start = if applied.spares > 0 {
            c.spare_start_s
        } else if applied.restarted > 0 {
            c.worker_start_s
        } else {
            0.0
        };
        // Expert loads, per node in parallel: from live replicas over the link; checkpoint
        // sources come from the buddy's copy with peer copies, else from storage.
        let waited = applied.published.as_ref().filter(|_| rung != Rung::Reroute);
        let loads = waited.map_or(0.0, |control| {
            control.load_experts.values().fold(0.0_f64, |worst, loads| {
                let from_disk = loads
                    .iter()
                    .filter(|l| matches!(l.source, crate::recovery::LoadSource::Checkpoint { .. }))
                    .count() as f64;
                let from_peer = loads.len() as f64 - from_disk;
                let disk_rate = if peer_ok { link } else { node_read };
                worst.max(from_peer * s.expert_bytes / link + from_disk * s.expert_bytes / disk_rate)
            })
        });
        // A new or restarted member needs the node's dense state too (from any member).
        let newcomer =
            if applied.spares + applied.restarted > 0 { s.dense_bytes_per_chip * cpn / link } else { 0.0 };
        // A rollback: every member restores the whole state, from host memory or storage.
        let progress = self.episode_progress();
        let reload = match rollback {
            Some(step) if peer_ok && self.snapshot_step(progress).max(step as f64) < progress.floor() => {
                s.bytes_per_chip() / (c.snapshot_gbps * GB)
            }
            Some(step) if !peer_ok && (step as f64) < progress.floor() => {
                s.bytes_per_chip() / (c.read_gbps * GB)
            }
            _ => 0.0,
        };
        c.commit_s + start + loads.max(newcomer).max(reload)
    }

    /// The brain recorded a finished recovery: training resumes from its rollback point.
    fn complete(&mut self, at: f64, record: &CompletedRecovery) {
        let progress = self.episode_progress();
        let (to, rolled_back) = match record.rollback_to {
            None => (progress.floor(), false),
            Some(step) if self.peer_ok() => (self.snapshot_step(progress).max(step as f64), true),
            Some(step) => (step as f64, true),
        };
        if rolled_back {
            if self.peer_copies && self.peer_ok() {
                self.out.peer_rollbacks += 1;
            } else {
                self.out.disk_rollbacks += 1;
            }
        }
        self.resume(at, to, record.tier.as_str(), false);
    }

    /// Training continues at `at` from `to`; the episode's time goes to detection and `tier`.
    fn resume(&mut self, at: f64, to: f64, tier: &str, disk_rollback: bool) {
        if disk_rollback {
            self.out.disk_rollbacks += 1;
        }
        let mut carried = BTreeSet::new();
        if let Some(ep) = self.episode.take() {
            carried.clone_from(&ep.lost_hosts);
            let visible = ep.visible_at.unwrap_or(at).min(at);
            self.out.detection_s += visible - ep.halted_at;
            let t = self.out.tiers.entry(tier.to_string()).or_default();
            t.count += 1;
            t.seconds += at - visible;
            let lost = (ep.progress - to).max(0.0);
            self.out.steps_lost += lost;
            self.out.lost_work_s += lost * self.params.costs.step_s;
        }
        self.training.resume(at, to);
        self.last_resume = to;
        if self.unseen > 0 && self.cluster.is_some() {
            // A fault the brain has not seen yet already stopped training again; the hosts it
            // may have taken stay counted for the buddy check.
            self.halt(at);
            if let Some(ep) = self.episode.as_mut() {
                ep.lost_hosts = carried;
            }
        }
    }

    fn finish(mut self) -> PolicyOutcome {
        let horizon = self.params.horizon_s;
        self.training.advance(horizon);
        let open = self.episode.as_ref().map_or(0.0, |e| horizon - e.halted_at);
        let mut out = self.out;
        out.dead_s = open;
        out.steps_kept = self.training.progress;
        out.checkpoint_pause_s = self.training.pause_total_s;
        out.checkpoints_skipped = self.training.skipped;
        out.ettr = out.steps_kept * self.params.costs.step_s / horizon;
        out.goodput_steps_per_hour = out.steps_kept / (horizon / 3600.0);
        out.decisions = self.cluster.as_ref().map_or(0, |c| c.decisions);
        out
    }
}
