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
use crate::recovery::{BrainConfig, ControlRecord, InForce, RecoveryState, RestoreSource, Rung};

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
    /// A rebalance: keep the in-memory state as [`Restore::InMemory`] does (members agree on
    /// the lowest step and the ones ahead roll their last update back), and copy every expert
    /// a member gains from a live member that held it in the previous generation, at that step.
    /// No rollback, no disk read.
    Live,
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
    /// A rebalance for the measured load (no recovery active; see [`Restore::Live`]).
    Rebalance,
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
            GenerationTier::Rebalance => "rebalance",
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

    /// What member writes are judged against while this plan is in force.
    pub fn in_force(&self) -> InForce {
        let rollback_to = match self.restore {
            Restore::Checkpoint { step } | Restore::Peer { step } => Some(step),
            Restore::Fresh => Some(0),
            // Memory kept (a reroute, a rebalance): nothing was abandoned.
            Restore::InMemory | Restore::Live => None,
        };
        InForce {
            generation: self.generation(),
            members: self.members.iter().copied().collect(),
            rollback_to,
        }
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

/// The planner's shape for `workers` one-chip worker processes holding `layers` × `routed_experts`
/// experts plus `redundant_experts` replicas per layer, with memory that never binds (1 MiB of
/// state per expert, 1 GiB per chip): the layout of the embedded worker's own runs and tests.
pub fn one_chip_workers(
    layers: u32,
    routed_experts: u32,
    redundant_experts: u32,
    workers: u32,
) -> PlacementShape {
    let base = PlacementShape {
        layers,
        routed_experts,
        redundant_experts,
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
        // Members copy what they gain from the live holders of the previous generation.
        (RestoreSource::Memory, Some(_)) if tier == GenerationTier::Rebalance => Restore::Live,
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
        (None, _) if control.rebalance => GenerationTier::Rebalance,
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

/// Largest value ninelives writes to etcd: well under etcd's default request limit (1.5 MiB), so
/// a generation fits etcd at any scale.
pub const MAX_VALUE_BYTES: usize = 512 * 1024;

/// What the members' plan needs of the planner's shape to be stored per group and read back.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PlanLayout {
    /// Nodes (member ranks) per expert-parallel group: rank `r` is in group `r / nodesPerGroup`.
    pub nodes_per_group: u32,
    /// Chips per node.
    pub chips_per_node: u32,
    /// Routed experts per layer: an expert is stored as `layer * routedExperts + expert`.
    pub routed_experts: u32,
}

impl PlanLayout {
    /// The layout of `shape`.
    pub fn of(shape: &PlacementShape) -> Self {
        Self {
            nodes_per_group: shape.nodes_per_group(),
            chips_per_node: shape.chips_per_node,
            routed_experts: shape.routed_experts,
        }
    }
}

/// The commit record at the job's `placement` key: a generation becomes visible when this small
/// value is written (last, in the control loop's fenced transaction), and it names the group
/// values ([`GroupRecord`], at [`JobKeys::plan_group`]) that hold the rest. Members read it, then
/// the groups they need; they never see half a generation. Its size grows with the groups and
/// the member ranges, not with the experts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanRecord {
    /// The rendezvous generation (first field, as every reader of `placement` expects).
    pub generation: u64,
    /// How group values are laid out.
    pub layout: PlanLayout,
    /// The content digest of each group's value, in group order.
    pub groups: Vec<String>,
    /// Live member ranks as ascending, disjoint, inclusive ranges.
    pub members: Vec<[u32; 2]>,
    /// How members obtain their state.
    pub restore: Restore,
    /// Why this generation exists.
    pub tier: GenerationTier,
    /// See [`DistPlan::peer_interval_steps`].
    pub peer_interval_steps: u64,
}

/// One expert-parallel group of a stored plan: its chips' experts (compact: dense expert
/// indices), pending loads, and the buddies of the group's member ranks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupRecord {
    /// Group index.
    pub index: u32,
    /// Per chip of the group (node-major), its experts as `layer * routedExperts + expert`.
    pub chips: Vec<Vec<u32>>,
    /// See [`crate::placement::GroupPlacement::pending`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<placement::Move>,
    /// Buddies of this group's member ranks (see [`DistPlan::buddies`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub buddies: BTreeMap<u32, Vec<u32>>,
}

/// What a reader finds at the job's `placement` key.
#[derive(Clone, Debug, PartialEq)]
pub enum PlacementValue {
    /// A whole plan in the value (written by tests and tools; small jobs only).
    Inline(Box<DistPlan>),
    /// A commit record: the plan is in its group values.
    Record(PlanRecord),
}

impl PlacementValue {
    /// Parses the value at `placement` (untrusted input: an error, never a guess).
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Format {
            #[serde(default)]
            layout: Option<serde::de::IgnoredAny>,
        }
        if serde_json::from_slice::<Format>(bytes)?.layout.is_some() {
            Ok(PlacementValue::Record(serde_json::from_slice(bytes)?))
        } else {
            Ok(PlacementValue::Inline(Box::new(serde_json::from_slice(bytes)?)))
        }
    }

    /// The generation it publishes.
    pub fn generation(&self) -> u64 {
        match self {
            PlacementValue::Inline(plan) => plan.generation(),
            PlacementValue::Record(record) => record.generation,
        }
    }
}

/// A stored plan that cannot be written or read back.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum StoredPlanError {
    /// The plan's derived fields do not follow from its placement and layout (it would not read
    /// back as itself).
    #[error("the plan cannot be stored per group: {0}")]
    NotStorable(String),
    /// A value would exceed [`MAX_VALUE_BYTES`].
    #[error("{key} would be {bytes} bytes, over the {MAX_VALUE_BYTES}-byte limit")]
    TooLarge {
        /// The key.
        key: String,
        /// Its value's size.
        bytes: usize,
    },
    /// A group value does not match its commit record.
    #[error("group {group}: {reason}")]
    BadGroup {
        /// The group.
        group: u32,
        /// What is wrong.
        reason: String,
    },
    /// Encoding failed.
    #[error("encoding: {0}")]
    Encode(String),
}

/// FNV-1a, 64 bits: names a group value by its content (not a security boundary: a writer able
/// to forge values can write `placement` itself).
fn digest(bytes: &[u8]) -> String {
    let hash = bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

fn ranges(members: &[u32]) -> Vec<[u32; 2]> {
    let mut out: Vec<[u32; 2]> = Vec::new();
    for &r in members {
        match out.last_mut() {
            Some(last) if last[1].checked_add(1) == Some(r) => last[1] = r,
            _ => out.push([r, r]),
        }
    }
    out
}

impl PlanRecord {
    /// The member ranks, ascending (ranges that are not ascending and disjoint are an error).
    pub fn member_ranks(&self) -> Result<Vec<u32>, StoredPlanError> {
        let mut out = Vec::new();
        for &[first, last] in &self.members {
            if first > last || out.last().is_some_and(|&prev| prev >= first) {
                return Err(StoredPlanError::NotStorable(format!("member ranges {:?}", self.members)));
            }
            out.extend(first..=last);
        }
        Ok(out)
    }

    /// The group of member `rank`.
    pub fn group_of(&self, rank: u32) -> u32 {
        rank / self.layout.nodes_per_group.max(1)
    }

    /// The key of group `group`'s value (`None`: no such group).
    pub fn group_key(&self, keys: &JobKeys, group: u32) -> Option<String> {
        self.groups.get(group as usize).map(|d| keys.plan_group(group, d))
    }

    /// Every group value key, in group order.
    pub fn group_keys(&self, keys: &JobKeys) -> Vec<String> {
        (0..).zip(&self.groups).map(|(g, d)| keys.plan_group(g, d)).collect()
    }

    /// Parses and checks group `group`'s value as read from `key`.
    pub fn parse_group(&self, group: u32, bytes: &[u8]) -> Result<GroupRecord, StoredPlanError> {
        let bad = |reason: String| StoredPlanError::BadGroup { group, reason };
        let expected = self.groups.get(group as usize).ok_or_else(|| bad("no such group".into()))?;
        if digest(bytes) != *expected {
            return Err(bad("content does not match the commit record's digest".into()));
        }
        let record: GroupRecord = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if record.index != group {
            return Err(bad(format!("value says it is group {}", record.index)));
        }
        let per_group = u64::from(self.layout.nodes_per_group) * u64::from(self.layout.chips_per_node);
        if record.chips.len() as u64 != per_group {
            return Err(bad(format!("{} chips, not {per_group}", record.chips.len())));
        }
        Ok(record)
    }

    fn expert(&self, dense: u32) -> ExpertId {
        let r = self.layout.routed_experts.max(1);
        ExpertId::new(dense / r, dense % r)
    }

    /// The group's placement as the planner's type.
    pub fn group_placement(&self, group: &GroupRecord) -> placement::GroupPlacement {
        placement::GroupPlacement {
            index: group.index,
            chips: group.chips.iter().map(|c| c.iter().map(|&e| self.expert(e)).collect()).collect(),
            pending: group.pending.clone(),
        }
    }

    /// The experts each given member holds, from its group's value (empty when it hosts none).
    pub fn experts_of_group(&self, group: &GroupRecord, members: &[u32]) -> BTreeMap<u32, Vec<ExpertId>> {
        let (npg, cpn) = (self.layout.nodes_per_group, self.layout.chips_per_node as usize);
        let mut out = BTreeMap::new();
        for &rank in members.iter().filter(|&&r| self.group_of(r) == group.index) {
            let local = (rank % npg.max(1)) as usize;
            let held: BTreeSet<ExpertId> =
                group.chips.iter().skip(local * cpn).take(cpn).flatten().map(|&e| self.expert(e)).collect();
            out.insert(rank, held.into_iter().collect());
        }
        out
    }

    /// The whole plan from every group's value, in group order.
    pub fn assemble(&self, groups: &[GroupRecord]) -> Result<DistPlan, StoredPlanError> {
        if groups.len() != self.groups.len() {
            return Err(StoredPlanError::NotStorable(format!(
                "{} group values for {} groups",
                groups.len(),
                self.groups.len()
            )));
        }
        let members = self.member_ranks()?;
        let mut experts = BTreeMap::new();
        let mut buddies = BTreeMap::new();
        let mut placed = Vec::with_capacity(groups.len());
        for (g, group) in (0..).zip(groups) {
            if group.index != g {
                return Err(StoredPlanError::BadGroup {
                    group: g,
                    reason: format!("found group {}", group.index),
                });
            }
            experts.extend(self.experts_of_group(group, &members));
            buddies.extend(group.buddies.iter().map(|(r, b)| (*r, b.clone())));
            placed.push(self.group_placement(group));
        }
        Ok(DistPlan {
            placement: Placement { generation: self.generation, groups: placed },
            members,
            experts,
            restore: self.restore,
            tier: self.tier,
            buddies,
            peer_interval_steps: self.peer_interval_steps,
        })
    }
}

/// A plan split for storage: the commit record and every group's value.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredPlan {
    /// The value at `placement`.
    pub record: PlanRecord,
    /// Each group's (key, value), in group order.
    pub groups: Vec<(String, String)>,
}

impl StoredPlan {
    /// Splits `plan` (of a job with `shape`) into its commit record and group values. The plan
    /// must read back as itself ([`PlanRecord::assemble`]); every value is checked against
    /// [`MAX_VALUE_BYTES`].
    pub fn split(keys: &JobKeys, plan: &DistPlan, shape: &PlacementShape) -> Result<Self, StoredPlanError> {
        let layout = PlanLayout::of(shape);
        let routed = layout.routed_experts;
        let encode = |e: &ExpertId| {
            (e.expert < routed)
                .then(|| e.layer.checked_mul(routed).and_then(|l| l.checked_add(e.expert)))
                .flatten()
                .ok_or_else(|| StoredPlanError::NotStorable(format!("expert {e} outside the layout")))
        };
        let ngroups = u32::try_from(plan.placement.groups.len())
            .map_err(|_| StoredPlanError::NotStorable("too many groups".into()))?;
        let mut buddies: Vec<BTreeMap<u32, Vec<u32>>> = vec![BTreeMap::new(); ngroups as usize];
        let npg = layout.nodes_per_group.max(1);
        for (rank, b) in &plan.buddies {
            let slot = buddies.get_mut((rank / npg) as usize).ok_or_else(|| {
                StoredPlanError::NotStorable(format!("buddies of rank {rank} outside every group"))
            })?;
            slot.insert(*rank, b.clone());
        }
        let mut values = Vec::with_capacity(ngroups as usize);
        let mut groups = Vec::with_capacity(ngroups as usize);
        let mut records = Vec::with_capacity(ngroups as usize);
        for (g, (group, buddies)) in (0..ngroups).zip(plan.placement.groups.iter().zip(buddies)) {
            let chips = group
                .chips
                .iter()
                .map(|c| c.iter().map(encode).collect::<Result<Vec<_>, _>>())
                .collect::<Result<_, _>>()?;
            let record = GroupRecord { index: group.index, chips, pending: group.pending.clone(), buddies };
            let value = serde_json::to_string(&record).map_err(|e| StoredPlanError::Encode(e.to_string()))?;
            let d = digest(value.as_bytes());
            let key = keys.plan_group(g, &d);
            if value.len() > MAX_VALUE_BYTES {
                return Err(StoredPlanError::TooLarge { key, bytes: value.len() });
            }
            groups.push(d);
            values.push((key, value));
            records.push(record);
        }
        let record = PlanRecord {
            generation: plan.generation(),
            layout,
            groups,
            members: ranges(&plan.members),
            restore: plan.restore,
            tier: plan.tier,
            peer_interval_steps: plan.peer_interval_steps,
        };
        let back = record.assemble(&records)?;
        if back != *plan {
            return Err(StoredPlanError::NotStorable(
                "its members' experts or buddies do not follow from the placement and layout".into(),
            ));
        }
        Ok(Self { record, groups: values })
    }
}

/// What publishing a generation writes.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationWrites {
    /// The group values the previous commit record does not already name: written first (in
    /// batches, outside the fence: unreferenced until the commit record names them).
    pub groups: Vec<(String, String)>,
    /// One transaction, guarded by the record's revision: `control`, `recovery` (the brain's
    /// record, so a restarted driver never sees a generation without its record) and, last, the
    /// commit record at `placement`.
    pub commit: [(String, String); 3],
    /// The commit record written.
    pub record: PlanRecord,
}

/// The writes publishing generation `plan` (of a job with `shape`): its new group values and the
/// fenced commit. `previous` is the commit record in force: groups it already names are not
/// rewritten. Every value is at most [`MAX_VALUE_BYTES`].
pub fn generation_writes(
    keys: &JobKeys,
    plan: &DistPlan,
    shape: &PlacementShape,
    control: &ControlRecord,
    state: &RecoveryState,
    previous: Option<&PlanRecord>,
) -> Result<GenerationWrites, StoredPlanError> {
    let stored = StoredPlan::split(keys, plan, shape)?;
    let kept: BTreeSet<String> =
        previous.map(|p| p.group_keys(keys).into_iter().collect()).unwrap_or_default();
    let groups = stored.groups.into_iter().filter(|(k, _)| !kept.contains(k)).collect();
    let encode = |e: serde_json::Error| StoredPlanError::Encode(e.to_string());
    let commit = [
        (keys.control(), serde_json::to_string(control).map_err(encode)?),
        (keys.recovery(), state.to_json()),
        (keys.placement(), serde_json::to_string(&stored.record).map_err(encode)?),
    ];
    if let Some((key, value)) = commit.iter().find(|(_, v)| v.len() > MAX_VALUE_BYTES) {
        return Err(StoredPlanError::TooLarge { key: key.clone(), bytes: value.len() });
    }
    Ok(GenerationWrites { groups, commit, record: stored.record })
}

/// Group value keys under [`JobKeys::plan_groups`] that `record` does not name: garbage once
/// the generation in force no longer needs older ones (the control loop deletes them when a
/// generation settles).
pub fn unreferenced_groups<'k>(
    keys: &JobKeys,
    record: &PlanRecord,
    existing: impl IntoIterator<Item = &'k str>,
) -> Vec<String> {
    let named: BTreeSet<String> = record.group_keys(keys).into_iter().collect();
    let prefix = keys.plan_groups();
    existing
        .into_iter()
        .filter(|k| k.starts_with(&prefix) && !named.contains(*k))
        .map(str::to_string)
        .collect()
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
        one_chip_workers(2, 4, redundant, workers)
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

    /// A shape of several expert-parallel groups (2 nodes each) and pipeline stages.
    fn grouped(nodes: u32) -> PlacementShape {
        PlacementShape {
            layers: 4,
            routed_experts: 6,
            redundant_experts: 2,
            expert_state_bytes: 1 << 20,
            nodes,
            chips_per_node: 2,
            chip_memory_bytes: 8 << 20,
            expert_parallel_size: 4,
            nodes_per_rack: Some(1),
            min_healthy_fraction: 0.5,
            pipeline_stages: 2,
        }
    }

    fn record_of(generation: u64) -> ControlRecord {
        ControlRecord { generation, ..ControlRecord::default() }
    }

    fn state(nodes: u32) -> RecoveryState {
        RecoveryState::new((0..nodes).map(|n| format!("n{n}")).collect(), vec![])
    }

    /// Reads back what `writes` stored, as a member would: the commit record, then every group.
    fn read_back(keys: &JobKeys, store: &BTreeMap<String, String>) -> DistPlan {
        let PlacementValue::Record(record) =
            PlacementValue::parse(store[&keys.placement()].as_bytes()).unwrap()
        else {
            panic!("not a commit record")
        };
        let groups: Vec<GroupRecord> = (0..)
            .zip(record.group_keys(keys))
            .map(|(g, k)| record.parse_group(g, store[&k].as_bytes()).unwrap())
            .collect();
        record.assemble(&groups).unwrap()
    }

    fn apply(store: &mut BTreeMap<String, String>, writes: &GenerationWrites) {
        store.extend(writes.groups.iter().cloned());
        store.extend(writes.commit.iter().cloned());
    }

    #[test]
    fn a_stored_plan_reads_back_bit_for_bit_and_a_replan_rewrites_only_changed_groups() {
        let s = grouped(8);
        let keys = crate::keyspace::Keyspace::default().job("ml", "g");
        let peers = PeerCopies { copies: 1, interval_steps: 3, nodes_per_rack: Some(1) };
        let first = initial_plan(&s, Restore::Fresh).unwrap();
        assert_eq!(first.placement.groups.len(), 4);
        let gen1 = from_brain(
            &s,
            &first.placement,
            (0..8).collect(),
            RestoreSource::Memory,
            None,
            GenerationTier::Initial,
            peers,
        )
        .unwrap();
        let mut store = BTreeMap::new();
        let w1 = generation_writes(&keys, &gen1, &s, &record_of(1), &state(8), None).unwrap();
        assert_eq!(w1.groups.len(), 4, "every group is new");
        assert_eq!(
            w1.commit.last().map(|(k, _)| k.clone()),
            Some(keys.placement()),
            "the commit record goes last"
        );
        apply(&mut store, &w1);
        assert_eq!(read_back(&keys, &store), gen1);

        // Node 5 (group 2) is dropped and its chips emptied: only group 2's value changes.
        let mut next = first.placement.clone();
        next.generation = 2;
        for hosted in next.groups[2].chips.iter_mut().skip(2) {
            hosted.clear();
        }
        let members = vec![0, 1, 2, 3, 4, 6, 7];
        let gen2 = from_brain(
            &s,
            &next,
            members,
            RestoreSource::Checkpoint { step: 9 },
            Some(&gen1),
            GenerationTier::Shrink,
            peers,
        )
        .unwrap();
        let w2 = generation_writes(&keys, &gen2, &s, &record_of(2), &state(8), Some(&w1.record)).unwrap();
        let rewritten: Vec<&str> = w2.groups.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(rewritten.len(), 1, "{rewritten:?}");
        assert!(rewritten[0].starts_with(&format!("{}000002/", keys.plan_groups())));
        assert_eq!(w2.record.members, [[0, 4], [6, 7]]);
        apply(&mut store, &w2);
        assert_eq!(read_back(&keys, &store), gen2);
        // Generation 1's group 2 is garbage once generation 2 is in force, nothing else.
        let garbage = unreferenced_groups(&keys, &w2.record, store.keys().map(String::as_str));
        assert_eq!(garbage, [w1.record.group_key(&keys, 2).unwrap()]);
    }

    #[test]
    fn group_values_that_do_not_match_their_record_are_refused() {
        let s = grouped(4);
        let keys = crate::keyspace::Keyspace::default().job("ml", "g");
        let plan = initial_plan(&s, Restore::Fresh).unwrap();
        let stored = StoredPlan::split(&keys, &plan, &s).unwrap();
        let (_, value) = &stored.groups[1];
        let record = &stored.record;
        assert!(record.parse_group(1, value.as_bytes()).is_ok());
        // Another group's value, a tampered value, a group the record does not have.
        assert!(matches!(
            record.parse_group(0, value.as_bytes()),
            Err(StoredPlanError::BadGroup { group: 0, .. })
        ));
        let tampered = value.replacen('1', "2", 1);
        assert!(record.parse_group(1, tampered.as_bytes()).is_err());
        assert!(record.parse_group(9, value.as_bytes()).is_err());
        // A plan whose experts do not follow from its placement cannot be stored.
        let mut odd = plan.clone();
        odd.experts.insert(0, vec![]);
        assert!(matches!(StoredPlan::split(&keys, &odd, &s), Err(StoredPlanError::NotStorable(_))));
        // Both formats parse at `placement`; the generation is on top of both.
        let inline = serde_json::to_vec(&plan).unwrap();
        assert!(matches!(PlacementValue::parse(&inline), Ok(PlacementValue::Inline(p)) if *p == plan));
        let committed = serde_json::to_vec(record).unwrap();
        assert_eq!(PlacementValue::parse(&committed).map(|v| v.generation()).ok(), Some(1));
        assert!(PlacementValue::parse(b"{\"layout\":1}").is_err());
    }

    /// The reference layout (`examples/longcat-2.0.yaml`: 6,250 nodes, 50,000 chips, 250 groups)
    /// with peer copies: every value a generation writes fits in 512 KiB.
    #[test]
    fn every_value_of_the_reference_layout_fits_in_512_kib() {
        let text = include_str!("../../examples/longcat-2.0.yaml");
        let job = crate::manifest::parse_job(text).unwrap();
        let shape = crate::validate::JobShape::resolve(&job.spec).unwrap();
        let s = PlacementShape::from_job(&shape, job.spec.failure_policy.min_healthy_fraction);
        let keys = crate::keyspace::Keyspace::default().job("ml", "longcat");
        let first = initial_plan(&s, Restore::Fresh).unwrap();
        let peers = PeerCopies { copies: 1, interval_steps: 10, nodes_per_rack: s.nodes_per_rack };
        let plan = from_brain(
            &s,
            &first.placement,
            first.members.clone(),
            RestoreSource::Memory,
            None,
            GenerationTier::Initial,
            peers,
        )
        .unwrap();
        let writes = generation_writes(&keys, &plan, &s, &record_of(1), &state(s.nodes), None).unwrap();
        assert_eq!(writes.groups.len(), 250);
        let largest = writes.groups.iter().chain(&writes.commit).map(|(_, v)| v.len()).max().unwrap();
        assert!(largest <= MAX_VALUE_BYTES, "largest value {largest} bytes");
        let record = &writes.commit[2].1;
        assert!(record.len() < 16 * 1024, "commit record {} bytes", record.len());
        let mut store = BTreeMap::new();
        apply(&mut store, &writes);
        assert_eq!(read_back(&keys, &store), plan);
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
