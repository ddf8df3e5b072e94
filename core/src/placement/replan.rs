//! Re-planning after failures: move only what was on the failed chips, from the best source.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::error::PlanError;
use super::health::FailedChips;
use super::ids::ExpertId;
use super::initial::Weight;
use super::load::ExpertLoad;
use super::plan::{Infeasibility, LoadStats, RecoveryPlan, Tier};
use super::shape::PlacementShape;
use super::types::{GroupPlacement, Move, Placement, Source};

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
    /// A re-planned group whose max/mean chip load exceeds this is rebalanced too.
    pub rebalance_threshold: f64,
    /// Rebalancing stops once a group's max/mean chip load is at or below this.
    pub rebalance_target: f64,
}

impl Default for ReplanOptions {
    fn default() -> Self {
        Self {
            redundancy: Redundancy::Restore,
            rebalance: false,
            rebalance_threshold: 1.10,
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
/// least-loaded healthy chip with memory left and a failure domain that does not yet hold the
/// expert, hottest first, sourced from the lowest-numbered live replica, else the checkpoint.
/// Nothing else moves unless a rebalance is requested or the group's max/mean load passes
/// `options.rebalance_threshold`.
///
/// `O(c + r·C)` per re-planned group for `c` replicas in the group, `r` replicas lost and `C`
/// chips per group, plus `O(total replicas)` to copy the placement and measure load.
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
    let (mut lower_bound, mut rebalance_moves) = (0u64, 0u64);
    for &g in &touched {
        current.check_group(shape, g, &FailedChips::none())?;
        match replan_group(shape, &current.groups[g as usize], failed, &dense, options) {
            GroupOutcome::Planned(p) => {
                moves.extend(p.moves);
                carried.extend(p.carried);
                dropped.extend(p.dropped);
                evicted.extend(p.evicted);
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
    lower_bound: u64,
    rebalance_moves: u64,
}

/// One group's working state while it is re-planned; chips are group-local indices.
struct Work<'a> {
    shape: &'a PlacementShape,
    index: u32,
    domains: Vec<u32>,
    up: Vec<bool>,
    slots: usize,
    chips: Vec<Vec<ExpertId>>,
    /// Healthy chips hosting each expert (dense order), loaded or pending.
    hosts: Vec<Vec<u32>>,
    /// (chip, expert) replicas listed but not loaded yet.
    pending: BTreeSet<(usize, usize)>,
    load: Vec<f64>,
}

impl Work<'_> {
    fn live_peer(&self, i: usize) -> Option<usize> {
        self.hosts[i].iter().map(|&c| c as usize).filter(|&c| !self.pending.contains(&(c, i))).min()
    }

    fn source(&self, i: usize) -> Source {
        self.live_peer(i).map_or(Source::Checkpoint, |c| Source::Peer(self.shape.chip_at(self.index, c)))
    }

    /// Least-loaded healthy chip with memory left whose domain holds no replica of expert `i`
    /// (the replica on `leaving`, if any, does not count: it is the one being moved).
    fn best_chip(&self, i: usize, leaving: Option<usize>) -> Option<usize> {
        let used: Vec<u32> = self.hosts[i]
            .iter()
            .map(|&c| c as usize)
            .filter(|&c| Some(c) != leaving)
            .map(|c| self.domains[c])
            .collect();
        (0..self.chips.len())
            .filter(|&c| self.up[c] && self.chips[c].len() < self.slots && !used.contains(&self.domains[c]))
            .filter(|&c| Some(c) != leaving)
            .min_by(|&a, &b| Weight(self.load[a]).cmp(&Weight(self.load[b])).then(a.cmp(&b)))
    }

    /// Frees a slot for an expert that lost every replica: removes the lightest replica of an
    /// expert that has another one, from the least-loaded healthy chip that hosts such a replica.
    /// Returns the chip and the evicted expert, or `None` when every replica is its expert's last.
    fn evict_spare(&mut self, dense: &[f64], moves: &mut Vec<Move>) -> Option<(usize, ExpertId)> {
        let weight = |i: usize, hosts: &[Vec<u32>]| dense[i] / hosts[i].len().max(1) as f64;
        let (c, e) = (0..self.chips.len())
            .filter(|&c| self.up[c])
            .filter_map(|c| {
                let e = self.chips[c]
                    .iter()
                    .map(|&e| self.shape.expert_index(e))
                    .filter(|&i| self.hosts[i].len() >= 2)
                    .min_by(|&a, &b| {
                        Weight(weight(a, &self.hosts)).cmp(&Weight(weight(b, &self.hosts))).then(a.cmp(&b))
                    })?;
                Some((c, e))
            })
            .min_by(|a, b| Weight(self.load[a.0]).cmp(&Weight(self.load[b.0])).then(a.0.cmp(&b.0)))?;
        let expert = self.shape.expert_at(e);
        self.load[c] -= weight(e, &self.hosts);
        self.chips[c].retain(|&x| x != expert);
        self.hosts[e].retain(|&h| h as usize != c);
        let chip = self.shape.chip_at(self.index, c);
        if self.pending.remove(&(c, e)) {
            moves.retain(|m| !(m.to == chip && m.expert == expert));
        }
        let source = self.source(e);
        for m in moves.iter_mut().filter(|m| m.expert == expert && m.source == Source::Peer(chip)) {
            m.source = source;
        }
        Some((c, expert))
    }

    fn max_and_mean(&self) -> (usize, f64, f64) {
        let (mut arg, mut max, mut sum, mut n) = (0, f64::NEG_INFINITY, 0.0, 0usize);
        for (c, &l) in self.load.iter().enumerate().filter(|(c, _)| self.up[*c]) {
            if l > max {
                (arg, max) = (c, l);
            }
            sum += l;
            n += 1;
        }
        (arg, max.max(0.0), if n == 0 { 0.0 } else { sum / n as f64 })
    }
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
    let experts = shape.experts();
    let mut w = Work {
        shape,
        index,
        domains: shape.local_domains(index),
        up: (0..size).map(|l| !failed.contains(shape.chip_at(index, l))).collect(),
        slots: shape.slots_per_chip() as usize,
        chips: group.chips.clone(),
        hosts: vec![Vec::new(); experts],
        pending: group.pending.iter().map(|m| (shape.locate(m.to).1, shape.expert_index(m.expert))).collect(),
        load: vec![0.0; size],
    };
    let mut requested = vec![0u32; experts];
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
    let weight = |i: usize, n: u32| dense[i] / f64::from(n.max(1));
    for (local, hosted) in w.chips.iter().enumerate() {
        w.load[local] = hosted.iter().map(|&e| shape.expert_index(e)).map(|i| weight(i, requested[i])).sum();
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
            .then(Weight(weight(b, requested[b])).cmp(&Weight(weight(a, requested[a]))))
            .then(a.cmp(&b))
    });

    let (mut moves, mut dropped, mut evicted) = (Vec::new(), Vec::new(), Vec::new());
    for i in to_create {
        let expert = shape.expert_at(i);
        let target = match w.best_chip(i, None) {
            Some(c) => Some(c),
            // An expert with no replica left outranks redundancy: make room by evicting a spare
            // replica of another expert.
            None if w.hosts[i].is_empty() => w.evict_spare(dense, &mut moves).map(|(c, e)| {
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
        moves.push(Move { expert, to: shape.chip_at(index, c), source: w.source(i) });
        w.chips[c].push(expert);
        w.hosts[i].push(c as u32);
        w.pending.insert((c, i));
        w.load[c] += weight(i, requested[i]);
    }

    // Earlier loads still outstanding: those onto failed chips were re-created above; the rest
    // keep their target and get a new source if theirs failed or is itself not loaded yet.
    let mut carried = Vec::new();
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
        carried.push(Move { source, ..*m });
    }

    // Re-weigh with the replica counts actually achieved, then rebalance when asked or needed.
    for (local, hosted) in w.chips.iter().enumerate() {
        w.load[local] =
            hosted.iter().map(|&e| shape.expert_index(e)).map(|i| weight(i, w.hosts[i].len() as u32)).sum();
    }
    let (_, max, mean) = w.max_and_mean();
    let mut rebalance_moves = 0;
    if options.rebalance || (mean > 0.0 && max / mean > options.rebalance_threshold) {
        rebalance_moves = rebalance(&mut w, dense, options.rebalance_target, &mut moves, &mut carried);
    }

    w.chips.iter_mut().for_each(|h| h.sort_unstable());
    moves.sort_unstable_by_key(|m| (m.to, m.expert));
    carried.sort_unstable_by_key(|m| (m.to, m.expert));
    let pending = {
        let mut all: Vec<Move> = moves.iter().chain(&carried).copied().collect();
        all.sort_unstable_by_key(|m| (m.to, m.expert));
        all
    };
    GroupOutcome::Planned(GroupPlan {
        group: GroupPlacement { index, chips: w.chips, pending },
        moves,
        carried,
        dropped,
        evicted,
        lower_bound,
        rebalance_moves,
    })
}

/// Moves replicas off the most loaded chip while that strictly lowers its load, until the
/// group's max/mean load reaches `target`. Each step takes the replica whose move to its
/// least-loaded eligible chip leaves the lower peak (a weight near half the gap), so hot
/// replicas are not shuffled from one chip to the next. Each step lowers the sum of squared chip
/// loads, so it terminates; it is also capped at four moves per chip. Returns the replicas moved.
fn rebalance(
    w: &mut Work<'_>,
    dense: &[f64],
    target: f64,
    moves: &mut Vec<Move>,
    carried: &mut [Move],
) -> u64 {
    let shape = w.shape;
    let mut moved = 0u64;
    for _ in 0..w.chips.len() * 4 {
        let (from, max, mean) = w.max_and_mean();
        if mean <= 0.0 || max / mean <= target {
            break;
        }
        let mut candidates: Vec<usize> = w.chips[from].iter().map(|&e| shape.expert_index(e)).collect();
        candidates.sort_unstable();
        // Chips by load once per step; each candidate takes the first eligible one, which is
        // what `best_chip` would return, without a scan per candidate.
        let mut order: Vec<usize> = (0..w.chips.len()).filter(|&c| w.up[c] && c != from).collect();
        order.sort_unstable_by(|&a, &b| Weight(w.load[a]).cmp(&Weight(w.load[b])).then(a.cmp(&b)));
        let mut step: Option<(Weight, f64, usize, usize)> = None;
        for i in candidates {
            let wt = dense[i] / w.hosts[i].len().max(1) as f64;
            let used: Vec<u32> =
                w.hosts[i].iter().map(|&c| c as usize).filter(|&c| c != from).map(|c| w.domains[c]).collect();
            let Some(&to) =
                order.iter().find(|&&c| w.chips[c].len() < w.slots && !used.contains(&w.domains[c]))
            else {
                continue;
            };
            let peak = Weight((max - wt).max(w.load[to] + wt));
            if peak.0 < max && step.is_none_or(|(best, ..)| peak < best) {
                step = Some((peak, wt, i, to));
            }
        }
        let step = step.map(|(_, wt, i, to)| (Weight(wt), i, to));
        let Some((Weight(wt), i, to)) = step else { break };
        let expert = shape.expert_at(i);
        let (from_chip, to_chip) = (shape.chip_at(w.index, from), shape.chip_at(w.index, to));
        w.chips[from].retain(|&e| e != expert);
        w.chips[to].push(expert);
        if let Some(h) = w.hosts[i].iter_mut().find(|c| **c as usize == from) {
            *h = to as u32;
        }
        w.load[from] -= wt;
        w.load[to] += wt;
        if w.pending.remove(&(from, i)) {
            // Not loaded yet: send the outstanding load to the new chip instead.
            for m in
                moves.iter_mut().chain(carried.iter_mut()).filter(|m| m.to == from_chip && m.expert == expert)
            {
                m.to = to_chip;
            }
        } else {
            // The old replica serves as the source until the placement settles.
            moves.push(Move { expert, to: to_chip, source: Source::Peer(from_chip) });
            moved += 1;
        }
        w.pending.insert((to, i));
    }
    moved
}
