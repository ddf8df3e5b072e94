//! Per-expert load: tokens routed to each logical expert, as the worker measures it.

use serde::{Deserialize, Serialize};

use super::error::PlanError;
use super::ids::ExpertId;
use super::shape::PlacementShape;

/// Tokens routed to each expert, one row per layer (`load[layer][expert]`).
///
/// Serialised as a bare JSON array of arrays, which is also the `ninelives plan --load FILE`
/// format: `[[12.0, 3.5, ...], [...], ...]`, `layers` rows of `routedExperts` non-negative numbers.
/// Only ratios matter; units are whatever the worker counts. The same table applies to every
/// expert-parallel group (the worker aggregates its counters over groups).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(transparent)]
pub struct ExpertLoad {
    layers: Vec<Vec<f64>>,
}

impl ExpertLoad {
    /// Every expert equally loaded (what the planner assumes before the worker has measured).
    pub fn uniform(shape: &PlacementShape) -> Self {
        Self { layers: vec![vec![1.0; shape.routed_experts as usize]; shape.layers as usize] }
    }

    /// A Zipf(`s`) load per layer: the expert of rank `r` (1-based) gets weight `1 / r^s`, ranks
    /// assigned by a seeded shuffle so each layer has different hot experts. Each layer's mean is
    /// 1.0. Equal `(shape, s, seed)` give equal tables on every platform.
    pub fn zipf(shape: &PlacementShape, s: f64, seed: u64) -> Self {
        let n = shape.routed_experts as usize;
        let layers = (0..shape.layers)
            .map(|layer| {
                let mut rng = SplitMix64::new(seed ^ u64::from(layer).wrapping_mul(0xA076_1D64_78BD_642F));
                let mut order: Vec<usize> = (0..n).collect();
                // Fisher-Yates with the in-crate generator, so the table is reproducible.
                for i in (1..n).rev() {
                    let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                    order.swap(i, j);
                }
                let mut row = vec![0.0; n];
                for (rank, &expert) in order.iter().enumerate() {
                    row[expert] = 1.0 / ((rank + 1) as f64).powf(s);
                }
                let total: f64 = row.iter().sum();
                row.iter_mut().for_each(|x| *x *= n as f64 / total);
                row
            })
            .collect();
        Self { layers }
    }

    /// A table from explicit rows; checked with [`ExpertLoad::validate`] by every planner call.
    pub fn from_rows(layers: Vec<Vec<f64>>) -> Self {
        Self { layers }
    }

    /// The rows, one per layer.
    pub fn rows(&self) -> &[Vec<f64>] {
        &self.layers
    }

    /// Load of one expert (0 for an id outside the table).
    pub fn get(&self, e: ExpertId) -> f64 {
        self.layers.get(e.layer as usize).and_then(|r| r.get(e.expert as usize)).copied().unwrap_or(0.0)
    }

    /// Checks the table has the model's shape and only finite, non-negative values.
    pub fn validate(&self, shape: &PlacementShape) -> Result<(), PlanError> {
        if self.layers.len() != shape.layers as usize {
            return Err(PlanError::LoadShape {
                expected: format!("{} layers", shape.layers),
                found: format!("{} layers", self.layers.len()),
            });
        }
        for (layer, row) in self.layers.iter().enumerate() {
            if row.len() != shape.routed_experts as usize {
                return Err(PlanError::LoadShape {
                    expected: format!("{} experts per layer", shape.routed_experts),
                    found: format!("{} experts in layer {layer}", row.len()),
                });
            }
            if let Some((expert, &value)) = row.iter().enumerate().find(|(_, v)| !v.is_finite() || **v < 0.0)
            {
                return Err(PlanError::BadLoad { expert: ExpertId::new(layer as u32, expert as u32), value });
            }
        }
        Ok(())
    }

    /// Loads in dense expert order (see [`PlacementShape::expert_index`]).
    pub(crate) fn dense(&self) -> Vec<f64> {
        self.layers.iter().flatten().copied().collect()
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a tiny, fast, well-mixed generator. Used instead of
/// an external crate so seeded loads are identical across platforms and dependency upgrades.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
