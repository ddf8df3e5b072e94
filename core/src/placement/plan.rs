//! What a re-plan decided: the tier, the loads it needs, and how good the result is.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::health::FailedChips;
use super::ids::ExpertId;
use super::load::ExpertLoad;
use super::shape::PlacementShape;
use super::types::Move;
use super::types::{Placement, Source};

/// The rung of the recovery ladder a plan needs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Tier {
    /// Every expert kept a live replica: training retries the step at once with the new routing.
    /// Any moves only restore redundancy, from live peers, in the background.
    Reroute,
    /// Some expert has no live replica: its listed loads must finish before training resumes
    /// (a load from [`Source::Checkpoint`] rolls the job back to that checkpoint).
    Reshard,
    /// No placement can satisfy the job; the current placement stays in force.
    Infeasible {
        /// Why.
        reason: Infeasibility,
    },
}

impl Tier {
    /// `reroute`, `reshard` or `infeasible`, as in metrics labels and `ninelives plan --json`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Tier::Reroute => "reroute",
            Tier::Reshard => "reshard",
            Tier::Infeasible { .. } => "infeasible",
        }
    }
}

/// Why a plan is infeasible.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Infeasibility {
    /// Fewer healthy chips than the failure policy's `minHealthyFraction` requires.
    #[serde(rename_all = "camelCase")]
    MinHealthyFraction {
        /// Healthy chips in the job.
        healthy: u64,
        /// Healthy chips required.
        required: u64,
    },
    /// An expert lost every replica and no healthy chip of its group has memory left for it.
    /// (Failure domains never block such an expert: with no live replica it conflicts with none.)
    #[serde(rename_all = "camelCase")]
    Capacity {
        /// The group.
        group: u32,
        /// The expert that cannot be placed.
        expert: ExpertId,
        /// Healthy chips left in the group.
        healthy_chips: u64,
    },
}

impl fmt::Display for Infeasibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Infeasibility::MinHealthyFraction { healthy, required } => {
                write!(f, "minHealthyFraction: {healthy} healthy chips, policy requires {required}")
            }
            Infeasibility::Capacity { group, expert, healthy_chips } => write!(
                f,
                "capacity: expert {expert} lost every replica and none of the {healthy_chips} healthy chips of group {group} has memory for it"
            ),
        }
    }
}

/// Load balance and redundancy of a placement, over healthy chips.
///
/// A replica carries `expert load / replicas of that expert in the group` (tokens split evenly
/// over replicas). Every MoE layer's all-to-all is a barrier, so a group's step takes, per layer,
/// as long as that layer's most loaded chip: `stepInflation` is Σ over layers of the most loaded
/// healthy chip's load in that layer, over Σ over layers of the mean healthy-chip load in that
/// layer (1.0 is perfect), for the worst group. `maxMeanLoad` sums a chip's load over all its
/// layers first and is kept as a secondary figure (it hides per-layer imbalance).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoadStats {
    /// The objective: the worst group's Σ_layer max-chip load / Σ_layer mean-chip load.
    #[serde(default = "one")]
    pub step_inflation: f64,
    /// The group with the highest step inflation.
    #[serde(default)]
    pub worst_group: u32,
    /// The worst group's step inflation in each pipeline stage, in stage order.
    #[serde(default)]
    pub stage_step_inflation: Vec<f64>,
    /// Highest chip load (summed over the chip's layers).
    pub max_chip_load: f64,
    /// Mean load over healthy chips.
    pub mean_chip_load: f64,
    /// `maxChipLoad / meanChipLoad` over the whole job (1.0 when there is no load).
    pub max_mean_load: f64,
    /// Fewest replicas (loaded or pending, on healthy chips) of any expert in any group.
    pub replicas_min: u32,
    /// Fewest live replicas (loaded, on healthy chips) of any expert in any group; 0 means a
    /// reshard is outstanding.
    pub live_replicas_min: u32,
    /// Healthy chips counted.
    pub healthy_chips: u64,
}

fn one() -> f64 {
    1.0
}

/// One group's per-layer figures: Σ_layer max and Σ_layer mean over its healthy chips.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LayerBalance {
    /// Σ over the group's layers of the most loaded healthy chip's load in that layer.
    pub sum_max: f64,
    /// Σ over the group's layers of the mean healthy-chip load in that layer.
    pub sum_mean: f64,
}

impl LayerBalance {
    /// `sum_max / sum_mean`, 1.0 without load.
    pub fn inflation(&self) -> f64 {
        if self.sum_mean > 0.0 { self.sum_max / self.sum_mean } else { 1.0 }
    }

    /// Measures per-layer loads `loads[layer][chip]` over the chips with `up[chip]`.
    pub fn of(loads: &[Vec<f64>], up: &[bool]) -> Self {
        let healthy = up.iter().filter(|u| **u).count();
        if healthy == 0 {
            return Self::default();
        }
        let mut out = Self::default();
        for row in loads {
            let (mut max, mut sum) = (0.0f64, 0.0f64);
            for (&l, _) in row.iter().zip(up).filter(|(_, u)| **u) {
                max = max.max(l);
                sum += l;
            }
            out.sum_max += max;
            out.sum_mean += sum / healthy as f64;
        }
        out
    }
}

impl LoadStats {
    /// Measures a placement. `O(replicas + layers x chips)`.
    pub fn measure(
        shape: &PlacementShape,
        placement: &Placement,
        failed: &FailedChips,
        load: &ExpertLoad,
    ) -> Self {
        let dense = load.dense();
        let experts = shape.experts();
        let (mut max, mut sum, mut healthy) = (0.0f64, 0.0f64, 0u64);
        let (mut replicas_min, mut live_min) = (u32::MAX, u32::MAX);
        let (mut worst, mut worst_group) = (f64::NEG_INFINITY, 0u32);
        let mut stages = vec![f64::NEG_INFINITY; shape.pipeline_stages.max(1) as usize];
        let mut counts = vec![0u32; experts];
        let mut live = vec![0u32; experts];
        for g in &placement.groups {
            let range = shape.group_experts(g.index);
            if range.end > experts {
                continue; // a placement of another shape; `check` reports it
            }
            counts[range.clone()].iter_mut().for_each(|c| *c = 0);
            live[range.clone()].iter_mut().for_each(|c| *c = 0);
            let pending: BTreeSet<_> = g.pending.iter().map(|m| (m.to, m.expert)).collect();
            let up: Vec<bool> =
                (0..g.chips.len()).map(|l| !failed.contains(shape.chip_at(g.index, l))).collect();
            for (local, hosted) in g.chips.iter().enumerate().filter(|(l, _)| up[*l]) {
                let chip = shape.chip_at(g.index, local);
                for &e in hosted {
                    let i = shape.expert_index(e);
                    counts[i] += 1;
                    if pending.is_empty() || !pending.contains(&(chip, e)) {
                        live[i] += 1;
                    }
                }
            }
            replicas_min = replicas_min.min(counts[range.clone()].iter().copied().min().unwrap_or(0));
            live_min = live_min.min(live[range.clone()].iter().copied().min().unwrap_or(0));
            let first = range.start / shape.routed_experts.max(1) as usize;
            let mut layers = vec![vec![0.0; g.chips.len()]; shape.layers_per_stage() as usize];
            for (local, hosted) in g.chips.iter().enumerate().filter(|(l, _)| up[*l]) {
                let mut chip_load = 0.0;
                for &e in hosted {
                    let i = shape.expert_index(e);
                    let w = dense[i] / f64::from(counts[i].max(1));
                    chip_load += w;
                    if let Some(row) = layers.get_mut((e.layer as usize).wrapping_sub(first)) {
                        row[local] += w;
                    }
                }
                max = max.max(chip_load);
                sum += chip_load;
                healthy += 1;
            }
            let inflation = LayerBalance::of(&layers, &up).inflation();
            if inflation > worst {
                (worst, worst_group) = (inflation, g.index);
            }
            if let Some(s) = stages.get_mut(shape.stage_of_group(g.index) as usize) {
                *s = s.max(inflation);
            }
        }
        let mean = if healthy == 0 { 0.0 } else { sum / healthy as f64 };
        Self {
            step_inflation: if worst.is_finite() { worst } else { 1.0 },
            worst_group,
            stage_step_inflation: stages.into_iter().map(|s| if s.is_finite() { s } else { 1.0 }).collect(),
            max_chip_load: max,
            mean_chip_load: mean,
            max_mean_load: if mean > 0.0 { max / mean } else { 1.0 },
            replicas_min: if replicas_min == u32::MAX { 0 } else { replicas_min },
            live_replicas_min: if live_min == u32::MAX { 0 } else { live_min },
            healthy_chips: healthy,
        }
    }
}

/// What changing from one placement generation to the next needs, and what it achieves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPlan {
    /// The generation planned from.
    pub from_generation: u64,
    /// The generation this plan produces (equal to `fromGeneration` when infeasible).
    pub generation: u64,
    /// The recovery tier needed.
    pub tier: Tier,
    /// New loads this plan adds, in group then chip order.
    pub moves: Vec<Move>,
    /// Loads published earlier and still outstanding (a failure during a reshard), with their
    /// source replaced when the old source failed. `moves` and `carried` together are every load
    /// the new generation waits for.
    pub carried: Vec<Move>,
    /// Replicas not re-created because no healthy chip had both memory and a free failure
    /// domain for them; their experts keep fewer replicas than requested (but at least one).
    pub dropped: Vec<ExpertId>,
    /// Spare replicas removed to make room for an expert that had lost every replica (chips
    /// full); their experts keep at least one replica.
    pub evicted: Vec<ExpertId>,
    /// Replicas removed because every replica of their expert ended up in one failure domain
    /// (where they protect nothing against that domain's loss); one replica stays.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged: Vec<ExpertId>,
    /// Replicas moved by this plan (`moves.len()`).
    pub experts_moved: u64,
    /// State bytes moved by this plan.
    pub bytes_moved: u64,
    /// Replicas that any plan must move: those on the failed chips that the redundancy policy
    /// re-creates (every one under `Restore`; one per expert left without replicas under
    /// `Defer`).
    pub lower_bound_experts: u64,
    /// Bytes of `lowerBoundExperts`.
    pub lower_bound_bytes: u64,
    /// Replicas moved from chip to chip to rebalance load (included in `moves`).
    pub rebalance_moves: u64,
    /// Groups re-planned, in order.
    pub groups: Vec<u32>,
    /// Balance and redundancy of the resulting placement (of the current one when infeasible).
    pub stats: LoadStats,
}

impl RecoveryPlan {
    /// Loads that read the checkpoint (non-empty means a rollback).
    pub fn checkpoint_loads(&self) -> impl Iterator<Item = &Move> {
        self.moves.iter().chain(&self.carried).filter(|m| m.source == Source::Checkpoint)
    }
}
