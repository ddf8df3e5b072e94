//! The failure trace: seeded, so every policy sees the same faults at the same times.

use serde::Serialize;

use super::model::FaultModel;
use crate::fault_schedule::FaultKind;
use crate::placement::SplitMix64;

/// One fault of the trace.
#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// Seconds since the start of the run.
    pub at: f64,
    /// What fails.
    pub kind: FaultKind,
    /// Node index in the job at that moment (a spare may have taken it over).
    pub node: u32,
    /// Chip index on the node, for chip-level faults.
    pub chip: Option<u32>,
}

/// Draws the faults of `model` over `horizon_s` seconds on `nodes` × `chips_per_node` chips,
/// deterministically from `seed`, in time order. Each kind is a Poisson process; targets are
/// uniform.
pub fn generate(
    model: &FaultModel,
    horizon_s: f64,
    nodes: u32,
    chips_per_node: u32,
    seed: u64,
) -> Vec<Fault> {
    let mut rng = SplitMix64::new(seed);
    let mut faults = Vec::new();
    for (&kind, &mean) in &model.mean_interval_s {
        let mut t = 0.0;
        loop {
            t += exponential(&mut rng, mean);
            if t >= horizon_s {
                break;
            }
            let node = below(&mut rng, nodes);
            let chip = kind.targets_chip().then(|| below(&mut rng, chips_per_node));
            faults.push(Fault { at: t, kind, node, chip });
        }
    }
    faults.sort_by(|a, b| a.at.total_cmp(&b.at).then(a.kind.cmp(&b.kind)));
    faults
}

/// A uniform draw in `(0, 1]`.
fn unit(rng: &mut SplitMix64) -> f64 {
    ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
}

fn exponential(rng: &mut SplitMix64, mean: f64) -> f64 {
    -unit(rng).ln() * mean
}

fn below(rng: &mut SplitMix64, n: u32) -> u32 {
    if n == 0 {
        return 0;
    }
    u32::try_from(rng.next_u64() % u64::from(n)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::model::DEFAULT_MIX;

    #[test]
    fn traces_are_seeded_sorted_and_match_the_rate() {
        let model = FaultModel::every(300.0, &DEFAULT_MIX).expect("valid model");
        let week = 7.0 * 86_400.0;
        let a = generate(&model, week, 6250, 8, 7);
        assert_eq!(a, generate(&model, week, 6250, 8, 7));
        assert_ne!(a, generate(&model, week, 6250, 8, 8));
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at));
        // 2,016 expected; a Poisson count's sd is ~45.
        assert!((1800..2250).contains(&a.len()), "{} faults", a.len());
        let nodes = a.iter().filter(|f| f.kind == FaultKind::Node).count() as f64;
        assert!((nodes / a.len() as f64 - 88.0 / 419.0).abs() < 0.04);
        assert!(a.iter().all(|f| f.node < 6250 && f.chip.is_none_or(|c| c < 8)));
        assert!(a.iter().all(|f| f.kind.targets_chip() == f.chip.is_some()));
    }
}
