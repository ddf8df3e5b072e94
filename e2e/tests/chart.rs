//! Tests of the Helm chart: lint, server-side dry-run against the e2e apiserver, CRDs equal to
//! the generated ones, and least-privilege RBAC.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use ninelives_e2e::cluster::run;
use ninelives_e2e::{ControlPlane, tools};
use serde_json::Value;

fn chart() -> PathBuf {
    tools::repo_root().join("charts/ninelives")
}

fn helm(args: &[&str]) -> String {
    let mut command = Command::new(tools::tool("helm").expect("helm (e2e/tools/build.sh)"));
    command.args(args).env("HELM_CACHE_HOME", std::env::temp_dir().join("ninelives-helm-cache"));
    run(command, None).unwrap_or_else(|e| panic!("{e}"))
}

fn render(extra: &[&str]) -> String {
    let chart = chart().display().to_string();
    let mut args = vec!["template", "ninelives", chart.as_str(), "--namespace", "ninelives-system"];
    args.extend_from_slice(extra);
    helm(&args)
}

fn documents(yaml: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("rendered chart is YAML");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn kinds(yaml: &str) -> BTreeSet<String> {
    documents(yaml).iter().filter_map(|d| d["kind"].as_str().map(str::to_string)).collect()
}

#[test]
fn chart_crds_equal_the_generated_crds() {
    let generated = ninelives_core::crd_yaml();
    let committed = std::fs::read_to_string(tools::repo_root().join("crds/trainingjob.yaml")).expect("crds/");
    let in_chart = std::fs::read_to_string(chart().join("crds/trainingjob.yaml")).expect("chart crds/");
    assert_eq!(committed, generated, "crds/ drifted: cargo run -p ninelives -- crd > crds/trainingjob.yaml");
    assert_eq!(in_chart, generated, "chart CRD drifted: cp crds/trainingjob.yaml charts/ninelives/crds/");
}

#[test]
fn helm_lint_passes_with_default_and_optional_features() {
    let chart = chart().display().to_string();
    helm(&["lint", "--strict", &chart]);
    helm(&[
        "lint",
        "--strict",
        &chart,
        "--set",
        "etcd.tls.enabled=true,etcd.tls.secretName=etcd-client,metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true",
    ]);
}

#[test]
fn values_schema_rejects_bad_values() {
    let chart = chart().display().to_string();
    let mut command = Command::new(tools::tool("helm").expect("helm"));
    command.args(["template", "x", &chart, "--set", "operator.replicas=0"]);
    let err = run(command, None).expect_err("replicas 0 must be rejected").to_string();
    assert!(err.contains("replicas"), "{err}");
    let mut command = Command::new(tools::tool("helm").expect("helm"));
    command.args(["template", "x", &chart, "--set", "etcd.tls.enabled=true"]);
    let err = run(command, None).expect_err("TLS without a secret must be rejected").to_string();
    assert!(err.contains("etcd.tls.secretName"), "{err}");
}

#[test]
fn chart_renders_every_component_and_toggle() {
    let default = kinds(&render(&[]));
    for kind in [
        "Deployment",
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Service",
    ] {
        assert!(default.contains(kind), "{kind} missing from {default:?}");
    }
    assert!(!default.contains("ServiceMonitor") && !default.contains("PodMonitor"));
    let monitored =
        kinds(&render(&["--set", "metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true"]));
    assert!(monitored.contains("ServiceMonitor") && monitored.contains("PodMonitor"));

    let docs = documents(&render(&["--set", "etcd.tls.enabled=true,etcd.tls.secretName=etcd-client"]));
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").expect("deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> =
        container["args"].as_array().expect("args").iter().filter_map(Value::as_str).collect();
    assert!(args.contains(&"--etcd-ca-file=/etc/ninelives/etcd/ca.crt"), "{args:?}");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/live");
    let daemonset = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("daemonset");
    let agent = &daemonset["spec"]["template"]["spec"];
    assert_eq!(agent["containers"][0]["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    assert_eq!(agent["volumes"][0]["hostPath"]["path"], "/var/lib/ninelives/chips");
    assert_eq!(agent["tolerations"][0]["operator"], "Exists");
}

/// Every (apiGroup, resource, verb) the chart grants, with where the code uses it. A grant
/// without an entry here fails the test (unused permission); an entry whose evidence is not in
/// the named source file fails it too (the code stopped using it).
const USES: &[(&str, &str, &str, &str, &str)] = &[
    ("ninelives.io", "trainingjobs", "list", "operator/src/controller.rs", "Controller::new(jobs"),
    ("ninelives.io", "trainingjobs", "watch", "operator/src/controller.rs", "Controller::new(jobs"),
    ("ninelives.io", "trainingjobs", "get", "operator/src/controller.rs", "finalizer(&api, FINALIZER"),
    ("ninelives.io", "trainingjobs", "patch", "operator/src/controller.rs", "finalizer(&api, FINALIZER"),
    ("ninelives.io", "trainingjobs/status", "patch", "operator/src/controller.rs", "api.patch_status(&name"),
    ("", "pods", "list", "operator/src/controller.rs", ".list(&ListParams::default().labels(&job_selector"),
    ("", "pods", "watch", "operator/src/controller.rs", ".owns(pods"),
    ("", "pods", "patch", "operator/src/controller.rs", "pods.patch(&pod_name"),
    // Server-side apply that creates the object is authorised as create too.
    ("", "pods", "create", "operator/src/controller.rs", "pods.patch(&pod_name"),
    ("", "pods", "delete", "operator/src/controller.rs", "api.delete(name"),
    ("", "services", "get", "operator/src/controller.rs", "services.get_opt(&name)"),
    (
        "",
        "services",
        "patch",
        "operator/src/controller.rs",
        ".patch(&name, &PatchParams::apply(FIELD_MANAGER)",
    ),
    (
        "",
        "services",
        "create",
        "operator/src/controller.rs",
        ".patch(&name, &PatchParams::apply(FIELD_MANAGER)",
    ),
    ("", "services", "delete", "operator/src/controller.rs", "delete_ignoring_missing(&services"),
    ("events.k8s.io", "events", "create", "operator/src/controller.rs", "recorder.publish("),
    ("events.k8s.io", "events", "patch", "operator/src/controller.rs", "recorder.publish("),
    ("coordination.k8s.io", "leases", "get", "operator/src/leader.rs", "self.api.get_opt(&self.name)"),
    ("coordination.k8s.io", "leases", "create", "operator/src/leader.rs", "self.api.create("),
    ("coordination.k8s.io", "leases", "update", "operator/src/leader.rs", "self.api.replace("),
    // The agent (agent/ crate) patches its own Node's taint and chip-health condition.
    ("", "nodes", "get", "agent/src", "Api<Node>"),
    ("", "nodes", "patch", "agent/src", "Api<Node>"),
    ("", "nodes/status", "patch", "agent/src", "patch_status"),
];

fn source_contains(path: &str, needle: &str) -> Option<bool> {
    let full = tools::repo_root().join(path);
    if full.is_dir() {
        let mut found = false;
        for entry in std::fs::read_dir(&full).ok()?.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            found |= text.contains(needle);
        }
        Some(found)
    } else {
        Some(std::fs::read_to_string(full).ok()?.contains(needle))
    }
}

#[test]
fn every_rbac_rule_is_used_by_the_code_and_none_is_a_wildcard() {
    let mut granted = BTreeSet::new();
    for doc in documents(&render(&[])) {
        if !matches!(doc["kind"].as_str(), Some("ClusterRole" | "Role")) {
            continue;
        }
        for rule in doc["rules"].as_array().expect("rules") {
            let list = |field: &str| -> Vec<String> {
                rule[field]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                    .unwrap_or_default()
            };
            for group in list("apiGroups") {
                for resource in list("resources") {
                    for verb in list("verbs") {
                        assert!(
                            !group.contains('*') && !resource.contains('*') && !verb.contains('*'),
                            "wildcard in {}: {group}/{resource} {verb}",
                            doc["metadata"]["name"]
                        );
                        granted.insert((group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    let used: BTreeSet<(String, String, String)> =
        USES.iter().map(|(g, r, v, _, _)| (g.to_string(), r.to_string(), v.to_string())).collect();
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(unused.is_empty(), "the chart grants permissions no code uses: {unused:?}");
    let missing: Vec<_> = used.difference(&granted).collect();
    assert!(missing.is_empty(), "the code needs permissions the chart does not grant: {missing:?}");
    for (group, resource, verb, path, needle) in USES {
        match source_contains(path, needle) {
            Some(true) => {}
            Some(false) => panic!("{group}/{resource} {verb}: {path} no longer contains {needle:?}"),
            // The agent is built on another branch; its rules are checked once agent/ exists.
            None => assert!(path.starts_with("agent/"), "{path} not found"),
        }
    }
}

#[test]
fn rendered_chart_passes_server_side_dry_run() {
    let plane = ControlPlane::start().expect("control plane");
    plane.kubectl(&["create", "namespace", "ninelives-system"]).expect("namespace");
    let rendered =
        render(&["--include-crds", "--set", "etcd.tls.enabled=true,etcd.tls.secretName=etcd-client"]);
    let out = plane
        .kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered))
        .unwrap_or_else(|e| panic!("{e}"));
    for object in [
        "deployment.apps/ninelives-operator",
        "daemonset.apps/ninelives-agent",
        "poddisruptionbudget.policy/ninelives-operator",
    ] {
        assert!(out.contains(object), "{object} missing from:\n{out}");
    }
}

/// The chart's RBAC is not just minimal but sufficient: the operator, authenticated as the
/// chart's ServiceAccount and granted nothing else, runs a job from creation to deletion.
#[tokio::test]
async fn operator_runs_a_job_with_nothing_but_the_charts_rbac() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::Api;
    use kube::api::{DeleteParams, ListParams, PostParams};
    use ninelives_core::TrainingJob;
    use ninelives_core::job::JobPhase;
    use ninelives_e2e::{Harness, OperatorProcess, wait_for};
    use std::time::Duration;

    let h = Harness::start(2).await.expect("harness");
    h.plane.kubectl(&["create", "namespace", "ninelives-system"]).expect("namespace");
    let rbac: Vec<String> = documents(&render(&[]))
        .into_iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some("ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding")
            )
        })
        .map(|d| d.to_string())
        .collect();
    let list = format!("{{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[{}]}}", rbac.join(","));
    h.plane.kubectl_stdin(&["apply", "-f", "-"], Some(&list)).unwrap_or_else(|e| panic!("{e}"));
    let forbidden = h.plane.kubectl(&[
        "--kubeconfig",
        &h.plane.operator_kubeconfig().display().to_string(),
        "get",
        "secrets",
        "-A",
    ]);
    assert!(forbidden.is_err(), "the operator identity must not read secrets");

    let operator = OperatorProcess::start_as(
        &h.plane,
        h.plane.operator_kubeconfig(),
        "ninelives-system",
        "operator-rbac",
        &h.worker,
        15,
    )
    .expect("operator");
    let manifest = serde_json::json!({
        "apiVersion": "ninelives.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": { "name": "least", "namespace": "default" },
        "spec": {
            "model": { "preset": "tiny" },
            "topology": { "nodes": 2, "chipsPerNode": 8, "chipMemory": "1Gi" },
            "data": { "datasets": ["/usr/share/common-licenses"], "globalBatchSize": 16, "microBatchSize": 4 },
            "training": { "steps": 30, "learningRate": { "peak": 0.003 } },
            "checkpoint": { "path": "/tmp/ninelives-e2e/least", "intervalSteps": 10 }
        }
    });
    let jobs: Api<TrainingJob> = Api::namespaced(h.client.clone(), "default");
    let job: TrainingJob = serde_json::from_value(manifest).expect("job");
    jobs.create(&PostParams::default(), &job).await.expect("create");
    let timeout = Duration::from_secs(90);
    wait_for("least to succeed", timeout, || async {
        let phase = jobs.get("least").await.ok()?.status?.phase;
        (phase == Some(JobPhase::Succeeded)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.log_tail()));
    jobs.delete("least", &DeleteParams::default()).await.expect("delete");
    wait_for("least to be gone", timeout, || async {
        jobs.get_opt("least").await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.log_tail()));
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), "default");
    assert!(
        pods.list(&ListParams::default().labels("ninelives.io/job=least"))
            .await
            .expect("pods")
            .items
            .is_empty()
    );
    let log = operator.log();
    assert!(!log.contains("forbidden"), "the operator hit an RBAC denial:\n{log}");
}

/// Dashboards of the repository's `dashboards/` as parsed JSON, by file name.
fn source_dashboards() -> std::collections::BTreeMap<String, Value> {
    let dir = tools::repo_root().join("dashboards");
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("dashboards/").flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).expect("dashboard");
            let name = path.file_name().expect("name").to_string_lossy().into_owned();
            out.insert(name, serde_json::from_str(&text).expect("dashboard JSON"));
        }
    }
    out
}

#[test]
fn chart_ships_dashboards_for_the_grafana_sidecar_and_rules_as_a_prometheusrule() {
    // Default: dashboards on (plain ConfigMaps), PrometheusRule off (needs the operator's CRDs).
    let docs = documents(&render(&[]));
    let configmaps: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap" && d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect();
    let sources = source_dashboards();
    assert_eq!(configmaps.len(), sources.len(), "one ConfigMap per dashboard");
    for cm in &configmaps {
        let data = cm["data"].as_object().expect("data");
        assert_eq!(data.len(), 1);
        let (file, json) = data.iter().next().expect("one dashboard");
        let shipped: Value = serde_json::from_str(json.as_str().expect("string")).expect("shipped JSON");
        assert_eq!(Some(&shipped), sources.get(file), "{file} differs from dashboards/{file}");
        assert_eq!(cm["metadata"]["namespace"], "ninelives-system");
    }
    assert!(!kinds(&render(&[])).contains("PrometheusRule"));
    let off = documents(&render(&["--set", "metrics.grafanaDashboards.enabled=false"]));
    assert!(!off.iter().any(|d| d["kind"] == "ConfigMap"), "dashboards toggle off still renders ConfigMaps");
    let elsewhere = documents(&render(&["--set", "metrics.grafanaDashboards.namespace=monitoring"]));
    assert!(
        elsewhere
            .iter()
            .filter(|d| d["kind"] == "ConfigMap")
            .all(|d| d["metadata"]["namespace"] == "monitoring")
    );

    let rules_on = documents(&render(&[
        "--set",
        "metrics.prometheusRule.enabled=true,metrics.prometheusRule.runbookBaseUrl=https://runbooks.example/nl.md,metrics.prometheusRule.labels.release=kps",
    ]));
    let rule = rules_on.iter().find(|d| d["kind"] == "PrometheusRule").expect("PrometheusRule");
    assert_eq!(rule["metadata"]["labels"]["release"], "kps");
    let source = std::fs::read_to_string(tools::repo_root().join("dashboards/alerts.yaml"))
        .expect("alerts.yaml")
        .replace("https://example.invalid/ninelives/docs/runbooks.md", "https://runbooks.example/nl.md");
    let source: Value = serde_saphyr::from_str(&source).expect("alerts.yaml YAML");
    assert_eq!(
        rule["spec"]["groups"], source["groups"],
        "PrometheusRule groups differ from dashboards/alerts.yaml"
    );
    let text = rule.to_string();
    assert!(text.contains("{{ $labels.node }}"), "alert templates must reach Prometheus unrendered");

    let monitored = documents(&render(&["--set", "metrics.podMonitor.enabled=true"]));
    let pod_monitor = monitored.iter().find(|d| d["kind"] == "PodMonitor").expect("PodMonitor");
    let relabel = &pod_monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0];
    assert_eq!(relabel["targetLabel"], "node", "dashboards select agent series by node");

    let chart = chart().display().to_string();
    helm(&["lint", "--strict", &chart, "--set", "metrics.prometheusRule.enabled=true"]);
    let mut command = Command::new(tools::tool("helm").expect("helm"));
    command.args(["template", "x", &chart, "--set", "metrics.prometheusRule.runbookBaseUrl=runbooks"]);
    let err = run(command, None).expect_err("a runbook base that is no URL must be rejected").to_string();
    assert!(err.contains("runbookBaseUrl"), "{err}");
}

/// The optional Prometheus Operator resources (ServiceMonitor, PodMonitor, PrometheusRule) pass
/// the server-side dry-run once their CRDs exist. The real CRDs are not vendored; a fixture with
/// the PrometheusRule fields the chart uses stands in (e2e/tests/fixtures/monitoring-crds.yaml).
#[test]
fn monitoring_resources_pass_server_side_dry_run_with_their_crds() {
    let plane = ControlPlane::start().expect("control plane");
    plane.kubectl(&["create", "namespace", "ninelives-system"]).expect("namespace");
    let crds = tools::repo_root().join("e2e/tests/fixtures/monitoring-crds.yaml").display().to_string();
    plane.kubectl(&["apply", "-f", &crds]).unwrap_or_else(|e| panic!("{e}"));
    plane
        .kubectl(&[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/prometheusrules.monitoring.coreos.com",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/podmonitors.monitoring.coreos.com",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    let rendered = render(&[
        "--include-crds",
        "--set",
        "metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,metrics.prometheusRule.enabled=true",
    ]);
    let out = plane
        .kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered))
        .unwrap_or_else(|e| panic!("{e}"));
    for object in [
        "prometheusrule.monitoring.coreos.com/ninelives-alerts",
        "servicemonitor.monitoring.coreos.com/ninelives-operator",
        "podmonitor.monitoring.coreos.com/ninelives-agent",
        "configmap/ninelives-dashboard-fleet-health",
        "configmap/ninelives-dashboard-control-plane",
    ] {
        assert!(out.contains(object), "{object} missing from:\n{out}");
    }
    // The fixture is strict where it matters: a misspelt rule field is refused.
    let bad = "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata: {name: bad, namespace: ninelives-system}\nspec:\n  groups:\n    - name: g\n      rules:\n        - alert: A\n          expr: up == 0\n          fro: 5m\n";
    let err =
        plane.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], Some(bad)).expect_err("unknown field");
    assert!(err.to_string().contains("fro"), "{err}");
}
