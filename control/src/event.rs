//! Typed events — a completed recovery, a control-plane outage — each emitting its log line and
//! its metric together.

use ninelives_core::recovery::{CompletedRecovery, Outage, RestoreSource, Rung, TriggerKind};
use ninelives_telemetry::recovery::{RecoveryMetrics, RecoveryObservation};
use tracing::{info, warn};

/// A completed recovery as a runtime reports it. The operator reports the brain's own figures
/// ([`RecoveryEvent::from_record`]); the local runtime reports what its processes measured.
#[derive(Clone, Debug, PartialEq)]
pub struct RecoveryEvent {
    /// What failed, for people: `chip node-2/5 hbm-ecc-uncorrectable`, `chip:1/3`.
    pub trigger: String,
    /// What kind of fault it was (the metric's `trigger` label).
    pub kind: TriggerKind,
    /// The rung that recovered it.
    pub tier: Rung,
    /// Fault → detection, when the fault time is known.
    pub detect_s: Option<f64>,
    /// Detection → training resumed.
    pub resume_s: f64,
    /// Completed steps thrown away.
    pub steps_lost: u64,
    /// The generation that resumed training.
    pub generation: u64,
    /// Where the resumed state came from (memory, a peer snapshot, the disk checkpoint).
    pub source: RestoreSource,
}

impl RecoveryEvent {
    /// The brain's record of a recovery.
    pub fn from_record(r: &CompletedRecovery) -> Self {
        Self {
            trigger: r.trigger.clone(),
            kind: r.kind,
            tier: r.tier,
            detect_s: r.detect_s,
            resume_s: r.resume_s,
            steps_lost: r.steps_lost,
            generation: r.generation,
            source: r.source,
        }
    }

    /// One sentence for logs and Events.
    pub fn note(&self) -> String {
        let detected = self.detect_s.map(|d| format!("detected in {d:.1} s, ")).unwrap_or_default();
        let from = match self.source {
            RestoreSource::Memory => "state kept in memory".to_string(),
            RestoreSource::Peer { step } => format!("from peer memory at step {step}"),
            RestoreSource::Checkpoint { step } => format!("from checkpoint {step}"),
        };
        format!(
            "{} recovered by {} in {:.1} s ({detected}{} steps lost, {from}, generation {})",
            self.trigger,
            self.tier.as_str(),
            self.resume_s,
            self.steps_lost,
            self.generation
        )
    }

    /// Logs the recovery of job `namespace/name` and counts it in `metrics`.
    pub fn emit(&self, namespace: &str, name: &str, metrics: Option<&RecoveryMetrics>) {
        info!(
            job = %format!("{namespace}/{name}"),
            tier = self.tier.as_str(),
            trigger = self.kind.as_str(),
            resume_s = self.resume_s,
            steps_lost = self.steps_lost,
            source = self.source.as_str(),
            generation = self.generation,
            "{}",
            self.note()
        );
        if let Some(m) = metrics {
            m.recovery(
                namespace,
                name,
                &RecoveryObservation {
                    tier: self.tier.as_str(),
                    trigger: self.kind.as_str(),
                    detect_s: self.detect_s,
                    resume_s: self.resume_s,
                    steps_lost: self.steps_lost,
                    source: self.source.as_str(),
                },
            );
        }
    }
}

/// The control plane became degraded (`outage`), or healthy again after `frozen_s` seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OutageEvent<'a> {
    /// The outage in progress; `None` when it ended.
    pub outage: Option<&'a Outage>,
    /// How long decisions were frozen, when it ended.
    pub frozen_s: Option<f64>,
}

impl OutageEvent<'_> {
    /// Logs the change for job `namespace/name` and records it in `metrics`.
    pub fn emit(&self, namespace: &str, name: &str, metrics: Option<&RecoveryMetrics>) {
        let job = format!("{namespace}/{name}");
        match self.outage {
            Some(o) => {
                warn!(%job, reason = o.cause.reason(), "control plane degraded: {}; decisions frozen", o.cause)
            }
            None => {
                info!(%job, frozen_s = self.frozen_s.unwrap_or(0.0), "control plane healthy again; deciding")
            }
        }
        if let Some(m) = metrics {
            m.control_plane(namespace, name, self.outage.map(|o| o.cause.reason()));
        }
    }
}
