//! One group's working state while it is placed or re-planned, and the per-layer balancing that
//! both use: chips are group-local indices, experts dense indices, loads kept per layer.

use std::collections::BTreeSet;

use super::ids::ExpertId;
use super::plan::LayerBalance;
use super::shape::PlacementShape;
use super::types::{Move, Source};

/// A group being planned.
pub(crate) struct Work<'a> {
    pub shape: &'a PlacementShape,
    /// Group index.
    pub index: u32,
    /// First layer of the group's pipeline stage.
    pub first_layer: u32,
    /// Failure domain of each chip, renumbered from 0 within the group.
    pub domains: Vec<u32>,
    /// Failure domains in the group.
    domain_count: usize,
    /// Whether each chip is healthy.
    pub up: Vec<bool>,
    /// Replica slots per chip.
    pub slots: usize,
    /// Replicas per chip.
    pub chips: Vec<Vec<ExpertId>>,
    /// Healthy chips hosting each expert (dense order, whole model), loaded or pending.
    pub hosts: Vec<Vec<u32>>,
    /// (chip, expert) replicas listed but not loaded yet.
    pub pending: BTreeSet<(usize, usize)>,
    /// Load of each replica of each expert (dense order), as counted in `load`.
    pub share: Vec<f64>,
    /// Load per layer of the stage and chip: `load[layer - first_layer][chip]`.
    pub load: Vec<Vec<f64>>,
    /// Whether relocations are recorded as [`Move`]s (re-plans) or free (initial placement).
    pub record: bool,
    /// Loads this plan adds.
    pub moves: Vec<Move>,
    /// Loads published earlier and still outstanding.
    pub carried: Vec<Move>,
}

impl<'a> Work<'a> {
    /// An empty group: every chip healthy unless `up` says otherwise, nothing hosted.
    pub fn empty(shape: &'a PlacementShape, index: u32, up: Vec<bool>, record: bool) -> Self {
        let size = shape.chips_per_group() as usize;
        let domains = shape.local_domains(index);
        Self {
            shape,
            index,
            first_layer: shape.group_layers(index).start,
            domain_count: domains.iter().copied().max().map_or(0, |d| d as usize + 1),
            domains,
            up,
            slots: shape.slots_per_chip() as usize,
            chips: vec![Vec::new(); size],
            hosts: vec![Vec::new(); shape.experts()],
            pending: BTreeSet::new(),
            share: vec![0.0; shape.experts()],
            load: vec![vec![0.0; size]; shape.layers_per_stage() as usize],
            record,
            moves: Vec::new(),
            carried: Vec::new(),
        }
    }

    /// The stage-local layer of an expert.
    pub fn layer_of(&self, i: usize) -> usize {
        i / self.shape.routed_experts.max(1) as usize - self.first_layer as usize
    }

    /// Failure domains in the group.
    pub fn domain_count(&self) -> usize {
        self.domain_count
    }

    /// Adds a replica of expert `i` on chip `c`, carrying `share` load.
    pub fn add(&mut self, i: usize, c: usize) {
        self.chips[c].push(self.shape.expert_at(i));
        self.hosts[i].push(c as u32);
        let l = self.layer_of(i);
        self.load[l][c] += self.share[i];
    }

    /// Sets each replica's share of expert `i` to `dense / replicas`, updating chip loads.
    pub fn reweigh(&mut self, i: usize, dense: f64) {
        let share = dense / self.hosts[i].len().max(1) as f64;
        let l = self.layer_of(i);
        for &c in &self.hosts[i] {
            self.load[l][c as usize] += share - self.share[i];
        }
        self.share[i] = share;
    }

    /// Whether a replica of expert `i` may go to chip `to` (leaving `from`, if moving): healthy,
    /// memory left unless swapping, no replica there yet, and the expert's replicas still span
    /// two failure domains when it has two or more (and the group has two).
    pub fn allowed(&self, i: usize, to: usize, from: Option<usize>, swap: bool) -> bool {
        if !self.up[to] || Some(to) == from || self.hosts[i].contains(&(to as u32)) {
            return false;
        }
        if !swap && self.chips[to].len() >= self.slots {
            return false;
        }
        let mut first = None;
        let mut count = 1;
        let mut spans = false;
        for d in
            self.hosts[i].iter().map(|&c| c as usize).filter(|&c| Some(c) != from).map(|c| self.domains[c])
        {
            count += 1;
            match first {
                None => first = Some(d),
                Some(f) if f != d => spans = true,
                Some(_) => {}
            }
        }
        let spans = spans || first.is_some_and(|f| f != self.domains[to]);
        count < 2 || spans || self.domain_count() < 2
    }

    /// For every chip, whether a new replica of expert `i` may go there: what
    /// [`Work::allowed`] says for each chip, in `O(chips + replicas)`, written into `out`.
    pub fn eligible(&self, i: usize, out: &mut Vec<bool>) {
        let mut first = None;
        let mut spans = false;
        for &h in &self.hosts[i] {
            let d = self.domains[h as usize];
            match first {
                None => first = Some(d),
                Some(f) if f != d => spans = true,
                Some(_) => {}
            }
        }
        let free_domain = spans || self.domain_count() < 2;
        out.clear();
        out.extend((0..self.chips.len()).map(|c| {
            self.up[c]
                && self.chips[c].len() < self.slots
                && (free_domain || first.is_none_or(|f| f != self.domains[c]))
        }));
        for &h in &self.hosts[i] {
            out[h as usize] = false;
        }
    }

    /// The lowest-numbered healthy chip holding a loaded replica of `i`.
    pub fn live_peer(&self, i: usize) -> Option<usize> {
        self.hosts[i].iter().map(|&c| c as usize).filter(|&c| !self.pending.contains(&(c, i))).min()
    }

    /// Where a new replica of `i` reads its state from.
    pub fn source(&self, i: usize) -> Source {
        self.live_peer(i).map_or(Source::Checkpoint, |c| Source::Peer(self.shape.chip_at(self.index, c)))
    }

    /// Moves the replica of expert `i` from chip `from` to chip `to`; returns whether it moved
    /// loaded state (a new [`Move`] from the old chip) rather than redirecting a pending load.
    pub fn relocate(&mut self, i: usize, from: usize, to: usize) -> bool {
        let expert = self.shape.expert_at(i);
        self.chips[from].retain(|&e| e != expert);
        self.chips[to].push(expert);
        if let Some(h) = self.hosts[i].iter_mut().find(|c| **c as usize == from) {
            *h = to as u32;
        }
        let l = self.layer_of(i);
        self.load[l][from] -= self.share[i];
        self.load[l][to] += self.share[i];
        if !self.record {
            return false;
        }
        let (from_chip, to_chip) = (self.shape.chip_at(self.index, from), self.shape.chip_at(self.index, to));
        let was_pending = self.pending.remove(&(from, i));
        self.pending.insert((to, i));
        if was_pending {
            // Not loaded yet: send the outstanding load to the new chip instead.
            for m in self
                .moves
                .iter_mut()
                .chain(self.carried.iter_mut())
                .filter(|m| m.to == from_chip && m.expert == expert)
            {
                m.to = to_chip;
            }
            false
        } else {
            // The old replica serves as the source until the placement settles.
            self.moves.push(Move { expert, to: to_chip, source: Source::Peer(from_chip) });
            true
        }
    }

    /// The group's step inflation from the loads kept.
    pub fn inflation(&self) -> f64 {
        LayerBalance::of(&self.load, &self.up).inflation()
    }

    /// The most loaded healthy chip of stage-local layer `l`, the layer's max/mean, and its mean.
    pub fn layer_peak(&self, l: usize) -> (usize, f64, f64) {
        let (mut arg, mut max, mut sum, mut n) = (0, f64::NEG_INFINITY, 0.0, 0usize);
        for (c, &x) in self.load[l].iter().enumerate().filter(|(c, _)| self.up[*c]) {
            if x > max {
                (arg, max) = (c, x);
            }
            sum += x;
            n += 1;
        }
        let mean = if n == 0 { 0.0 } else { sum / n as f64 };
        (arg, if mean > 0.0 { max / mean } else { 1.0 }, mean)
    }

    /// Lowers the most loaded chip of layer `l` by moving one of its replicas of that layer to
    /// another chip, or swapping it with a lighter replica of the same layer there, while the
    /// layer's max/mean exceeds `target` and a step strictly lowers the peak (both chips end
    /// below it, so each step removes a chip from the peak level and the loop terminates;
    /// `budget` caps the steps). Candidate chips are tried least loaded first: the first option
    /// that brings the peak to `target` takes the step, else the option that lowers the peak
    /// most per replica moved (a swap moves two). Returns the replicas whose loaded state moved.
    pub fn improve_layer(&mut self, l: usize, target: f64, budget: usize) -> u64 {
        let mut moved = 0;
        let layer = self.first_layer + l as u32;
        for _ in 0..budget {
            let (from, ratio, mean) = self.layer_peak(l);
            if ratio <= target {
                break;
            }
            let Some((a, to, b)) = self.best_step(l, layer, from, target * mean) else { break };
            moved += u64::from(self.relocate(a, from, to));
            if let Some(b) = b {
                moved += u64::from(self.relocate(b, to, from));
            }
        }
        moved
    }

    /// The step [`Work::improve_layer`] takes from chip `from`: (replica to move, chip, replica
    /// to swap back), or `None` when no step lowers the peak.
    fn best_step(
        &self,
        l: usize,
        layer: u32,
        from: usize,
        goal: f64,
    ) -> Option<(usize, usize, Option<usize>)> {
        let peak = self.load[l][from];
        let of_layer = |c: usize| -> Vec<usize> {
            self.chips[c].iter().filter(|e| e.layer == layer).map(|&e| self.shape.expert_index(e)).collect()
        };
        let mine = of_layer(from);
        let mut order: Vec<usize> =
            (0..self.chips.len()).filter(|&c| c != from && self.up[c] && self.load[l][c] < peak).collect();
        order
            .sort_unstable_by(|&a, &b| Weight(self.load[l][a]).cmp(&Weight(self.load[l][b])).then(a.cmp(&b)));
        // Score: how much the peak drops per replica moved (a swap moves two).
        let mut best: Option<(Weight, f64, usize, usize, Option<usize>)> = None;
        let score_of =
            |best: &Option<(Weight, f64, usize, usize, Option<usize>)>| best.map_or(1e-12, |b| b.0.0);
        for to in order {
            let there = self.load[l][to];
            // No option with this chip or a later (more loaded) one drops the peak below `there`.
            if peak - there <= score_of(&best) {
                break;
            }
            for &a in &mine {
                let wa = self.share[a];
                let after = (peak - wa).max(there + wa);
                let score = peak - after;
                if score > score_of(&best) && self.allowed(a, to, Some(from), false) {
                    best = Some((Weight(score), after, a, to, None));
                }
            }
            let theirs = of_layer(to);
            for &a in &mine {
                let wa = self.share[a];
                for &b in &theirs {
                    let wb = self.share[b];
                    let after = (peak - wa + wb).max(there + wa - wb);
                    let score = (peak - after) / 2.0;
                    if wb < wa
                        && score > score_of(&best)
                        && self.allowed(a, to, Some(from), true)
                        && self.allowed(b, from, Some(to), true)
                    {
                        best = Some((Weight(score), after, a, to, Some(b)));
                    }
                }
            }
            if best.is_some_and(|b| b.1 <= goal) {
                break;
            }
        }
        best.map(|(_, _, a, to, b)| (a, to, b))
    }
}

/// An `f64` with a total order (`total_cmp`), so heaps and sorts are deterministic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Weight(pub f64);

impl Eq for Weight {}

impl PartialOrd for Weight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Weight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}
