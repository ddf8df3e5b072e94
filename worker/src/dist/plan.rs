//! Pure decisions of expert-parallel training: who computes which micro-batch and which replica
//! serves an expert call. The generation protocol itself (what members agree on) is
//! [`ninelives_core::generation`]. No I/O here.

use std::collections::BTreeSet;

use ninelives_core::generation::{DistPlan, GenerationTier, Restore, experts_by_node};
use ninelives_core::placement::{
    self, ExpertLoad, FailedChips, Failure, PlacementShape, Redundancy, ReplanOptions, Tier,
};

use crate::model::ExpertId;

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
        Tier::Reroute => (GenerationTier::Reroute, Restore::InMemory),
        _ => {
            (GenerationTier::Reshard, checkpoint.map_or(Restore::Fresh, |step| Restore::Checkpoint { step }))
        }
    };
    // Every load of a reshard comes from the checkpoint and completes before the members ack
    // the generation, so nothing stays pending.
    next.groups.iter_mut().for_each(|g| g.pending.clear());
    let experts = experts_by_node(shape, &next).into_iter().filter(|(r, _)| members.contains(r)).collect();
    Decision::Publish(DistPlan { placement: next, members, experts, restore, tier })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ninelives_core::generation::{initial_plan, worker_shape};

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
    fn losing_a_member_whose_experts_are_replicated_is_a_reroute() {
        // Every expert twice (4 redundant per layer over 4 routed), on distinct workers.
        let s = shape(4, 4);
        let plan = initial_plan(&s, Restore::Fresh).unwrap();
        for e in 0..4 {
            assert_eq!(plan.holders(ExpertId::new(0, e)).len(), 2);
        }
        let live: BTreeSet<u32> = [0, 1, 3].into();
        let Decision::Publish(next) = decide(&s, &plan, &live, Some(4)) else { panic!("no new generation") };
        assert_eq!(next.tier, GenerationTier::Reroute);
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
        assert_eq!(next.tier, GenerationTier::Reshard);
        assert_eq!(next.restore, Restore::Checkpoint { step: 8 });
        next.check(2, 4).unwrap();
        assert!(next.experts_of(1).is_empty());
        let Decision::Publish(fresh) = decide(&s, &plan, &live, None) else { panic!() };
        assert_eq!(fresh.restore, Restore::Fresh, "no checkpoint yet: start over");
        assert!(matches!(decide(&s, &plan, &BTreeSet::new(), None), Decision::Fail(_)));
    }
}
