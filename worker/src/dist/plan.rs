//! Pure decisions of expert-parallel training: who computes which micro-batch, which replica
//! serves an expert call, what each worker owns, and what the coordinator does when a member
//! is lost. No I/O here.

use std::collections::{BTreeMap, BTreeSet};

use ninelives_core::keyspace::JobKeys;
use ninelives_core::placement::{
    self, ExpertLoad, FailedChips, Failure, Placement, PlacementShape, Redundancy, ReplanOptions, Tier,
};
use ninelives_core::recovery::{ControlRecord, RecoveryState};
use serde::{Deserialize, Serialize};

use crate::model::ExpertId;

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
    /// `initial`, `reroute` or `reshard`.
    pub tier: String,
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
    pub fn check(&self, layers: u32, routed: u32) -> Result<(), String> {
        if self.members.windows(2).any(|w| w[0] >= w[1]) || self.members.is_empty() {
            return Err(format!("members {:?} are not a sorted, non-empty list", self.members));
        }
        for rank in self.experts.keys() {
            if !self.members.contains(rank) {
                return Err(format!("rank {rank} holds experts but is not a member"));
            }
        }
        for layer in 0..layers {
            for expert in 0..routed {
                let id = ExpertId::new(layer, expert);
                if self.holders(id).is_empty() {
                    return Err(format!("{id} has no holder"));
                }
            }
        }
        Ok(())
    }
}

/// The member that computes micro-batch `micro`: position `micro mod members`.
pub fn micro_batch_owner(members: &[u32], micro: usize) -> Option<u32> {
    (!members.is_empty()).then(|| members[micro % members.len()])
}

/// The replica that serves `expert` for micro-batch `micro`: holders sorted by rank, index
/// `(micro + expert) mod replicas`. Deterministic, so requester and replicas agree without
/// talking, and it spreads a replicated expert's micro-batches over its replicas.
pub fn serving_replica(holders: &[u32], micro: u32, expert: ExpertId) -> Option<u32> {
    if holders.is_empty() {
        return None;
    }
    let i = (u64::from(micro) + u64::from(expert.expert)) % holders.len() as u64;
    Some(holders[i as usize])
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
            for e in placement.hosted(shape, placement::ChipId { node, chip }) {
                held.insert(ExpertId::new(e.layer, e.expert));
            }
        }
    }
    out.into_iter().map(|(n, s)| (n, s.into_iter().collect())).collect()
}

/// The first generation: the planner's initial placement over `workers` workers.
pub fn initial_plan(shape: &PlacementShape, restore: Restore) -> Result<DistPlan, String> {
    let load = ExpertLoad::uniform(shape);
    let placement = placement::initial_placement(shape, &load).map_err(|e| e.to_string())?;
    let experts = experts_by_node(shape, &placement);
    Ok(DistPlan { members: (0..shape.nodes).collect(), experts, restore, tier: "initial".into(), placement })
}

/// What the coordinator does after observing the live members.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Every member is alive: nothing to do.
    Keep,
    /// Publish this next generation.
    Publish(DistPlan),
    /// The job cannot continue (reason for the operator).
    Fail(String),
}

/// The coordinator's decision when `live` ranks are alive under `current`.
///
/// Lost members' nodes count as failed; the planner re-plans (lost redundancy deferred, no
/// rebalancing, so a reroute moves nothing). `reroute` keeps every member's memory (they agree on
/// a step, see [`Restore::InMemory`]); `reshard` re-places the experts that lost their last
/// replica and rolls everyone back to `checkpoint` (or to a fresh start when none is
/// committed yet).
pub fn decide(
    shape: &PlacementShape,
    current: &DistPlan,
    live: &BTreeSet<u32>,
    checkpoint: Option<u64>,
) -> Decision {
    let members: Vec<u32> = current.members.iter().copied().filter(|r| live.contains(r)).collect();
    if members.len() == current.members.len() {
        return Decision::Keep;
    }
    if members.is_empty() {
        return Decision::Fail("every worker is gone".into());
    }
    let failures: Vec<Failure> =
        (0..shape.nodes).filter(|n| !members.contains(n)).map(Failure::Node).collect();
    let failed = match FailedChips::from_failures(shape, &failures) {
        Ok(f) => f,
        Err(e) => return Decision::Fail(e.to_string()),
    };
    let options = ReplanOptions {
        redundancy: Redundancy::Defer,
        rebalance: false,
        rebalance_threshold: f64::INFINITY,
        rebalance_target: 1.0,
    };
    let replanned =
        match placement::replan(shape, &current.placement, &failed, &ExpertLoad::uniform(shape), &options) {
            Ok(r) => r,
            Err(e) => return Decision::Fail(e.to_string()),
        };
    let Some(mut next) = replanned.placement else {
        let reason = match &replanned.plan.tier {
            Tier::Infeasible { reason } => format!("{reason:?}"),
            other => other.as_str().to_string(),
        };
        return Decision::Fail(format!("no feasible placement without ranks {failures:?}: {reason}"));
    };
    let (tier, restore) = match replanned.plan.tier {
        Tier::Reroute => ("reroute", Restore::InMemory),
        _ => ("reshard", checkpoint.map_or(Restore::Fresh, |step| Restore::Checkpoint { step })),
    };
    // Every load of a reshard comes from the checkpoint and completes before the members ack
    // the generation, so nothing stays pending.
    next.groups.iter_mut().for_each(|g| g.pending.clear());
    let experts = experts_by_node(shape, &next).into_iter().filter(|(r, _)| members.contains(r)).collect();
    Decision::Publish(DistPlan { placement: next, members, experts, restore, tier: tier.into() })
}

/// The generation a recovery brain published (Kubernetes: the operator drives
/// [`ninelives_core::recovery::decide`]), as the members' agreement.
///
/// `shape` is the job's own planner shape (a member stands for its node: it holds the experts of
/// all its node's chips); `members` are the ranks the brain expects (dropped ones left out);
/// `restore_step` is the brain's rollback (`Some(0)`: the seeded initial state). Without a
/// rollback the members keep their memory, which works only when no member gains an expert it
/// does not hold (a member can drop experts, not conjure them): anything else is an error the
/// brain must not produce for expert-parallel workers (see `BrainConfig::for_expert_parallel`).
pub fn from_brain(
    shape: &PlacementShape,
    placement: &Placement,
    members: Vec<u32>,
    restore_step: Option<u64>,
    previous: Option<&DistPlan>,
    tier: &str,
) -> Result<DistPlan, String> {
    let experts: BTreeMap<u32, Vec<ExpertId>> =
        experts_by_node(shape, placement).into_iter().filter(|(r, _)| members.contains(r)).collect();
    let restore = match (restore_step, previous) {
        (Some(0), _) | (None, None) => Restore::Fresh,
        (Some(step), _) => Restore::Checkpoint { step },
        (None, Some(before)) => {
            for (rank, mine) in &experts {
                let held = before.experts_of(*rank);
                if let Some(missing) = mine.iter().find(|e| !held.contains(e)) {
                    return Err(format!(
                        "generation {} gives rank {rank} expert {missing} without a rollback; a member \
                         cannot load an expert from a peer's memory",
                        placement.generation
                    ));
                }
            }
            Restore::InMemory
        }
    };
    let plan = DistPlan { placement: placement.clone(), members, experts, restore, tier: tier.to_string() };
    Ok(plan)
}

/// [`from_brain`] for a generation the brain just published, with the members (the ranks it
/// expects), the rollback (its control record) and the tier (`initial` for generation 1, else
/// the active recovery's rung, `settled` without one) read from the brain's own record. Both
/// runtimes that drive the brain — the operator and the local demo — publish exactly this.
pub fn from_published_generation(
    shape: &PlacementShape,
    state: &RecoveryState,
    placement: &Placement,
    control: &ControlRecord,
    previous: Option<&DistPlan>,
) -> Result<DistPlan, String> {
    let tier = match (&state.active, placement.generation) {
        (_, 1) => "initial",
        (Some(active), _) => active.rung.as_str(),
        (None, _) => "settled",
    };
    from_brain(shape, placement, state.expected_ranks().collect(), control.restore_step, previous, tier)
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
        };
        worker_shape(&base, workers)
    }

    #[test]
    fn micro_batches_and_replicas_are_spread_deterministically() {
        assert_eq!(micro_batch_owner(&[0, 2, 3], 4), Some(2));
        assert_eq!(micro_batch_owner(&[], 0), None);
        let e = ExpertId::new(1, 3);
        assert_eq!(serving_replica(&[1, 4], 0, e), Some(4));
        assert_eq!(serving_replica(&[1, 4], 1, e), Some(1));
        assert_eq!(serving_replica(&[2], 7, e), Some(2));
        assert_eq!(serving_replica(&[], 0, e), None);
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
    fn losing_a_member_whose_experts_are_replicated_is_a_reroute() {
        // Every expert twice (4 redundant per layer over 4 routed), on distinct workers.
        let s = shape(4, 4);
        let plan = initial_plan(&s, Restore::Fresh).unwrap();
        for e in 0..4 {
            assert_eq!(plan.holders(ExpertId::new(0, e)).len(), 2);
        }
        let live: BTreeSet<u32> = [0, 1, 3].into();
        let Decision::Publish(next) = decide(&s, &plan, &live, Some(4)) else { panic!("no new generation") };
        assert_eq!(next.tier, "reroute");
        assert_eq!(next.restore, Restore::InMemory);
        assert_eq!(next.generation(), plan.generation() + 1);
        assert_eq!(next.members, [0, 1, 3]);
        next.check(2, 4).unwrap();
        for r in [0, 1, 3] {
            assert_eq!(next.experts_of(r), plan.experts_of(r), "a reroute moves nothing");
        }
        assert_eq!(decide(&s, &plan, &[0, 1, 2, 3].into(), None), Decision::Keep);
    }

    #[test]
    fn losing_the_only_replica_is_a_reshard_from_the_checkpoint() {
        let s = shape(4, 0);
        let plan = initial_plan(&s, Restore::Fresh).unwrap();
        let live: BTreeSet<u32> = [0, 2, 3].into();
        let Decision::Publish(next) = decide(&s, &plan, &live, Some(8)) else { panic!("no new generation") };
        assert_eq!(next.tier, "reshard");
        assert_eq!(next.restore, Restore::Checkpoint { step: 8 });
        next.check(2, 4).unwrap();
        assert!(next.experts_of(1).is_empty());
        let Decision::Publish(fresh) = decide(&s, &plan, &live, None) else { panic!() };
        assert_eq!(fresh.restore, Restore::Fresh, "no checkpoint yet: start over");
        assert!(matches!(decide(&s, &plan, &BTreeSet::new(), None), Decision::Fail(_)));
    }

    #[test]
    fn a_brain_generation_becomes_the_members_agreement() {
        let s = shape(4, 4);
        let first = initial_plan(&s, Restore::Fresh).unwrap();
        let gen1 = from_brain(&s, &first.placement, vec![0, 1, 2, 3], None, None, "initial").unwrap();
        assert_eq!((gen1.restore, &gen1.experts), (Restore::Fresh, &first.experts));
        // A rollback: everyone loads the checkpoint, whatever moved.
        let mut next = first.placement.clone();
        next.generation = 2;
        let rolled = from_brain(&s, &next, vec![0, 1, 3], Some(20), Some(&gen1), "reshard").unwrap();
        assert_eq!(rolled.restore, Restore::Checkpoint { step: 20 });
        assert!(rolled.experts_of(2).is_empty(), "a dropped rank holds nothing");
        assert_eq!(from_brain(&s, &next, vec![0], Some(0), None, "restore").unwrap().restore, Restore::Fresh);
        // Without a rollback a member may lose a replica but not gain one.
        let lost = ExpertId::new(0, 0);
        let rank = first.holders(lost)[0];
        let mut fewer = first.placement.clone();
        fewer.generation = 3;
        for chips in fewer.groups.iter_mut().map(|g| &mut g.chips) {
            for (i, hosted) in chips.iter_mut().enumerate() {
                if i as u32 / s.chips_per_node == rank {
                    hosted.retain(|e| (e.layer, e.expert) != (lost.layer, lost.expert));
                }
            }
        }
        let kept = from_brain(&s, &fewer, vec![0, 1, 2, 3], None, Some(&gen1), "reroute").unwrap();
        assert_eq!(kept.restore, Restore::InMemory);
        assert!(!kept.experts_of(rank).contains(&lost));
        let gained = from_brain(&s, &first.placement, vec![0, 1, 2, 3], None, Some(&kept), "reroute");
        assert!(gained.unwrap_err().contains("without a rollback"));
    }

    #[test]
    fn a_plan_round_trips_through_json_with_the_planners_fields_on_top() {
        let plan = initial_plan(&shape(2, 1), Restore::Checkpoint { step: 3 }).unwrap();
        let text = serde_json::to_string(&plan).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["generation"], 1);
        assert!(value["groups"].is_array());
        let back: DistPlan = serde_json::from_str(&text).unwrap();
        assert_eq!(back, plan);
        assert_eq!(agreed_step(&[(0, 5), (2, 4)].into()), Some(4));
    }
}
