//! What the members' step lines say: progress, the final digest, and how long each recovery
//! really took to resume.

use ninelives_core::member_output::MemberLine;

use crate::effects::Resuming;
use crate::report::{RecoveryEntry, Sample};

/// The training progress seen so far.
#[derive(Clone, Debug, Default)]
pub(crate) struct Training {
    /// Every step line taken, in order.
    pub samples: Vec<Sample>,
    /// The generation each sample was taken under (parallel to `samples`).
    generations: Vec<u64>,
    /// (generation, step) of the newest step line taken: members print every step, and after a
    /// rollback the steps start lower again under a newer generation.
    newest: (u64, u64),
    pub last_step: u64,
    pub last_loss: Option<f64>,
    pub last_tps: Option<f64>,
    pub digest: Option<String>,
}

impl Training {
    /// Takes one line of a member that has joined `generation`, at run time `t`; returns the
    /// generation the line says the member joined, if it is a join line.
    pub fn take(&mut self, generation: u64, line: &str, t: f64) -> Option<u64> {
        match MemberLine::parse(line)? {
            MemberLine::Joined { generation, .. } => return Some(generation),
            // Every member prints every step; the first line of a (generation, step) counts.
            MemberLine::Step(s) if (generation, s.step) > self.newest => {
                self.newest = (generation, s.step);
                self.samples.push(Sample { t, step: s.step, loss: s.loss, tokens_per_s: s.tokens_per_s });
                self.generations.push(generation);
                self.last_step = s.step;
                self.last_loss = Some(s.loss);
                self.last_tps = Some(s.tokens_per_s);
            }
            MemberLine::Digest(hex) => self.digest = Some(hex),
            _ => {}
        }
        None
    }

    /// The report entry of a recovery once training resumed after it (`None`: not yet).
    /// `start_unix` is the run's start, to compare step lines with the brain's unix times.
    pub fn resumed(&self, r: &Resuming, start_unix: f64) -> Option<RecoveryEntry> {
        let unix = |s: &Sample| start_unix + s.t;
        let samples = &self.samples;
        // The first step of the generation that resumed: a step line of the old generation may
        // be read only after the brain saw the recovery complete, and it resumed nothing.
        let i = samples
            .iter()
            .zip(&self.generations)
            .position(|(s, &g)| g >= r.record.generation && unix(s) >= r.record.resumed_at)?;
        let first = samples[i];
        // Work thrown away: the newest step reached before the fault was detected, minus the
        // step training went on from. Split at detection, not at completion: a restore is
        // acknowledged only after the restarted worker's first step, so that step belongs to
        // "after".
        let d = samples.iter().position(|s| unix(s) >= r.record.detected_at).unwrap_or(i);
        let before = samples[..d].iter().map(|s| s.step).max().unwrap_or(0);
        // The lowest step between detection and resume: a worker may still finish a step after
        // detection before it is restarted from an older checkpoint.
        let resumed_from =
            samples[d.min(i)..=i].iter().map(|s| s.step).min().unwrap_or(first.step).saturating_sub(1);
        Some(RecoveryEntry {
            trigger: r.trigger.clone(),
            tier: r.record.tier.as_str().to_string(),
            detect_s: r.detect_s,
            resume_s: (unix(&first) - r.record.detected_at).max(0.0),
            steps_lost: before.saturating_sub(resumed_from),
            source: r.record.source.as_str().to_string(),
            at_s: first.t,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use ninelives_core::recovery::{CompletedRecovery, RestoreSource, Rung, TriggerKind};

    use super::*;

    fn step(step: u64) -> String {
        format!(
            "step={step} loss=2.5000 tokens_per_s=1000 lr=1.000e-3 grad_norm=0.500 balance=1.0000 z=0.1000"
        )
    }

    #[test]
    fn a_rollback_counts_the_steps_thrown_away() {
        let mut tr = Training::default();
        assert_eq!(tr.take(0, "joined generation=1 tier=initial step=0 members=[0] experts=8", 0.0), Some(1));
        for s in 1..=12 {
            tr.take(1, &step(s), f64::from(u32::try_from(s).unwrap()));
        }
        tr.take(1, &step(12), 12.5); // another member's copy of the same step
        assert_eq!(tr.samples.len(), 12);
        // Rolled back to checkpoint 10 under generation 2: steps 11.. again.
        for (t, s) in [(15.0, 11), (16.0, 12), (17.0, 13)] {
            tr.take(2, &step(s), t);
        }
        let record = CompletedRecovery {
            id: 1,
            kind: TriggerKind::Worker,
            trigger: "worker 1".into(),
            triggers: vec![],
            tier: Rung::Restore,
            plan_tier: "reshard".into(),
            fault_at: None,
            detected_at: 1000.0 + 12.8,
            resumed_at: 1000.0 + 15.0,
            detect_s: None,
            resume_s: 2.2,
            steps_lost: 2,
            rollback_to: Some(10),
            source: RestoreSource::Peer { step: 10 },
            generation: 2,
            escalations: 0,
            experts_moved: 0,
        };
        let r = Resuming { record, trigger: "worker:1".into(), detect_s: Some(0.1) };
        let entry = tr.resumed(&r, 1000.0).unwrap();
        assert_eq!((entry.steps_lost, entry.tier.as_str(), entry.source.as_str()), (2, "restore", "peer"));
        assert!((entry.resume_s - 2.2).abs() < 1e-9);
        let mut early = r.clone();
        early.record.resumed_at = 2000.0;
        assert!(tr.resumed(&early, 1000.0).is_none(), "not resumed yet");
        tr.take(2, &format!("params_sha256={}", "0f".repeat(32)), 18.0);
        assert_eq!(tr.digest.as_deref(), Some("0f".repeat(32).as_str()));
    }

    #[test]
    fn an_old_generations_step_read_late_does_not_count_as_the_resume() {
        let mut tr = Training::default();
        for s in 1..=12 {
            tr.take(1, &step(s), f64::from(u32::try_from(s).unwrap()));
        }
        // Generation 2 restarts from step 0; a member's step 13 of generation 1 is read only
        // after the brain recorded the recovery complete (t = 12.9 > resumed_at).
        tr.take(1, &step(13), 12.9);
        for (t, s) in [(13.0, 1), (13.5, 2)] {
            tr.take(2, &step(s), t);
        }
        let record = CompletedRecovery {
            id: 1,
            kind: TriggerKind::Chip,
            trigger: "chip node-1/3".into(),
            triggers: vec![],
            tier: Rung::Reshard,
            plan_tier: "reshard".into(),
            fault_at: None,
            detected_at: 1000.0 + 12.2,
            resumed_at: 1000.0 + 12.8,
            detect_s: None,
            resume_s: 0.6,
            steps_lost: 12,
            rollback_to: None,
            source: RestoreSource::Checkpoint { step: 0 },
            generation: 2,
            escalations: 0,
            experts_moved: 0,
        };
        let r = Resuming { record, trigger: "chip:1/3".into(), detect_s: Some(0.1) };
        let entry = tr.resumed(&r, 1000.0).unwrap();
        assert_eq!(entry.steps_lost, 12, "rolled back to step 0");
        assert!((entry.resume_s - 0.8).abs() < 1e-9, "{}", entry.resume_s);
    }
}
