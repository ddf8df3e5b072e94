//! The initial placement: EPLB-style replication of the hottest experts, then balanced,
//! failure-domain-aware, memory-aware packing of the replicas onto each group's chips.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};

use super::error::PlanError;
use super::ids::ExpertId;
use super::load::ExpertLoad;
use super::shape::PlacementShape;
use super::types::{GroupPlacement, Placement};

/// An `f64` with a total order (`total_cmp`), so heaps and sorts are deterministic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Weight(pub f64);

impl Eq for Weight {}

impl PartialOrd for Weight {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Weight {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The first placement of a job, generation 1, on an all-healthy topology (a job starts on the
/// nodes the scheduler gave it; chips that fail later are handled by
/// [`replan`](super::replan())).
///
/// Per layer, every expert gets one replica and the `redundantExperts` extra replicas go one at
/// a time to the expert with the highest load per replica (DeepSeek EPLB's `replicate_experts`),
/// capped at the number of failure domains in a group. Replicas are then packed
/// heaviest-first onto the least-loaded chip that has memory left and whose failure domain does
/// not hold the expert yet (longest-processing-time greedy, with the domain and memory
/// constraints EPLB expresses by grouping per node).
///
/// Groups with the same failure-domain layout get the same (node-shifted) assignment; it is
/// computed once.
pub fn initial_placement(shape: &PlacementShape, load: &ExpertLoad) -> Result<Placement, PlanError> {
    shape.validate()?;
    load.validate(shape)?;
    let needed = shape.experts() as u64;
    let available = shape.chips_per_group() * u64::from(shape.slots_per_chip());
    if needed > available {
        return Err(PlanError::Capacity { needed, available });
    }
    let dense = load.dense();
    let mut by_layout: BTreeMap<Vec<u32>, Vec<Vec<ExpertId>>> = BTreeMap::new();
    let mut groups = Vec::with_capacity(shape.groups() as usize);
    for g in 0..shape.groups() {
        let domains = shape.local_domains(g);
        let chips = match by_layout.get(&domains) {
            Some(chips) => chips.clone(),
            None => {
                let chips = pack_group(shape, &dense, &domains)?;
                by_layout.insert(domains, chips.clone());
                chips
            }
        };
        groups.push(GroupPlacement { index: g, chips, pending: Vec::new() });
    }
    Ok(Placement { generation: 1, groups })
}

/// Replica count per expert of one group (dense order), EPLB-style. Extra replicas per layer are
/// limited so the group's total fits its chips' memory.
pub(crate) fn replica_counts(shape: &PlacementShape, dense: &[f64], domains_in_group: u32) -> Vec<u32> {
    let routed = shape.routed_experts as usize;
    let mut counts = vec![1u32; shape.experts()];
    let slots = shape.chips_per_group() * u64::from(shape.slots_per_chip());
    let spare_per_layer = slots.saturating_sub(shape.experts() as u64) / u64::from(shape.layers.max(1));
    let extra_per_layer = u64::from(shape.redundant_experts).min(spare_per_layer) as u32;
    for layer in 0..shape.layers as usize {
        let base = layer * routed;
        // Max-heap on load per replica; ties go to the lower expert index.
        let mut heap: BinaryHeap<(Weight, Reverse<usize>)> =
            (0..routed).map(|e| (Weight(dense[base + e]), Reverse(base + e))).collect();
        let mut extra = extra_per_layer;
        while extra > 0 {
            let Some((_, Reverse(i))) = heap.pop() else { break };
            if counts[i] >= domains_in_group {
                continue; // every domain already has a replica: another adds no placeable copy
            }
            counts[i] += 1;
            extra -= 1;
            heap.push((Weight(dense[i] / f64::from(counts[i])), Reverse(i)));
        }
    }
    counts
}

/// Packs one group: LPT over replicas, heaviest first, onto the least-loaded eligible chip.
fn pack_group(
    shape: &PlacementShape,
    dense: &[f64],
    domains: &[u32],
) -> Result<Vec<Vec<ExpertId>>, PlanError> {
    let domain_count = domains.iter().copied().max().map_or(0, |d| d + 1);
    let counts = replica_counts(shape, dense, domain_count);
    let mut items: Vec<(Weight, usize)> = counts
        .iter()
        .enumerate()
        .flat_map(|(i, &c)| std::iter::repeat_n((Weight(dense[i] / f64::from(c)), i), c as usize))
        .collect();
    items.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));

    let chips = domains.len();
    let slots = shape.slots_per_chip() as usize;
    let mut hosted: Vec<Vec<ExpertId>> = vec![Vec::new(); chips];
    let mut expert_domains: Vec<Vec<u32>> = vec![Vec::new(); counts.len()];
    // Min-heap of (load, chip); full chips leave the heap for good.
    let mut heap: BinaryHeap<Reverse<(Weight, usize)>> =
        (0..chips).map(|c| Reverse((Weight(0.0), c))).collect();
    let mut skipped = Vec::new();
    for &(w, i) in &items {
        let mut target = None;
        while let Some(Reverse((load, c))) = heap.pop() {
            if expert_domains[i].contains(&domains[c]) {
                skipped.push(Reverse((load, c)));
            } else {
                target = Some((load, c));
                break;
            }
        }
        heap.extend(skipped.drain(..));
        // Only extra replicas can find no domain (counts are capped by domains); memory is
        // checked against one replica of each expert up front, so drop rather than fail.
        let Some((load, c)) = target else { continue };
        hosted[c].push(shape.expert_at(i));
        expert_domains[i].push(domains[c]);
        if hosted[c].len() < slots {
            heap.push(Reverse((Weight(load.0 + w.0), c)));
        }
    }
    // `replica_counts` keeps the total within the group's slots and a first replica never meets
    // a domain conflict, so this only fires on a broken invariant; report it, don't panic.
    if expert_domains.iter().any(Vec::is_empty) {
        return Err(PlanError::Capacity {
            needed: shape.experts() as u64,
            available: chips as u64 * slots as u64,
        });
    }
    hosted.iter_mut().for_each(|h| h.sort_unstable());
    Ok(hosted)
}
