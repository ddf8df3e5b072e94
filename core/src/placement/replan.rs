//! Re-planning after failures: move only what was on the failed chips, from the best source.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::error::PlanError;
use super::health::FailedChips;
use super::ids::ExpertId;
use super::initial::IMPROVE_STEPS_PER_CHIP;
use super::load::ExpertLoad;
use super::plan::{Infeasibility, LoadStats, RecoveryPlan, Tier};
use super::shape::PlacementShape;
use super::types::{GroupPlacement, Move, Placement, Source};
use super::work::Weight;
use super::work::Work;

/// What happens to replicas lost with a failed chip when their expert still has a live replica.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Redundancy {
    /// Re-create every lost replica (from a live peer), keeping each expert's requested replica
    /// count and hence the load balance. Moves exactly the state that was on the failed chips.
    #[default]
    Restore,
    /// Re-create only experts left with no replica; the others run with fewer replicas until the
    /// next rebalance. Moves the least state possible.
    Defer,
}

/// Knobs of [`replan`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplanOptions {
    /// Lost-redundancy policy.
    pub redundancy: Redundancy,
    /// Rebalance every group, moving replicas off the most loaded chips even without failures.
    pub rebalance: bool,
    /// A re-planned group whose step inflation exceeds this is rebalanced too.
    pub rebalance_threshold: f64,
    /// Rebalancing a layer stops once its max/mean chip load is at or below this.
    pub rebalance_target: f64,
}

impl Default for ReplanOptions {
    fn default() -> Self {
        Self {
            redundancy: Redundancy::Restore,
            rebalance: false,
            rebalance_threshold: 1.05,
            rebalance_target: 1.04,
        }
    }
}

/// The outcome of [`replan`]: the plan, and the next placement unless the plan is infeasible.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Replan {
    /// What the change needs and achieves.
    pub plan: RecoveryPlan,
    /// Generation `current.generation + 1`; `None` when the tier is infeasible.
    pub placement: Option<Placement>,
}

/// Plans the next placement generation after `failed` chips went out.
///
/// `current` may still have loads pending from an earlier plan (a failure during a reshard):
/// pending loads onto chips that failed are re-planned like any lost replica, and pending loads
/// whose source chip failed get a new source. Only groups with a failed chip that hosted
/// replicas, or a pending load from a failed chip, are re-planned (all groups when
/// `options.rebalance`); the others are carried over unchanged.
///
/// Within a group, every replica on a failed chip is re-created (see [`Redundancy`]) on the
/// healthy chip with the least load in the expert's layer that has memory left, does not hold
/// the expert, and keeps the expert's replicas in two failure domains, hottest first, sourced
/// from the lowest-numbered live replica, else the checkpoint. Nothing else moves unless a
/// rebalance is requested or the group's step inflation passes `options.rebalance_threshold`;
/// then each layer's most loaded chip sheds replicas (moves and swaps, from live peers) until the
/// layer's max/mean reaches `options.rebalance_target` or no step lowers it.
///
/// `O(c + r·C)` per re-planned group for `c` replicas in the group, `r` replicas lost and `C`
/// chips per group, plus the rebalance steps (each `O(C·k²)` for `k` replicas of a layer per
/// chip) and `O(total replicas)` to copy the placement and measure load.
pub fn replan(
    shape: &PlacementShape,
    current: &Placement,
    failed: &FailedChips,
    load: &ExpertLoad,
    options: &ReplanOptions,
) -> Result<Replan, PlanError> {
    shape.validate()?;
    load.validate(shape)?;
    failed.validate(shape)?;
    current.check_layout(shape)?;
    let dense = load.dense();

    let healthy = shape.chips() - failed.len() as u64;
    let required = (shape.min_healthy_fraction * shape.chips() as f64).ceil() as u64;
    if healthy < required {
        let reason = Infeasibility::MinHealthyFraction { healthy, required };
        return Ok(infeasible(shape, current, failed, load, reason, Vec::new()));
    }

    let mut touched = BTreeSet::new();
    for c in failed.iter() {
        let (g, local) = shape.locate(c);
        if !current.groups[g as usize].chips[local].is_empty() {
            touched.insert(g);
        }
    }
    for g in &current.groups {
        if g.pending.iter().any(|m| matches!(m.source, Source::Peer(p) if failed.contains(p))) {
            touched.insert(g.index);
        }
    }
    if options.rebalance {
        touched.extend(0..shape.groups());
    }

    let mut groups: Vec<Option<GroupPlacement>> = vec![None; current.groups.len()];
    let (mut moves, mut carried, mut dropped, mut evicted) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut merged = Vec::new();
    let (mut lower_bound, mut rebalance_moves) = (0u64, 0u64);
    for &g in &touched {
        current.check_group(shape, g, &FailedChips::none())?;
        match replan_group(shape, &current.groups[g as usize], failed, &dense, options) {
            GroupOutcome::Planned(p) => {
                moves.extend(p.moves);
                carried.extend(p.carried);
                dropped.extend(p.dropped);
                evicted.extend(p.evicted);
                merged.extend(p.merged);
                lower_bound += p.lower_bound;
                rebalance_moves += p.rebalance_moves;
                groups[g as usize] = Some(p.group);
            }
            GroupOutcome::Infeasible(reason) => {
                return Ok(infeasible(shape, current, failed, load, reason, touched.into_iter().collect()));
            }
        }
    }
    // Loads outstanding in groups left alone are still needed by the new generation.
    for (g, new) in current.groups.iter().zip(&groups) {
        if new.is_none() {
            carried.extend(g.pending.iter().copied());
        }
    }
    let next = Placement {
        generation: current.generation + 1,
        groups: groups
            .into_iter()
            .zip(&current.groups)
            .map(|(new, old)| new.unwrap_or_else(|| old.clone()))
            .collect(),
    };
    let stats = LoadStats::measure(shape, &next, failed, load);
    let tier = if stats.live_replicas_min == 0 { Tier::Reshard } else { Tier::Reroute };
    let bytes = shape.expert_state_bytes;
    let plan = RecoveryPlan {
        from_generation: current.generation,
        generation: next.generation,
        tier,
        experts_moved: moves.len() as u64,
        bytes_moved: moves.len() as u64 * bytes,
        moves,
        carried,
        dropped,
        evicted,
        merged,
        lower_bound_experts: lower_bound,
        lower_bound_bytes: lower_bound * bytes,
        rebalance_moves,
        groups: touched.into_iter().collect(),
        stats,
    };
    Ok(Replan { plan, placement: Some(next) })
}

fn infeasible(
    shape: &PlacementShape,
    current: &Placement,
    failed: &FailedChips,
    load: &ExpertLoad,
    reason: Infeasibility,
    groups: Vec<u32>,
) -> Replan {
    let plan = RecoveryPlan {
        from_generation: current.generation,
        generation: current.generation,
        tier: Tier::Infeasible { reason },
        moves: Vec::new(),
        carried: Vec::new(),
        dropped: Vec::new(),
        evicted: Vec::new(),
        merged: Vec::new(),
        experts_moved: 0,
        bytes_moved: 0,
        lower_bound_experts: 0,
        lower_bound_bytes: 0,
        rebalance_moves: 0,
        groups,
        stats: LoadStats::measure(shape, current, failed, load),
    };
    Replan { plan, placement: None }
}

enum GroupOutcome {
    Planned(GroupPlan),
    Infeasible(Infeasibility),
}

struct GroupPlan {
    group: GroupPlacement,
    moves: Vec<Move>,
    carried: Vec<Move>,
    dropped: Vec<ExpertId>,
    evicted: Vec<ExpertId>,
    merged: Vec<ExpertId>,
    lower_bound: u64,
    rebalance_moves: u64,
}

/// Frees a slot for an expert that lost every replica: removes the lightest replica of an
/// expert that has another one (preferring one whose other replicas still span two failure
/// domains), from the least-loaded healthy chip that hosts such a replica. Returns the chip and the evicted expert,
/// or `None` when every replica is its expert's last.
fn evict_spare(w: &mut Work<'_>, dense: &[f64]) -> Option<(usize, ExpertId)> {
    let total = |w: &Work<'_>, c: usize| w.load.iter().map(|row| row[c]).sum::<f64>();
    let (c, e) = (0..w.chips.len())
        .filter(|&c| w.up[c])
        .filter_map(|c| {
            let e = w.chips[c]
                .iter()
                .map(|&e| w.shape.expert_index(e))
                .filter(|&i| w.hosts[i].len() >= 2)
                .min_by(|&a, &b| {
                    (!keeps_spread(w, a, c))
                        .cmp(&!keeps_spread(w, b, c))
                        .then(Weight(w.share[a]).cmp(&Weight(w.share[b])))
                        .then(a.cmp(&b))
                })?;
            Some((c, e))
        })
        .min_by(|a, b| Weight(total(w, a.0)).cmp(&Weight(total(w, b.0))).then(a.0.cmp(&b.0)))?;
    let expert = w.shape.expert_at(e);
    let l = w.layer_of(e);
    w.load[l][c] -= w.share[e];
    w.chips[c].retain(|&x| x != expert);
    w.hosts[e].retain(|&h| h as usize != c);
    w.reweigh(e, dense[e]);
    let chip = w.shape.chip_at(w.index, c);
    if w.pending.remove(&(c, e)) {
        w.moves.retain(|m| !(m.to == chip && m.expert == expert));
    }
    let source = w.source(e);
    for m in w.moves.iter_mut().filter(|m| m.expert == expert && m.source == Source::Peer(chip)) {
        m.source = source;
    }
    Some((c, expert))
}

/// Replicas of one expert left in a single failure domain (the domain holding the others failed
/// and no chip elsewhere could take the replacement, or redundancy is deferred) protect nothing
/// against that domain's loss: keep one (loaded, lowest chip first) and drop the rest, listed in
/// `merged`. Nothing moves.
fn merge_unspread(w: &mut Work<'_>, dense: &[f64], merged: &mut Vec<ExpertId>) {
    let used: BTreeSet<u32> =
        (0..w.chips.len()).filter(|&c| !w.chips[c].is_empty()).map(|c| w.domains[c]).collect();
    if used.len() < 2 {
        return;
    }
    for i in w.shape.group_experts(w.index) {
        let domains: BTreeSet<u32> = w.hosts[i].iter().map(|&c| w.domains[c as usize]).collect();
        if w.hosts[i].len() < 2 || domains.len() >= 2 {
            continue;
        }
        let keep =
            w.live_peer(i).unwrap_or_else(|| w.hosts[i].iter().map(|&c| c as usize).min().unwrap_or(0));
        let expert = w.shape.expert_at(i);
        let l = w.layer_of(i);
        for c in w.hosts[i].clone().into_iter().map(|c| c as usize).filter(|&c| c != keep) {
            w.load[l][c] -= w.share[i];
            w.chips[c].retain(|&e| e != expert);
            w.hosts[i].retain(|&h| h as usize != c);
            let chip = w.shape.chip_at(w.index, c);
            if w.pending.remove(&(c, i)) {
                w.moves.retain(|m| !(m.to == chip && m.expert == expert));
            }
            merged.push(expert);
        }
        w.reweigh(i, dense[i]);
    }
}

/// Whether expert `i`'s replicas other than the one on chip `c` still span two failure domains
/// (or are a single replica).
fn keeps_spread(w: &Work<'_>, i: usize, c: usize) -> bool {
    let rest: BTreeSet<u32> =
        w.hosts[i].iter().map(|&h| h as usize).filter(|&h| h != c).map(|h| w.domains[h]).collect();
    w.hosts[i].len() <= 2 || rest.len() >= 2 || w.domain_count() < 2
}

/// The least-loaded healthy chip in expert `i`'s layer that may take a new replica of it.
fn best_chip(w: &Work<'_>, i: usize) -> Option<usize> {
    let l = w.layer_of(i);
    let mut eligible = Vec::with_capacity(w.chips.len());
    w.eligible(i, &mut eligible);
    (0..w.chips.len()).filter(|&c| eligible[c]).min_by(|&a, &b| {
        Weight(w.load[l][a])
            .cmp(&Weight(w.load[l][b]))
            .then(w.chips[a].len().cmp(&w.chips[b].len()))
            .then(a.cmp(&b))
    })
}

fn replan_group(
    shape: &PlacementShape,
    group: &GroupPlacement,
    failed: &FailedChips,
    dense: &[f64],
    options: &ReplanOptions,
) -> GroupOutcome {
    let index = group.index;
    let size = group.chips.len();
    let up = (0..size).map(|l| !failed.contains(shape.chip_at(index, l))).collect();
    let mut w = Work::empty(shape, index, up, true);
    w.chips = group.chips.clone();
    w.pending = group.pending.iter().map(|m| (shape.locate(m.to).1, shape.expert_index(m.expert))).collect();
    let mut requested = vec![0u32; shape.experts()];
    let mut lost: Vec<usize> = Vec::new();
    for (local, hosted) in w.chips.iter_mut().enumerate() {
        for &e in hosted.iter() {
            let i = shape.expert_index(e);
            requested[i] += 1;
            if w.up[local] { w.hosts[i].push(local as u32) } else { lost.push(i) }
        }
        if !w.up[local] {
            hosted.clear();
        }
    }
    w.pending.retain(|&(c, _)| w.up[c]);
    // While lost replicas are re-created, every replica weighs its share at the requested count.
    for i in shape.group_experts(index) {
        w.share[i] = dense[i] / f64::from(requested[i].max(1));
        let l = w.layer_of(i);
        for k in 0..w.hosts[i].len() {
            let c = w.hosts[i][k] as usize;
            w.load[l][c] += w.share[i];
        }
    }

    let mut to_create = match options.redundancy {
        Redundancy::Restore => lost,
        Redundancy::Defer => {
            let mut uncovered: Vec<usize> = lost.into_iter().filter(|&i| w.hosts[i].is_empty()).collect();
            uncovered.sort_unstable();
            uncovered.dedup();
            uncovered
        }
    };
    let lower_bound = to_create.len() as u64;
    // Experts with no replica left first (they gate training), then hottest replicas first.
    to_create.sort_by(|&a, &b| {
        (!w.hosts[a].is_empty())
            .cmp(&!w.hosts[b].is_empty())
            .then(Weight(w.share[b]).cmp(&Weight(w.share[a])))
            .then(a.cmp(&b))
    });

    let (mut dropped, mut evicted) = (Vec::new(), Vec::new());
    for i in to_create {
        let expert = shape.expert_at(i);
        let target = match best_chip(&w, i) {
            Some(c) => Some(c),
            // An expert with no replica left outranks redundancy: make room by evicting a spare
            // replica of another expert.
            None if w.hosts[i].is_empty() => evict_spare(&mut w, dense).map(|(c, e)| {
                evicted.push(e);
                c
            }),
            None => None,
        };
        let Some(c) = target else {
            if w.hosts[i].is_empty() {
                let healthy_chips = w.up.iter().filter(|u| **u).count() as u64;
                return GroupOutcome::Infeasible(Infeasibility::Capacity {
                    group: index,
                    expert,
                    healthy_chips,
                });
            }
            dropped.push(expert);
            continue;
        };
        let source = w.source(i);
        w.moves.push(Move { expert, to: shape.chip_at(index, c), source });
        w.add(i, c);
        w.pending.insert((c, i));
    }

    let mut merged = Vec::new();
    merge_unspread(&mut w, dense, &mut merged);
    // Merging freed memory: a replica dropped for lack of room may fit now.
    if !merged.is_empty() {
        dropped.retain(|&expert| {
            let i = shape.expert_index(expert);
            let Some(c) = best_chip(&w, i) else { return true };
            let source = w.source(i);
            w.moves.push(Move { expert, to: shape.chip_at(index, c), source });
            w.add(i, c);
            w.pending.insert((c, i));
            false
        });
    }

    // Earlier loads still outstanding: those onto failed chips were re-created above; the rest
    // keep their target and get a new source if theirs failed or is itself not loaded yet.
    for m in &group.pending {
        let (to, i) = (shape.locate(m.to).1, shape.expert_index(m.expert));
        if !w.up[to] || !w.chips[to].contains(&m.expert) {
            continue; // lost with its chip (re-created above) or evicted
        }
        let source = match m.source {
            Source::Peer(p) => {
                let p = shape.locate(p).1;
                if w.up[p] && w.hosts[i].contains(&(p as u32)) && !w.pending.contains(&(p, i)) {
                    m.source
                } else {
                    w.source(i)
                }
            }
            Source::Checkpoint => Source::Checkpoint,
        };
        w.carried.push(Move { source, ..*m });
    }

    // Re-weigh with the replica counts actually achieved, then rebalance when asked or needed.
    for i in shape.group_experts(index) {
        w.reweigh(i, dense[i]);
    }
    let mut rebalance_moves = 0;
    if options.rebalance || w.inflation() > options.rebalance_threshold {
        for l in 0..w.load.len() {
            rebalance_moves += w.improve_layer(l, options.rebalance_target, size * IMPROVE_STEPS_PER_CHIP);
        }
    }

    let Work { mut chips, mut moves, mut carried, .. } = w;
    chips.iter_mut().for_each(|h| h.sort_unstable());
    moves.sort_unstable_by_key(|m| (m.to, m.expert));
    carried.sort_unstable_by_key(|m| (m.to, m.expert));
    let pending = {
        let mut all: Vec<Move> = moves.iter().chain(&carried).copied().collect();
        all.sort_unstable_by_key(|m| (m.to, m.expert));
        all
    };
    GroupOutcome::Planned(GroupPlan {
        group: GroupPlacement { index, chips, pending },
        moves,
        carried,
        dropped,
        evicted,
        merged,
        lower_bound,
        rebalance_moves,
    })
}
