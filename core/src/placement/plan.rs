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
/// Chip load is the sum over hosted replicas of `expert load / replicas of that expert in the
/// group` (tokens split evenly over replicas); `maxMeanLoad` is the job's step-time inflation
/// from imbalance (1.0 is perfect).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoadStats {
    /// Highest chip load.
    pub max_chip_load: f64,
    /// Mean load over healthy chips.
    pub mean_chip_load: f64,
    /// `maxChipLoad / meanChipLoad` (1.0 when there is no load).
    pub max_mean_load: f64,
    /// Fewest replicas (loaded or pending, on healthy chips) of any expert in any group.
    pub replicas_min: u32,
    /// Fewest live replicas (loaded, on healthy chips) of any expert in any group; 0 means a
    /// reshard is outstanding.
    pub live_replicas_min: u32,
    /// Healthy chips counted.
    pub healthy_chips: u64,
}

impl LoadStats {
    /// Measures a placement. `O(replicas)`.
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
        let mut counts = vec![0u32; experts];
        let mut live = vec![0u32; experts];
        for g in &placement.groups {
            counts.iter_mut().for_each(|c| *c = 0);
            live.iter_mut().for_each(|c| *c = 0);
            let pending: BTreeSet<_> = g.pending.iter().map(|m| (m.to, m.expert)).collect();
            let up = |local: usize| !failed.contains(shape.chip_at(g.index, local));
            for (local, hosted) in g.chips.iter().enumerate().filter(|(l, _)| up(*l)) {
                let chip = shape.chip_at(g.index, local);
                for &e in hosted {
                    let i = shape.expert_index(e);
                    counts[i] += 1;
                    if pending.is_empty() || !pending.contains(&(chip, e)) {
                        live[i] += 1;
                    }
                }
            }
            replicas_min = replicas_min.min(counts.iter().copied().min().unwrap_or(0));
            live_min = live_min.min(live.iter().copied().min().unwrap_or(0));
            for (_, hosted) in g.chips.iter().enumerate().filter(|(l, _)| up(*l)) {
                let chip_load: f64 = hosted
                    .iter()
                    .map(|&e| shape.expert_index(e))
                    .map(|i| dense[i] / f64::from(counts[i]))
                    .sum();
                max = max.max(chip_load);
                sum += chip_load;
                healthy += 1;
            }
        }
        let mean = if healthy == 0 { 0.0 } else { sum / healthy as f64 };
        Self {
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
