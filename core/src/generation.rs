//! The generation protocol: what a published generation says to the expert-parallel members
//! and how it is written to etcd.
//!
//! The brain ([`crate::recovery::decide`]) publishes a [`Placement`] and a [`ControlRecord`];
//! the members (worker processes, one per node) need more: who the members are, which routed
//! experts each holds, and where their state comes from before the generation's first step.
//! [`DistPlan`] is that agreement, stored at the job's `placement` key. It lives here, not in
//! the worker, so the control loop and its adapters (operator, local runtime) publish it
//! without linking the training code.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::keyspace::JobKeys;
use crate::placement::{self, ChipId, ExpertId, ExpertLoad, Placement, PlacementShape};
use crate::recovery::{BrainConfig, ControlRecord, RecoveryState, RestoreSource, Rung};

/// Where the members of a generation get their state from before its first step.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", tag = "from")]
pub enum Restore {
    /// Initialise from the seed at step 0.
    Fresh,
    /// Load the committed checkpoint of `step` (dense + each member's experts).
    Checkpoint {
        /// Checkpoint step.
        step: u64,
    },
    /// Keep the in-memory state (reroute): members agree on the lowest step any of them
    /// reached and the ones ahead roll their last update back.
    InMemory,
    /// Roll back to the in-memory peer snapshot of `step` (no disk read): every surviving member
    /// restores its own host-memory snapshot of `step`; an expert a member gains is copied from
    /// its previous owner's snapshot if that member survives, else from a buddy's copy; dense and
    /// replicated parameters come from any surviving member. The brain picks `step` only when
    /// the members' [`PeerRecord`](crate::recovery::PeerRecord)s cover every expert at it.
    Peer {
        /// Snapshot step.
        step: u64,
    },
}

/// Why a generation was published: the first one, a rung of the recovery ladder, or the brain
/// settling a finished recovery.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum GenerationTier {
    /// Generation 1.
    Initial,
    /// A recovery on this rung.
    Reroute,
    /// See [`Rung::Reshard`].
    Reshard,
    /// See [`Rung::Restore`].
    Restore,
    /// See [`Rung::Replace`].
    Replace,
    /// See [`Rung::Shrink`].
    Shrink,
    /// A generation published with no recovery active.
    Settled,
}

impl GenerationTier {
    /// Lower-case name, as printed by members and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            GenerationTier::Initial => "initial",
            GenerationTier::Reroute => "reroute",
            GenerationTier::Reshard => "reshard",
            GenerationTier::Restore => "restore",
            GenerationTier::Replace => "replace",
            GenerationTier::Shrink => "shrink",
            GenerationTier::Settled => "settled",
        }
    }
}

impl From<Rung> for GenerationTier {
    fn from(rung: Rung) -> Self {
        match rung {
            Rung::Reroute => GenerationTier::Reroute,
            Rung::Reshard => GenerationTier::Reshard,
            Rung::Restore => GenerationTier::Restore,
            Rung::Replace => GenerationTier::Replace,
            Rung::Shrink => GenerationTier::Shrink,
        }
    }
}

impl fmt::Display for GenerationTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A generation the members cannot follow, or that cannot be built.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum GenerationError {
    /// `members` is empty or not strictly ascending.
    #[error("members {0:?} are not a sorted, non-empty list")]
    Members(Vec<u32>),
    /// A rank holds experts but is not a member.
    #[error("rank {0} holds experts but is not a member")]
    NotAMember(u32),
    /// An expert of the model is held by no member.
    #[error("{0} has no holder")]
    NoHolder(ExpertId),
    /// Without a rollback a member would have to gain an expert it does not hold.
    #[error(
        "generation {generation} gives rank {rank} expert {expert} without a rollback; a member cannot \
         load an expert from a peer's memory"
    )]
    GainWithoutRollback {
        /// The generation.
        generation: u64,
        /// The member.
        rank: u32,
        /// The expert it would gain.
        expert: ExpertId,
    },
    /// The planner refused the initial placement.
    #[error("initial placement: {0}")]
    Plan(#[from] placement::PlanError),
}

/// The agreement of one generation, published at the job's `placement` key.
///
/// The planner's [`Placement`] is flattened in, so readers of the key that only know the
/// planner's format (the node agent) still find `generation` and `groups`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DistPlan {
    /// The planner's placement (its `generation` is the rendezvous generation).
    #[serde(flatten)]
    pub placement: Placement,
    /// Live member ranks, ascending.
    pub members: Vec<u32>,
    /// Routed experts held by each member.
    pub experts: BTreeMap<u32, Vec<ExpertId>>,
    /// How members obtain their state.
    pub restore: Restore,
    /// Why this generation exists.
    pub tier: GenerationTier,
    /// The members that keep a host-memory copy of each member's training state
    /// ([`crate::peer::buddies`]); empty without peer copies.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub buddies: BTreeMap<u32, Vec<u32>>,
    /// Members snapshot their state to their buddies every this many steps (≥ 1).
    #[serde(default = "default_peer_interval")]
    pub peer_interval_steps: u64,
}

fn default_peer_interval() -> u64 {
    1
}

impl DistPlan {
    /// The rendezvous generation.
    pub fn generation(&self) -> u64 {
        self.placement.generation
    }

    /// Position of `rank` among the members.
    pub fn position(&self, rank: u32) -> Option<usize> {
        self.members.iter().position(|&r| r == rank)
    }

    /// Members holding `expert`, ascending.
    pub fn holders(&self, expert: ExpertId) -> Vec<u32> {
        self.experts.iter().filter(|(_, held)| held.contains(&expert)).map(|(&r, _)| r).collect()
    }

    /// Experts of `rank`.
    pub fn experts_of(&self, rank: u32) -> &[ExpertId] {
        self.experts.get(&rank).map_or(&[], Vec::as_slice)
    }

    /// The lowest member: writes checkpoints and prints the digest.
    pub fn leader(&self) -> Option<u32> {
        self.members.first().copied()
    }

    /// Checks every expert of the model has a holder among the members and members are sorted.
    pub fn check(&self, layers: u32, routed: u32) -> Result<(), GenerationError> {
        if self.members.windows(2).any(|w| w[0] >= w[1]) || self.members.is_empty() {
            return Err(GenerationError::Members(self.members.clone()));
        }
        if let Some(rank) = self.experts.keys().find(|r| !self.members.contains(r)) {
            return Err(GenerationError::NotAMember(*rank));
        }
        let held: BTreeSet<ExpertId> = self.experts.values().flatten().copied().collect();
        for layer in 0..layers {
            for expert in 0..routed {
                let id = ExpertId::new(layer, expert);
                if !held.contains(&id) {
                    return Err(GenerationError::NoHolder(id));
                }
            }
        }
        Ok(())
    }
}

/// A job's in-memory peer copies (`checkpoint.peerCopies`, `.peerIntervalSteps`), which every
/// generation's [`DistPlan`] carries so members snapshot from generation 1 on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCopies {
    /// Buddies per member (0: off).
    pub copies: u32,
    /// Snapshot every this many steps (≥ 1).
    pub interval_steps: u64,
    /// Nodes per rack, so buddies sit in other racks when racks are given.
    pub nodes_per_rack: Option<u32>,
}

impl Default for PeerCopies {
    fn default() -> Self {
        Self { copies: 0, interval_steps: default_peer_interval(), nodes_per_rack: None }
    }
}

impl PeerCopies {
    /// The peer copies the brain decides with.
    pub fn of(config: &BrainConfig) -> Self {
        Self {
            copies: config.peer_snapshots,
            interval_steps: config.peer_interval_steps.max(1),
            nodes_per_rack: config.shape.nodes_per_rack,
        }
    }
}

/// The planner's shape for `workers` worker processes: the job's chips per node, one
/// expert-parallel group spanning every worker (each expert must live somewhere in the job).
pub fn worker_shape(base: &PlacementShape, workers: u32) -> PlacementShape {
    let mut shape = base.clone();
    shape.nodes = workers;
    shape.expert_parallel_size = workers * base.chips_per_node;
    shape.nodes_per_rack = None;
    shape
}

/// Experts hosted on each node's chips (a worker stands for its node).
pub fn experts_by_node(shape: &PlacementShape, placement: &Placement) -> BTreeMap<u32, Vec<ExpertId>> {
    let mut out: BTreeMap<u32, BTreeSet<ExpertId>> = BTreeMap::new();
    for node in 0..shape.nodes {
        let held = out.entry(node).or_default();
        for chip in 0..shape.chips_per_node {
            held.extend(placement.hosted(shape, ChipId { node, chip }));
        }
    }
    out.into_iter().map(|(n, s)| (n, s.into_iter().collect())).collect()
}

/// The first generation: the planner's initial placement over every node of `shape`.
pub fn initial_plan(shape: &PlacementShape, restore: Restore) -> Result<DistPlan, GenerationError> {
    let load = ExpertLoad::uniform(shape);
    let placement = placement::initial_placement(shape, &load)?;
    let experts = experts_by_node(shape, &placement);
    Ok(DistPlan {
        members: (0..shape.nodes).collect(),
        experts,
        restore,
        tier: GenerationTier::Initial,
        placement,
        buddies: BTreeMap::new(),
        peer_interval_steps: default_peer_interval(),
    })
}

/// A generation the brain published, as the members' agreement.
///
/// `shape` is the job's own planner shape (a member stands for its node: it holds the experts of
/// all its node's chips); `members` are the ranks the brain expects (dropped ones left out);
/// `rollback` is the brain's ([`RestoreSource::Checkpoint`] of step 0: the seeded initial state;
/// [`RestoreSource::Peer`]: the members' in-memory snapshots). Without a rollback
/// ([`RestoreSource::Memory`]) the members keep their memory, which works only when no member
/// gains an expert it does not hold (a member can drop experts, not conjure them): anything else
/// is an error the brain must not produce for expert-parallel workers (see
/// [`BrainConfig::for_expert_parallel`]). `peers` gives every generation its buddies.
pub fn from_brain(
    shape: &PlacementShape,
    placement: &Placement,
    members: Vec<u32>,
    rollback: RestoreSource,
    previous: Option<&DistPlan>,
    tier: GenerationTier,
    peers: PeerCopies,
) -> Result<DistPlan, GenerationError> {
    let experts: BTreeMap<u32, Vec<ExpertId>> =
        experts_by_node(shape, placement).into_iter().filter(|(r, _)| members.contains(r)).collect();
    let restore = match (rollback, previous) {
        (RestoreSource::Checkpoint { step: 0 } | RestoreSource::Peer { step: 0 }, _)
        | (RestoreSource::Memory, None) => Restore::Fresh,
        (RestoreSource::Checkpoint { step }, _) => Restore::Checkpoint { step },
        (RestoreSource::Peer { step }, _) => Restore::Peer { step },
        (RestoreSource::Memory, Some(before)) => {
            for (rank, mine) in &experts {
                let held = before.experts_of(*rank);
                if let Some(missing) = mine.iter().find(|e| !held.contains(e)) {
                    return Err(GenerationError::GainWithoutRollback {
                        generation: placement.generation,
                        rank: *rank,
                        expert: *missing,
                    });
                }
            }
            Restore::InMemory
        }
    };
    let buddies = crate::peer::buddies(&members, peers.copies, peers.nodes_per_rack);
    Ok(DistPlan {
        placement: placement.clone(),
        members,
        experts,
        restore,
        tier,
        buddies,
        peer_interval_steps: peers.interval_steps.max(1),
    })
}

/// [`from_brain`] for a generation the brain just published, with the members (the ranks it
/// expects), the rollback (its control record) and the tier (`initial` for generation 1, else
/// the active recovery's rung, `settled` without one) read from the brain's own record, and the
/// peer copies of the brain's configuration.
pub fn from_published_generation(
    config: &BrainConfig,
    state: &RecoveryState,
    placement: &Placement,
    control: &ControlRecord,
    previous: Option<&DistPlan>,
) -> Result<DistPlan, GenerationError> {
    let tier = match (&state.active, placement.generation) {
        (_, 1) => GenerationTier::Initial,
        (Some(active), _) => active.rung.into(),
        (None, _) => GenerationTier::Settled,
    };
    from_brain(
        &config.shape,
        placement,
        state.expected_ranks().collect(),
        control.source(),
        previous,
        tier,
        PeerCopies::of(config),
    )
}

/// The keys and values publishing a generation writes, to go in one etcd transaction:
/// `control`, `placement` (the members' plan) and `recovery` (the brain's record), so a
/// restarted driver never sees a placement without its record.
pub fn generation_writes(
    keys: &JobKeys,
    plan: &DistPlan,
    control: &ControlRecord,
    state: &RecoveryState,
) -> serde_json::Result<[(String, String); 3]> {
    Ok([
        (keys.control(), serde_json::to_string(control)?),
        (keys.placement(), serde_json::to_string(plan)?),
        (keys.recovery(), state.to_json()),
    ])
}

/// The step members of an in-memory (reroute) generation continue from: the lowest step any
/// of them reached. A member one update ahead rolls it back; more than one is impossible because
/// no update completes without every member's contribution.
pub fn agreed_step(acked: &BTreeMap<u32, u64>) -> Option<u64> {
    acked.values().copied().min()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn shape(workers: u32, redundant: u32) -> PlacementShape {
        let base = PlacementShape {
            layers: 2,
            routed_experts: 4,
            redundant_experts: redundant,
            expert_state_bytes: 1 << 20,
            nodes: 1,
            chips_per_node: 1,
            chip_memory_bytes: 1 << 30,
            expert_parallel_size: 1,
            nodes_per_rack: None,
            min_healthy_fraction: 0.25,
            pipeline_stages: 1,
        };
        worker_shape(&base, workers)
    }

    #[test]
    fn the_initial_plan_gives_every_expert_a_holder() {
        for workers in 1..=4 {
            let plan = initial_plan(&shape(workers, 0), Restore::Fresh).unwrap();
            plan.check(2, 4).unwrap();
            assert_eq!(plan.members, (0..workers).collect::<Vec<_>>());
            let held: usize = plan.experts.values().map(Vec::len).sum();
            assert_eq!(held, 8, "no redundancy: each expert once");
        }
    }

    #[test]
    fn a_brain_generation_becomes_the_members_agreement() {
        let s = shape(4, 4);
        let off = PeerCopies::default();
        let ckpt = |step| RestoreSource::Checkpoint { step };
        let first = initial_plan(&s, Restore::Fresh).unwrap();
        let gen1 = from_brain(
            &s,
            &first.placement,
            vec![0, 1, 2, 3],
            RestoreSource::Memory,
            None,
            GenerationTier::Initial,
            off,
        )
        .unwrap();
        assert_eq!((gen1.restore, &gen1.experts), (Restore::Fresh, &first.experts));
        // A rollback: everyone loads the checkpoint, whatever moved.
        let mut next = first.placement.clone();
        next.generation = 2;
        let rolled =
            from_brain(&s, &next, vec![0, 1, 3], ckpt(20), Some(&gen1), GenerationTier::Reshard, off)
                .unwrap();
        assert_eq!(rolled.restore, Restore::Checkpoint { step: 20 });
        assert!(rolled.experts_of(2).is_empty(), "a dropped rank holds nothing");
        let restart = from_brain(&s, &next, vec![0], ckpt(0), None, GenerationTier::Restore, off).unwrap();
        assert_eq!(restart.restore, Restore::Fresh);
        // Without a rollback a member may lose a replica but not gain one.
        let lost = ExpertId::new(0, 0);
        let rank = first.holders(lost)[0];
        let mut fewer = first.placement.clone();
        fewer.generation = 3;
        for chips in fewer.groups.iter_mut().map(|g| &mut g.chips) {
            for (i, hosted) in chips.iter_mut().enumerate() {
                if u32::try_from(i).unwrap() / s.chips_per_node == rank {
                    hosted.retain(|e| *e != lost);
                }
            }
        }
        let kept = from_brain(
            &s,
            &fewer,
            vec![0, 1, 2, 3],
            RestoreSource::Memory,
            Some(&gen1),
            GenerationTier::Reroute,
            off,
        )
        .unwrap();
        assert_eq!(kept.restore, Restore::InMemory);
        assert!(!kept.experts_of(rank).contains(&lost));
        let gained = from_brain(
            &s,
            &first.placement,
            vec![0, 1, 2, 3],
            RestoreSource::Memory,
            Some(&kept),
            GenerationTier::Reroute,
            off,
        );
        assert!(
            matches!(gained, Err(GenerationError::GainWithoutRollback { rank: r, expert, .. }) if r == rank && expert == lost)
        );
    }

    #[test]
    fn a_peer_rollback_restores_from_peers_and_every_generation_carries_the_buddies() {
        let s = shape(4, 0);
        let first = initial_plan(&s, Restore::Fresh).unwrap();
        let peers = PeerCopies { copies: 1, interval_steps: 2, nodes_per_rack: None };
        let gen1 = from_brain(
            &s,
            &first.placement,
            vec![0, 1, 2, 3],
            RestoreSource::Memory,
            None,
            GenerationTier::Initial,
            peers,
        )
        .unwrap();
        assert_eq!(gen1.buddies, crate::peer::buddies(&[0, 1, 2, 3], 1, None));
        assert_eq!((gen1.buddies[&3].as_slice(), gen1.peer_interval_steps), (&[0][..], 2));
        let mut next = first.placement.clone();
        next.generation = 2;
        let rolled = from_brain(
            &s,
            &next,
            vec![0, 1, 2, 3],
            RestoreSource::Peer { step: 41 },
            Some(&gen1),
            GenerationTier::Replace,
            peers,
        )
        .unwrap();
        assert_eq!(rolled.restore, Restore::Peer { step: 41 });
        assert_eq!(rolled.buddies.len(), 4);
        let dropped = from_brain(
            &s,
            &next,
            vec![0, 2, 3],
            RestoreSource::Peer { step: 41 },
            Some(&gen1),
            GenerationTier::Shrink,
            peers,
        )
        .unwrap();
        assert_eq!(
            dropped.buddies,
            crate::peer::buddies(&[0, 2, 3], 1, None),
            "buddies among the members left"
        );
    }

    #[test]
    fn a_plan_round_trips_through_json_with_the_planners_fields_on_top() {
        let plan = initial_plan(&shape(2, 1), Restore::Checkpoint { step: 3 }).unwrap();
        let text = serde_json::to_string(&plan).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["generation"], 1);
        assert_eq!(value["tier"], "initial");
        assert!(value["groups"].is_array());
        let back: DistPlan = serde_json::from_str(&text).unwrap();
        assert_eq!(back, plan);
        assert_eq!(agreed_step(&[(0, 5), (2, 4)].into()), Some(4));
    }

    #[test]
    fn check_names_what_is_wrong() {
        let mut plan = initial_plan(&shape(2, 0), Restore::Fresh).unwrap();
        plan.experts.insert(9, vec![]);
        assert_eq!(plan.check(2, 4), Err(GenerationError::NotAMember(9)));
        plan.experts.remove(&9);
        plan.experts.values_mut().for_each(|v| v.retain(|e| *e != ExpertId::new(1, 2)));
        assert_eq!(plan.check(2, 4), Err(GenerationError::NoHolder(ExpertId::new(1, 2))));
        plan.members = vec![1, 0];
        assert_eq!(plan.check(2, 4), Err(GenerationError::Members(vec![1, 0])));
    }
}
