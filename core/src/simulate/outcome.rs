//! What one policy achieved over the simulated window.

use std::collections::BTreeMap;

use serde::Serialize;

use super::model::Policy;

/// Recoveries that ended on one tier, and the wall time they took (detection excluded).
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TierTime {
    /// Recoveries.
    pub count: u64,
    /// Seconds from detection to training resumed.
    pub seconds: f64,
}

/// The result of one policy on the shared fault trace.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyOutcome {
    /// The policy.
    pub policy: Policy,
    /// Effective training time ratio: time of the steps kept / wall time.
    pub ettr: f64,
    /// Steps kept per wall-clock hour.
    pub goodput_steps_per_hour: f64,
    /// Steps done and kept at the end of the window.
    pub steps_kept: f64,
    /// Steps computed and then rolled back (the interrupted step included).
    pub steps_lost: f64,
    /// Faults that interrupted training.
    pub interruptions: u64,
    /// Recoveries by the tier that ended them (`restart` for checkpoint-restart).
    pub tiers: BTreeMap<String, TierTime>,
    /// Rollbacks served by the disk checkpoint.
    pub disk_rollbacks: u64,
    /// Rollbacks served by peer (in-memory) copies.
    pub peer_rollbacks: u64,
    /// Seconds from faults to their detection while training stood still.
    pub detection_s: f64,
    /// Seconds of computing later rolled back.
    pub lost_work_s: f64,
    /// Seconds training paused for disk checkpoints.
    pub checkpoint_pause_s: f64,
    /// Seconds after the brain failed the job, or in a recovery still open at the end.
    pub dead_s: f64,
    /// Checkpoints skipped because the previous one was still being written.
    pub checkpoints_skipped: u64,
    /// Why the brain failed the job, if it did.
    pub job_failed: Option<String>,
    /// `decide` calls made.
    pub decisions: u64,
    /// (hours, steps kept so far) along the run.
    pub progress: Vec<(f64, f64)>,
}

impl PolicyOutcome {
    /// Seconds spent in recoveries after detection, over all tiers.
    pub fn recovery_s(&self) -> f64 {
        self.tiers.values().map(|t| t.seconds).sum()
    }

    /// Wall time not producing kept steps, by cause, largest first:
    /// `(cause, seconds)` for detection, recovery, lost work, checkpoint pauses and dead time.
    pub fn losses(&self) -> Vec<(&'static str, f64)> {
        let mut v = vec![
            ("detection", self.detection_s),
            ("recovery", self.recovery_s()),
            ("lost work", self.lost_work_s),
            ("checkpoint pauses", self.checkpoint_pause_s),
            ("dead", self.dead_s),
        ];
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }
}
