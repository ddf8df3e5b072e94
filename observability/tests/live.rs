//! Real ninelives processes under a real Prometheus: every dashboard query evaluated through the
//! HTTP API over a run with injected faults — each parses, each metric it names is catalogued,
//! and each query whose metrics the run's processes export returns data; the node-loss and
//! fault-rate alerts are seen pending or firing.
//!
//! A second run drives `ninelives demo`'s runtime with the recovery brain, whose metrics feed the
//! recovery and job panels; a third runs two operator replicas on the e2e test bed (etcd and
//! kube-apiserver), whose metrics feed the operator panels of the control-plane dashboard. Not
//! covered: alerts that need minutes of a condition (`for: 1m` and longer) are only unit-tested
//! with promtool (tests/alerts.rs).

use ninelives_core::job::JobPhase;
use ninelives_observability::catalogue::Catalogue;
use ninelives_observability::dashboard::{Dashboard, legend};
use ninelives_observability::fleet::{self, ControlPlaneOptions, FleetOptions};
use ninelives_observability::render::{Line, PanelImage, write_png};
use ninelives_observability::repo_root;

/// The runs start many processes and assert on timings: one at a time on a 2-core machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Queries that may be empty although every metric they name is exported: they select error
/// cases a clean run does not have.
const MAY_BE_EMPTY: &[(&str, &str)] = &[
    // etcd answers every request with OK in a healthy run.
    ("control-plane", "etcd errors / B"),
    // testkit runs etcd with --unsafe-no-fsync (test speed), so etcd observes no WAL fsync.
    ("control-plane", "etcd WAL fsync / A"),
];

#[test]
fn every_dashboard_query_runs_against_real_processes() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let catalogue = Catalogue::load(&repo_root().join("METRICS.md")).expect("METRICS.md");
    let dashboards = Dashboard::load_dir(&repo_root().join("dashboards")).expect("dashboards");
    let run = fleet::run(&FleetOptions::default(), &mut |line| eprintln!("fleet: {line}"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let evaluations = fleet::evaluate(&run, &dashboards);

    let mut problems = Vec::new();
    let mut with_data = 0;
    for e in &evaluations {
        let place = format!("{}: {}", e.dashboard, e.query.describe());
        if let Err(error) = &e.result {
            problems.push(format!("{place}: Prometheus rejected it: {error}\n  {}", e.sent));
            continue;
        }
        for name in &e.names {
            if catalogue.resolve(name).is_none() {
                problems.push(format!("{place}: {name} is not in METRICS.md"));
            }
        }
        let exempt = MAY_BE_EMPTY.iter().any(|(d, q)| *d == e.dashboard && *q == e.query.describe());
        if e.has_data() {
            with_data += 1;
        } else if e.exported && !exempt {
            problems.push(format!("{place}: its metrics are exported but it returned no data\n  {}", e.sent));
        }
    }
    assert!(problems.is_empty(), "{}\n\n{}", problems.join("\n"), run.logs());

    // Not vacuous: the agents, the worker and etcd feed most panels of three dashboards.
    eprintln!("{with_data} of {} queries returned data", evaluations.len());
    assert!(with_data >= 25, "only {with_data} queries returned data\n{}", run.logs());
    for (dashboard, panel) in [
        ("fleet-health", "Nodes with unusable chips / A"),
        ("fleet-health", "Fault onsets by code and action / A"),
        ("fleet-health", "Chip states of the selected nodes / A"),
        ("training-job", "Loss / A"),
        ("training-job", "Checkpoint save and load time / B"),
        ("control-plane", "etcd latency seen by agents / B"),
    ] {
        let e = evaluations
            .iter()
            .find(|e| e.dashboard == dashboard && e.query.describe() == panel)
            .unwrap_or_else(|| panic!("{dashboard}: {panel} not found"));
        assert!(e.has_data(), "{dashboard}: {panel} returned no data");
    }
    // What the panels show matches what happened: node-0 lost two chips to ECC errors and node-1
    // one to a hang.
    let unusable = run
        .prometheus
        .query_at(
            "sum by (node) (ninelives_agent_chip_state{state=~\"failed|quarantined\"}) > 0",
            Some(run.end - 8.0),
        )
        .expect("query");
    let by_node: Vec<(String, f64)> = unusable
        .iter()
        .map(|s| (s.labels.get("node").cloned().unwrap_or_default(), s.samples.first().map_or(0.0, |x| x.1)))
        .collect();
    assert!(by_node.contains(&("node-0".into(), 2.0)), "{by_node:?}");
    assert!(by_node.contains(&("node-1".into(), 1.0)), "{by_node:?}");

    for alert in ["NinelivesNodeLost", "NinelivesChipFaultRateHigh"] {
        assert!(run.alerts_seen.contains_key(alert), "{alert} never pending/firing: {:?}", run.alerts_seen);
    }

    // A panel snapshot from the run's results.
    let loss = evaluations.iter().find(|e| e.query.describe() == "Loss / A").expect("loss");
    let lines: Vec<Line> = loss
        .result
        .as_ref()
        .expect("loss result")
        .iter()
        .map(|s| Line {
            label: legend(&loss.query.legend, &s.labels),
            points: s.samples.iter().map(|(t, v)| (t - run.start, *v)).collect(),
        })
        .collect();
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("loss.png");
    let markers = run.markers.iter().map(|(t, m)| (t - run.start, m.clone())).collect();
    write_png(&PanelImage { title: "Loss".into(), unit: String::new(), lines, markers }, &path).expect("png");
    assert!(std::fs::metadata(&path).expect("png written").len() > 1000);
}

/// How many queries name a metric `selected` picks, and those of them Prometheus rejected or
/// that returned no data.
fn queries_without_data(
    evaluations: &[fleet::Evaluation],
    selected: impl Fn(&str) -> bool,
) -> (usize, Vec<String>) {
    let mut count = 0;
    let mut problems = Vec::new();
    for e in evaluations.iter().filter(|e| e.names.iter().any(|n| selected(n))) {
        count += 1;
        let place = format!("{}: {}", e.dashboard, e.query.describe());
        match &e.result {
            Err(error) => problems.push(format!("{place}: rejected: {error}\n  {}", e.sent)),
            Ok(_) if !e.has_data() => problems.push(format!("{place}: no data\n  {}", e.sent)),
            Ok(_) => {}
        }
    }
    (count, problems)
}

/// The recovery brain's own metrics, as `ninelives demo` exports them.
const BRAIN_METRICS: &[&str] = &[
    "ninelives_recoveries_total",
    "ninelives_recovery_detection_seconds",
    "ninelives_recovery_resume_seconds",
    "ninelives_recovery_steps_lost_total",
    "ninelives_recovery_in_progress",
    "ninelives_job_",
    "ninelives_checkpoint_last_committed",
];

#[test]
fn the_demo_under_prometheus_feeds_the_recovery_and_job_panels() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dashboards = Dashboard::load_dir(&repo_root().join("dashboards")).expect("dashboards");
    let demo = fleet::demo(&fleet::DemoOptions::default(), &mut |line| eprintln!("demo: {line}"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let run = &demo.fleet;
    assert!(demo.failure.is_none(), "the job failed: {:?}\n{}", demo.failure, run.logs());
    let evaluations = fleet::evaluate(run, &dashboards);

    // Every query that names a brain metric parses and returns data.
    let (brain_queries, problems) =
        queries_without_data(&evaluations, |n| BRAIN_METRICS.iter().any(|b| n.starts_with(b)));
    assert!(brain_queries >= 8, "only {brain_queries} dashboard queries use the brain's metrics");
    assert!(problems.is_empty(), "{}\n\n{}", problems.join("\n"), run.logs());

    // What Prometheus holds agrees with the run's own report.
    let total = run.prometheus.query_at("sum(ninelives_recoveries_total)", Some(run.end)).expect("query");
    let counted = total.first().and_then(|s| s.samples.first()).map_or(0.0, |x| x.1);
    assert_eq!(counted as usize, demo.report.recoveries.len(), "{:?}", demo.report.recoveries);
    assert!(counted >= 4.0, "chip, chip, hang, node and worker faults: {:?}", demo.report.recoveries);
    let step = run.prometheus.query_at("max(ninelives_job_step)", Some(run.end)).expect("query");
    assert_eq!(step.first().and_then(|s| s.samples.first()).map(|x| x.1), Some(60.0));
    assert!(run.alerts_seen.contains_key("NinelivesNodeLost"), "{:?}", run.alerts_seen);
}

/// The value of each series of `expr` at `time`, keyed by `label`.
fn values_by(run: &fleet::FleetRun, expr: &str, time: f64, label: &str) -> Vec<(String, f64)> {
    let series = run.prometheus.query_at(expr, Some(time)).unwrap_or_else(|e| panic!("{expr}: {e}"));
    let mut out: Vec<(String, f64)> = series
        .iter()
        .map(|s| {
            (s.labels.get(label).cloned().unwrap_or_default(), s.samples.first().map_or(f64::NAN, |x| x.1))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn two_operator_replicas_under_prometheus_feed_the_control_plane_panels() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dashboards = Dashboard::load_dir(&repo_root().join("dashboards")).expect("dashboards");
    let cp =
        fleet::control_plane(&ControlPlaneOptions::default(), &mut |line| eprintln!("control plane: {line}"))
            .unwrap_or_else(|e| panic!("{e:#}"));
    let run = &cp.fleet;
    assert_eq!(cp.phases.get(fleet::SUCCEEDING_JOB), Some(&Some(JobPhase::Succeeded)), "{}", run.logs());
    assert_eq!(cp.phases.get(fleet::INVALID_JOB), Some(&Some(JobPhase::Invalid)), "{}", run.logs());
    assert_eq!(cp.leaders, fleet::REPLICAS, "the standby took over");

    // Every query that names an operator metric parses and returns data.
    let evaluations = fleet::evaluate(run, &dashboards);
    let (operator_queries, problems) = queries_without_data(&evaluations, fleet::is_operator_metric);
    eprintln!("{operator_queries} dashboard queries use the operator's metrics");
    // Leaders, Leader by replica, TrainingJobs by phase, Reconcile rate and errors (2),
    // Reconcile latency (2).
    assert!(operator_queries >= 7, "only {operator_queries} dashboard queries use the operator's metrics");
    assert!(problems.is_empty(), "{}\n\n{}", problems.join("\n"), run.logs());

    // One leader at every step while both replicas ran: the standby reports 0.
    let (from, to) = cp.both_running;
    let leaders = run
        .prometheus
        .query_range("sum(ninelives_operator_leader)", from + 1.0, to - 1.0, fleet::STEP)
        .expect("query");
    let samples: Vec<f64> = leaders.iter().flat_map(|s| s.samples.iter().map(|x| x.1)).collect();
    assert!(samples.len() >= 10, "{samples:?}");
    assert!(samples.iter().all(|v| *v == 1.0), "sum(ninelives_operator_leader) while both ran: {samples:?}");
    let [first, standby] = fleet::REPLICAS;
    let by_pod = "max by (pod) (ninelives_operator_leader)";
    assert_eq!(
        values_by(run, by_pod, to - 1.0, "pod"),
        [(first.to_string(), 1.0), (standby.to_string(), 0.0)]
    );
    // After the leader was killed its series went stale and the standby leads.
    assert_eq!(values_by(run, by_pod, run.end, "pod"), [(standby.to_string(), 1.0)]);

    // The jobs-by-phase panel shows the succeeded and the invalid job, from either leader.
    for time in [to - 1.0, run.end] {
        let phases = values_by(run, "max by (phase) (ninelives_operator_jobs)", time, "phase");
        for (phase, count) in [("Succeeded", 1.0), ("Invalid", 1.0), ("Running", 0.0), ("Failed", 0.0)] {
            assert!(phases.contains(&(phase.to_string(), count)), "{phase} should be {count}: {phases:?}");
        }
    }
    // Every error kind has a series from the start, so the error panel has data in a healthy run.
    let errors =
        values_by(run, "sum by (kind) (ninelives_operator_reconcile_errors_total)", from + 1.0, "kind");
    let kinds: Vec<&str> = errors.iter().map(|(k, _)| k.as_str()).collect();
    let mut expected = ninelives_operator::metrics::ERROR_KINDS.to_vec();
    expected.sort_unstable();
    assert_eq!(kinds, expected);
    eprintln!(
        "reconcile errors at the end: {:?}",
        values_by(run, "sum by (kind) (ninelives_operator_reconcile_errors_total) > 0", run.end, "kind")
    );
}
