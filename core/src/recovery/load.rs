//! Measured expert load, closed loop: the members' windowed token counts
//! ([`LoadRecord`], at `jobs/<ns>/<job>/loads/<rank>`), the brain's smoothed table
//! ([`LoadTracker`]), and when a running job is rebalanced ([`RebalancePolicy`]).
//!
//! Pure: the control loop feeds the tracker from each observation and hands its table to the
//! brain ([`BrainConfig::load`](super::BrainConfig)), which uses it for every re-plan and, when
//! the measured step inflation passes the job's threshold, publishes a rebalance generation.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::job::{DEFAULT_LOAD_WINDOW_STEPS, RebalanceSpec};
use crate::placement::{
    ChipId, ExpertId, ExpertLoad, FailedChips, LoadStats, Move, Placement, PlacementShape, PlanError,
    Redundancy, ReplanOptions, Source, initial_placement, replan,
};

/// Most `(layer, expert)` counts one record may carry (a LongCat-class stage of 60 layers x 512
/// experts is 30,720): bounds the value (counts below 2^32 a window keep it under 512 KiB).
pub const MAX_LOAD_ENTRIES: usize = 32_768;

/// Weight of a new window in the smoothed table (exponentially weighted moving average).
pub const LOAD_SMOOTHING: f64 = 0.5;

/// A record whose window ended more than this many windows before the job's step is stale (its
/// member stopped reporting: left, or cut off from etcd) and is not counted.
pub const STALE_AFTER_WINDOWS: u64 = 4;

/// A rebalance is published only when it lowers the predicted step inflation by at least this
/// fraction: moving state for a marginal gain is not worth the transfer.
pub const MIN_REBALANCE_GAIN: f64 = 0.05;

/// One member's token counts of one window, as it writes them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LoadRecord {
    /// The generation the member had joined when the window closed.
    pub generation: u64,
    /// The member (must equal the key's rank).
    pub rank: u32,
    /// The window covers steps `fromStep + 1 ..= toStep`.
    pub from_step: u64,
    /// The window's last step.
    pub to_step: u64,
    /// Tokens this member's micro-batches routed to each routed expert, `[layer][expert]`.
    pub tokens: Vec<Vec<u64>>,
}

impl LoadRecord {
    /// The JSON value written to etcd.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of integers always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Why a load record was not counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadRejection {
    /// The key's rank and the record's differ.
    RankMismatch {
        /// The rank in the key.
        key: u32,
        /// The rank in the value.
        record: u32,
    },
    /// More counts than [`MAX_LOAD_ENTRIES`].
    TooLarge {
        /// Counts carried.
        entries: usize,
    },
    /// Not `layers` rows of `routedExperts` counts.
    Shape {
        /// What the job has.
        expected: String,
        /// What the record has.
        found: String,
    },
    /// `toStep` is not after `fromStep`.
    EmptyWindow {
        /// Start (exclusive).
        from_step: u64,
        /// End.
        to_step: u64,
    },
    /// Every count is zero.
    NoTokens,
    /// Written in a generation newer than the brain published.
    FutureGeneration {
        /// The record's.
        written: u64,
        /// The brain's newest.
        current: u64,
    },
    /// The window ended more than [`STALE_AFTER_WINDOWS`] windows before the job's step.
    Stale {
        /// The window's last step.
        to_step: u64,
        /// The job's step.
        step: u64,
    },
}

impl fmt::Display for LoadRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadRejection::RankMismatch { key, record } => {
                write!(f, "record of rank {record} under rank {key}'s key")
            }
            LoadRejection::TooLarge { entries } => {
                write!(f, "{entries} counts exceed the limit of {MAX_LOAD_ENTRIES}")
            }
            LoadRejection::Shape { expected, found } => write!(f, "expected {expected}, found {found}"),
            LoadRejection::EmptyWindow { from_step, to_step } => {
                write!(f, "window {from_step}..{to_step} holds no step")
            }
            LoadRejection::NoTokens => f.write_str("every count is zero"),
            LoadRejection::FutureGeneration { written, current } => {
                write!(f, "written in generation {written}, newer than the newest published ({current})")
            }
            LoadRejection::Stale { to_step, step } => {
                write!(
                    f,
                    "window ended at step {to_step}, more than {STALE_AFTER_WINDOWS} windows before step {step}"
                )
            }
        }
    }
}

/// The smoothed table of expert load the brain plans with.
///
/// Each round's new windows (one per member, summed: a member counts only its own
/// micro-batches) are normalised per layer to a mean of 1.0 and folded into an exponentially
/// weighted moving average ([`LOAD_SMOOTHING`]). A window already counted is skipped (a record
/// stays in etcd until its member's next window overwrites it); after a rollback, replayed steps
/// are not counted twice.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadTracker {
    layers: usize,
    routed: usize,
    window_steps: u64,
    table: Option<Vec<Vec<f64>>>,
    counted: BTreeMap<u32, u64>,
    windows: u64,
}

impl LoadTracker {
    /// A tracker for `shape`'s experts, whose members report every `window_steps` steps.
    pub fn new(shape: &PlacementShape, window_steps: u64) -> Self {
        Self {
            layers: shape.layers as usize,
            routed: shape.routed_experts as usize,
            window_steps: window_steps.max(1),
            table: None,
            counted: BTreeMap::new(),
            windows: 0,
        }
    }

    /// Checks one record read at `loads/<key>` against the job, the brain's newest generation
    /// and the job's step (when known).
    pub fn check(
        &self,
        key: u32,
        record: &LoadRecord,
        generation: u64,
        step: Option<u64>,
    ) -> Result<(), LoadRejection> {
        if record.rank != key {
            return Err(LoadRejection::RankMismatch { key, record: record.rank });
        }
        let entries: usize = record.tokens.iter().map(Vec::len).sum();
        if entries > MAX_LOAD_ENTRIES {
            return Err(LoadRejection::TooLarge { entries });
        }
        if record.tokens.len() != self.layers || record.tokens.iter().any(|r| r.len() != self.routed) {
            let widths: BTreeSet<usize> = record.tokens.iter().map(Vec::len).collect();
            return Err(LoadRejection::Shape {
                expected: format!("{} layers x {} experts", self.layers, self.routed),
                found: format!("{} layers x {widths:?} experts", record.tokens.len()),
            });
        }
        if record.to_step <= record.from_step {
            return Err(LoadRejection::EmptyWindow { from_step: record.from_step, to_step: record.to_step });
        }
        if record.tokens.iter().flatten().all(|&c| c == 0) {
            return Err(LoadRejection::NoTokens);
        }
        if record.generation > generation {
            return Err(LoadRejection::FutureGeneration { written: record.generation, current: generation });
        }
        let horizon = STALE_AFTER_WINDOWS.saturating_mul(self.window_steps);
        if let Some(step) = step
            && record.to_step.saturating_add(horizon) < step
        {
            return Err(LoadRejection::Stale { to_step: record.to_step, step });
        }
        Ok(())
    }

    /// Folds the windows of `records` (rank → record) not counted yet. Returns the records left
    /// out, with why; a window already counted is neither folded nor reported.
    pub fn observe(
        &mut self,
        records: &BTreeMap<u32, LoadRecord>,
        generation: u64,
        step: Option<u64>,
    ) -> Vec<(u32, LoadRejection)> {
        let mut rejected = Vec::new();
        let mut sum = vec![vec![0u64; self.routed]; self.layers];
        let mut fresh = false;
        for (&rank, record) in records {
            if let Err(why) = self.check(rank, record, generation, step) {
                rejected.push((rank, why));
                continue;
            }
            if self.counted.get(&rank).is_some_and(|&done| record.to_step <= done) {
                continue;
            }
            self.counted.insert(rank, record.to_step);
            for (row, counts) in sum.iter_mut().zip(&record.tokens) {
                for (total, &c) in row.iter_mut().zip(counts) {
                    *total = total.saturating_add(c);
                }
            }
            fresh = true;
        }
        if fresh {
            self.fold(&sum);
        }
        rejected
    }

    fn fold(&mut self, sum: &[Vec<u64>]) {
        let previous = self.table.take();
        let table = sum
            .iter()
            .enumerate()
            .map(|(layer, counts)| {
                let old = previous.as_ref().and_then(|t| t.get(layer));
                let total: u64 = counts.iter().sum();
                if total == 0 {
                    // Nothing routed in this layer this round: keep what was known.
                    return old.cloned().unwrap_or_else(|| vec![1.0; self.routed]);
                }
                let scale = self.routed as f64 / total as f64;
                let measured = counts.iter().map(|&c| c as f64 * scale);
                match old {
                    Some(old) => old
                        .iter()
                        .zip(measured)
                        .map(|(o, m)| (1.0 - LOAD_SMOOTHING) * o + LOAD_SMOOTHING * m)
                        .collect(),
                    None => measured.collect(),
                }
            })
            .collect();
        self.table = Some(table);
        self.windows += 1;
    }

    /// The smoothed table (each layer's mean 1.0), once a window was counted.
    pub fn table(&self) -> Option<ExpertLoad> {
        self.table.clone().map(ExpertLoad::from_rows)
    }

    /// Rounds in which new windows were folded.
    pub fn windows(&self) -> u64 {
        self.windows
    }
}

/// When the brain rebalances a running job (`spec.parallelism.rebalance`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RebalancePolicy {
    /// Measured step inflation above which a rebalance is considered.
    pub threshold: f64,
    /// Steps between two rebalance decisions (and before the first).
    pub min_interval_steps: u64,
    /// Members report their counts every this many steps.
    pub window_steps: u64,
}

impl RebalancePolicy {
    /// The policy of a spec's `rebalance` section.
    pub fn of(spec: &RebalanceSpec) -> Self {
        Self {
            threshold: spec.threshold,
            min_interval_steps: spec.min_interval_steps.max(1),
            window_steps: spec.window_steps.max(1),
        }
    }

    /// The load window of a job with or without a policy.
    pub fn window_of(policy: Option<&Self>) -> u64 {
        policy.map_or(DEFAULT_LOAD_WINDOW_STEPS, |p| p.window_steps)
    }

    /// Whether a running job at `step`, whose last rebalance decision was at `last` (0: none),
    /// with `inflation` measured, is due for one; else why not.
    pub fn due(&self, step: u64, last: u64, inflation: f64) -> Result<(), RebalanceHold> {
        let since = step.saturating_sub(last);
        if since < self.min_interval_steps {
            return Err(RebalanceHold::TooSoon { since, min_interval: self.min_interval_steps });
        }
        // NaN (nothing measurable) never passes.
        if inflation.partial_cmp(&self.threshold) != Some(std::cmp::Ordering::Greater) {
            return Err(RebalanceHold::BelowThreshold { inflation, threshold: self.threshold });
        }
        Ok(())
    }
}

/// Why a running job is not rebalanced now.
#[derive(Clone, Debug, PartialEq)]
pub enum RebalanceHold {
    /// Fewer than `minIntervalSteps` since the last decision.
    TooSoon {
        /// Steps since.
        since: u64,
        /// The minimum.
        min_interval: u64,
    },
    /// The measured step inflation is at or below the threshold.
    BelowThreshold {
        /// Measured.
        inflation: f64,
        /// The threshold.
        threshold: f64,
    },
    /// No candidate placement lowers the step inflation by [`MIN_REBALANCE_GAIN`].
    NoGain {
        /// Measured on the placement in force.
        before: f64,
        /// The best candidate's.
        after: f64,
    },
    /// The best candidate would load an expert that has no live replica (from a checkpoint).
    NeedsCheckpoint,
}

/// A rebalance the brain can publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Rebalanced {
    /// The next placement (settled: members copy what they gain while joining it).
    pub placement: Placement,
    /// Replicas a chip gains, each from a live holder.
    pub moves: Vec<Move>,
    /// Step inflation of the placement in force under the measured load.
    pub before: f64,
    /// Step inflation of `placement` under the same load.
    pub after: f64,
}

/// A rebalance generation the brain published (kept in its record, newest last).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceRecord {
    /// The generation.
    pub generation: u64,
    /// The job's step when it was decided (members join it at the next step boundary).
    pub step: u64,
    /// Unix time of the decision.
    pub at: f64,
    /// Measured step inflation of the placement it replaced.
    pub before: f64,
    /// Step inflation of the new placement under the same measured load.
    pub predicted: f64,
    /// Replicas copied from live holders.
    pub replicas_moved: u64,
}

/// The rebalance of `current` for the measured `load`: the better of re-planning with every
/// group rebalanced (replicas move, counts stay) and, when no chip is out, a fresh placement for
/// the measured load (hot experts get the redundant replicas). `Err` with why when neither
/// lowers the step inflation by [`MIN_REBALANCE_GAIN`].
pub fn rebalance(
    shape: &PlacementShape,
    current: &Placement,
    failed: &FailedChips,
    load: &ExpertLoad,
) -> Result<Result<Rebalanced, RebalanceHold>, PlanError> {
    let before = LoadStats::measure(shape, current, failed, load).step_inflation;
    let options = ReplanOptions {
        redundancy: Redundancy::Restore,
        rebalance: true,
        rebalance_threshold: 0.0,
        rebalance_target: 1.0,
    };
    let mut candidates: Vec<Placement> = Vec::new();
    if let Some(p) = replan(shape, current, failed, load, &options)?.placement {
        candidates.push(p.settled());
    }
    if failed.is_empty() {
        candidates.push(initial_placement(shape, load)?);
    }
    let mut best: Option<(f64, Placement)> = None;
    for mut c in candidates {
        c.generation = current.generation + 1;
        let after = LoadStats::measure(shape, &c, failed, load).step_inflation;
        if best.as_ref().is_none_or(|(b, _)| after < *b) {
            best = Some((after, c));
        }
    }
    let Some((after, placement)) = best else {
        return Ok(Err(RebalanceHold::NoGain { before, after: before }));
    };
    let wanted = before * (1.0 - MIN_REBALANCE_GAIN);
    if after.partial_cmp(&wanted).is_none_or(|o| o == std::cmp::Ordering::Greater) {
        return Ok(Err(RebalanceHold::NoGain { before, after }));
    }
    let moves = moves_between(shape, current, &placement, failed);
    if moves.iter().any(|m| m.source == Source::Checkpoint) {
        return Ok(Err(RebalanceHold::NeedsCheckpoint));
    }
    Ok(Ok(Rebalanced { placement, moves, before, after }))
}

/// The replicas `next` places on a chip that `current` did not, each sourced from the
/// lowest-numbered healthy chip of its group holding the expert in `current` (else the
/// checkpoint), in group and chip order.
pub fn moves_between(
    shape: &PlacementShape,
    current: &Placement,
    next: &Placement,
    failed: &FailedChips,
) -> Vec<Move> {
    let mut moves = Vec::new();
    for (old, new) in current.groups.iter().zip(&next.groups) {
        let mut holders: BTreeMap<ExpertId, ChipId> = BTreeMap::new();
        for (local, hosted) in old.chips.iter().enumerate() {
            let chip = shape.chip_at(old.index, local);
            if failed.contains(chip) {
                continue;
            }
            for &e in hosted {
                holders.entry(e).or_insert(chip);
            }
        }
        for (local, hosted) in new.chips.iter().enumerate() {
            let chip = shape.chip_at(new.index, local);
            let before = old.chips.get(local).map_or(&[][..], Vec::as_slice);
            for &expert in hosted.iter().filter(|e| !before.contains(e)) {
                let source = holders.get(&expert).map_or(Source::Checkpoint, |&c| Source::Peer(c));
                moves.push(Move { expert, to: chip, source });
            }
        }
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::initial_placement;
    use crate::recovery::Observation;

    /// 2 layers x 4 experts on 4 nodes of 2 chips (8 chips, one group), 2 redundant replicas a layer.
    fn shape() -> PlacementShape {
        PlacementShape {
            layers: 2,
            routed_experts: 4,
            redundant_experts: 2,
            expert_state_bytes: 1 << 20,
            nodes: 4,
            chips_per_node: 2,
            chip_memory_bytes: 1 << 30,
            expert_parallel_size: 8,
            nodes_per_rack: None,
            min_healthy_fraction: 0.25,
            pipeline_stages: 1,
        }
    }

    fn record(rank: u32, from: u64, to: u64, tokens: Vec<Vec<u64>>) -> LoadRecord {
        LoadRecord { generation: 1, rank, from_step: from, to_step: to, tokens }
    }

    fn skewed() -> Vec<Vec<u64>> {
        vec![vec![700, 100, 100, 100], vec![100, 100, 100, 700]]
    }

    #[test]
    fn the_table_sums_members_normalises_layers_and_smooths_windows() {
        let mut t = LoadTracker::new(&shape(), 10);
        assert_eq!(t.table(), None);
        let first = BTreeMap::from([
            (0, record(0, 0, 10, vec![vec![300, 100, 0, 0], vec![1, 1, 1, 1]])),
            (1, record(1, 0, 10, vec![vec![100, 100, 200, 0], vec![1, 1, 1, 1]])),
        ]);
        assert!(t.observe(&first, 1, Some(10)).is_empty());
        // Summed: [400, 200, 200, 0] of 800 -> mean 1.0 per layer.
        assert_eq!(t.table().map(|l| l.rows().to_vec()), Some(vec![vec![2.0, 1.0, 1.0, 0.0], vec![1.0; 4]]));
        // The same windows again: nothing new, nothing rejected, table unchanged.
        assert!(t.observe(&first, 1, Some(12)).is_empty());
        assert_eq!(t.windows(), 1);
        // A new window moves the table halfway (LOAD_SMOOTHING 0.5) towards it.
        let second = BTreeMap::from([(0, record(0, 10, 20, vec![vec![0, 0, 0, 400], vec![1, 1, 1, 1]]))]);
        assert!(t.observe(&second, 1, Some(20)).is_empty());
        assert_eq!(t.table().map(|l| l.rows()[0].clone()), Some(vec![1.0, 0.5, 0.5, 2.0]));
        assert_eq!(t.windows(), 2);
    }

    #[test]
    fn malformed_and_stale_records_are_rejected_with_a_reason() {
        let mut t = LoadTracker::new(&shape(), 10);
        let mut wide = skewed();
        wide[1].push(5);
        let records = BTreeMap::from([
            (0, record(1, 0, 10, skewed())),
            (1, record(1, 0, 10, wide)),
            (2, record(2, 10, 10, skewed())),
            (3, record(3, 0, 10, vec![vec![0; 4], vec![0; 4]])),
            (4, LoadRecord { generation: 9, ..record(4, 0, 10, skewed()) }),
            (5, record(5, 0, 10, skewed())),
            (6, record(6, 0, 10, vec![vec![1; MAX_LOAD_ENTRIES / 2 + 1]; 2])),
            (7, record(7, 50, 60, skewed())),
        ]);
        let rejected = t.observe(&records, 2, Some(61));
        let reasons: BTreeMap<u32, LoadRejection> = rejected.into_iter().collect();
        assert_eq!(reasons[&0], LoadRejection::RankMismatch { key: 0, record: 1 });
        assert!(matches!(reasons[&1], LoadRejection::Shape { .. }), "{}", reasons[&1]);
        assert_eq!(reasons[&2], LoadRejection::EmptyWindow { from_step: 10, to_step: 10 });
        assert_eq!(reasons[&3], LoadRejection::NoTokens);
        assert_eq!(reasons[&4], LoadRejection::FutureGeneration { written: 9, current: 2 });
        // Window ended at 10, more than 4 windows of 10 before step 61.
        assert_eq!(reasons[&5], LoadRejection::Stale { to_step: 10, step: 61 });
        assert_eq!(reasons[&6], LoadRejection::TooLarge { entries: MAX_LOAD_ENTRIES + 2 });
        assert!(!reasons.contains_key(&7));
        assert_eq!(t.windows(), 1, "only rank 7's window was counted");
        assert!(reasons.values().all(|r| !r.to_string().is_empty()));
    }

    #[test]
    fn a_record_stays_bounded_in_size() {
        // The largest record a member may write fits etcd's budget by a wide margin.
        let rows = 64;
        let tokens = vec![vec![u64::from(u32::MAX); MAX_LOAD_ENTRIES / rows]; rows];
        let r = LoadRecord { generation: u64::MAX, rank: u32::MAX, from_step: 0, to_step: u64::MAX, tokens };
        assert!(r.to_json().len() < crate::generation::MAX_VALUE_BYTES, "{}", r.to_json().len());
        let tiny = record(0, 0, 10, skewed()).to_json();
        let back: LoadRecord = serde_json::from_slice(&tiny).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, record(0, 0, 10, skewed()));
    }

    #[test]
    fn threshold_and_minimum_interval_gate_a_rebalance() {
        let p = RebalancePolicy { threshold: 1.5, min_interval_steps: 20, window_steps: 5 };
        assert_eq!(p.due(19, 0, 3.0), Err(RebalanceHold::TooSoon { since: 19, min_interval: 20 }));
        assert_eq!(p.due(20, 0, 1.5), Err(RebalanceHold::BelowThreshold { inflation: 1.5, threshold: 1.5 }));
        assert_eq!(p.due(20, 0, 1.51), Ok(()));
        assert_eq!(p.due(39, 20, 3.0), Err(RebalanceHold::TooSoon { since: 19, min_interval: 20 }));
        assert!(p.due(40, 20, f64::NAN).is_err(), "an unmeasurable inflation never rebalances");
    }

    #[test]
    fn a_skewed_load_is_rebalanced_from_live_peers_and_a_balanced_one_is_not() {
        let shape = shape();
        let uniform = ExpertLoad::uniform(&shape);
        let current = initial_placement(&shape, &uniform).unwrap_or_else(|e| panic!("{e}"));
        let load = ExpertLoad::from_rows(vec![vec![7.0, 1.0, 1.0, 1.0], vec![1.0, 1.0, 1.0, 7.0]]);
        let none = FailedChips::none();
        let done = rebalance(&shape, &current, &none, &load)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|hold| panic!("{hold:?}"));
        assert!(done.after <= done.before * (1.0 - MIN_REBALANCE_GAIN), "{} -> {}", done.before, done.after);
        assert_eq!(done.placement.generation, current.generation + 1);
        assert!(!done.placement.has_pending());
        assert!(!done.moves.is_empty());
        for m in &done.moves {
            let Source::Peer(from) = m.source else { panic!("{m:?} reads a checkpoint") };
            assert!(current.hosted(&shape, from).contains(&m.expert));
            assert!(!current.hosted(&shape, m.to).contains(&m.expert));
        }
        done.placement.check(&shape, &none).unwrap_or_else(|e| panic!("{e}"));
        // Rebalanced for the load it measured, it holds: nothing more to gain.
        let again = rebalance(&shape, &done.placement, &none, &load).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(again, Err(RebalanceHold::NoGain { .. })), "{again:?}");
        // Deterministic.
        let twice = rebalance(&shape, &current, &none, &load).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(twice, Ok(done));
    }

    /// The tiny example's brain for expert-parallel workers, running generation 1 (the uniform
    /// initial placement) with every member joined, at `step`.
    fn running_tiny(
        step: u64,
    ) -> (crate::recovery::BrainConfig, crate::recovery::RecoveryState, Observation, Placement) {
        let job = crate::manifest::parse_job(include_str!("../../../examples/tiny.yaml"))
            .unwrap_or_else(|v| panic!("{v:?}"));
        let cfg = crate::recovery::BrainConfig::from_spec(&job.spec)
            .unwrap_or_else(|e| panic!("{e}"))
            .for_expert_parallel();
        let names: Vec<String> = (0..cfg.shape.nodes).map(|i| format!("n{i}")).collect();
        let mut obs = Observation { now: 500.0, step: Some(step), ..Default::default() };
        for n in &names {
            obs.nodes.insert(n.clone(), crate::recovery::NodeView { alive: true, ..Default::default() });
        }
        obs.members = (0..cfg.shape.nodes).collect();
        obs.joined.insert(1, (0..cfg.shape.nodes).collect());
        let mut st = crate::recovery::RecoveryState::new(names, vec!["s0".into()]);
        st.phase = crate::recovery::BrainPhase::Running;
        st.generation = 1;
        let placement = initial_placement(&cfg.shape, &cfg.load).unwrap_or_else(|e| panic!("{e}"));
        (cfg, st, obs, placement)
    }

    /// Expert 7 of every layer takes most tokens.
    fn hot_last(shape: &PlacementShape) -> ExpertLoad {
        let mut row = vec![1.0; shape.routed_experts as usize];
        if let Some(last) = row.last_mut() {
            *last = 9.0;
        }
        ExpertLoad::from_rows(vec![row; shape.layers as usize])
    }

    #[test]
    fn the_brain_publishes_a_rebalance_from_live_peers_once_per_interval() {
        use crate::generation::{GenerationTier, Restore, from_published_generation};
        use crate::recovery::{Action, Feedback, decide, decide_with};
        let (cfg, st, obs, placement) = running_tiny(60);
        let policy = RebalancePolicy { threshold: 1.2, min_interval_steps: 50, window_steps: 10 };
        let feedback = Feedback { load: Some(hot_last(&cfg.shape)), rebalance: Some(policy) };
        // Without measurements, or without a policy, nothing happens.
        let plain = decide(&cfg, &st, &obs, Some(&placement)).unwrap_or_else(|e| panic!("{e}"));
        assert!(plain.actions.is_empty(), "{:?}", plain.actions);
        let unmeasured = Feedback { load: None, ..feedback.clone() };
        let d = decide_with(&cfg, &unmeasured, &st, &obs, Some(&placement)).unwrap_or_else(|e| panic!("{e}"));
        assert!(d.actions.is_empty());

        let d = decide_with(&cfg, &feedback, &st, &obs, Some(&placement)).unwrap_or_else(|e| panic!("{e}"));
        let [Action::PublishPlacement { placement: next, control }] = d.actions.as_slice() else {
            panic!("{:?}", d.actions)
        };
        assert_eq!((next.generation, control.generation), (2, 2));
        assert!(control.rebalance && control.restore_step.is_none() && !control.from_peers);
        assert!(
            control
                .load_experts
                .values()
                .flatten()
                .all(|l| matches!(l.source, crate::recovery::LoadSource::Peer { .. }))
        );
        assert_eq!(d.state.generation, 2);
        assert_eq!(d.state.rebalanced_at, 60);
        assert_eq!(d.state.phase, crate::recovery::BrainPhase::Running);
        let record = d.state.rebalances.last().cloned().unwrap_or_else(|| panic!("no record"));
        assert!(record.predicted < record.before && record.replicas_moved > 0, "{record:?}");
        // Members keep their memory and copy what they gain: no rollback.
        let previous = crate::generation::from_published_generation(
            &cfg,
            &st,
            &placement,
            &crate::recovery::ControlRecord { generation: 1, ..Default::default() },
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let plan = from_published_generation(&cfg, &d.state, next, control, Some(&previous))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((plan.restore, plan.tier), (Restore::Live, GenerationTier::Rebalance));

        // Until every member joined it, and then for minIntervalSteps, no other rebalance.
        let mut obs2 = obs.clone();
        obs2.step = Some(200);
        let waiting =
            decide_with(&cfg, &feedback, &d.state, &obs2, Some(next)).unwrap_or_else(|e| panic!("{e}"));
        assert!(waiting.actions.is_empty());
        obs2.joined.insert(2, (0..cfg.shape.nodes).collect());
        obs2.step = Some(109);
        let worse = Feedback {
            load: Some(ExpertLoad::from_rows(vec![vec![9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]; 4])),
            ..feedback.clone()
        };
        let soon = decide_with(&cfg, &worse, &d.state, &obs2, Some(next)).unwrap_or_else(|e| panic!("{e}"));
        assert!(soon.actions.is_empty() && soon.state == d.state);
        obs2.step = Some(110);
        let due = decide_with(&cfg, &worse, &d.state, &obs2, Some(next)).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(due.actions.as_slice(), [Action::PublishPlacement { .. }]), "{:?}", due.actions);
        // The same load again: nothing left to gain, but the check counts for the interval.
        let settled =
            decide_with(&cfg, &feedback, &d.state, &obs2, Some(next)).unwrap_or_else(|e| panic!("{e}"));
        assert!(settled.actions.is_empty());
        assert_eq!(settled.state.rebalanced_at, 110);
    }
}
