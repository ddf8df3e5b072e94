//! The operator's Prometheus metrics, in its own registry.

use std::collections::HashMap;
use std::sync::Mutex;

use ninelives_core::job::JobPhase;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::lifecycle::phase_name;

const PHASES: [JobPhase; 7] = [
    JobPhase::Pending,
    JobPhase::Running,
    JobPhase::Recovering,
    JobPhase::Suspended,
    JobPhase::Succeeded,
    JobPhase::Failed,
    JobPhase::Invalid,
];

/// Every `kind` [`crate::error::Error::label`] returns. The error counter's series exist at 0 from
/// the start (Prometheus practice for known label values): `rate()` over them reads 0 in a healthy
/// run instead of nothing, and an error shows as an increase rather than a series appearing.
pub const ERROR_KINDS: [&str; 14] = [
    "read",
    "apply",
    "status",
    "finalizer",
    "etcd",
    "cleanup_pending",
    "missing_field",
    "serialize",
    "client",
    "lease",
    "controller",
    "io",
    "metrics",
    "brain",
];

/// Counters, histogram and gauges of the operator.
#[derive(Debug)]
pub struct Metrics {
    /// The registry `/metrics` serves.
    pub registry: Registry,
    reconciles: IntCounter,
    errors: IntCounterVec,
    duration: Histogram,
    jobs: IntGaugeVec,
    leader: IntGauge,
    phases: Mutex<HashMap<String, JobPhase>>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles =
            IntCounter::new("ninelives_operator_reconciles_total", "TrainingJob reconciles started")?;
        let errors = IntCounterVec::new(
            Opts::new("ninelives_operator_reconcile_errors_total", "Failed reconciles by error kind"),
            &["kind"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "ninelives_operator_reconcile_duration_seconds",
                "Time to reconcile one TrainingJob",
            )
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )?;
        let jobs =
            IntGaugeVec::new(Opts::new("ninelives_operator_jobs", "TrainingJobs by phase"), &["phase"])?;
        let leader =
            IntGauge::new("ninelives_operator_leader", "1 while this replica holds the leader Lease")?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        for phase in PHASES {
            jobs.with_label_values(&[phase_name(phase)]).set(0);
        }
        for kind in ERROR_KINDS {
            errors.with_label_values(&[kind]).reset();
        }
        Ok(Self { registry, reconciles, errors, duration, jobs, leader, phases: Mutex::new(HashMap::new()) })
    }

    /// Counts a reconcile and returns a timer that observes its duration when dropped.
    pub fn reconcile_started(&self) -> prometheus::HistogramTimer {
        self.reconciles.inc();
        self.duration.start_timer()
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }

    /// Records the phase of job `key` (`None` once the job is gone).
    pub fn set_phase(&self, key: &str, phase: Option<JobPhase>) {
        let mut phases = self.phases.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match phase {
            Some(phase) => phases.insert(key.to_string(), phase),
            None => phases.remove(key),
        };
        for candidate in PHASES {
            let count = phases.values().filter(|p| **p == candidate).count();
            self.jobs
                .with_label_values(&[phase_name(candidate)])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use prometheus::{Encoder, TextEncoder};

    fn text(metrics: &Metrics) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&metrics.registry.gather(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn jobs_by_phase_follow_each_job() {
        let metrics = Metrics::new().unwrap();
        metrics.set_phase("a/x", Some(JobPhase::Running));
        metrics.set_phase("a/y", Some(JobPhase::Running));
        metrics.set_phase("a/x", Some(JobPhase::Succeeded));
        let out = text(&metrics);
        assert!(out.contains("ninelives_operator_jobs{phase=\"Running\"} 1"), "{out}");
        assert!(out.contains("ninelives_operator_jobs{phase=\"Succeeded\"} 1"), "{out}");
        metrics.set_phase("a/x", None);
        assert!(text(&metrics).contains("ninelives_operator_jobs{phase=\"Succeeded\"} 0"));
        metrics.reconcile_failed("apply");
        metrics.set_leader(true);
        let out = text(&metrics);
        assert!(out.contains("ninelives_operator_reconcile_errors_total{kind=\"apply\"} 1"));
        assert!(out.contains("ninelives_operator_leader 1"));
    }

    /// One error of each variant; [`variant_is_listed`] makes a new variant a compile error here.
    fn one_of_each() -> Vec<Error> {
        let kube = || kube::Error::LinesCodecMaxLineLengthExceeded;
        vec![
            Error::Read { what: "pods", source: kube() },
            Error::Apply { what: "pod x-0".into(), source: kube() },
            Error::Status(kube()),
            Error::Finalizer("conflict".into()),
            Error::Etcd { prefix: "/ninelives/".into(), source: etcd_client::Error::InvalidArgs("x".into()) },
            Error::EtcdTimeout(5),
            Error::EtcdIdentity(ninelives_control::ControlError::Timeout { op: "user-add", seconds: 5 }),
            Error::CleanupPending(2),
            Error::MissingField("uid"),
            Error::Serialize(serde_json::from_str::<u8>("x").unwrap_err()),
            Error::Client(kube()),
            Error::Config("no kubeconfig".into()),
            Error::Lease(kube()),
            Error::LostLease,
            Error::ControllerStopped,
            Error::Io(std::io::Error::other("bind")),
            Error::Metrics(prometheus::Error::Msg("duplicate".into())),
            Error::Brain("x".into()),
            Error::Control(ninelives_control::ControlError::Malformed {
                key: "k".into(),
                reason: "r".into(),
            }),
            Error::Control(ninelives_control::ControlError::Timeout { op: "read", seconds: 5 }),
            Error::Control(ninelives_control::ControlError::Effect(ninelives_control::EffectError::new(
                "node-table",
                "forbidden",
            ))),
        ]
    }

    /// Exhaustive on purpose: adding a variant to [`Error`] fails to compile until it is added to
    /// [`one_of_each`] (and its label, if new, to [`ERROR_KINDS`]).
    fn variant_is_listed(error: &Error) -> bool {
        match error {
            Error::Read { .. }
            | Error::Apply { .. }
            | Error::Status(_)
            | Error::Finalizer(_)
            | Error::Etcd { .. }
            | Error::EtcdTimeout(_)
            | Error::EtcdIdentity(_)
            | Error::CleanupPending(_)
            | Error::MissingField(_)
            | Error::Serialize(_)
            | Error::Client(_)
            | Error::Config(_)
            | Error::Lease(_)
            | Error::LostLease
            | Error::ControllerStopped
            | Error::Io(_)
            | Error::Metrics(_)
            | Error::Brain(_)
            | Error::Control(_) => true,
        }
    }

    #[test]
    fn every_error_kind_has_a_series_from_the_start() {
        let errors = one_of_each();
        assert!(errors.iter().all(variant_is_listed));
        let labels: std::collections::BTreeSet<&str> = errors.iter().map(Error::label).collect();
        let kinds: std::collections::BTreeSet<&str> = ERROR_KINDS.into_iter().collect();
        assert_eq!(labels, kinds, "ERROR_KINDS must be exactly the labels of Error");

        let out = text(&Metrics::new().unwrap());
        for kind in ERROR_KINDS {
            let series = format!("ninelives_operator_reconcile_errors_total{{kind=\"{kind}\"}} 0");
            assert!(out.lines().any(|l| l == series), "{series} missing from\n{out}");
        }
    }
}
