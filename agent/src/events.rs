//! The agent's observable occurrences: each [`AgentEvent`] emits its log line and its metric
//! together, so logs and `/metrics` never disagree.

use std::time::Duration;

use ninelives_core::keyspace::ChipState;
use ninelives_core::recovery::{AckOutcome, ApplyKind};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::faults::FaultAction;

/// The agent's Prometheus metrics, in their own registry.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    registry: Registry,
    chip_state: IntGaugeVec,
    faults: IntCounterVec,
    unknown_codes: IntCounterVec,
    quarantines: IntCounter,
    keepalive_seconds: Histogram,
    etcd_errors: IntCounterVec,
    etcd_connected: IntGauge,
    chip_writes: IntCounter,
    publish_seconds: Histogram,
    malformed_values: IntCounter,
    apply_seconds: HistogramVec,
    apply_outcomes: IntCounterVec,
    node_isolated: IntGauge,
    kube_errors: IntCounterVec,
}

const STATES: [ChipState; 4] =
    [ChipState::Healthy, ChipState::Degraded, ChipState::Failed, ChipState::Quarantined];

fn latency_buckets() -> Vec<f64> {
    vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0]
}

impl AgentMetrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let chip_state = IntGaugeVec::new(
            Opts::new("ninelives_agent_chip_state", "1 for the state each chip is in, 0 for the others"),
            &["chip", "state"],
        )?;
        let faults = IntCounterVec::new(
            Opts::new("ninelives_agent_faults_total", "Chip fault onsets by code and action taken"),
            &["code", "action"],
        )?;
        let unknown_codes = IntCounterVec::new(
            Opts::new(
                "ninelives_agent_unknown_fault_codes_total",
                "Fault codes absent from the fault table (the chip was isolated)",
            ),
            &["code"],
        )?;
        let quarantines =
            IntCounter::new("ninelives_agent_quarantines_total", "Chips quarantined for flapping")?;
        let keepalive_seconds = Histogram::with_opts(
            HistogramOpts::new("ninelives_agent_lease_keepalive_seconds", "Lease keepalive round trip")
                .buckets(latency_buckets()),
        )?;
        let etcd_errors = IntCounterVec::new(
            Opts::new("ninelives_agent_etcd_errors_total", "Failed etcd requests by operation"),
            &["op"],
        )?;
        let etcd_connected = IntGauge::new(
            "ninelives_agent_etcd_connected",
            "1 while the node's lease is held and its chip states are in sync",
        )?;
        let chip_writes =
            IntCounter::new("ninelives_agent_chip_writes_total", "Chip state values written to etcd")?;
        let publish_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "ninelives_agent_chip_publish_seconds",
                "From the observation that changed a chip's state to its write in etcd",
            )
            .buckets(latency_buckets()),
        )?;
        let malformed_values = IntCounter::new(
            "ninelives_agent_malformed_values_total",
            "Values read from etcd that could not be parsed (skipped)",
        )?;
        let apply_seconds = HistogramVec::new(
            HistogramOpts::new(
                "ninelives_agent_apply_seconds",
                "Time to apply a placement generation on the local workers, by kind",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]),
            &["kind"],
        )?;
        let apply_outcomes = IntCounterVec::new(
            Opts::new("ninelives_agent_apply_total", "Placement generations applied, by kind and outcome"),
            &["kind", "outcome"],
        )?;
        let node_isolated =
            IntGauge::new("ninelives_agent_node_isolated", "1 while a host-level fault isolates the node")?;
        let kube_errors = IntCounterVec::new(
            Opts::new("ninelives_agent_kube_errors_total", "Failed Kubernetes API requests by operation"),
            &["op"],
        )?;
        registry.register(Box::new(chip_state.clone()))?;
        registry.register(Box::new(faults.clone()))?;
        registry.register(Box::new(unknown_codes.clone()))?;
        registry.register(Box::new(quarantines.clone()))?;
        registry.register(Box::new(keepalive_seconds.clone()))?;
        registry.register(Box::new(etcd_errors.clone()))?;
        registry.register(Box::new(etcd_connected.clone()))?;
        registry.register(Box::new(chip_writes.clone()))?;
        registry.register(Box::new(publish_seconds.clone()))?;
        registry.register(Box::new(malformed_values.clone()))?;
        registry.register(Box::new(apply_seconds.clone()))?;
        registry.register(Box::new(apply_outcomes.clone()))?;
        registry.register(Box::new(node_isolated.clone()))?;
        registry.register(Box::new(kube_errors.clone()))?;
        Ok(Self {
            registry,
            chip_state,
            faults,
            unknown_codes,
            quarantines,
            keepalive_seconds,
            etcd_errors,
            etcd_connected,
            chip_writes,
            publish_seconds,
            malformed_values,
            apply_seconds,
            apply_outcomes,
            node_isolated,
            kube_errors,
        })
    }

    /// The registry to serve on `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Chip state values written to etcd so far.
    pub fn chip_writes(&self) -> u64 {
        self.chip_writes.get()
    }

    fn set_chip_state(&self, chip: u32, state: ChipState) {
        let chip = chip.to_string();
        for s in STATES {
            self.chip_state.with_label_values(&[chip.as_str(), s.as_str()]).set(i64::from(s == state));
        }
    }
}

/// Keeps label values bounded and printable: codes come from outside (vendor files).
fn label(code: &str) -> String {
    code.chars().take(64).map(|c| if c.is_ascii_graphic() { c } else { '_' }).collect()
}

/// One observable occurrence in the agent.
#[derive(Clone, Debug)]
pub enum AgentEvent<'a> {
    /// A chip was discovered at start-up (sets its state gauge).
    ChipDiscovered {
        /// Chip index.
        chip: u32,
        /// Initial state.
        state: ChipState,
    },
    /// A chip's verdict changed.
    ChipChanged {
        /// Chip index.
        chip: u32,
        /// State before.
        from: ChipState,
        /// State after.
        to: ChipState,
        /// Code behind the new state.
        code: &'a str,
        /// Action taken.
        action: FaultAction,
    },
    /// A fault code absent from the fault table was seen.
    UnknownFaultCode {
        /// Chip index.
        chip: u32,
        /// The code.
        code: &'a str,
    },
    /// A chip flapped too often and is now quarantined.
    ChipQuarantined {
        /// Chip index.
        chip: u32,
        /// Code of the onset that tipped it.
        code: &'a str,
    },
    /// An operator lifted a chip's quarantine.
    QuarantineCleared {
        /// Chip index.
        chip: u32,
    },
    /// The node entered or left isolation (host-level fault).
    NodeIsolation {
        /// Whether it is isolated now.
        isolated: bool,
    },
    /// The node holds a lease and its presence key.
    LeaseAcquired {
        /// Lease id.
        lease: i64,
        /// TTL granted, seconds.
        ttl: i64,
        /// Whether an existing lease was kept (outage shorter than the TTL).
        reused: bool,
    },
    /// A keepalive round trip completed.
    KeepAlive {
        /// Round trip.
        latency: Duration,
    },
    /// An etcd request failed.
    EtcdError {
        /// Operation label.
        op: &'static str,
        /// The error text.
        error: &'a str,
    },
    /// The connection to etcd is lost or back (lease held and states in sync).
    EtcdConnection {
        /// Whether connected now.
        connected: bool,
    },
    /// A chip state was written to etcd.
    ChipPublished {
        /// Chip index.
        chip: u32,
        /// State written.
        state: ChipState,
        /// Since the observation that produced it.
        latency: Duration,
    },
    /// A value read from etcd was malformed and skipped.
    MalformedValue {
        /// The key.
        key: &'a str,
        /// What is wrong.
        reason: &'a str,
    },
    /// A placement generation was applied on the local workers (or failed, or timed out).
    GenerationApplied {
        /// Job, `namespace/name`.
        job: &'a str,
        /// Generation.
        generation: u64,
        /// What was applied.
        kind: ApplyKind,
        /// How it ended.
        outcome: AckOutcome,
        /// Time taken.
        elapsed: Duration,
        /// Error text when not applied.
        error: Option<&'a str>,
    },
    /// A Kubernetes API request failed.
    KubeError {
        /// Operation label.
        op: &'static str,
        /// The error text.
        error: &'a str,
    },
    /// The Node condition or taint was updated.
    NodeReported {
        /// Whether all chips are usable.
        healthy: bool,
        /// Whether the taint is present now.
        tainted: bool,
    },
}

impl AgentEvent<'_> {
    /// Logs the event and updates its metric.
    pub fn emit(self, metrics: &AgentMetrics) {
        match self {
            AgentEvent::ChipDiscovered { chip, state } => {
                tracing::debug!(chip, state = state.as_str(), "chip discovered");
                metrics.set_chip_state(chip, state);
            }
            AgentEvent::ChipChanged { chip, from, to, code, action } => {
                if to.usable() && action == FaultAction::Ignore {
                    tracing::info!(chip, from = from.as_str(), to = to.as_str(), "chip recovered");
                } else {
                    tracing::warn!(
                        chip,
                        from = from.as_str(),
                        to = to.as_str(),
                        code,
                        action = action.as_str(),
                        "chip fault"
                    );
                    metrics.faults.with_label_values(&[label(code).as_str(), action.as_str()]).inc();
                }
                metrics.set_chip_state(chip, to);
            }
            AgentEvent::UnknownFaultCode { chip, code } => {
                tracing::warn!(
                    chip,
                    code,
                    "unknown fault code; isolating the chip (add it to the fault table)"
                );
                metrics.unknown_codes.with_label_values(&[label(code).as_str()]).inc();
            }
            AgentEvent::ChipQuarantined { chip, code } => {
                tracing::warn!(
                    chip,
                    code,
                    "chip quarantined for flapping; clear with `ninelives agent clear --chips-dir DIR {chip}`"
                );
                metrics.quarantines.inc();
            }
            AgentEvent::QuarantineCleared { chip } => {
                tracing::info!(chip, "quarantine cleared by operator");
            }
            AgentEvent::NodeIsolation { isolated } => {
                if isolated {
                    tracing::warn!("host-level fault: isolating every chip of the node");
                } else {
                    tracing::info!("node isolation lifted");
                }
                metrics.node_isolated.set(i64::from(isolated));
            }
            AgentEvent::LeaseAcquired { lease, ttl, reused } => {
                tracing::info!(lease = format!("{lease:x}"), ttl, reused, "node lease held");
            }
            AgentEvent::KeepAlive { latency } => {
                tracing::trace!(latency_ms = latency.as_secs_f64() * 1e3, "lease keepalive");
                metrics.keepalive_seconds.observe(latency.as_secs_f64());
            }
            AgentEvent::EtcdError { op, error } => {
                tracing::warn!(op, error, "etcd request failed");
                metrics.etcd_errors.with_label_values(&[op]).inc();
            }
            AgentEvent::EtcdConnection { connected } => {
                if connected {
                    tracing::info!("etcd connected; chip states in sync");
                } else {
                    tracing::warn!("etcd connection lost; keeping desired chip states to reconcile");
                }
                metrics.etcd_connected.set(i64::from(connected));
            }
            AgentEvent::ChipPublished { chip, state, latency } => {
                tracing::info!(
                    chip,
                    state = state.as_str(),
                    latency_ms = latency.as_secs_f64() * 1e3,
                    "chip state written"
                );
                metrics.chip_writes.inc();
                metrics.publish_seconds.observe(latency.as_secs_f64());
            }
            AgentEvent::MalformedValue { key, reason } => {
                tracing::warn!(key, reason, "malformed value in etcd skipped");
                metrics.malformed_values.inc();
            }
            AgentEvent::GenerationApplied { job, generation, kind, outcome, elapsed, error } => {
                let (kind, outcome) = (kind.as_str(), outcome.as_str());
                let seconds = elapsed.as_secs_f64();
                match error {
                    None => tracing::info!(
                        job,
                        generation,
                        kind,
                        outcome,
                        seconds,
                        "placement generation applied"
                    ),
                    Some(error) => tracing::warn!(
                        job,
                        generation,
                        kind,
                        outcome,
                        seconds,
                        error,
                        "placement generation not applied"
                    ),
                }
                metrics.apply_seconds.with_label_values(&[kind]).observe(seconds);
                metrics.apply_outcomes.with_label_values(&[kind, outcome]).inc();
            }
            AgentEvent::KubeError { op, error } => {
                tracing::warn!(op, error, "kubernetes request failed");
                metrics.kube_errors.with_label_values(&[op]).inc();
            }
            AgentEvent::NodeReported { healthy, tainted } => {
                tracing::info!(healthy, tainted, "node condition updated");
            }
        }
    }
}
