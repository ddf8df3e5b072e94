//! The decision function: `(config, persisted state, observation, placement) → (state, actions)`.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use super::control::{AckOutcome, ControlRecord};
use super::load::{RebalancePolicy, RebalanceRecord, rebalance};
use super::observe::Observation;
use super::reasons::{JobFailure, Refusal, RungRefusal};
use super::rung::Rung;
use super::state::{
    ActiveRecovery, Attempt, BrainPhase, CompletedRecovery, Exclusion, HISTORY_LIMIT, RecoveryState,
    RestoreSource, StampRejected, Trigger, TriggerKind,
};
use crate::job::{RecoveryTier, TrainingJobSpec};
use crate::placement::{
    ChipId, ExpertLoad, FailedChips, GroupPlacement, LoadStats, Move, Placement, PlacementShape, PlanError,
    Redundancy, ReplanOptions, Source, Tier, initial_placement, replan,
};
use crate::validate::JobShape;

/// The trigger code of a member that had not joined the job's first generation by
/// `failurePolicy.startTimeoutSeconds` (a [`TriggerKind::Worker`] trigger).
pub const START_TIMEOUT_CODE: &str = "start-timeout";

/// A chip that failed stays out of placements until it has been usable this long without a
/// relapse (hysteresis against flapping; the agent's own flap window is 600 s).
pub const DEFAULT_REJOIN_AFTER_SECONDS: f64 = 600.0;

/// Everything fixed about a job that the brain decides with.
#[derive(Clone, Debug, PartialEq)]
pub struct BrainConfig {
    /// The planner's view of the job.
    pub shape: PlacementShape,
    /// Expert load the planner balances (uniform unless measured).
    pub load: ExpertLoad,
    /// Planner knobs.
    pub options: ReplanOptions,
    /// Rungs the failure policy allows (`replace` allows `shrink` too).
    pub allowed: BTreeSet<Rung>,
    /// An attempt not complete within this escalates to the next rung.
    pub recovery_timeout_s: f64,
    /// Members not joined this long after the first generation was published are recovered
    /// like lost workers (`failurePolicy.startTimeoutSeconds`).
    pub start_timeout_s: f64,
    /// Deadline for agents to apply a generation (written into the control record).
    pub apply_timeout_s: f64,
    /// Recoveries after which the job fails instead.
    pub max_recoveries: u32,
    /// Steps of the job; reaching them is success.
    pub total_steps: u64,
    /// See [`DEFAULT_REJOIN_AFTER_SECONDS`].
    pub rejoin_after_s: f64,
    /// Whether a node can copy an expert's live state from a peer ([`Source::Peer`] loads, done
    /// by agents). Expert-parallel worker processes cannot: for them every attempt that moves an
    /// expert or restarts a worker rolls the job back to the newest checkpoint.
    pub peer_copies: bool,
    /// Copies of each member's training state kept in other members' host memory
    /// (`checkpoint.peerCopies`). With at least one, an attempt that must roll back rolls back
    /// to the newest complete peer snapshot the survivors cover, not to the disk checkpoint.
    pub peer_snapshots: u32,
    /// Members snapshot every this many steps (`checkpoint.peerIntervalSteps`, ≥ 1).
    pub peer_interval_steps: u64,
}

impl BrainConfig {
    /// The configuration of a validated spec.
    pub fn from_spec(spec: &TrainingJobSpec) -> Result<Self, BrainError> {
        let shape = JobShape::resolve(spec).map_err(|violations| {
            BrainError::InvalidSpec(violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
        })?;
        let policy = &spec.failure_policy;
        let shape = PlacementShape::from_job(&shape, policy.min_healthy_fraction);
        shape.validate()?;
        let mut allowed = BTreeSet::new();
        for tier in &policy.allowed_tiers {
            match tier {
                RecoveryTier::Reroute => allowed.insert(Rung::Reroute),
                RecoveryTier::Reshard => allowed.insert(Rung::Reshard),
                RecoveryTier::Restore => allowed.insert(Rung::Restore),
                RecoveryTier::Replace => allowed.insert(Rung::Replace) | allowed.insert(Rung::Shrink),
            };
        }
        let timeout = f64::from(policy.recovery_timeout_seconds.max(1));
        Ok(Self {
            load: ExpertLoad::uniform(&shape),
            shape,
            options: ReplanOptions::default(),
            allowed,
            recovery_timeout_s: timeout,
            start_timeout_s: f64::from(policy.start_timeout_seconds.max(1)),
            apply_timeout_s: timeout,
            max_recoveries: policy.max_recoveries,
            total_steps: spec.training.steps,
            rejoin_after_s: DEFAULT_REJOIN_AFTER_SECONDS,
            peer_copies: true,
            peer_snapshots: spec.checkpoint.peer_copies,
            peer_interval_steps: spec.checkpoint.peer_interval_steps.max(1),
        })
    }

    /// This configuration for expert-parallel worker processes (Kubernetes), which apply
    /// generations themselves: no live copies between chips (a rollback instead, from peer
    /// snapshots when `peer_snapshots` allows, else from disk), and lost redundancy is not re-created and nothing
    /// rebalanced, so a reroute moves no expert and keeps every member's memory.
    #[must_use]
    pub fn for_expert_parallel(mut self) -> Self {
        self.peer_copies = false;
        self.options = ReplanOptions {
            redundancy: Redundancy::Defer,
            rebalance: false,
            rebalance_threshold: f64::INFINITY,
            rebalance_target: 1.0,
        };
        self
    }
}

/// Input the brain cannot act on. The job is left as it is and the error reported; other jobs
/// are unaffected.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum BrainError {
    /// The spec does not validate.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// The placement or record does not fit the job (e.g. corrupted in etcd).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The record's node table does not fit the job's topology.
    #[error("recovery record lists {found} nodes but the job has {expected}")]
    NodeTable {
        /// Nodes in the job.
        expected: usize,
        /// Nodes in the record.
        found: usize,
    },
}

/// What the runtime (operator or local demo) must do. Apply `PublishPlacement` and the new
/// state in one etcd transaction (`control`, `placement`, `recovery`), so a restart never sees
/// one without the other.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Publish a placement generation and its control record.
    PublishPlacement {
        /// The placement.
        placement: Placement,
        /// What agents must do to apply it.
        control: ControlRecord,
    },
    /// Make sure the worker of `rank` runs on `node` (start or restart it); with
    /// `restore_step` it starts from that checkpoint.
    StartMember {
        /// Rank (= node index).
        rank: u32,
        /// Node name.
        node: String,
        /// Checkpoint to start from (0 = the seeded initial state).
        restore_step: Option<u64>,
    },
    /// A spare node takes over node index `index` from `replaces`.
    BringInSpare {
        /// The spare's name.
        spare: String,
        /// The node it replaces.
        replaces: String,
        /// The index it takes over.
        index: u32,
    },
    /// Node index `index` leaves the job (its worker, if any, is stopped).
    DropNode {
        /// Index.
        index: u32,
        /// Name.
        node: String,
    },
    /// A recovery finished: record it (status, Event, metrics, report).
    RecordRecovery(CompletedRecovery),
    /// Every step is done.
    JobSucceeded,
    /// The job cannot continue.
    FailJob(JobFailure),
}

/// The outcome of one decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The state to persist (write it when it differs from the one read).
    pub state: RecoveryState,
    /// What to do, in order.
    pub actions: Vec<Action>,
}

/// What the members measured, as the control loop's [`LoadTracker`](super::LoadTracker) has
/// smoothed it, and when to act on it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Feedback {
    /// The measured load table; every re-plan uses it instead of [`BrainConfig::load`].
    pub load: Option<ExpertLoad>,
    /// When a running job is rebalanced for the measured load (`spec.parallelism.rebalance`).
    pub rebalance: Option<RebalancePolicy>,
}

/// Decides one step of a job's recovery.
///
/// Pure and idempotent: the same inputs give the same decision, and feeding a decision's state
/// back with an unchanged observation gives no further actions. `placement` is the generation in
/// force as read from etcd (`None` before the first); it is untrusted and checked by the planner.
pub fn decide(
    config: &BrainConfig,
    prior: &RecoveryState,
    observation: &Observation,
    placement: Option<&Placement>,
) -> Result<Decision, BrainError> {
    decide_with(config, &Feedback::default(), prior, observation, placement)
}

/// [`decide`] with measured load: re-plans use `feedback.load`, and a running job whose measured
/// step inflation passes the policy's threshold (at most once per `minIntervalSteps`, once every
/// member joined the generation in force, no fault pending) gets a rebalance generation: no
/// rollback, every gained replica copied from a live holder (`ControlRecord::rebalance`).
pub fn decide_with(
    config: &BrainConfig,
    feedback: &Feedback,
    prior: &RecoveryState,
    observation: &Observation,
    placement: Option<&Placement>,
) -> Result<Decision, BrainError> {
    let mut d = Decider {
        cfg: config,
        load: feedback.load.as_ref().unwrap_or(&config.load),
        feedback,
        obs: observation,
        st: prior.clone(),
        actions: Vec::new(),
    };
    if d.st.phase.is_terminal() {
        return Ok(d.finish());
    }
    let nodes = config.shape.nodes as usize;
    if d.st.node_names.len() != nodes {
        return Err(BrainError::NodeTable { expected: nodes, found: d.st.node_names.len() });
    }
    if d.st.phase != BrainPhase::Starting && observation.step.is_some_and(|s| s >= config.total_steps) {
        d.st.phase = BrainPhase::Succeeded;
        d.st.active = None;
        d.actions.push(Action::JobSucceeded);
        return Ok(d.finish());
    }
    let health = d.assess();
    match d.st.phase {
        BrainPhase::Starting => {
            d.start(placement)?;
            d.start_faults(&health, placement)?;
        }
        BrainPhase::Running => {
            let triggers = d.new_triggers(&health);
            if !triggers.is_empty() {
                d.begin(triggers, placement)?;
            } else if health.missing.is_empty() {
                d.maybe_rebalance(placement)?;
            }
        }
        BrainPhase::Recovering => d.advance(&health, placement)?,
        BrainPhase::Succeeded | BrainPhase::Failed => {}
    }
    Ok(d.finish())
}

/// What the observation says about the job's nodes, after hysteresis.
struct Health {
    /// Usable-or-not of every chip of every node not dropped: `Some((code, since))` when bad.
    bad: BTreeMap<ChipId, (String, Option<f64>)>,
    /// Node indices (not dropped) whose agent is not alive.
    down: BTreeSet<u32>,
    /// Ranks expected but without membership, on nodes that are alive.
    missing: BTreeSet<u32>,
}

/// A rung's concrete plan, not yet applied to the state.
struct Published {
    placement: Placement,
    moves: Vec<Move>,
    plan_tier: &'static str,
    checkpoint_loads: bool,
    node_names: Vec<String>,
    spares: Vec<String>,
    dropped: BTreeSet<u32>,
    excluded: BTreeMap<ChipId, Exclusion>,
    restart: BTreeSet<u32>,
    force_rollback: bool,
    pre_actions: Vec<Action>,
}

struct Decider<'a> {
    cfg: &'a BrainConfig,
    /// The load re-plans balance: measured when fed back, else the configured one.
    load: &'a ExpertLoad,
    feedback: &'a Feedback,
    obs: &'a Observation,
    st: RecoveryState,
    actions: Vec<Action>,
}

impl Decider<'_> {
    fn finish(self) -> Decision {
        Decision { state: self.st, actions: self.actions }
    }

    fn cpn(&self) -> u32 {
        self.cfg.shape.chips_per_node
    }

    fn alive(&self, index: u32) -> bool {
        let name = &self.st.node_names[index as usize];
        self.obs.nodes.get(name).is_some_and(|v| v.alive)
    }

    /// Reads chip/node/member health and updates the hysteresis of excluded chips.
    fn assess(&mut self) -> Health {
        let mut bad = BTreeMap::new();
        let mut down = BTreeSet::new();
        let ranks: Vec<u32> = self.st.expected_ranks().collect();
        for &n in &ranks {
            let name = &self.st.node_names[n as usize];
            match self.obs.nodes.get(name).filter(|v| v.alive) {
                None => {
                    down.insert(n);
                    for c in 0..self.cpn() {
                        bad.insert(ChipId::new(n, c), ("node-lost".to_string(), None));
                    }
                }
                Some(view) => {
                    for (&c, record) in view.chips.range(..self.cpn()) {
                        if !record.state.usable() {
                            bad.insert(ChipId::new(n, c), (record.code.clone(), Some(record.since)));
                        }
                    }
                }
            }
        }
        let now = self.obs.now;
        let rejoin = self.cfg.rejoin_after_s;
        let dropped = self.st.dropped.clone();
        self.st.excluded.retain(|chip, ex| {
            if dropped.contains(&chip.node) {
                return true;
            }
            if bad.contains_key(chip) {
                if ex.healthy_since.take().is_some() {
                    ex.relapses += 1;
                }
                true
            } else {
                let since = *ex.healthy_since.get_or_insert(now);
                now - since < rejoin
            }
        });
        let missing =
            ranks.iter().copied().filter(|r| !down.contains(r) && !self.obs.members.contains(r)).collect();
        Health { bad, down, missing }
    }

    /// Faults not yet handled: lost nodes, bad chips not excluded, lost workers.
    fn new_triggers(&self, health: &Health) -> Vec<Trigger> {
        let name = |n: u32| self.st.node_names[n as usize].clone();
        let mut out = Vec::new();
        for &n in &health.down {
            if (0..self.cpn()).any(|c| !self.st.excluded.contains_key(&ChipId::new(n, c))) {
                out.push(Trigger {
                    kind: TriggerKind::Node,
                    node: n,
                    node_name: name(n),
                    chip: None,
                    code: "node-lost".into(),
                    at: None,
                    stamp_rejected: None,
                });
            }
        }
        for (chip, (code, since)) in &health.bad {
            if health.down.contains(&chip.node) || self.st.excluded.contains_key(chip) {
                continue;
            }
            // The agent's stamp is its own clock: taken only within what the brain's clock
            // allows (a node whose clock is an hour behind must not make detection read an hour).
            let checked = since.map(|at| StampRejected::check(at, self.obs.now, self.obs.previous_decision));
            out.push(Trigger {
                kind: TriggerKind::of_chip_code(code),
                node: chip.node,
                node_name: name(chip.node),
                chip: Some(chip.chip),
                code: code.clone(),
                at: checked.and_then(Result::ok),
                stamp_rejected: checked.and_then(Result::err),
            });
        }
        let active = self.st.active.as_ref();
        for &r in &health.missing {
            let handled = active.is_some_and(|a| {
                a.restarted.contains(&r)
                    || a.triggers.iter().any(|t| t.kind == TriggerKind::Worker && t.node == r)
            });
            if !handled {
                out.push(Trigger {
                    kind: TriggerKind::Worker,
                    node: r,
                    node_name: name(r),
                    chip: None,
                    code: "worker-lost".into(),
                    at: None,
                    stamp_rejected: None,
                });
            }
        }
        out
    }

    fn exclude(&mut self, triggers: &[Trigger]) {
        let now = self.obs.now;
        for t in triggers {
            let chips: Vec<u32> = match (t.kind, t.chip) {
                (TriggerKind::Node, _) => (0..self.cpn()).collect(),
                (_, Some(c)) => vec![c],
                (_, None) => Vec::new(),
            };
            for c in chips {
                self.st.excluded.entry(ChipId::new(t.node, c)).or_insert_with(|| Exclusion {
                    code: t.code.clone(),
                    since: now,
                    healthy_since: None,
                    relapses: 0,
                });
            }
        }
    }

    fn start(&mut self, placement: Option<&Placement>) -> Result<(), BrainError> {
        match placement {
            None if self.st.generation == 0 => {
                let p = initial_placement(&self.cfg.shape, self.load)?;
                self.st.generation = p.generation;
                self.st.starting_since = Some(self.obs.now);
                // A job that starts over committed checkpoints (a relaunch) resumes from the
                // newest; a new job has none and starts from the seeded initial state.
                let restore_step = self.obs.checkpoints.last().copied();
                let control = ControlRecord {
                    generation: p.generation,
                    restore_step,
                    timeout_seconds: Some(self.cfg.apply_timeout_s),
                    ..Default::default()
                };
                self.actions.push(Action::PublishPlacement { placement: p, control });
                let ranks: Vec<u32> = self.st.expected_ranks().collect();
                for rank in ranks {
                    let node = self.st.node_names[rank as usize].clone();
                    self.actions.push(Action::StartMember { rank, node, restore_step });
                }
            }
            // Published in the same transaction as the record, so it will be read next time.
            None => {}
            Some(p) => self.st.generation = self.st.generation.max(p.generation),
        }
        if self.st.generation > 0 && self.st.expected_ranks().all(|r| self.obs.members.contains(&r)) {
            self.st.phase = BrainPhase::Running;
        }
        Ok(())
    }

    /// Faults before the first step, once the first generation is in force: a lost node or a
    /// failed chip is recovered at once, like any other; members that have not joined are
    /// waited for until the start deadline (workers take time to start), then recovered as lost
    /// workers (code [`START_TIMEOUT_CODE`]). With no recovery left the job fails
    /// ([`JobFailure::StartTimedOut`]) instead of hanging in `Starting`.
    fn start_faults(&mut self, health: &Health, placement: Option<&Placement>) -> Result<(), BrainError> {
        if self.st.phase != BrainPhase::Starting || placement.is_none() || self.st.generation == 0 {
            return Ok(());
        }
        // A record written before the deadline existed starts its clock now.
        let since = *self.st.starting_since.get_or_insert(self.obs.now);
        let overdue = self.obs.now >= since + self.cfg.start_timeout_s;
        let mut triggers = self.new_triggers(health);
        triggers.retain(|t| t.kind != TriggerKind::Worker || overdue);
        for t in &mut triggers {
            if t.kind == TriggerKind::Worker {
                t.code = START_TIMEOUT_CODE.to_string();
            }
        }
        if triggers.is_empty() {
            return Ok(());
        }
        if overdue && self.st.recoveries >= self.cfg.max_recoveries {
            let missing = health.missing.iter().map(|&r| self.st.node_names[r as usize].clone()).collect();
            self.fail(JobFailure::StartTimedOut { missing });
            return Ok(());
        }
        self.begin(triggers, placement)?;
        // Members still starting (before the deadline) are waited for like restarted ones, not
        // taken for lost by the recovery.
        if let Some(a) = self.st.active.as_mut() {
            a.restarted.extend(health.missing.iter().copied());
        }
        Ok(())
    }

    fn fail(&mut self, failure: JobFailure) {
        self.st.phase = BrainPhase::Failed;
        self.st.active = None;
        self.st.failure = Some(failure.clone());
        self.actions.push(Action::FailJob(failure));
    }

    fn begin(&mut self, triggers: Vec<Trigger>, placement: Option<&Placement>) -> Result<(), BrainError> {
        if self.st.recoveries >= self.cfg.max_recoveries {
            let triggers = triggers.iter().map(ToString::to_string).collect();
            self.fail(JobFailure::MaxRecoveriesExceeded { triggers, max: self.cfg.max_recoveries });
            return Ok(());
        }
        self.st.recoveries += 1;
        self.exclude(&triggers);
        let start = first_rung(&triggers);
        self.st.active = Some(ActiveRecovery {
            id: self.st.recoveries,
            fault_at: earliest(&triggers, None),
            triggers,
            rung: start,
            generation: self.st.generation,
            detected_at: self.obs.now,
            deadline: self.obs.now,
            step_at_detection: self.obs.step.unwrap_or(0),
            rollback_to: None,
            rollback_from_peers: false,
            plan_tier: String::new(),
            experts_moved: 0,
            restarted: BTreeSet::new(),
            attempts: Vec::new(),
        });
        self.st.phase = BrainPhase::Recovering;
        self.attempt_from(start, placement)
    }

    fn advance(&mut self, health: &Health, placement: Option<&Placement>) -> Result<(), BrainError> {
        let Some(active) = self.st.active.clone() else {
            self.st.phase = BrainPhase::Running;
            return Ok(());
        };
        let new = self.new_triggers(health);
        if !new.is_empty() {
            // A failure during a recovery: fold it in and re-plan from the published placement
            // (its pending loads are carried or re-sourced by the planner).
            let what: Vec<String> = new.iter().map(ToString::to_string).collect();
            self.exclude(&new);
            let start = self.rung_for(&new);
            if let Some(a) = self.st.active.as_mut() {
                a.fault_at = earliest(&new, a.fault_at);
                a.triggers.extend(new);
                abandon(a, format!("new fault during the recovery: {}", what.join(", ")));
            }
            return self.attempt_from(start, placement);
        }
        if placement.is_some_and(|p| p.generation < active.generation) {
            // The runtime writes placement and record in one transaction; an older placement
            // means the generation was never published: publish the attempt again.
            return self.attempt_from(active.rung, placement);
        }
        let generation = active.generation;
        let acks = self.obs.acks.get(&generation);
        let participants: Vec<u32> = self.st.expected_ranks().collect();
        let mut waiting = Vec::new();
        let joined = self.obs.joined.get(&generation);
        for &n in &participants {
            let name = &self.st.node_names[n as usize];
            // An expert-parallel worker applies the generation itself and says so.
            if joined.is_some_and(|ranks| ranks.contains(&n)) {
                continue;
            }
            match acks.and_then(|a| a.get(name)) {
                Some(ack) if ack.outcome == AckOutcome::Applied => {}
                Some(ack) => {
                    let reason = format!(
                        "node {name} answered generation {generation} with {:?}{}",
                        ack.outcome,
                        ack.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
                    );
                    return self.escalate(reason, placement);
                }
                None => waiting.push(format!("ack of {name}")),
            }
        }
        waiting.extend(health.missing.iter().map(|r| format!("member {r}")));
        if waiting.is_empty() {
            self.complete(active, placement);
            return Ok(());
        }
        if self.obs.now >= active.deadline {
            let reason = format!(
                "{} attempt (generation {generation}) not done within {} s; waiting for {}",
                active.rung,
                self.cfg.recovery_timeout_s,
                waiting.join(", ")
            );
            return self.escalate(reason, placement);
        }
        Ok(())
    }

    /// The first rung for `new` faults together with the active recovery's faults that are not
    /// resolved yet (a lost node not yet replaced or dropped, a lost worker not yet restarted).
    fn rung_for(&self, new: &[Trigger]) -> Rung {
        let mut all: Vec<Trigger> = new.to_vec();
        if let Some(a) = &self.st.active {
            for t in &a.triggers {
                let current = self.st.node_names.get(t.node as usize) == Some(&t.node_name);
                let unresolved = !self.st.dropped.contains(&t.node)
                    && match t.kind {
                        TriggerKind::Node => current,
                        TriggerKind::Worker => !a.restarted.contains(&t.node),
                        _ => false,
                    };
                if unresolved {
                    all.push(t.clone());
                }
            }
        }
        first_rung(&all)
    }

    fn escalate(&mut self, reason: String, placement: Option<&Placement>) -> Result<(), BrainError> {
        let Some(a) = self.st.active.as_mut() else { return Ok(()) };
        let rung = a.rung;
        abandon(a, reason.clone());
        match rung.above().next() {
            Some(next) => self.attempt_from(next, placement),
            None => {
                self.fail(JobFailure::LadderExhausted { last: reason });
                Ok(())
            }
        }
    }

    fn complete(&mut self, active: ActiveRecovery, placement: Option<&Placement>) {
        let now = self.obs.now;
        let primary = active.primary().cloned();
        let record = CompletedRecovery {
            id: active.id,
            kind: primary.as_ref().map_or(TriggerKind::Chip, |t| t.kind),
            trigger: primary.as_ref().map(ToString::to_string).unwrap_or_default(),
            triggers: active.triggers.clone(),
            tier: active.rung,
            plan_tier: active.plan_tier.clone(),
            fault_at: active.fault_at,
            detected_at: active.detected_at,
            resumed_at: now,
            detect_s: active.fault_at.map(|f| (active.detected_at - f).max(0.0)),
            resume_s: (now - active.detected_at).max(0.0),
            steps_lost: active.rollback_to.map_or(0, |r| active.step_at_detection.saturating_sub(r)),
            rollback_to: active.rollback_to,
            source: RestoreSource::of(active.rollback_to, active.rollback_from_peers),
            generation: active.generation,
            escalations: u32::try_from(active.attempts.len().saturating_sub(1)).unwrap_or(u32::MAX),
            experts_moved: active.experts_moved,
        };
        self.st.history.push(record.clone());
        if self.st.history.len() > HISTORY_LIMIT {
            let extra = self.st.history.len() - HISTORY_LIMIT;
            self.st.history.drain(..extra);
        }
        self.st.active = None;
        self.st.phase = BrainPhase::Running;
        self.actions.push(Action::RecordRecovery(record));
        // Every node applied the generation, so its loads are done: publish it settled (same
        // replicas, nothing pending), which workers simply route by.
        if let Some(p) = placement.filter(|p| p.has_pending() && p.generation == self.st.generation) {
            let settled = p.settled();
            self.st.generation = settled.generation;
            let control = ControlRecord {
                generation: settled.generation,
                timeout_seconds: Some(self.cfg.apply_timeout_s),
                ..Default::default()
            };
            self.actions.push(Action::PublishPlacement { placement: settled, control });
        }
    }

    /// Tries the allowed rungs from `start` upwards and publishes the first that applies; fails
    /// the job when none does.
    fn attempt_from(&mut self, start: Rung, placement: Option<&Placement>) -> Result<(), BrainError> {
        let Some(base) = placement else {
            self.fail(JobFailure::NoPlacement);
            return Ok(());
        };
        let mut refused = Vec::new();
        for rung in Rung::LADDER.into_iter().filter(|r| *r >= start) {
            if !self.cfg.allowed.contains(&rung) {
                refused.push(RungRefusal { rung, refusal: Refusal::NotAllowed });
                continue;
            }
            match self.try_rung(rung, base)? {
                Ok(published) => {
                    self.publish(rung, published);
                    return Ok(());
                }
                Err(refusal) => refused.push(RungRefusal { rung, refusal }),
            }
        }
        self.fail(JobFailure::NoRecoveryApplies { refusals: refused });
        Ok(())
    }

    /// Nodes a replace or shrink acts on: lost nodes first, then the nodes of the recovery's
    /// faulty chips and lost workers (not dropped; for a replace, not already replaced).
    fn suspects(&self, down: &BTreeSet<u32>, include_replaced: bool) -> Vec<u32> {
        let mut out: Vec<u32> = down.iter().copied().collect();
        if let Some(a) = &self.st.active {
            for t in &a.triggers {
                let current = self.st.node_names.get(t.node as usize) == Some(&t.node_name);
                if (current || include_replaced)
                    && !self.st.dropped.contains(&t.node)
                    && !out.contains(&t.node)
                {
                    out.push(t.node);
                }
            }
        }
        out
    }

    fn failed_set(
        &self,
        excluded: &BTreeMap<ChipId, Exclusion>,
        dropped: &BTreeSet<u32>,
    ) -> Result<FailedChips, PlanError> {
        let cpn = self.cpn();
        let chips = excluded
            .keys()
            .copied()
            .chain(dropped.iter().flat_map(|&n| (0..cpn).map(move |c| ChipId::new(n, c))));
        FailedChips::from_chips(&self.cfg.shape, chips)
    }

    fn try_rung(&self, rung: Rung, base: &Placement) -> Result<Result<Published, Refusal>, BrainError> {
        let cfg = self.cfg;
        let down: BTreeSet<u32> = self.st.expected_ranks().filter(|&n| !self.alive(n)).collect();
        let missing: BTreeSet<u32> =
            self.st.expected_ranks().filter(|r| !down.contains(r) && !self.obs.members.contains(r)).collect();
        // Ranks an earlier attempt of this recovery is (re)starting are not lost state.
        let restarting = self.st.active.as_ref().map(|a| a.restarted.clone()).unwrap_or_default();
        let lost_state: Vec<u32> = missing.iter().copied().filter(|r| !restarting.contains(r)).collect();
        let mut names = self.st.node_names.clone();
        let mut spares = self.st.spares.clone();
        let mut dropped = self.st.dropped.clone();
        let mut excluded = self.st.excluded.clone();
        let mut restart = BTreeSet::new();
        let mut pre_actions = Vec::new();
        let mut base = base.clone();
        match rung {
            Rung::Reroute | Rung::Reshard | Rung::Restore => {
                if let Some(n) = down.first() {
                    return Ok(Err(Refusal::NodeLost { node: names[*n as usize].clone() }));
                }
                if rung != Rung::Restore && !lost_state.is_empty() {
                    return Ok(Err(Refusal::WorkersLostState { count: lost_state.len() }));
                }
                if rung == Rung::Restore {
                    restart.extend(missing.iter().copied());
                }
            }
            Rung::Replace => {
                let suspects = self.suspects(&down, false);
                if suspects.is_empty() {
                    return Ok(Err(Refusal::NothingToReplace));
                }
                let mut replaced_any = false;
                for index in suspects {
                    let live = spares.iter().position(|s| self.obs.nodes.get(s).is_some_and(|v| v.alive));
                    match live {
                        Some(position) => {
                            let spare = spares.remove(position);
                            let replaced = std::mem::replace(&mut names[index as usize], spare.clone());
                            excluded.retain(|c, _| c.node != index);
                            let failed = self.failed_set(&excluded, &dropped)?;
                            base = refill_node(&cfg.shape, &base, index, &failed);
                            restart.insert(index);
                            pre_actions.push(Action::BringInSpare { spare, replaces: replaced, index });
                            replaced_any = true;
                        }
                        // A lost node with no spare left is dropped in the same attempt.
                        None if down.contains(&index) => {
                            dropped.insert(index);
                            pre_actions.push(Action::DropNode { index, node: names[index as usize].clone() });
                        }
                        None => {}
                    }
                }
                if !replaced_any {
                    let why = if spares.is_empty() { Refusal::NoSpareLeft } else { Refusal::NoSpareAlive };
                    return Ok(Err(why));
                }
                if dropped.len() >= names.len() {
                    return Ok(Err(Refusal::NoNodeLeft));
                }
                restart.extend(missing.iter().copied().filter(|r| !dropped.contains(r)));
            }
            Rung::Shrink => {
                let suspects = self.suspects(&down, true);
                if suspects.is_empty() {
                    return Ok(Err(Refusal::NothingToDrop));
                }
                dropped.extend(suspects.iter().copied());
                if dropped.len() >= names.len() {
                    return Ok(Err(Refusal::NoNodeLeft));
                }
                for &n in &suspects {
                    pre_actions.push(Action::DropNode { index: n, node: names[n as usize].clone() });
                }
                restart.extend(missing.iter().copied().filter(|r| !dropped.contains(r)));
            }
        }
        let failed = self.failed_set(&excluded, &dropped)?;
        let result = replan(&cfg.shape, &base, &failed, self.load, &cfg.options)?;
        let plan = result.plan;
        let (Some(mut placement), tier) = (result.placement, &plan.tier) else {
            let reason = match &plan.tier {
                Tier::Infeasible { reason } => reason.to_string(),
                other => format!("planner gave no placement (tier {})", other.as_str()),
            };
            return Ok(Err(Refusal::Infeasible { reason }));
        };
        if rung == Rung::Reroute && *tier != Tier::Reroute {
            return Ok(Err(Refusal::LastReplicaLost));
        }
        placement.generation = self.st.generation + 1;
        let checkpoint_loads = plan.checkpoint_loads().next().is_some();
        let moves: Vec<Move> = plan.moves.iter().chain(&plan.carried).copied().collect();
        Ok(Ok(Published {
            placement,
            moves,
            plan_tier: tier.as_str(),
            checkpoint_loads,
            node_names: names,
            spares,
            dropped,
            excluded,
            restart,
            force_rollback: rung == Rung::Restore,
            pre_actions,
        }))
    }

    fn publish(&mut self, rung: Rung, p: Published) {
        let now = self.obs.now;
        let generation = p.placement.generation;
        let newest = self.obs.checkpoints.last().copied().unwrap_or(0);
        let no_copies = !self.cfg.peer_copies && (!p.moves.is_empty() || !p.restart.is_empty());
        let needs_rollback = p.force_rollback || p.checkpoint_loads || no_copies;
        let (survivors, lost) = self.survivors_and_lost(&p);
        let covered = |step: u64| self.peer_snapshot_covers(step, &survivors, &lost);
        let prior = self.st.active.as_ref().and_then(|a| a.rollback_to.map(|r| (r, a.rollback_from_peers)));
        // Once an attempt rolled back, every later attempt rolls back to the same step from the
        // same source: some members may already have restored it. A peer snapshot a new fault
        // has since made unreachable (its last holder lost) gives way to a fresh choice.
        let (rollback, from_peers) = match prior {
            Some((step, false)) => (Some(step), false),
            Some((step, true)) if covered(step) => (Some(step), true),
            Some(_) => self.rollback_choice(newest, &survivors, &lost),
            None if needs_rollback => self.rollback_choice(newest, &survivors, &lost),
            None => (None, false),
        };
        // A checkpoint load (agents) still reads the disk checkpoint.
        let checkpoint_step = if from_peers { newest } else { rollback.unwrap_or(newest) };
        let mut control = ControlRecord::from_moves(
            generation,
            &p.moves,
            &p.node_names,
            checkpoint_step,
            rollback,
            self.cfg.apply_timeout_s,
        );
        control.from_peers = from_peers;
        self.st.generation = generation;
        self.st.node_names = p.node_names;
        self.st.spares = p.spares;
        self.st.dropped = p.dropped;
        self.st.excluded = p.excluded;
        self.actions.extend(p.pre_actions);
        self.actions.push(Action::PublishPlacement { placement: p.placement, control });
        let mut restarted = BTreeSet::new();
        for rank in p.restart {
            let node = self.st.node_names[rank as usize].clone();
            self.actions.push(Action::StartMember { rank, node, restore_step: rollback });
            restarted.insert(rank);
        }
        if let Some(a) = self.st.active.as_mut() {
            a.rung = rung;
            a.generation = generation;
            a.deadline = now + self.cfg.recovery_timeout_s;
            a.rollback_to = rollback;
            a.rollback_from_peers = from_peers;
            a.plan_tier = p.plan_tier.to_string();
            a.experts_moved = p.moves.len() as u64;
            a.restarted.extend(restarted);
            a.attempts.push(Attempt { rung, generation, at: now, abandoned: None });
        }
    }
}

impl Decider<'_> {
    /// Whether every expected member (or node agent) applied generation `generation`.
    fn everyone_joined(&self, generation: u64) -> bool {
        let joined = self.obs.joined.get(&generation);
        let acks = self.obs.acks.get(&generation);
        self.st.expected_ranks().all(|r| {
            joined.is_some_and(|j| j.contains(&r))
                || acks
                    .and_then(|a| a.get(&self.st.node_names[r as usize]))
                    .is_some_and(|a| a.outcome == AckOutcome::Applied)
        })
    }

    /// Publishes a rebalance generation when the measured step inflation of the settled
    /// generation in force passes the policy's threshold and a candidate lowers it (see
    /// [`decide_with`]). A check that finds no gain also counts for the minimum interval.
    fn maybe_rebalance(&mut self, placement: Option<&Placement>) -> Result<(), BrainError> {
        let (Some(policy), Some(load)) = (self.feedback.rebalance, self.feedback.load.as_ref()) else {
            return Ok(());
        };
        let (Some(step), Some(current)) = (self.obs.step, placement) else { return Ok(()) };
        if current.generation != self.st.generation
            || current.has_pending()
            || !self.everyone_joined(current.generation)
        {
            return Ok(());
        }
        let failed = self.failed_set(&self.st.excluded, &self.st.dropped)?;
        let before = LoadStats::measure(&self.cfg.shape, current, &failed, load).step_inflation;
        if policy.due(step, self.st.rebalanced_at, before).is_err() {
            return Ok(());
        }
        self.st.rebalanced_at = step;
        let Ok(done) = rebalance(&self.cfg.shape, current, &failed, load)? else { return Ok(()) };
        let generation = self.st.generation + 1;
        let mut placement = done.placement;
        placement.generation = generation;
        // Sources are live chips (no checkpoint step), and nothing rolls back.
        let mut control = ControlRecord::from_moves(
            generation,
            &done.moves,
            &self.st.node_names,
            0,
            None,
            self.cfg.apply_timeout_s,
        );
        control.rebalance = true;
        self.st.generation = generation;
        self.st.rebalances.push(RebalanceRecord {
            generation,
            step,
            at: self.obs.now,
            before,
            predicted: done.after,
            replicas_moved: done.moves.len() as u64,
        });
        if self.st.rebalances.len() > HISTORY_LIMIT {
            let extra = self.st.rebalances.len() - HISTORY_LIMIT;
            self.st.rebalances.drain(..extra);
        }
        self.actions.push(Action::PublishPlacement { placement, control });
        Ok(())
    }

    /// The previous generation's members split into those whose host memory survives the
    /// attempt `p` and those whose memory is gone: their node is lost, their process is
    /// (re)started, a spare takes their index, or they are dropped.
    fn survivors_and_lost(&self, p: &Published) -> (BTreeSet<u32>, BTreeSet<u32>) {
        let previous: BTreeSet<u32> = self.st.expected_ranks().collect();
        let lost: BTreeSet<u32> = previous
            .iter()
            .copied()
            .filter(|&r| !self.alive(r) || p.restart.contains(&r) || p.dropped.contains(&r))
            .collect();
        (previous.difference(&lost).copied().collect(), lost)
    }

    /// The rollback of an attempt that must roll back: the newest peer snapshot the survivors
    /// cover when peer copies are on and it is not older than the newest checkpoint, else the
    /// newest disk checkpoint.
    fn rollback_choice(
        &self,
        newest: u64,
        survivors: &BTreeSet<u32>,
        lost: &BTreeSet<u32>,
    ) -> (Option<u64>, bool) {
        match self.newest_peer_snapshot(survivors, lost).filter(|&s| s >= newest) {
            Some(step) => (Some(step), true),
            None => (Some(newest), false),
        }
    }

    /// The newest step every survivor holds its own complete snapshot of and every lost member
    /// has a surviving holder of a copy of (the contract's brain rule); `None` without peer
    /// copies or when no step is covered.
    fn newest_peer_snapshot(&self, survivors: &BTreeSet<u32>, lost: &BTreeSet<u32>) -> Option<u64> {
        if self.cfg.peer_snapshots == 0 || survivors.is_empty() {
            return None;
        }
        let mut steps: Vec<u64> = survivors
            .iter()
            .filter_map(|r| self.peer_record(*r))
            .flat_map(|rec| rec.own.iter().copied())
            .collect();
        steps.sort_unstable();
        steps.dedup();
        steps.into_iter().rev().find(|&s| self.peer_snapshot_covers(s, survivors, lost))
    }

    fn peer_snapshot_covers(&self, step: u64, survivors: &BTreeSet<u32>, lost: &BTreeSet<u32>) -> bool {
        if self.cfg.peer_snapshots == 0 || survivors.is_empty() {
            return false;
        }
        let owns = |r: &u32| self.peer_record(*r).is_some_and(|rec| rec.own.contains(&step));
        let held = |l: &u32| {
            survivors.iter().any(|h| {
                self.peer_record(*h).is_some_and(|rec| rec.holds.get(l).is_some_and(|s| s.contains(&step)))
            })
        };
        survivors.iter().all(owns) && lost.iter().all(held)
    }

    /// The peer record of `rank`, when it was written by a process that has not been restarted
    /// since (a restarted member's record from before the restart lists memory that is gone).
    fn peer_record(&self, rank: u32) -> Option<&super::observe::PeerRecord> {
        let mut fresh_from = self.st.history.last().map_or(0, |r| r.generation);
        if let Some(a) = self.st.active.as_ref().filter(|a| a.restarted.contains(&rank)) {
            fresh_from = fresh_from.max(a.attempts.first().map_or(0, |t| t.generation));
        }
        self.obs.peers.get(&rank).filter(|rec| rec.generation >= fresh_from)
    }
}

fn abandon(active: &mut ActiveRecovery, reason: String) {
    if let Some(last) = active.attempts.last_mut().filter(|a| a.abandoned.is_none()) {
        last.abandoned = Some(reason);
    }
}

/// The first rung worth trying for a set of faults: a lost node needs a new node (or to be
/// dropped), a lost worker a restart with its state restored, a chip fault starts at reroute.
fn first_rung(triggers: &[Trigger]) -> Rung {
    if triggers.iter().any(|t| t.kind == TriggerKind::Node) {
        Rung::Replace
    } else if triggers.iter().any(|t| t.kind == TriggerKind::Worker) {
        Rung::Restore
    } else {
        Rung::Reroute
    }
}

fn earliest(triggers: &[Trigger], prior: Option<f64>) -> Option<f64> {
    triggers.iter().filter_map(|t| t.at).chain(prior).min_by(f64::total_cmp)
}

/// `base` with every replica on node `index` (a fresh machine: no state) re-listed as a pending
/// load onto the same chip, sourced from the lowest-numbered live replica elsewhere in the group,
/// else the checkpoint; pending loads that read from the node are re-sourced the same way.
fn refill_node(shape: &PlacementShape, base: &Placement, index: u32, failed: &FailedChips) -> Placement {
    let mut next = base.clone();
    let npg = shape.nodes_per_group().max(1);
    let group = index / npg;
    let Some(g) = next.groups.get_mut(group as usize) else { return next };
    let on_node = |c: ChipId| c.node == index;
    let pending_targets: BTreeSet<(ChipId, _)> = g.pending.iter().map(|m| (m.to, m.expert)).collect();
    let source_for = |g: &GroupPlacement, expert| {
        g.chips
            .iter()
            .enumerate()
            .map(|(local, hosted)| (shape.chip_at(group, local), hosted))
            .find(|(chip, hosted)| {
                hosted.contains(&expert)
                    && !on_node(*chip)
                    && !failed.contains(*chip)
                    && !pending_targets.contains(&(*chip, expert))
            })
            .map_or(Source::Checkpoint, |(chip, _)| Source::Peer(chip))
    };
    let mut pending: Vec<Move> = Vec::new();
    for m in &g.pending {
        if on_node(m.to) {
            continue; // re-created below with the node's other replicas
        }
        let source = match m.source {
            Source::Peer(p) if on_node(p) => source_for(g, m.expert),
            s => s,
        };
        pending.push(Move { source, ..*m });
    }
    for (local, hosted) in g.chips.iter().enumerate() {
        let chip = shape.chip_at(group, local);
        if on_node(chip) {
            for &expert in hosted {
                pending.push(Move { expert, to: chip, source: source_for(g, expert) });
            }
        }
    }
    pending.sort();
    g.pending = pending;
    next
}
