//! The Grafana dashboards: structure, templating, catalogued metrics only, and every query
//! parsed by a real Prometheus.

use std::collections::{BTreeMap, BTreeSet};

use ninelives_observability::catalogue::Catalogue;
use ninelives_observability::dashboard::{Dashboard, Origin, label_values};
use ninelives_observability::promql::{self, Intervals};
use ninelives_observability::{repo_root, rules};
use ninelives_testkit::prometheus::{PrometheusServer, QueryError};

fn dashboards() -> Vec<Dashboard> {
    let all = Dashboard::load_dir(&repo_root().join("dashboards")).expect("dashboards/");
    assert_eq!(all.len(), 4, "fleet health, training job, recovery, control plane");
    all
}

fn by_slug(slug: &str) -> Dashboard {
    dashboards().into_iter().find(|d| d.slug() == slug).unwrap_or_else(|| panic!("dashboards/{slug}.json"))
}

fn intervals() -> Intervals {
    Intervals { rate_interval: "1m".into(), interval: "15s".into(), range: "1h".into() }
}

#[test]
fn dashboards_use_the_current_schema_a_datasource_variable_and_templated_filters() {
    let mut uids = BTreeSet::new();
    for d in dashboards() {
        let name = d.slug();
        assert!(d.json["schemaVersion"].as_u64().unwrap_or(0) >= 39, "{name}: schemaVersion");
        assert!(uids.insert(d.json["uid"].as_str().unwrap_or_default().to_string()), "{name}: duplicate uid");
        let ds = d.variables.iter().find(|v| v.name == "datasource").expect("datasource variable");
        assert_eq!(ds.kind, "datasource");
        assert_eq!(d.json["templating"]["list"][0]["query"], "prometheus");
        let mut panels = 0;
        for panel in d.json["panels"].as_array().expect("panels") {
            if panel["type"] == "row" {
                continue;
            }
            panels += 1;
            let title = panel["title"].as_str().unwrap_or_default();
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{name}/{title}: datasource variable");
            assert!(
                !panel["description"].as_str().unwrap_or_default().is_empty(),
                "{name}/{title}: description"
            );
            for target in panel["targets"].as_array().expect("targets") {
                assert_eq!(target["datasource"]["uid"], "${datasource}", "{name}/{title}: target datasource");
            }
            let grid = &panel["gridPos"];
            let right = grid["x"].as_u64().unwrap_or(99) + grid["w"].as_u64().unwrap_or(99);
            assert!(right <= 24, "{name}/{title}: panel wider than the grid");
        }
        assert!(panels >= 6, "{name}: {panels} panels");
        // Filters: every query of agent metrics is scoped by namespace (and node on the fleet
        // dashboard), every job-level query by TrainingJob.
        for q in &d.queries {
            let names = promql::metric_names(&q.expr);
            let agent = names.iter().any(|n| n.starts_with("ninelives_agent_"));
            let job = names.iter().any(|n| {
                n.starts_with("ninelives_worker_")
                    || n.starts_with("ninelives_job_")
                    || n.starts_with("ninelives_recover")
                    || n.starts_with("ninelives_checkpoint_")
            });
            if agent {
                assert!(
                    q.expr.contains("$namespace"),
                    "{name}/{}: agent query not scoped by $namespace",
                    q.describe()
                );
                if name == "fleet-health" {
                    assert!(q.expr.contains("$node"), "{name}/{}: not scoped by $node", q.describe());
                }
            }
            if job {
                assert!(
                    q.expr.contains("$trainingjob"),
                    "{name}/{}: not scoped by $trainingjob",
                    q.describe()
                );
            }
        }
    }
}

#[test]
fn dashboards_have_the_panels_the_sre_needs() {
    let titles = |slug: &str| -> Vec<String> {
        by_slug(slug)
            .queries
            .iter()
            .map(|q| match &q.origin {
                Origin::Panel { title, kind, .. } => format!("{kind}:{title}"),
                Origin::Annotation { name } => format!("annotation:{name}"),
            })
            .collect()
    };
    let has = |slug: &str, wanted: &str| {
        let all = titles(slug);
        assert!(all.iter().any(|t| t.contains(wanted)), "{slug} lacks {wanted}: {all:?}");
    };
    for wanted in [
        "heatmap:Nodes by number of unusable chips",
        "state-timeline:Nodes with unusable chips",
        "state-timeline:Chip states of the selected nodes",
        "Fault onsets by code and action",
        "Quarantined chips",
        "Agents present",
    ] {
        has("fleet-health", wanted);
    }
    for wanted in [
        "Step",
        "Loss",
        "Tokens per second",
        "Goodput",
        "Checkpoint age",
        "Checkpoint save and load time",
        "annotation:Recoveries",
    ] {
        has("training-job", wanted);
    }
    for wanted in ["Detection time", "Resume time", "Steps lost", "Recoveries by tier"] {
        has("recovery", wanted);
    }
    for wanted in [
        "Leaders",
        "Reconcile rate and errors",
        "Reconcile latency",
        "etcd latency seen by agents",
        "etcd errors",
    ] {
        has("control-plane", wanted);
    }
    let recovery = by_slug("recovery");
    let quantiles = recovery
        .queries
        .iter()
        .filter(|q| q.expr.contains("histogram_quantile") && q.expr.contains("by (tier, le)"));
    assert!(quantiles.count() >= 4, "detection and resume quantiles by tier");
}

/// Every metric name used by a dashboard query, variable or annotation, and by an alert.
fn used_names() -> BTreeMap<String, Vec<String>> {
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in dashboards() {
        for q in &d.queries {
            for n in promql::metric_names(&q.expr) {
                used.entry(n).or_default().push(format!("{}: {}", d.slug(), q.describe()));
            }
        }
        for v in d.variables.iter().filter(|v| v.kind == "query") {
            let query = v.query.as_deref().unwrap_or_default();
            let (selector, _) = label_values(query)
                .unwrap_or_else(|| panic!("{}: variable {} query {query}", d.slug(), v.name));
            for n in promql::metric_names(&selector) {
                used.entry(n).or_default().push(format!("{}: variable {}", d.slug(), v.name));
            }
        }
    }
    for rule in rules::load(&repo_root().join("dashboards/alerts.yaml")).expect("alerts.yaml") {
        for n in promql::metric_names(&rule.expr) {
            used.entry(n).or_default().push(format!("alert {}", rule.name));
        }
    }
    used
}

#[test]
fn dashboards_and_alerts_name_only_metrics_in_metrics_md() {
    let catalogue = Catalogue::load(&repo_root().join("METRICS.md")).expect("METRICS.md");
    let unknown: Vec<String> = used_names()
        .into_iter()
        .filter(|(name, _)| catalogue.resolve(name).is_none())
        .map(|(name, places)| format!("{name} (used by {})", places.join(", ")))
        .collect();
    assert!(unknown.is_empty(), "not in METRICS.md:\n{}", unknown.join("\n"));
    assert!(used_names().len() >= 30, "the dashboards cover the catalogue");
}

#[test]
fn every_query_parses_on_a_real_prometheus() {
    let prometheus = PrometheusServer::start(&[], &[]).expect("prometheus (scripts/setup installs it)");
    let values = BTreeMap::new();
    let mut exprs: Vec<(String, String)> = Vec::new();
    for d in dashboards() {
        for q in &d.queries {
            exprs.push((
                format!("{}: {}", d.slug(), q.describe()),
                promql::substitute(&q.expr, &intervals(), &values),
            ));
        }
        for v in d.variables.iter().filter(|v| v.kind == "query") {
            if let Some((selector, _)) = label_values(v.query.as_deref().unwrap_or_default()) {
                exprs.push((
                    format!("{}: variable {}", d.slug(), v.name),
                    promql::substitute(&selector, &intervals(), &values),
                ));
            }
        }
    }
    for rule in rules::load(&repo_root().join("dashboards/alerts.yaml")).expect("alerts.yaml") {
        exprs.push((format!("alert {}", rule.name), rule.expr));
    }
    let mut failures = Vec::new();
    for (place, expr) in &exprs {
        assert!(!expr.contains('$'), "{place}: unsubstituted variable in {expr}");
        match prometheus.query(expr) {
            Ok(_) => {}
            Err(e @ QueryError::Api { .. }) => failures.push(format!("{place}: {e}\n  {expr}")),
            Err(e) => panic!("{place}: {e}\n{}", prometheus.log_tail()),
        }
    }
    assert!(failures.is_empty(), "queries Prometheus rejects:\n{}", failures.join("\n"));
    // The check can fail: a broken expression is rejected.
    assert!(matches!(prometheus.query("sum by (node) (rate(x[5m])"), Err(QueryError::Api { .. })));
    assert!(exprs.len() >= 60, "{} expressions checked", exprs.len());
}

#[test]
fn the_charts_copies_equal_the_sources() {
    let root = repo_root();
    let chart = root.join("charts/ninelives/files");
    for d in dashboards() {
        let file = d.path.file_name().expect("file name");
        let source = std::fs::read_to_string(&d.path).expect("dashboard");
        let copy = std::fs::read_to_string(chart.join("dashboards").join(file)).unwrap_or_default();
        assert!(
            source == copy,
            "{} drifted: cp dashboards/*.json charts/ninelives/files/dashboards/",
            file.to_string_lossy()
        );
    }
    let copies = std::fs::read_dir(chart.join("dashboards")).expect("chart dashboards").count();
    assert_eq!(copies, dashboards().len(), "the chart ships a dashboard dashboards/ does not have");
    let rules = std::fs::read_to_string(root.join("dashboards/alerts.yaml")).expect("alerts.yaml");
    let copy = std::fs::read_to_string(chart.join("alerts.yaml")).unwrap_or_default();
    assert!(rules == copy, "alerts drifted: cp dashboards/alerts.yaml charts/ninelives/files/alerts.yaml");
}
