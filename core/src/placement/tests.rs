//! Property tests of every planner invariant over random topologies, loads and failure sets
//! (chips, whole nodes, whole racks, and failures during a pending reshard), plus the
//! LongCat-2.0 reference job.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn shape(
    (cpn, npg, groups, npr): (u32, u32, u32, Option<u32>),
    (layers, routed, redundant): (u32, u32, u32),
    extra_slots: u32,
) -> PlacementShape {
    staged(1, (cpn, npg, groups, npr), (layers, routed, redundant), extra_slots)
}

/// A shape with `stages` pipeline stages of `layers` layers each and `groups` groups per stage.
fn staged(
    stages: u32,
    (cpn, npg, groups, npr): (u32, u32, u32, Option<u32>),
    (layers, routed, redundant): (u32, u32, u32),
    extra_slots: u32,
) -> PlacementShape {
    let ep = cpn * npg;
    let need = (layers * routed).div_ceil(ep);
    PlacementShape {
        pipeline_stages: stages,
        layers: layers * stages,
        routed_experts: routed,
        redundant_experts: redundant,
        expert_state_bytes: 100,
        nodes: npg * groups * stages,
        chips_per_node: cpn,
        chip_memory_bytes: u64::from(need + extra_slots) * 100 + 42,
        expert_parallel_size: ep,
        nodes_per_rack: npr,
        min_healthy_fraction: 0.0,
    }
}

fn arb_shape() -> impl Strategy<Value = PlacementShape> {
    (
        1u32..=3,
        (1u32..=4, 2u32..=6, 1u32..=2, prop::option::of(1u32..=3)),
        (1u32..=3, 1u32..=6, 0u32..=12),
        0u32..=4,
    )
        .prop_map(|(stages, topo, model, extra)| staged(stages, topo, model, extra))
}

/// Failures as raw numbers, mapped onto the shape (kind 0 chip, 1 node, 2 rack).
fn failures(shape: &PlacementShape, raw: &[(u8, u32, u32)]) -> Vec<Failure> {
    raw.iter()
        .map(|&(kind, a, b)| match (kind % 3, shape.racks()) {
            (2, racks) if racks > 0 => Failure::Rack(a % racks),
            (1, _) | (2, _) => Failure::Node(a % shape.nodes),
            _ => Failure::Chip(ChipId::new(a % shape.nodes, b % shape.chips_per_node)),
        })
        .collect()
}

fn arb_raw_failures() -> impl Strategy<Value = Vec<(u8, u32, u32)>> {
    prop::collection::vec((0u8..3, any::<u32>(), any::<u32>()), 1..4)
}

/// Replicas of each expert on healthy chips, per group: `(group, dense expert) -> chips`.
fn replicas(
    shape: &PlacementShape,
    p: &Placement,
    failed: &FailedChips,
) -> BTreeMap<(u32, usize), Vec<ChipId>> {
    let mut out: BTreeMap<(u32, usize), Vec<ChipId>> = BTreeMap::new();
    for g in &p.groups {
        for (local, hosted) in g.chips.iter().enumerate() {
            let chip = shape.chip_at(g.index, local);
            if failed.contains(chip) {
                continue;
            }
            for &e in hosted {
                out.entry((g.index, shape.expert_index(e))).or_default().push(chip);
            }
        }
    }
    out
}

fn is_pending(p: &Placement, shape: &PlacementShape, chip: ChipId, e: ExpertId) -> bool {
    p.groups[shape.locate(chip).0 as usize].pending.iter().any(|m| m.to == chip && m.expert == e)
}

/// The failure-domain invariant as a user relies on it: losing any one node, or any one rack
/// when racks are modelled, leaves a healthy replica of every expert that had two or more (in
/// groups whose replicas sit in two or more such domains).
fn assert_domains_protect(shape: &PlacementShape, p: &Placement, failed: &FailedChips) {
    let reps = replicas(shape, p, failed);
    let node = |c: ChipId| c.node;
    let rack = |c: ChipId| shape.domain_of_node(c.node);
    let units: [(&str, &dyn Fn(ChipId) -> u32); 2] = [("node", &node), ("rack", &rack)];
    for (name, unit) in &units {
        for g in 0..shape.groups() {
            let used: BTreeSet<u32> = reps
                .iter()
                .filter(|((h, _), _)| *h == g)
                .flat_map(|(_, c)| c.iter().map(|&c| shape.domain_of_node(c.node)))
                .collect();
            if used.len() < 2 {
                continue; // the group has one domain: nothing can be kept apart
            }
            for ((_, i), chips) in reps.range((g, 0)..(g + 1, 0)).filter(|(_, c)| c.len() >= 2) {
                for lost in chips.iter().map(|&c| unit(c)).collect::<BTreeSet<_>>() {
                    assert!(
                        chips.iter().any(|&c| unit(c) != lost),
                        "losing {name} {lost} removes every replica of {} in group {g}: {chips:?}",
                        shape.expert_at(*i)
                    );
                }
            }
        }
    }
}

/// Every chip hosts experts of its group's pipeline stage only, and no expert twice.
fn assert_stage_confined(shape: &PlacementShape, p: &Placement) {
    for g in &p.groups {
        let layers = shape.group_layers(g.index);
        for hosted in &g.chips {
            assert!(hosted.iter().all(|e| layers.contains(&e.layer)), "group {} hosts {hosted:?}", g.index);
            let distinct: BTreeSet<_> = hosted.iter().collect();
            assert_eq!(distinct.len(), hosted.len(), "a chip lists an expert twice: {hosted:?}");
        }
    }
}

/// Re-plans without load-triggered rebalancing, so movement can be checked exactly.
fn minimal() -> ReplanOptions {
    ReplanOptions { rebalance_threshold: f64::INFINITY, ..ReplanOptions::default() }
}

/// Every invariant of a re-plan from `before` with `failed` chips out, redundancy restored and
/// no rebalance.
fn assert_replan_invariants(shape: &PlacementShape, before: &Placement, failed: &FailedChips, out: &Replan) {
    let plan = &out.plan;
    let Some(after) = &out.placement else {
        // Infeasible only when an expert really cannot fit: its group's healthy memory is
        // smaller than one replica of every expert.
        let Tier::Infeasible { reason: Infeasibility::Capacity { group, healthy_chips, .. } } = &plan.tier
        else {
            panic!("unexpected infeasible plan {:?}", plan.tier);
        };
        let slots = healthy_chips * u64::from(shape.slots_per_chip());
        assert!(
            slots < shape.experts_per_group() as u64,
            "group {group} has {slots} healthy slots for {} experts",
            shape.experts_per_group()
        );
        return;
    };
    after.check(shape, failed).expect("structural invariants");
    assert_domains_protect(shape, after, failed);
    assert_stage_confined(shape, after);
    assert_eq!(after.generation, before.generation + 1);
    assert_eq!(plan.generation, after.generation);

    let was = replicas(shape, before, &FailedChips::none());
    let now = replicas(shape, after, failed);
    let survived = replicas(shape, before, failed);
    for g in 0..shape.groups() {
        for i in shape.group_experts(g) {
            let e = shape.expert_at(i);
            let n = now.get(&(g, i)).map_or(0, Vec::len);
            assert!(n >= 1, "expert {e} of group {g} has no healthy replica");
            // Requested count, unless a replica was dropped for lack of room or evicted.
            let requested = was.get(&(g, i)).map_or(0, Vec::len);
            let short =
                plan.dropped.iter().chain(&plan.evicted).chain(&plan.merged).filter(|d| **d == e).count();
            assert!(n + short >= requested, "expert {e} of group {g}: {n} replicas, {requested} requested");
            // Minimal movement: every replica that survived stays where it was (bar evictions).
            let kept = survived.get(&(g, i)).map_or(0, |chips| {
                chips.iter().filter(|c| now.get(&(g, i)).is_some_and(|n| n.contains(c))).count()
            });
            assert!(
                kept + short >= survived.get(&(g, i)).map_or(0, Vec::len),
                "surviving replica of {e} moved"
            );
        }
    }
    // A dropped replica really had nowhere to go.
    for d in &plan.dropped {
        let (g, _) = plan
            .groups
            .iter()
            .map(|&g| (g, now.get(&(g, shape.expert_index(*d))).cloned().unwrap_or_default()))
            .find(|(g, chips)| chips.len() < was.get(&(*g, shape.expert_index(*d))).map_or(0, Vec::len))
            .expect("a dropped replica leaves its expert short in some group");
        let hosts = &now[&(g, shape.expert_index(*d))];
        let domains: BTreeSet<u32> = hosts.iter().map(|c| shape.domain_of_node(c.node)).collect();
        let group = &after.groups[g as usize];
        let group_domains: BTreeSet<u32> =
            (0..group.chips.len()).map(|l| shape.domain_of_node(shape.chip_at(g, l).node)).collect();
        for (local, hosted) in group.chips.iter().enumerate() {
            let chip = shape.chip_at(g, local);
            let spread = domains.len() >= 2
                || group_domains.len() < 2
                || !domains.contains(&shape.domain_of_node(chip.node));
            let eligible = !failed.contains(chip)
                && hosted.len() < shape.slots_per_chip() as usize
                && !hosted.contains(d)
                && spread;
            assert!(!eligible, "{d} was dropped but chip {chip} could host it");
        }
    }
    // Every load targets a healthy chip that now hosts the expert, from a live peer when one
    // existed, else the checkpoint.
    assert_eq!(plan.experts_moved, plan.moves.len() as u64);
    assert_eq!(plan.bytes_moved, plan.experts_moved * shape.expert_state_bytes);
    for m in plan.moves.iter().chain(&plan.carried) {
        assert!(!failed.contains(m.to) && after.hosted(shape, m.to).contains(&m.expert), "bad target {m:?}");
        let (g, _) = shape.locate(m.to);
        let live_before: Vec<ChipId> = survived
            .get(&(g, shape.expert_index(m.expert)))
            .map(|c| c.iter().copied().filter(|&c| !is_pending(before, shape, c, m.expert)).collect())
            .unwrap_or_default();
        match m.source {
            Source::Peer(p) => {
                assert!(live_before.contains(&p), "{m:?} reads a peer that is not a live replica")
            }
            Source::Checkpoint => {
                let still: Vec<_> =
                    live_before.iter().filter(|c| after.hosted(shape, **c).contains(&m.expert)).collect();
                assert!(still.is_empty(), "{m:?} reads the checkpoint though {still:?} is live");
            }
        }
    }
    // Movement is the lower bound, less what could not be placed.
    assert_eq!(plan.rebalance_moves, 0);
    let (moved, dropped, evicted) =
        (plan.experts_moved, plan.dropped.len() as u64, plan.evicted.len() as u64);
    assert!(
        moved + dropped <= plan.lower_bound_experts && moved + dropped + evicted >= plan.lower_bound_experts
    );
    if evicted == 0 {
        assert_eq!(moved + dropped, plan.lower_bound_experts);
    }
    // The tier says whether training can go on without waiting for a load.
    let all_live = (0..shape.groups()).all(|g| {
        shape
            .group_experts(g)
            .all(|i| now[&(g, i)].iter().any(|&c| !is_pending(after, shape, c, shape.expert_at(i))))
    });
    assert_eq!(plan.tier == Tier::Reroute, all_live);
    assert_eq!(plan.stats.live_replicas_min >= 1, all_live);
    assert_eq!(plan.stats.replicas_min as usize, now.values().map(Vec::len).min().unwrap_or(0));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn initial_placement_keeps_every_invariant(shape in arb_shape(), seed in any::<u64>(), s in 0.0f64..2.0) {
        let load = ExpertLoad::zipf(&shape, s, seed);
        let p = initial_placement(&shape, &load).unwrap();
        p.check(&shape, &FailedChips::none()).unwrap();
        prop_assert_eq!(p.generation, 1);
        let reps = replicas(&shape, &p, &FailedChips::none());
        assert_domains_protect(&shape, &p, &FailedChips::none());
        assert_stage_confined(&shape, &p);
        let extra = super::initial::extra_per_layer(&shape);
        for g in 0..shape.groups() {
            let group = &p.groups[g as usize];
            let one_domain = shape.local_domains(g).iter().all(|&d| d == 0);
            let roomy = group.chips.iter().all(|h| h.len() < shape.slots_per_chip() as usize);
            for layer in shape.group_layers(g) {
                let base = layer as usize * shape.routed_experts as usize;
                let cap = if one_domain { 1 } else { shape.expert_parallel_size };
                let counts = super::initial::replica_counts(&load.dense(), base, shape.routed_experts as usize, extra, cap);
                let mut total = 0;
                for e in 0..shape.routed_experts {
                    let n = reps.get(&(g, base + e as usize)).map_or(0, Vec::len);
                    prop_assert!(n >= 1, "L{}E{} has no replica in group {}", layer, e, g);
                    // At most what EPLB's replication asked for, and exactly that when no chip
                    // ran out of memory (nothing had to be dropped).
                    prop_assert!(n as u32 <= counts[e as usize]);
                    if roomy {
                        prop_assert_eq!(n as u32, counts[e as usize], "L{}E{} in group {}", layer, e, g);
                    }
                    total += n as u64;
                }
                prop_assert!(total <= u64::from(shape.routed_experts) + extra);
            }
        }
        // The objective is measured per layer; it is never below the ideal.
        let stats = LoadStats::measure(&shape, &p, &FailedChips::none(), &load);
        prop_assert!(stats.step_inflation >= 1.0 - 1e-9);
        prop_assert_eq!(stats.stage_step_inflation.len(), shape.pipeline_stages as usize);
        prop_assert_eq!(initial_placement(&shape, &load).unwrap(), p, "deterministic");
    }

    #[test]
    fn replan_after_chip_node_and_rack_failures(
        shape in arb_shape(),
        seed in any::<u64>(),
        raw in arb_raw_failures(),
    ) {
        let load = ExpertLoad::zipf(&shape, 1.0, seed);
        let before = initial_placement(&shape, &load).unwrap();
        let failed = FailedChips::from_failures(&shape, &failures(&shape, &raw)).unwrap();
        let out = replan(&shape, &before, &failed, &load, &minimal()).unwrap();
        assert_replan_invariants(&shape, &before, &failed, &out);
        let again = replan(&shape, &before, &failed, &load, &minimal()).unwrap();
        prop_assert_eq!(
            serde_json::to_string(&again).unwrap(),
            serde_json::to_string(&out).unwrap(),
            "deterministic"
        );
    }

    #[test]
    fn cascading_failure_during_a_pending_reshard(
        shape in arb_shape(),
        seed in any::<u64>(),
        first in arb_raw_failures(),
        second in arb_raw_failures(),
    ) {
        let load = ExpertLoad::zipf(&shape, 1.0, seed);
        let p0 = initial_placement(&shape, &load).unwrap();
        let f1 = FailedChips::from_failures(&shape, &failures(&shape, &first)).unwrap();
        let r1 = replan(&shape, &p0, &f1, &load, &minimal()).unwrap();
        let Some(p1) = r1.placement else { return Ok(()) };
        // Second failure before any pending load finished: plan from the pending placement.
        let mut f2 = f1.clone();
        for f in failures(&shape, &second) {
            f2.add(&shape, f).unwrap();
        }
        let r2 = replan(&shape, &p1, &f2, &load, &minimal()).unwrap();
        assert_replan_invariants(&shape, &p1, &f2, &r2);
        if let Some(p2) = &r2.placement {
            // Nothing outstanding is forgotten: every earlier load onto a healthy chip that
            // still hosts the expert is carried (possibly with a new source).
            for m in p1.groups.iter().flat_map(|g| &g.pending) {
                if !f2.contains(m.to) && p2.hosted(&shape, m.to).contains(&m.expert) {
                    prop_assert!(r2.plan.carried.iter().any(|c| c.to == m.to && c.expert == m.expert));
                }
            }
            let settled = p2.settled();
            prop_assert!(!settled.has_pending());
            settled.check(&shape, &f2).unwrap();
        }
    }

    #[test]
    fn defer_moves_only_experts_left_without_replicas(shape in arb_shape(), seed in any::<u64>(), raw in arb_raw_failures()) {
        let load = ExpertLoad::zipf(&shape, 1.0, seed);
        let before = initial_placement(&shape, &load).unwrap();
        let failed = FailedChips::from_failures(&shape, &failures(&shape, &raw)).unwrap();
        let opts = ReplanOptions { redundancy: Redundancy::Defer, ..minimal() };
        let out = replan(&shape, &before, &failed, &load, &opts).unwrap();
        if let Some(after) = &out.placement {
            after.check(&shape, &failed).unwrap();
            prop_assert!(out.plan.moves.iter().all(|m| m.source == Source::Checkpoint));
            prop_assert_eq!(out.plan.experts_moved, out.plan.lower_bound_experts);
            prop_assert_eq!(out.plan.tier == Tier::Reroute, out.plan.moves.is_empty());
            prop_assert!(out.plan.stats.replicas_min >= 1);
        }
    }

    #[test]
    fn rebalance_never_makes_balance_worse(shape in arb_shape(), seed in any::<u64>(), raw in arb_raw_failures()) {
        let load = ExpertLoad::zipf(&shape, 1.5, seed);
        let before = initial_placement(&shape, &load).unwrap();
        let failed = FailedChips::from_failures(&shape, &failures(&shape, &raw)).unwrap();
        let plain = ReplanOptions { rebalance_threshold: f64::INFINITY, ..ReplanOptions::default() };
        let forced = ReplanOptions { rebalance: true, rebalance_target: 1.0, ..ReplanOptions::default() };
        let a = replan(&shape, &before, &failed, &load, &plain).unwrap();
        let b = replan(&shape, &before, &failed, &load, &forced).unwrap();
        if let (Some(_), Some(pb)) = (&a.placement, &b.placement) {
            pb.check(&shape, &failed).unwrap();
            prop_assert!(b.plan.stats.step_inflation <= a.plan.stats.step_inflation + 1e-9);
            prop_assert!(b.plan.stats.replicas_min >= 1);
        }
    }

    #[test]
    fn malformed_shapes_are_errors_not_panics(
        sizes in (0u32..5, 0u32..5, 0u32..9, 0u32..4, 0u32..4, 0u32..4),
        npr in prop::option::of(0u32..3),
        memory in 0u64..1000,
    ) {
        let (layers, routed, nodes, cpn, ep, redundant) = sizes;
        let shape = PlacementShape {
            layers, routed_experts: routed, redundant_experts: redundant, expert_state_bytes: 100,
            nodes, chips_per_node: cpn, chip_memory_bytes: memory, expert_parallel_size: ep,
            nodes_per_rack: npr, min_healthy_fraction: 0.5, pipeline_stages: 1 + layers % 2,
        };
        let load = ExpertLoad::uniform(&shape);
        match initial_placement(&shape, &load) {
            Ok(p) => p.check(&shape, &FailedChips::none()).unwrap(),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

fn small() -> PlacementShape {
    shape((2, 4, 2, Some(2)), (2, 4, 2), 2)
}

#[test]
fn bad_input_yields_typed_errors() {
    let s = small();
    let zero = PlacementShape { chips_per_node: 0, ..s.clone() };
    assert_eq!(
        initial_placement(&zero, &ExpertLoad::uniform(&s)),
        Err(PlanError::Zero { what: "chipsPerNode" })
    );
    let uneven = PlacementShape { expert_parallel_size: 6, ..s.clone() };
    assert!(matches!(
        initial_placement(&uneven, &ExpertLoad::uniform(&s)),
        Err(PlanError::InconsistentShape(_))
    ));
    let tiny_memory = PlacementShape { chip_memory_bytes: 99, ..s.clone() };
    assert!(matches!(
        initial_placement(&tiny_memory, &ExpertLoad::uniform(&s)),
        Err(PlanError::InconsistentShape(_))
    ));
    let crowded = PlacementShape { chip_memory_bytes: 100, ..shape((1, 2, 1, None), (2, 4, 0), 0) };
    assert_eq!(
        initial_placement(&crowded, &ExpertLoad::uniform(&crowded)),
        Err(PlanError::Capacity { needed: 8, available: 2 })
    );
    let short = ExpertLoad::from_rows(vec![vec![1.0; 4]]);
    assert!(matches!(initial_placement(&s, &short), Err(PlanError::LoadShape { .. })));
    let negative = ExpertLoad::from_rows(vec![vec![1.0, -1.0, 1.0, 1.0], vec![1.0; 4]]);
    assert_eq!(
        initial_placement(&s, &negative),
        Err(PlanError::BadLoad { expert: ExpertId::new(0, 1), value: -1.0 })
    );
    assert!(matches!(
        FailedChips::from_failures(&s, &[Failure::Chip(ChipId::new(8, 0))]),
        Err(PlanError::UnknownChip { .. })
    ));
    assert_eq!(
        FailedChips::from_failures(&s, &[Failure::Node(9)]),
        Err(PlanError::UnknownNode { node: 9, nodes: 8 })
    );
    assert_eq!(
        FailedChips::from_failures(&s, &[Failure::Rack(4)]),
        Err(PlanError::UnknownRack { rack: 4, racks: 4 })
    );
    assert!(matches!("chip:3".parse::<Failure>(), Err(PlanError::BadFailure(_))));
    assert_eq!("chip:3/1".parse::<Failure>(), Ok(Failure::Chip(ChipId::new(3, 1))));
    assert_eq!("rack:2".parse::<Failure>(), Ok(Failure::Rack(2)));

    // A placement of another job is refused, not trusted.
    let p = initial_placement(&s, &ExpertLoad::uniform(&s)).unwrap();
    let other = PlacementShape { nodes: 4, ..s.clone() };
    let r = replan(&other, &p, &FailedChips::none(), &ExpertLoad::uniform(&other), &ReplanOptions::default());
    assert!(matches!(r, Err(PlanError::PlacementMismatch(_))));
    let mut corrupt = p.clone();
    corrupt.groups[0].chips[1].push(ExpertId::new(7, 0));
    let failed = FailedChips::from_failures(&s, &[Failure::Chip(ChipId::new(0, 1))]).unwrap();
    let r = replan(&s, &corrupt, &failed, &ExpertLoad::uniform(&s), &ReplanOptions::default());
    assert!(matches!(r, Err(PlanError::PlacementMismatch(_))));
}

#[test]
fn capacity_shortage_is_infeasible_with_the_reason() {
    // One slot per chip and one chip per expert: losing a chip leaves nowhere for its expert.
    let s = PlacementShape {
        redundant_experts: 0,
        chip_memory_bytes: 100,
        ..shape((2, 2, 1, None), (1, 4, 0), 0)
    };
    let load = ExpertLoad::uniform(&s);
    let p = initial_placement(&s, &load).unwrap();
    let failed = FailedChips::from_failures(&s, &[Failure::Node(1)]).unwrap();
    let out = replan(&s, &p, &failed, &load, &ReplanOptions::default()).unwrap();
    assert!(out.placement.is_none());
    let Tier::Infeasible { reason } = &out.plan.tier else { panic!("{:?}", out.plan.tier) };
    assert!(matches!(reason, Infeasibility::Capacity { group: 0, healthy_chips: 2, .. }), "{reason}");
    assert!(reason.to_string().starts_with("capacity:"));
}

#[test]
fn min_healthy_fraction_makes_a_plan_infeasible() {
    let s = PlacementShape { min_healthy_fraction: 0.9, ..small() };
    let load = ExpertLoad::uniform(&s);
    let p = initial_placement(&s, &load).unwrap();
    let failed = FailedChips::from_failures(&s, &[Failure::Node(0), Failure::Node(5)]).unwrap();
    let out = replan(&s, &p, &failed, &load, &ReplanOptions::default()).unwrap();
    assert_eq!(
        out.plan.tier,
        Tier::Infeasible { reason: Infeasibility::MinHealthyFraction { healthy: 12, required: 15 } }
    );
    assert_eq!(out.plan.generation, p.generation);
}

#[test]
fn losing_every_replica_needs_a_checkpoint_reshard() {
    // No redundancy: whatever was on the failed chip exists nowhere else.
    let s = shape((2, 2, 1, None), (1, 4, 0), 2);
    let load = ExpertLoad::uniform(&s);
    let p = initial_placement(&s, &load).unwrap();
    let chip = ChipId::new(0, 0);
    let lost = p.hosted(&s, chip).to_vec();
    assert!(!lost.is_empty());
    let failed = FailedChips::from_failures(&s, &[Failure::Chip(chip)]).unwrap();
    let out = replan(&s, &p, &failed, &load, &ReplanOptions::default()).unwrap();
    assert_eq!(out.plan.tier, Tier::Reshard);
    assert_eq!(out.plan.moves.iter().map(|m| m.expert).collect::<Vec<_>>(), lost);
    assert!(out.plan.moves.iter().all(|m| m.source == Source::Checkpoint));
    assert_eq!(out.plan.bytes_moved, out.plan.lower_bound_bytes);
}

#[test]
fn plans_round_trip_as_camel_case_json() {
    let s = small();
    let load = ExpertLoad::zipf(&s, 1.2, 7);
    let p = initial_placement(&s, &load).unwrap();
    let failed = FailedChips::from_failures(&s, &[Failure::Rack(1)]).unwrap();
    let out = replan(&s, &p, &failed, &load, &ReplanOptions::default()).unwrap();
    let text = serde_json::to_string(&out).unwrap();
    assert!(text.contains("\"fromGeneration\":1") && text.contains("\"liveReplicasMin\""), "{text}");
    let back: Replan = serde_json::from_str(&text).unwrap();
    // serde_json's default float parser may differ from the printed value in the last bit.
    assert_eq!(back.placement, out.placement);
    assert_eq!(
        (&back.plan.tier, &back.plan.moves, &back.plan.groups),
        (&out.plan.tier, &out.plan.moves, &out.plan.groups)
    );
    assert!((back.plan.stats.step_inflation - out.plan.stats.step_inflation).abs() < 1e-12);
    let m =
        Move { expert: ExpertId::new(2, 5), to: ChipId::new(3, 1), source: Source::Peer(ChipId::new(4, 0)) };
    assert_eq!(
        serde_json::to_string(&m).unwrap(),
        r#"{"expert":{"layer":2,"expert":5},"to":{"node":3,"chip":1},"source":{"peer":{"node":4,"chip":0}}}"#
    );
    let infeasible =
        Tier::Infeasible { reason: Infeasibility::MinHealthyFraction { healthy: 1, required: 2 } };
    assert_eq!(
        serde_json::to_string(&infeasible).unwrap(),
        r#"{"kind":"infeasible","reason":{"kind":"minHealthyFraction","healthy":1,"required":2}}"#
    );
}

/// The reference job: 50,000 chips, 10 pipeline stages of 6 layers x 512 experts, groups of 200
/// chips, 288 redundant replicas per layer.
fn longcat() -> PlacementShape {
    let text = include_str!("../../../examples/longcat-2.0.yaml");
    let job = crate::manifest::parse_job(text).unwrap();
    let shape = crate::validate::JobShape::resolve(&job.spec).unwrap();
    PlacementShape::from_job(&shape, job.spec.failure_policy.min_healthy_fraction)
}

#[test]
fn longcat_is_balanced_and_a_node_failure_moves_only_its_state() {
    let s = longcat();
    let load = ExpertLoad::zipf(&s, 1.0, 2026);
    let p = initial_placement(&s, &load).unwrap();
    let stats = LoadStats::measure(&s, &p, &FailedChips::none(), &load);
    assert!(stats.step_inflation <= 1.05, "initial step inflation {}", stats.step_inflation);
    assert_eq!(stats.stage_step_inflation.len(), 10);
    // Node 130 is in group 5 (25 nodes per group), pipeline stage 0.
    let failed = FailedChips::from_failures(&s, &[Failure::Node(130)]).unwrap();
    let out = replan(&s, &p, &failed, &load, &ReplanOptions::default()).unwrap();
    let plan = &out.plan;
    assert_eq!(plan.groups, [5]);
    let on_node: Vec<ExpertId> = (0..8).flat_map(|c| p.hosted(&s, ChipId::new(130, c)).to_vec()).collect();
    assert_eq!(plan.lower_bound_experts, on_node.len() as u64);
    // Restoring a hot replica onto any chip overloads it, so the default options rebalance;
    // everything beyond the lower bound is rebalancing.
    assert_eq!(plan.experts_moved - plan.rebalance_moves, plan.lower_bound_experts);
    // Experts whose only replica was on the node come from the checkpoint, the rest from a peer.
    let singletons: Vec<ExpertId> =
        on_node.iter().copied().filter(|&e| p.replicas_of(&s, 5, e).len() == 1).collect();
    let mut from_checkpoint: Vec<ExpertId> = plan.checkpoint_loads().map(|m| m.expert).collect();
    from_checkpoint.sort_unstable();
    let mut expected = singletons.clone();
    expected.sort_unstable();
    assert_eq!(from_checkpoint, expected);
    assert_eq!(plan.tier, if singletons.is_empty() { Tier::Reroute } else { Tier::Reshard });
    assert!(plan.stats.step_inflation <= 1.10, "after: step inflation {}", plan.stats.step_inflation);

    // Without rebalancing, exactly the node's state moves.
    let strict = ReplanOptions { rebalance_threshold: f64::INFINITY, ..ReplanOptions::default() };
    let out = replan(&s, &p, &failed, &load, &strict).unwrap();
    assert_eq!(out.plan.bytes_moved, out.plan.lower_bound_bytes);
}

#[test]
fn zipf_loads_are_reproducible_and_skewed() {
    let s = PlacementShape { layers: 3, routed_experts: 64, ..small() };
    let a = ExpertLoad::zipf(&s, 1.0, 42);
    assert_eq!(a, ExpertLoad::zipf(&s, 1.0, 42));
    assert_ne!(a, ExpertLoad::zipf(&s, 1.0, 43));
    let harmonic: f64 = (1..=64).map(|r| 1.0 / f64::from(r)).sum();
    for row in a.rows() {
        let mean = row.iter().sum::<f64>() / 64.0;
        assert!((mean - 1.0).abs() < 1e-9);
        let hottest = row.iter().copied().fold(0.0, f64::max);
        assert!((hottest - 64.0 / harmonic).abs() < 1e-9, "hottest {hottest}");
    }
    // Layers get different hot experts.
    let argmax = |row: &Vec<f64>| (0..row.len()).max_by(|&x, &y| row[x].total_cmp(&row[y])).unwrap();
    assert!(a.rows().iter().map(argmax).collect::<std::collections::BTreeSet<_>>().len() > 1);
}

#[test]
fn redundant_replicas_go_to_the_hottest_experts() {
    // One group of 6 nodes without racks: an expert may have up to 6 replicas.
    let s = shape((2, 6, 1, None), (1, 8, 5), 4);
    let mut row = vec![1.0; 8];
    row[3] = 40.0; // hottest: takes extras while its replicas outweigh the next expert
    row[6] = 6.0;
    let load = ExpertLoad::from_rows(vec![row]);
    let p = initial_placement(&s, &load).unwrap();
    let replicas = |e| p.replicas_of(&s, 0, ExpertId::new(0, e)).len();
    // Each extra goes to the highest load per replica: 40, 20, 13.3, 10, 8 all beat 6, so all five
    // extras go to expert 3 (6 replicas of 6.67 each).
    assert_eq!(replicas(3), 6, "hottest expert");
    assert_eq!(replicas(6), 1);
    assert!((0..8).filter(|&e| e != 3).all(|e| replicas(e) == 1));
    // Its replicas sit on six different nodes.
    let nodes: std::collections::BTreeSet<u32> =
        p.replicas_of(&s, 0, ExpertId::new(0, 3)).iter().map(|c| c.node).collect();
    assert_eq!(nodes.len(), 6);
}

#[test]
fn each_layer_is_balanced_not_a_chips_sum() {
    // Two one-chip nodes, two layers of four experts with loads 3, 1, 1, 1. Balancing each chip's
    // sum could give {3, 1} + {1, 1} in layer 0 and the mirror in layer 1: equal sums, but every
    // layer waits for a chip at 4 while the mean is 3. Per layer, {3} | {1, 1, 1} is exact.
    let s = PlacementShape {
        redundant_experts: 0,
        chip_memory_bytes: 600,
        ..shape((1, 2, 1, None), (2, 4, 0), 0)
    };
    let load = ExpertLoad::from_rows(vec![vec![3.0, 1.0, 1.0, 1.0], vec![1.0, 1.0, 3.0, 1.0]]);
    let p = initial_placement(&s, &load).unwrap();
    let stats = LoadStats::measure(&s, &p, &FailedChips::none(), &load);
    assert!((stats.step_inflation - 1.0).abs() < 1e-12, "{stats:?} {:?}", p.groups[0].chips);
    assert!((stats.max_mean_load - 1.0).abs() < 1e-12, "{stats:?}");
}

#[test]
fn a_hot_expert_gets_more_replicas_than_there_are_failure_domains() {
    // Two nodes of four chips: the old rule (one replica per node) capped any expert at 2.
    let s = shape((4, 2, 1, None), (1, 8, 5), 4);
    let mut row = vec![1.0; 8];
    row[3] = 40.0;
    let load = ExpertLoad::from_rows(vec![row]);
    let p = initial_placement(&s, &load).unwrap();
    let hosts = p.replicas_of(&s, 0, ExpertId::new(0, 3));
    assert_eq!(hosts.len(), 6, "{hosts:?}");
    let nodes: BTreeSet<u32> = hosts.iter().map(|c| c.node).collect();
    assert_eq!(nodes.len(), 2, "replicas span both nodes: {hosts:?}");
    // Losing either node leaves the hot expert a live replica: its state is never read back from
    // the checkpoint.
    let hot = ExpertId::new(0, 3);
    for node in 0..2 {
        let failed = FailedChips::from_failures(&s, &[Failure::Node(node)]).unwrap();
        let out = replan(&s, &p, &failed, &load, &minimal()).unwrap();
        assert!(out.plan.checkpoint_loads().all(|m| m.expert != hot), "node {node}: {:?}", out.plan.moves);
        let next = out.placement.unwrap();
        assert!(next.replicas_of(&s, 0, hot).iter().any(|c| c.node != node));
    }
}
