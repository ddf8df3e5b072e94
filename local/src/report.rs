//! The run report: `report.json` and the charts, from what really happened.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;
use crate::svg::{Chart, Marker};

/// One recovery as reported.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RecoveryEntry {
    /// What failed: the fault kind (`chip`, `node`, `worker`, `hang`, `flap`) and its target.
    pub trigger: String,
    /// The rung that recovered it (`reroute`, `reshard`, `restore`, `replace`, `shrink`).
    pub tier: String,
    /// Fault → detection, seconds (`null` when the fault time is unknown).
    pub detect_s: Option<f64>,
    /// Detection → training resumed, seconds.
    pub resume_s: f64,
    /// Completed steps discarded by a rollback.
    pub steps_lost: u64,
    /// Where the resumed state came from: `memory` (no rollback), `peer` (an in-memory peer
    /// snapshot, no disk read) or `checkpoint` (the disk checkpoint).
    #[serde(default)]
    pub source: String,
    /// Run time (seconds since start) training resumed, for the charts.
    pub at_s: f64,
}

/// One observation of training progress.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Seconds since the run started.
    pub t: f64,
    /// The step just completed.
    pub step: u64,
    /// Its loss.
    pub loss: f64,
    /// Its throughput.
    pub tokens_per_s: f64,
}

/// A rebalance generation the brain published for the load the members measured.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RebalanceEntry {
    /// The generation.
    pub generation: u64,
    /// The step it was decided at.
    pub step: u64,
    /// Step inflation (Σ over layers of the most loaded chip / Σ of the mean) of the placement
    /// it replaced, under the load measured then (the members' token counts, smoothed).
    pub step_inflation_before: f64,
    /// The same figure for the new placement under the load measured until the end of the run.
    pub step_inflation_after: f64,
    /// What the brain predicted for the new placement when it decided.
    pub predicted: f64,
    /// Expert replicas copied from live holders.
    pub replicas_moved: u64,
    /// Mean training throughput (tokens/s) over the steps before and after it, as measured by
    /// the members (same number of steps each side, the join itself left out).
    pub tokens_per_s_before: Option<f64>,
    /// See `tokens_per_s_before`.
    pub tokens_per_s_after: Option<f64>,
}

/// `report.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Report {
    /// Every recovery, in order.
    pub recoveries: Vec<RecoveryEntry>,
    /// Productive step time / wall time (see [`goodput`]).
    pub goodput: f64,
    /// Loss of the last step.
    pub final_loss: Option<f64>,
    /// Whether the final parameters equal the uninterrupted reference run's (`null` when no
    /// reference was run).
    pub params_match: Option<bool>,
    /// Largest absolute difference of any parameter from the reference (`0` when equal).
    pub max_abs_diff: Option<f64>,
    /// Last step reached.
    pub steps: u64,
    /// Wall time of the run, seconds.
    pub wall_s: f64,
    /// Digest of the final parameters.
    pub params_sha256: Option<String>,
    /// Digest of the reference run's final parameters.
    pub reference_sha256: Option<String>,
    /// The faults injected, as written in the schedule.
    pub faults: Vec<String>,
    /// Rebalance generations for measured load, in order.
    #[serde(default)]
    pub rebalances: Vec<RebalanceEntry>,
    /// Control-plane outages the brain rode out without deciding.
    #[serde(default)]
    pub control_plane_outages: Vec<OutageEntry>,
}

/// One control-plane outage, as the run saw it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct OutageEntry {
    /// `StoreUnreachable` or `MassDisappearance` (the first cause seen).
    pub reason: String,
    /// Seconds after the run started that decisions froze.
    pub at_s: f64,
    /// How long decisions stayed frozen (`null`: still frozen when the run ended).
    pub frozen_s: Option<f64>,
}

/// Productive step time over wall time.
///
/// A step's time is the gap since the previous sample when that sample was the step before it
/// (a restart or rollback breaks the chain: the gap is not productive). A step completed again
/// after a rollback replaces its earlier time, so work that was thrown away does not count.
pub fn goodput(samples: &[Sample], wall_s: f64) -> f64 {
    if wall_s <= 0.0 {
        return 0.0;
    }
    let mut kept: BTreeMap<u64, f64> = BTreeMap::new();
    let mut last_step = None;
    for pair in samples.windows(2) {
        let (prev, cur) = (pair[0], pair[1]);
        if cur.step == prev.step + 1 && cur.t >= prev.t {
            kept.insert(cur.step, cur.t - prev.t);
        } else {
            kept.remove(&cur.step);
        }
        last_step = Some(cur.step);
    }
    // Steps past the final one were rolled back and never redone.
    if let Some(last) = last_step {
        kept.retain(|&s, _| s <= last);
    }
    (kept.values().sum::<f64>() / wall_s).clamp(0.0, 1.0)
}

/// Compares two parameter sets by name: `(equal, max |a - b|)`; a name present in only one, or
/// of different length, is a mismatch with an infinite difference.
pub fn compare_params(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> (bool, f64) {
    let mut max = 0.0f64;
    let mut equal = a.len() == b.len();
    for (name, x) in a {
        let Some(y) = b.get(name).filter(|y| y.len() == x.len()) else {
            return (false, f64::INFINITY);
        };
        for (p, q) in x.iter().zip(y) {
            if p.to_bits() != q.to_bits() {
                equal = false;
                max = max.max((f64::from(*p) - f64::from(*q)).abs());
            }
        }
    }
    if !equal && max == 0.0 && a.len() != b.len() {
        max = f64::INFINITY;
    }
    (equal, max)
}

impl Report {
    /// Writes `report.json`, `loss.svg` and `throughput.svg` into `dir` (created if missing);
    /// returns the paths written.
    pub fn write(&self, dir: &Path, samples: &[Sample]) -> Result<Vec<PathBuf>, RuntimeError> {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io(dir, e))?;
        let markers: Vec<Marker> = self
            .recoveries
            .iter()
            .map(|r| Marker { x: r.at_s, label: format!("{} → {}", r.trigger, r.tier) })
            .collect();
        let loss = Chart {
            title: "Training loss".into(),
            x_label: "seconds".into(),
            y_label: "loss".into(),
            points: samples.iter().map(|s| (s.t, s.loss)).collect(),
            markers: markers.clone(),
        };
        let throughput = Chart {
            title: "Throughput".into(),
            x_label: "seconds".into(),
            y_label: "tokens/s".into(),
            points: samples.iter().map(|s| (s.t, s.tokens_per_s)).collect(),
            markers,
        };
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| RuntimeError::io(dir, std::io::Error::other(e)))?;
        let files =
            [("report.json", json), ("loss.svg", loss.to_svg()), ("throughput.svg", throughput.to_svg())];
        let mut written = Vec::new();
        for (name, body) in files {
            let path = dir.join(name);
            std::fs::write(&path, body).map_err(|e| RuntimeError::io(&path, e))?;
            written.push(path);
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: f64, step: u64) -> Sample {
        Sample { t, step, loss: 5.0 - step as f64 * 0.01, tokens_per_s: 1000.0 }
    }

    #[test]
    fn goodput_counts_kept_steps_only() {
        // Steps 1..=4 at 1 s each, then a 3 s outage and a rollback to step 2, then 3..=5.
        let samples = [
            s(0.0, 0),
            s(1.0, 1),
            s(2.0, 2),
            s(3.0, 3),
            s(4.0, 4),
            s(7.0, 2),
            s(8.0, 3),
            s(9.0, 4),
            s(10.0, 5),
        ];
        // Kept: 1, 2 (1 s each; step 2 re-reported at 7.0 is a restart, not a redo: its old
        // time is dropped), 3, 4, 5 (redone: 1 s each) → 4 s productive out of 10.
        let g = goodput(&samples, 10.0);
        assert!((g - 0.4).abs() < 1e-9, "{g}");
        let smooth: Vec<Sample> = (0..=10).map(|i| s(i as f64, i)).collect();
        assert!((goodput(&smooth, 10.0) - 1.0).abs() < 1e-9);
        assert_eq!(goodput(&[], 0.0), 0.0);
    }

    #[test]
    fn parameter_comparison_is_bitwise_with_the_largest_difference() {
        let a = BTreeMap::from([("w".to_string(), vec![1.0f32, 2.0]), ("b".to_string(), vec![0.5])]);
        assert_eq!(compare_params(&a, &a.clone()), (true, 0.0));
        let mut b = a.clone();
        b.insert("w".into(), vec![1.0, 2.25]);
        assert_eq!(compare_params(&a, &b), (false, 0.25));
        let mut c = a.clone();
        c.remove("b");
        assert_eq!(compare_params(&a, &c), (false, f64::INFINITY));
    }

    #[test]
    fn writes_the_json_fields_the_issue_names_and_two_charts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = Report {
            recoveries: vec![RecoveryEntry {
                trigger: "chip:1/3".into(),
                tier: "reroute".into(),
                detect_s: Some(0.3),
                resume_s: 0.8,
                steps_lost: 0,
                source: "memory".into(),
                at_s: 2.0,
            }],
            goodput: 0.9,
            final_loss: Some(2.5),
            params_match: Some(true),
            max_abs_diff: Some(0.0),
            steps: 10,
            wall_s: 11.0,
            params_sha256: None,
            reference_sha256: None,
            faults: vec!["chip:1/3@5".into()],
            rebalances: Vec::new(),
            control_plane_outages: Vec::new(),
        };
        let samples: Vec<Sample> = (0..=10).map(|i| s(i as f64, i)).collect();
        let written = report.write(dir.path(), &samples).expect("write");
        assert_eq!(written.len(), 3);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).expect("read"))
                .expect("json");
        for key in ["recoveries", "goodput", "final_loss", "params_match", "max_abs_diff"] {
            assert!(json.get(key).is_some(), "{key}");
        }
        for key in ["trigger", "tier", "detect_s", "resume_s", "steps_lost", "source"] {
            assert!(json["recoveries"][0].get(key).is_some(), "{key}");
        }
        let svg = std::fs::read_to_string(dir.path().join("loss.svg")).expect("svg");
        assert!(svg.starts_with("<svg") && svg.contains("chip:1/3 → reroute"));
    }
}
