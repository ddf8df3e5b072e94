//! Real ninelives processes under a real Prometheus: every dashboard query evaluated through the
//! HTTP API over a run with injected faults — each parses, each metric it names is catalogued,
//! and each query whose metrics the run's processes export returns data; the node-loss and
//! fault-rate alerts are seen pending or firing.
//!
//! A second run drives `ninelives demo`'s runtime with the recovery brain, whose metrics feed the
//! recovery and job panels. Not covered: the operator's metrics (they need the e2e apiserver);
//! their queries are parsed here and return no data.

use ninelives_observability::catalogue::Catalogue;
use ninelives_observability::dashboard::{Dashboard, legend};
use ninelives_observability::fleet::{self, FleetOptions};
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
    let mut problems = Vec::new();
    let mut brain_queries = 0;
    for e in &evaluations {
        if !e.names.iter().any(|n| BRAIN_METRICS.iter().any(|b| n.starts_with(b))) {
            continue;
        }
        brain_queries += 1;
        let place = format!("{}: {}", e.dashboard, e.query.describe());
        match &e.result {
            Err(error) => problems.push(format!("{place}: rejected: {error}\n  {}", e.sent)),
            Ok(_) if !e.has_data() => problems.push(format!("{place}: no data\n  {}", e.sent)),
            Ok(_) => {}
        }
    }
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
