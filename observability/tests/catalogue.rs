//! METRICS.md against the code: every registry the binaries build today, with every labelled
//! family populated, compared name by name, type by type, label set by label set.

use std::collections::BTreeMap;
use std::time::Duration;

use ninelives_agent::events::{AgentEvent, AgentMetrics};
use ninelives_agent::faults::FaultAction;
use ninelives_core::job::JobPhase;
use ninelives_core::keyspace::ChipState;
use ninelives_core::recovery::{AckOutcome, ApplyKind};
use ninelives_observability::catalogue::{Catalogue, MetricKind, Status};
use ninelives_observability::repo_root;
use prometheus::Registry;
use prometheus::proto::MetricType;

/// `name → (type, sorted label names)` of every family a registry exports.
fn families(registry: &Registry) -> BTreeMap<String, (MetricKind, Vec<String>)> {
    let mut out = BTreeMap::new();
    for family in registry.gather() {
        let kind = match family.get_field_type() {
            MetricType::COUNTER => MetricKind::Counter,
            MetricType::GAUGE => MetricKind::Gauge,
            MetricType::HISTOGRAM => MetricKind::Histogram,
            other => panic!("{}: unexpected metric type {other:?}", family.name()),
        };
        let mut labels: Vec<String> = family
            .get_metric()
            .first()
            .map(|m| m.get_label().iter().map(|l| l.name().to_string()).collect())
            .unwrap_or_default();
        labels.sort();
        out.insert(family.name().to_string(), (kind, labels));
    }
    out
}

/// The agent's registry with every event emitted once, so labelled families have a child.
fn agent() -> Registry {
    let metrics = AgentMetrics::new().expect("agent metrics");
    let events = [
        AgentEvent::ChipDiscovered { chip: 0, state: ChipState::Healthy },
        AgentEvent::ChipChanged {
            chip: 0,
            from: ChipState::Healthy,
            to: ChipState::Failed,
            code: "hbm-ecc-uncorrectable",
            action: FaultAction::IsolateChip,
        },
        AgentEvent::UnknownFaultCode { chip: 1, code: "vendor-0xbeef" },
        AgentEvent::ChipQuarantined { chip: 2, code: "link-down" },
        AgentEvent::QuarantineCleared { chip: 2 },
        AgentEvent::NodeIsolation { isolated: false },
        AgentEvent::LeaseAcquired { lease: 1, ttl: 10, reused: false },
        AgentEvent::KeepAlive { latency: Duration::from_millis(3) },
        AgentEvent::EtcdError { op: "put-chip", error: "unavailable" },
        AgentEvent::EtcdConnection { connected: true },
        AgentEvent::ChipPublished { chip: 0, state: ChipState::Failed, latency: Duration::from_millis(40) },
        AgentEvent::MalformedValue { key: "/ninelives/nodes/n/chips/0", reason: "not JSON" },
        AgentEvent::GenerationApplied {
            job: "ml/big",
            generation: 2,
            kind: ApplyKind::Reroute,
            outcome: AckOutcome::Applied,
            elapsed: Duration::from_millis(200),
            error: None,
        },
        AgentEvent::KubeError { op: "patch-node", error: "forbidden" },
        AgentEvent::NodeReported { healthy: false, tainted: true },
    ];
    for event in events {
        event.emit(&metrics);
    }
    metrics.registry().clone()
}

fn worker() -> Registry {
    let metrics = ninelives_worker::metrics::WorkerMetrics::new().expect("worker metrics");
    metrics.checkpoint_bytes_total.with_label_values(&["save"]).inc_by(1);
    metrics.registry.clone()
}

fn recovery() -> Registry {
    use ninelives_core::recovery::{Observation, RecoveryState};
    use ninelives_local::metrics::{RecoveryMetrics, RecoveryObservation};
    let metrics = RecoveryMetrics::new().expect("recovery metrics");
    let r = RecoveryObservation {
        tier: "reroute",
        trigger: "chip",
        detect_s: Some(0.1),
        resume_s: 1.0,
        steps_lost: 0,
        source: "memory",
    };
    metrics.recovery("ml", "big", &r);
    let state = RecoveryState::new(vec!["node-0".into()], vec![]);
    metrics.brain("ml", "big", &state, &Observation::default(), 8, 0.5);
    metrics.progress("ml", "big", 10, Some(2.5), Some(0.9));
    metrics.checkpoint("ml", "big", 10, 1.0e9);
    metrics.control_plane("ml", "big", Some("MassDisappearance"));
    metrics.registry.clone()
}

fn operator() -> Registry {
    let metrics = ninelives_operator::metrics::Metrics::new().expect("operator metrics");
    metrics.reconcile_failed("apply");
    metrics.set_phase("ml/big", Some(JobPhase::Running));
    metrics.set_leader(true);
    drop(metrics.reconcile_started());
    metrics.registry.clone()
}

#[test]
fn metrics_md_lists_exactly_the_metrics_the_code_registers() {
    let catalogue = Catalogue::load(&repo_root().join("METRICS.md")).expect("METRICS.md");
    let mut registered = BTreeMap::new();
    for (binary, registry) in
        [("agent", agent()), ("worker", worker()), ("operator", operator()), ("demo", recovery())]
    {
        for (name, family) in families(&registry) {
            assert!(registered.insert(name.clone(), (binary, family)).is_none(), "{name} registered twice");
        }
    }
    let mut problems = Vec::new();
    for (name, (binary, (kind, labels))) in &registered {
        match catalogue.resolve(name) {
            None => problems.push(format!("{name} ({binary}) is registered but not in METRICS.md")),
            Some(doc) if doc.status != Status::Exported => problems
                .push(format!("{name} ({binary}) is registered but METRICS.md lists it as {:?}", doc.status)),
            Some(doc) => {
                if doc.kind != *kind {
                    problems
                        .push(format!("{name}: METRICS.md says {:?}, the code registers {kind:?}", doc.kind));
                }
                if doc.labels != *labels {
                    problems
                        .push(format!("{name}: METRICS.md labels {:?}, the code's {labels:?}", doc.labels));
                }
            }
        }
    }
    for doc in catalogue.iter().filter(|d| d.status == Status::Exported) {
        if !registered.contains_key(&doc.name) {
            problems.push(format!("{} is listed under \"{}\" but no registry has it", doc.name, doc.section));
        }
    }
    assert!(problems.is_empty(), "METRICS.md and the code disagree:\n{}", problems.join("\n"));
    // The catalogue is the whole story: three binaries and the brain's driver; nothing planned.
    assert!(registered.len() >= 40, "{} registered metrics", registered.len());
    assert_eq!(catalogue.iter().filter(|d| d.status == Status::Planned).count(), 0);
}

#[test]
fn labels_are_bounded_no_step_token_or_time_labels() {
    let catalogue = Catalogue::load(&repo_root().join("METRICS.md")).expect("METRICS.md");
    // Labels whose values are closed sets or bounded by fleet/job size (see METRICS.md).
    let allowed = [
        "chip",
        "state",
        "code",
        "action",
        "op",
        "kind",
        "outcome",
        "phase",
        "tier",
        "trigger",
        // Closed sets: a save failure's cause (`no-space`, `io`, ...), an outage's cause.
        "reason",
        // Closed set: where a recovery's state came from (`memory`, `peer`, `checkpoint`).
        "source",
        "tj_namespace",
        "trainingjob",
        "job",
        "instance",
        "grpc_service",
        "grpc_method",
        "grpc_code",
        "grpc_type",
    ];
    for doc in catalogue.iter() {
        for label in &doc.labels {
            assert!(
                allowed.contains(&label.as_str()),
                "{}: label {label} is not a known bounded label",
                doc.name
            );
        }
        if doc.labels.iter().any(|l| l == "chip") {
            assert!(
                doc.name.starts_with("ninelives_agent_"),
                "{}: per-chip series only from the agent",
                doc.name
            );
        }
        if doc.status == Status::Planned {
            assert!(
                doc.labels.contains(&"tj_namespace".to_string())
                    && doc.labels.contains(&"trainingjob".to_string()),
                "{}: job-level series carry tj_namespace and trainingjob (contract)",
                doc.name
            );
        }
        let unit_suffix_ok = match doc.kind {
            MetricKind::Histogram => doc.name.ends_with("_seconds") || doc.name.ends_with("_bytes"),
            _ => true,
        };
        assert!(unit_suffix_ok, "{}: histograms here measure seconds or bytes and say so", doc.name);
    }
}
