//! The synthetic cluster the real brain looks at: an [`Observation`] the simulator evolves (chip
//! records, node liveness, members, checkpoints, the members' acknowledgements) and the brain's
//! persisted state and placement, fed through [`decide`] exactly as a driver does.

use std::collections::BTreeSet;

use super::SimError;
use crate::job::TrainingJobSpec;
use crate::keyspace::{ChipRecord, ChipState};
use crate::placement::Placement;
use crate::recovery::{
    Action, ActiveRecovery, BrainConfig, BrainPhase, CompletedRecovery, ControlRecord, JobFailure, NodeView,
    Observation, RecoveryState, decide,
};

/// What one decision asked the runtime to do, as far as the simulator's costs care.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// The control record of a published generation.
    pub published: Option<ControlRecord>,
    /// Members (re)started.
    pub restarted: usize,
    /// Spares brought in.
    pub spares: usize,
    /// Recoveries finished.
    pub completed: Vec<CompletedRecovery>,
    /// The brain gave the job up.
    pub failed: Option<JobFailure>,
}

/// The brain, its record, the placement in force and what it observes.
pub(crate) struct Cluster {
    pub cfg: BrainConfig,
    pub state: RecoveryState,
    pub obs: Observation,
    pub placement: Option<Placement>,
    /// `decide` calls so far.
    pub decisions: u64,
}

impl Cluster {
    /// A job of `spec` with every node and spare up, before its first decision. Without peer
    /// copies the brain runs as expert-parallel workers drive it (`for_expert_parallel`).
    pub fn new(spec: &TrainingJobSpec, peer_copies: bool) -> Result<Self, SimError> {
        let mut cfg = BrainConfig::from_spec(spec)?;
        if !peer_copies {
            cfg = cfg.for_expert_parallel();
        }
        // The simulated window is part of a longer run: it never reaches the last step.
        cfg.total_steps = u64::MAX;
        let nodes: Vec<String> = (0..spec.topology.nodes).map(|i| format!("node-{i:05}")).collect();
        let spares: Vec<String> = (0..spec.topology.spare_nodes).map(|i| format!("spare-{i:03}")).collect();
        let mut obs = Observation::default();
        for name in nodes.iter().chain(&spares) {
            obs.nodes.insert(name.clone(), NodeView { alive: true, ..Default::default() });
        }
        obs.checkpoints.insert(0);
        let state = RecoveryState::new(nodes, spares);
        Ok(Self { cfg, state, obs, placement: None, decisions: 0 })
    }

    /// Publishes the initial placement and lets every member join: the job is running.
    pub fn start(&mut self, now: f64) -> Result<(), SimError> {
        self.decide(now, 0, &BTreeSet::from([0]))?;
        self.join_all();
        self.decide(now, 0, &BTreeSet::from([0]))?;
        if self.state.phase != BrainPhase::Running {
            return Err(SimError::Brain(format!("job did not start (phase {})", self.state.phase.as_str())));
        }
        Ok(())
    }

    /// Name of the node at `index` now.
    pub fn name(&self, index: u32) -> Option<&str> {
        self.state.node_names.get(index as usize).map(String::as_str)
    }

    /// Whether node `index` is out of the job (dropped by a shrink).
    pub fn dropped(&self, index: u32) -> bool {
        self.state.dropped.contains(&index)
    }

    /// Whether a failure of chip `chip` of node `index` interrupts training: it is in the job
    /// and not excluded (an excluded chip hosts nothing).
    pub fn chip_in_use(&self, index: u32, chip: u32) -> bool {
        !self.dropped(index) && !self.state.excluded.contains_key(&crate::placement::ChipId::new(index, chip))
    }

    /// The agent on `node` writes chip `chip`'s state.
    pub fn set_chip(&mut self, node: &str, chip: u32, state: ChipState, code: &str, since: f64) {
        if let Some(view) = self.obs.nodes.get_mut(node) {
            view.chips.insert(chip, ChipRecord { state, code: code.to_string(), since });
        }
    }

    /// `node`'s lease expired: it and its member are gone.
    pub fn node_lost(&mut self, node: &str) {
        if let Some(view) = self.obs.nodes.get_mut(node) {
            view.alive = false;
        }
        if let Some(rank) = self.rank_of(node) {
            self.obs.members.remove(&rank);
        }
    }

    /// The worker on `node` exited.
    pub fn worker_lost(&mut self, node: &str) {
        if let Some(rank) = self.rank_of(node) {
            self.obs.members.remove(&rank);
        }
    }

    /// A repaired machine joins the spare pool (unless it still holds a place in the job).
    pub fn spare_back(&mut self, node: &str) {
        if self.state.node_names.iter().any(|n| n == node) || self.state.spares.iter().any(|n| n == node) {
            return;
        }
        let view = self.obs.nodes.entry(node.to_string()).or_default();
        view.alive = true;
        view.chips.clear();
        self.state.spares.push(node.to_string());
    }

    fn rank_of(&self, node: &str) -> Option<u32> {
        let index = self.state.node_names.iter().position(|n| n == node)?;
        u32::try_from(index).ok()
    }

    /// Every member on a live node has applied the generation in force and is present.
    pub fn join_all(&mut self) {
        let live: BTreeSet<u32> = self
            .state
            .expected_ranks()
            .filter(|&r| self.name(r).and_then(|n| self.obs.nodes.get(n)).is_some_and(|v| v.alive))
            .collect();
        let generation = self.state.generation;
        self.obs.members = live.clone();
        self.obs.joined.clear();
        self.obs.joined.insert(generation, live);
    }

    /// One decision at `now` with the job at `step` and these committed checkpoints; the
    /// state and placement are applied as a driver applies them.
    pub fn decide(&mut self, now: f64, step: u64, checkpoints: &BTreeSet<u64>) -> Result<Applied, SimError> {
        self.obs.now = now;
        self.obs.step = Some(step);
        self.obs.checkpoints.clone_from(checkpoints);
        let decision = decide(&self.cfg, &self.state, &self.obs, self.placement.as_ref())?;
        self.decisions += 1;
        self.state = decision.state;
        let mut applied = Applied::default();
        for action in decision.actions {
            match action {
                Action::PublishPlacement { placement, control } => {
                    self.placement = Some(placement);
                    applied.published = Some(control);
                }
                Action::DropNode { index, .. } => {
                    self.obs.members.remove(&index);
                }
                Action::StartMember { .. } => applied.restarted += 1,
                Action::BringInSpare { .. } => applied.spares += 1,
                Action::RecordRecovery(record) => applied.completed.push(record),
                Action::FailJob(failure) => applied.failed = Some(failure),
                Action::JobSucceeded => {}
            }
        }
        Ok(applied)
    }

    /// The recovery in progress.
    pub fn active(&self) -> Option<&ActiveRecovery> {
        self.state.active.as_ref()
    }
}
