//! The initial placement: per layer, EPLB-style replication of the hottest experts, then
//! balanced, failure-domain-aware, memory-aware packing of the replicas onto each group's chips.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use super::error::PlanError;
use super::ids::ExpertId;
use super::load::ExpertLoad;
use super::shape::PlacementShape;
use super::types::{GroupPlacement, Placement};
use super::work::{Weight, Work};

/// The first placement of a job, generation 1, on an all-healthy topology (a job starts on the
/// nodes the scheduler gave it; chips that fail later are handled by
/// [`replan`](super::replan())).
///
/// Each group hosts the experts of its pipeline stage's layers, and each layer is balanced on
/// its own, because every MoE layer's all-to-all is a barrier (the objective is step time, see
/// [`LoadStats::step_inflation`](super::LoadStats)):
/// 1. per layer, every expert gets one replica and the `redundantExperts` extra replicas go one
///    at a time to the expert with the highest load per replica (DeepSeek EPLB's
///    `replicate_experts`), up to one per chip of the group (replicas on one chip would merge);
/// 2. the layer's replicas are packed heaviest first onto the chip with the least load in that
///    layer that has memory left and does not hold the expert yet; an expert's second replica
///    goes to another failure domain than its first, so losing one domain never removes an
///    expert that had two or more replicas (an extra replica with no such chip is dropped);
/// 3. the layer's most loaded chip sheds load by moving or swapping replicas while that lowers
///    its peak ([`Work::improve_layer`]).
///
/// Groups of one stage with the same failure-domain layout get the same (node-shifted)
/// assignment; it is computed once.
pub fn initial_placement(shape: &PlacementShape, load: &ExpertLoad) -> Result<Placement, PlanError> {
    shape.validate()?;
    load.validate(shape)?;
    let needed = shape.experts_per_group() as u64;
    let available = shape.chips_per_group() * u64::from(shape.slots_per_chip());
    if needed > available {
        return Err(PlanError::Capacity { needed, available });
    }
    let dense = load.dense();
    let mut by_layout: BTreeMap<(u32, Vec<u32>), Vec<Vec<ExpertId>>> = BTreeMap::new();
    let mut groups = Vec::with_capacity(shape.groups() as usize);
    for g in 0..shape.groups() {
        let key = (shape.stage_of_group(g), shape.local_domains(g));
        let chips = match by_layout.get(&key) {
            Some(chips) => chips.clone(),
            None => {
                let chips = pack_group(shape, &dense, g)?;
                by_layout.insert(key, chips.clone());
                chips
            }
        };
        groups.push(GroupPlacement { index: g, chips, pending: Vec::new() });
    }
    Ok(Placement { generation: 1, groups })
}

/// Steps of [`Work::improve_layer`] allowed per chip of a group and layer.
pub(crate) const IMPROVE_STEPS_PER_CHIP: usize = 4;

/// Replica count per expert of one layer (`dense[base..base + routed]`), EPLB-style: `extra`
/// replicas beyond one each go to the highest load per replica, at most `cap` per expert.
pub(crate) fn replica_counts(dense: &[f64], base: usize, routed: usize, extra: u64, cap: u32) -> Vec<u32> {
    let mut counts = vec![1u32; routed];
    // Max-heap on load per replica; ties go to the lower expert index.
    let mut heap: BinaryHeap<(Weight, Reverse<usize>)> =
        (0..routed).map(|e| (Weight(dense[base + e]), Reverse(e))).collect();
    let mut extra = extra;
    while extra > 0 {
        let Some((_, Reverse(e))) = heap.pop() else { break };
        if counts[e] >= cap {
            continue;
        }
        counts[e] += 1;
        extra -= 1;
        heap.push((Weight(dense[base + e] / f64::from(counts[e])), Reverse(e)));
    }
    counts
}

/// Extra replicas per layer a group gets: `redundantExperts`, limited so the group's replicas
/// fit its chips' memory.
pub(crate) fn extra_per_layer(shape: &PlacementShape) -> u64 {
    let slots = shape.chips_per_group() * u64::from(shape.slots_per_chip());
    let spare =
        slots.saturating_sub(shape.experts_per_group() as u64) / u64::from(shape.layers_per_stage().max(1));
    u64::from(shape.redundant_experts).min(spare)
}

/// Places one group, layer by layer.
fn pack_group(shape: &PlacementShape, dense: &[f64], group: u32) -> Result<Vec<Vec<ExpertId>>, PlanError> {
    let size = shape.chips_per_group() as usize;
    let mut w = Work::empty(shape, group, vec![true; size], false);
    // With one failure domain, a second replica could not be kept apart from the first.
    let cap = if w.domain_count() < 2 { 1 } else { u32::try_from(size).unwrap_or(u32::MAX) };
    let extra = extra_per_layer(shape);
    let routed = shape.routed_experts as usize;
    let layers = shape.group_layers(group);
    for (l, layer) in layers.clone().enumerate() {
        let base = layer as usize * routed;
        let counts = replica_counts(dense, base, routed, extra, cap);
        let mut items: Vec<(Weight, usize)> = counts
            .iter()
            .enumerate()
            .flat_map(|(e, &c)| {
                std::iter::repeat_n((Weight(dense[base + e] / f64::from(c)), base + e), c as usize)
            })
            .collect();
        items.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut eligible = Vec::with_capacity(size);
        for &(share, i) in &items {
            w.share[i] = share.0;
            // Least load in the layer; among equals, the domain with fewest replicas of the expert
            // (so one domain's loss takes as few as possible), then the emptiest chip.
            let in_domain =
                |c: usize| w.hosts[i].iter().filter(|&&h| w.domains[h as usize] == w.domains[c]).count();
            w.eligible(i, &mut eligible);
            let target = (0..size).filter(|&c| eligible[c]).min_by(|&a, &b| {
                Weight(w.load[l][a])
                    .cmp(&Weight(w.load[l][b]))
                    .then_with(|| in_domain(a).cmp(&in_domain(b)))
                    .then_with(|| w.chips[a].len().cmp(&w.chips[b].len()))
                    .then(a.cmp(&b))
            });
            match target {
                Some(c) => w.add(i, c),
                // Memory is checked against one replica of each expert up front, so only an
                // extra replica finds no chip: drop it.
                None if !w.hosts[i].is_empty() => {}
                None => {
                    return Err(PlanError::Capacity {
                        needed: shape.experts_per_group() as u64,
                        available: (size * w.slots) as u64,
                    });
                }
            }
        }
        for e in 0..routed {
            w.reweigh(base + e, dense[base + e]);
        }
        w.improve_layer(l, 1.0, size);
    }
    let mut chips = w.chips;
    chips.iter_mut().for_each(|h| h.sort_unstable());
    Ok(chips)
}
