//! The job-level and recovery metrics of whoever drives the recovery brain (METRICS.md,
//! "Recovery brain"): the local runtime of `ninelives demo` and the operator, for every job it
//! drives.
//!
//! Every series carries `tj_namespace` and `trainingjob` (one job per label pair, never a rank,
//! a chip or a step), so the families stay bounded by the number of jobs.

use ninelives_core::keyspace::ChipState;
use ninelives_core::recovery::{BrainPhase, Observation, RecoveryState};
use prometheus::{CounterVec, GaugeVec, HistogramOpts, HistogramVec, Opts, Registry};

/// Seconds buckets for detection and resume: sub-second detection up to minute-long restores.
const SECONDS_BUCKETS: [f64; 14] =
    [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0];

/// Phases as the API names them (`status.phase`), for `ninelives_job_phase{phase}`.
const PHASES: [&str; 5] = ["Pending", "Running", "Recovering", "Succeeded", "Failed"];

/// Ladder rungs (`tier` label values).
const TIERS: [&str; 5] = ["reroute", "reshard", "restore", "replace", "shrink"];

/// `source` label values: where a recovery's resumed state came from.
const SOURCES: [&str; 3] = ["memory", "peer", "checkpoint"];

/// `trigger` label values.
const TRIGGERS: [&str; 6] = ["chip", "node", "worker", "hang", "flap", "other"];

const CHIP_STATES: [ChipState; 4] =
    [ChipState::Healthy, ChipState::Degraded, ChipState::Failed, ChipState::Quarantined];

/// The recovery brain's metrics, in their own registry.
#[derive(Clone, Debug)]
pub struct RecoveryMetrics {
    /// The registry to serve.
    pub registry: Registry,
    recoveries: CounterVec,
    detection: HistogramVec,
    resume: HistogramVec,
    steps_lost: CounterVec,
    sources: CounterVec,
    in_progress: GaugeVec,
    step: GaugeVec,
    loss: GaugeVec,
    goodput: GaugeVec,
    chips: GaugeVec,
    min_healthy: GaugeVec,
    generation: GaugeVec,
    phase: GaugeVec,
    checkpoint_step: GaugeVec,
    checkpoint_time: GaugeVec,
    control_plane_degraded: GaugeVec,
    control_plane_outages: CounterVec,
}

/// One completed recovery, as measured.
#[derive(Clone, Copy, Debug)]
pub struct RecoveryObservation<'a> {
    /// Ladder rung that completed it (`reroute` … `shrink`).
    pub tier: &'a str,
    /// What caused it: `chip`, `node`, `worker`, `hang`, `flap` (anything else is `other`).
    pub trigger: &'a str,
    /// Fault → detection, when the fault time is known.
    pub detect_s: Option<f64>,
    /// Detection → training resumed.
    pub resume_s: f64,
    /// Steps recomputed.
    pub steps_lost: u64,
    /// Where the resumed state came from: `memory`, `peer`, `checkpoint` (anything else is
    /// counted as `checkpoint`, the conservative reading).
    pub source: &'a str,
}

/// The API phase name of a brain phase.
pub fn api_phase(phase: BrainPhase) -> &'static str {
    match phase {
        BrainPhase::Starting => "Pending",
        BrainPhase::Running => "Running",
        BrainPhase::Recovering => "Recovering",
        BrainPhase::Succeeded => "Succeeded",
        BrainPhase::Failed => "Failed",
    }
}

fn gauge(registry: &Registry, name: &str, help: &str, extra: &[&str]) -> prometheus::Result<GaugeVec> {
    let labels: Vec<&str> =
        ["tj_namespace", "trainingjob"].into_iter().chain(extra.iter().copied()).collect();
    let g = GaugeVec::new(Opts::new(name, help), &labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(registry: &Registry, name: &str, help: &str, extra: &[&str]) -> prometheus::Result<CounterVec> {
    let labels: Vec<&str> =
        ["tj_namespace", "trainingjob"].into_iter().chain(extra.iter().copied()).collect();
    let c = CounterVec::new(Opts::new(name, help), &labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(registry: &Registry, name: &str, help: &str) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec()),
        &["tj_namespace", "trainingjob", "tier"],
    )?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

impl RecoveryMetrics {
    /// Registers every family in a fresh registry.
    pub fn new() -> prometheus::Result<Self> {
        Self::with_registry(Registry::new())
    }

    /// Registers every family in `r` (the operator serves them beside its own).
    pub fn with_registry(r: Registry) -> prometheus::Result<Self> {
        Ok(Self {
            recoveries: counter(
                &r,
                "ninelives_recoveries_total",
                "Recoveries completed.",
                &["tier", "trigger"],
            )?,
            detection: histogram(
                &r,
                "ninelives_recovery_detection_seconds",
                "From the fault to the brain seeing it.",
            )?,
            resume: histogram(
                &r,
                "ninelives_recovery_resume_seconds",
                "From the fault being seen to training having resumed.",
            )?,
            steps_lost: counter(
                &r,
                "ninelives_recovery_steps_lost_total",
                "Optimizer steps recomputed because of recoveries.",
                &[],
            )?,
            sources: counter(
                &r,
                "ninelives_recovery_sources_total",
                "Recoveries completed, by where the resumed state came from.",
                &["source"],
            )?,
            in_progress: gauge(
                &r,
                "ninelives_recovery_in_progress",
                "1 while a recovery is under way.",
                &[],
            )?,
            step: gauge(&r, "ninelives_job_step", "The job's training step (rank 0's progress).", &[])?,
            loss: gauge(&r, "ninelives_job_loss", "The job's last training loss.", &[])?,
            goodput: gauge(
                &r,
                "ninelives_job_goodput_ratio",
                "Productive step time divided by wall time since the job started.",
                &[],
            )?,
            chips: gauge(&r, "ninelives_job_chips", "The job's chips by state.", &["state"])?,
            min_healthy: gauge(
                &r,
                "ninelives_job_min_healthy_chips",
                "Policy threshold: ceil(minHealthyFraction x chips).",
                &[],
            )?,
            generation: gauge(
                &r,
                "ninelives_job_placement_generation",
                "The placement generation in force.",
                &[],
            )?,
            phase: gauge(&r, "ninelives_job_phase", "1 for the job's phase, 0 for the others.", &["phase"])?,
            checkpoint_step: gauge(
                &r,
                "ninelives_checkpoint_last_committed_step",
                "Step of the newest committed checkpoint.",
                &[],
            )?,
            checkpoint_time: gauge(
                &r,
                "ninelives_checkpoint_last_committed_timestamp_seconds",
                "Commit time of the newest committed checkpoint (unix seconds).",
                &[],
            )?,
            control_plane_degraded: gauge(
                &r,
                "ninelives_control_plane_degraded",
                "1 while the brain freezes decisions because the control plane is degraded.",
                &[],
            )?,
            control_plane_outages: counter(
                &r,
                "ninelives_control_plane_outages_total",
                "Control-plane outages the brain rode out without deciding, by cause.",
                &["reason"],
            )?,
            registry: r,
        })
    }

    /// Records that the control plane became degraded (`reason`: the cause's CamelCase reason)
    /// or, with `None`, that it is healthy again.
    pub fn control_plane(&self, ns: &str, job: &str, reason: Option<&str>) {
        let degraded = self.control_plane_degraded.with_label_values(&[ns, job]);
        match reason {
            Some(reason) => {
                degraded.set(1.0);
                self.control_plane_outages.with_label_values(&[ns, job, reason]).inc();
            }
            None => degraded.set(0.0),
        }
    }

    /// Creates every recovery series of a job at zero (each tier, trigger): a series that first
    /// appears at 1 hides that first recovery from `increase()` and `rate()`.
    pub fn job_started(&self, ns: &str, job: &str) {
        for tier in TIERS {
            for trigger in TRIGGERS {
                self.recoveries.with_label_values(&[ns, job, tier, trigger]);
            }
            self.detection.with_label_values(&[ns, job, tier]);
            self.resume.with_label_values(&[ns, job, tier]);
        }
        self.steps_lost.with_label_values(&[ns, job]);
        for source in SOURCES {
            self.sources.with_label_values(&[ns, job, source]);
        }
        self.control_plane_degraded.with_label_values(&[ns, job]).set(0.0);
        for reason in ["StoreUnreachable", "MassDisappearance"] {
            self.control_plane_outages.with_label_values(&[ns, job, reason]);
        }
    }

    /// Records a completed recovery.
    pub fn recovery(&self, ns: &str, job: &str, r: &RecoveryObservation<'_>) {
        let trigger = match r.trigger {
            t @ ("chip" | "node" | "worker" | "hang" | "flap") => t,
            _ => "other",
        };
        self.recoveries.with_label_values(&[ns, job, r.tier, trigger]).inc();
        if let Some(d) = r.detect_s {
            self.detection.with_label_values(&[ns, job, r.tier]).observe(d);
        }
        self.resume.with_label_values(&[ns, job, r.tier]).observe(r.resume_s);
        // Touch the counter even at 0 so the series exists from the first recovery on.
        self.steps_lost.with_label_values(&[ns, job]).inc_by(r.steps_lost as f64);
        let source = if SOURCES.contains(&r.source) { r.source } else { "checkpoint" };
        self.sources.with_label_values(&[ns, job, source]).inc();
    }

    /// Sets the job's state from the brain's record and its observation of the cluster.
    pub fn brain(
        &self,
        ns: &str,
        job: &str,
        state: &RecoveryState,
        obs: &Observation,
        chips_per_node: u32,
        min_healthy_fraction: f64,
    ) {
        let current = api_phase(state.phase);
        for p in PHASES {
            self.phase.with_label_values(&[ns, job, p]).set(if p == current { 1.0 } else { 0.0 });
        }
        let recovering = state.phase == BrainPhase::Recovering;
        self.in_progress.with_label_values(&[ns, job]).set(if recovering { 1.0 } else { 0.0 });
        self.generation.with_label_values(&[ns, job]).set(state.generation as f64);

        // The job's chips: those of its nodes still in the job (not dropped). A node that is
        // down counts all its chips as failed; a chip without a record is healthy.
        let mut counts = [0u64; 4];
        let mut total = 0u64;
        for (index, name) in state.node_names.iter().enumerate() {
            if state.dropped.contains(&(index as u32)) {
                continue;
            }
            let view = obs.nodes.get(name).filter(|v| v.alive);
            for chip in 0..chips_per_node {
                total += 1;
                let s = match view {
                    None => ChipState::Failed,
                    Some(v) => v.chips.get(&chip).map_or(ChipState::Healthy, |r| r.state),
                };
                if let Some(i) = CHIP_STATES.iter().position(|c| *c == s) {
                    counts[i] += 1;
                }
            }
        }
        for (s, n) in CHIP_STATES.iter().zip(counts) {
            self.chips.with_label_values(&[ns, job, s.as_str()]).set(n as f64);
        }
        let min = (min_healthy_fraction * total as f64).ceil();
        self.min_healthy.with_label_values(&[ns, job]).set(min);
    }

    /// Sets the job's progress.
    /// `goodput` only where the driver sees every step's time (the local runtime).
    pub fn progress(&self, ns: &str, job: &str, step: u64, loss: Option<f64>, goodput: Option<f64>) {
        self.step.with_label_values(&[ns, job]).set(step as f64);
        if let Some(l) = loss {
            self.loss.with_label_values(&[ns, job]).set(l);
        }
        if let Some(g) = goodput {
            self.goodput.with_label_values(&[ns, job]).set(g);
        }
    }

    /// Sets the newest committed checkpoint.
    pub fn checkpoint(&self, ns: &str, job: &str, step: u64, committed_unix: f64) {
        self.checkpoint_step.with_label_values(&[ns, job]).set(step as f64);
        self.checkpoint_time.with_label_values(&[ns, job]).set(committed_unix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    fn text(m: &RecoveryMetrics) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&m.registry.gather(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_recovery_is_counted_with_its_tier_and_an_unknown_trigger_is_other() {
        let m = RecoveryMetrics::new().unwrap();
        let r = RecoveryObservation {
            tier: "reshard",
            trigger: "chip",
            detect_s: Some(0.2),
            resume_s: 2.5,
            steps_lost: 12,
            source: "peer",
        };
        m.recovery("ml", "tiny", &r);
        m.recovery("ml", "tiny", &RecoveryObservation { trigger: "cosmic-ray", steps_lost: 3, ..r });
        let t = text(&m);
        assert!(t.contains(r#"ninelives_recoveries_total{tier="reshard",tj_namespace="ml",trainingjob="tiny",trigger="chip"} 1"#), "{t}");
        assert!(t.contains(r#"trigger="other"} 1"#), "{t}");
        assert!(
            t.contains(
                r#"ninelives_recovery_sources_total{source="peer",tj_namespace="ml",trainingjob="tiny"} 2"#
            ),
            "{t}"
        );
        assert!(
            t.contains(r#"ninelives_recovery_steps_lost_total{tj_namespace="ml",trainingjob="tiny"} 15"#),
            "{t}"
        );
        assert!(t.contains(r#"ninelives_recovery_resume_seconds_bucket{tier="reshard",tj_namespace="ml",trainingjob="tiny",le="3"} 2"#), "{t}");
    }

    #[test]
    fn chips_of_a_down_node_count_as_failed_and_dropped_nodes_not_at_all() {
        let m = RecoveryMetrics::new().unwrap();
        let mut state = RecoveryState::new(vec!["a".into(), "b".into(), "c".into()], vec![]);
        state.dropped.insert(2);
        let mut obs = Observation::default();
        obs.nodes.insert(
            "a".into(),
            ninelives_core::recovery::NodeView { alive: true, chips: Default::default() },
        );
        m.brain("ml", "tiny", &state, &obs, 2, 0.5);
        let t = text(&m);
        assert!(
            t.contains(r#"ninelives_job_chips{state="healthy",tj_namespace="ml",trainingjob="tiny"} 2"#),
            "{t}"
        );
        assert!(
            t.contains(r#"ninelives_job_chips{state="failed",tj_namespace="ml",trainingjob="tiny"} 2"#),
            "{t}"
        );
        assert!(
            t.contains(r#"ninelives_job_min_healthy_chips{tj_namespace="ml",trainingjob="tiny"} 2"#),
            "{t}"
        );
        assert!(
            t.contains(r#"ninelives_job_phase{phase="Pending",tj_namespace="ml",trainingjob="tiny"} 1"#),
            "{t}"
        );
    }
}
