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
        "etcd.tls.enabled=true,etcd.tls.secretName=c,etcd.tls.serverSecretName=s,etcd.tls.workerSecretName=c,metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true",
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

    let docs = documents(&render(&["--set", ETCD_TLS]));
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
    ("", "secrets", "get", "operator/src/controller.rs", "secrets.get_opt(&name)"),
    ("", "secrets", "create", "operator/src/controller.rs", "secrets.create("),
    // etcd.auth: a job's credentials Secret without a usable password is replaced.
    ("", "secrets", "delete", "operator/src/etcd_auth.rs", ".delete(&name, &DeleteParams::default())"),
    // etcd.auth: one agent etcd user per Node.
    ("", "nodes", "list", "operator/src/etcd_auth.rs", ".list_metadata(&ListParams::default())"),
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
    ("networking.k8s.io", "networkpolicies", "get", "operator/src/controller.rs", "policies.get_opt(&name)"),
    (
        "networking.k8s.io",
        "networkpolicies",
        "create",
        "operator/src/controller.rs",
        "policies\n        .patch(&name",
    ),
    (
        "networking.k8s.io",
        "networkpolicies",
        "patch",
        "operator/src/controller.rs",
        "policies\n        .patch(&name",
    ),
    (
        "networking.k8s.io",
        "networkpolicies",
        "delete",
        "operator/src/controller.rs",
        "delete_ignoring_missing(&policies",
    ),
    ("", "persistentvolumeclaims", "get", "operator/src/controller.rs", "Api<PersistentVolumeClaim>"),
    ("scheduling.volcano.sh", "podgroups", "get", "operator/src/controller.rs", "groups.get_opt(&name)"),
    (
        "scheduling.volcano.sh",
        "podgroups",
        "create",
        "operator/src/controller.rs",
        "groups\n        .patch(&name",
    ),
    (
        "scheduling.volcano.sh",
        "podgroups",
        "patch",
        "operator/src/controller.rs",
        "groups\n        .patch(&name",
    ),
    (
        "scheduling.volcano.sh",
        "podgroups",
        "delete",
        "operator/src/controller.rs",
        "delete_ignoring_missing(&groups",
    ),
    ("scheduling.x-k8s.io", "podgroups", "get", "operator/src/controller.rs", "groups.get_opt(&name)"),
    (
        "scheduling.x-k8s.io",
        "podgroups",
        "create",
        "operator/src/controller.rs",
        "groups\n        .patch(&name",
    ),
    (
        "scheduling.x-k8s.io",
        "podgroups",
        "patch",
        "operator/src/controller.rs",
        "groups\n        .patch(&name",
    ),
    (
        "scheduling.x-k8s.io",
        "podgroups",
        "delete",
        "operator/src/controller.rs",
        "delete_ignoring_missing(&groups",
    ),
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

/// Values of the in-chart etcd with TLS, with the Secret names `scripts/etcd-certs` makes.
const ETCD_TLS: &str = "etcd.tls.enabled=true,etcd.tls.serverSecretName=ninelives-etcd-server,\
etcd.tls.secretName=ninelives-etcd-client,etcd.tls.workerSecretName=ninelives-etcd-client";

/// The chart with the in-chart 3-member etcd and TLS everywhere passes the apiserver's
/// server-side dry run, with the Secrets made by the chart's one-shot generator.
#[test]
fn rendered_chart_with_in_chart_etcd_and_tls_passes_server_side_dry_run() {
    let plane = ControlPlane::start().expect("control plane");
    plane.kubectl(&["create", "namespace", "ninelives-system"]).expect("namespace");
    plane.kubectl(&["create", "namespace", "training"]).expect("namespace");
    let certs = tempfile::tempdir().expect("tempdir");
    let mut generator = Command::new(tools::repo_root().join("scripts/etcd-certs"));
    generator.args(["ninelives", "ninelives-system"]).arg(certs.path()).arg("training");
    run(generator, None).unwrap_or_else(|e| panic!("{e}"));
    let secrets = certs.path().join("secrets.yaml").display().to_string();
    let created = plane.kubectl(&["apply", "-f", &secrets]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(created.matches("secret/ninelives-etcd-").count(), 3, "{created}");

    let rendered = render(&["--include-crds", "--set", ETCD_TLS]);
    let out = plane
        .kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered))
        .unwrap_or_else(|e| panic!("{e}"));
    for object in [
        "deployment.apps/ninelives-operator",
        "daemonset.apps/ninelives-agent",
        "poddisruptionbudget.policy/ninelives-operator",
        "statefulset.apps/ninelives-etcd",
        "service/ninelives-etcd-client",
        "poddisruptionbudget.policy/ninelives-etcd",
        "networkpolicy.networking.k8s.io/ninelives-etcd",
        "validatingadmissionpolicy.admissionregistration.k8s.io/ninelives-agent-own-node",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/ninelives-agent-own-node",
    ] {
        assert!(out.contains(object), "{object} missing from:\n{out}");
    }
    let docs = documents(&rendered);
    let etcd = docs.iter().find(|d| d["kind"] == "StatefulSet").expect("etcd StatefulSet");
    assert_eq!(etcd["spec"]["replicas"], 3);
    let args = etcd["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    for flag in ["--client-cert-auth=true", "--peer-client-cert-auth=true", "--listen-client-urls=https://"] {
        assert!(args.contains(flag), "{flag} missing from {args}");
    }
    let operator = docs.iter().find(|d| d["kind"] == "Deployment").expect("deployment").to_string();
    assert!(
        operator.contains("--etcd=https://ninelives-etcd-client.ninelives-system.svc:2379"),
        "{operator}"
    );
}

#[test]
fn etcd_defaults_are_coherent_and_incoherent_settings_are_refused() {
    // Default: in-chart etcd, plain text, and every component pointed at it over http://.
    let docs = documents(&render(&[]));
    assert!(docs.iter().any(|d| d["kind"] == "StatefulSet"), "etcd is deployed by default");
    let operator = docs.iter().find(|d| d["kind"] == "Deployment").expect("deployment").to_string();
    assert!(operator.contains("--etcd=http://ninelives-etcd-client.ninelives-system.svc:2379"), "{operator}");
    let external =
        documents(&render(&["--set", "etcd.deploy=false,etcd.endpoints={http://etcd.example:2379}"]));
    assert!(!external.iter().any(|d| d["kind"] == "StatefulSet"));
    let chart = chart().display().to_string();
    for (values, expected) in [
        ("etcd.deploy=false", "etcd.endpoints is required"),
        ("etcd.endpoints={https://etcd.example:2379}", "etcd.tls.enabled is false"),
        (
            "etcd.tls.enabled=true,etcd.tls.secretName=c,etcd.tls.workerSecretName=c",
            "etcd.tls.serverSecretName",
        ),
        (
            "etcd.tls.enabled=true,etcd.tls.secretName=c,etcd.tls.serverSecretName=s",
            "etcd.tls.workerSecretName",
        ),
        ("etcd.auth.enabled=true", "etcd.auth.enabled needs etcd.tls.enabled"),
    ] {
        let mut command = Command::new(tools::tool("helm").expect("helm"));
        command.args(["template", "x", &chart, "--set", values]);
        let err = run(command, None).expect_err(values).to_string();
        assert!(err.contains(expected), "{values}: {err}");
    }
}

/// The worker pods the chart's operator builds: its Deployment's flags parsed by the operator's
/// own argument parser, the pods built by the operator's own code, then created for real in a
/// namespace that enforces Pod Security `restricted`.
#[test]
fn worker_pods_from_the_charts_operator_carry_tls_prefix_metrics_and_pass_psa_restricted() {
    use clap::Parser;
    use ninelives_operator::OperatorArgs;
    use ninelives_operator::resources::{ETCD_TLS_MOUNT, desired_pods};

    #[derive(Parser)]
    struct Operator {
        #[command(flatten)]
        args: OperatorArgs,
    }

    let auth = "etcd.auth.enabled=true,etcd.auth.operatorSecretName=ninelives-etcd-operator";
    let docs = documents(&render(&["--set", &format!("{ETCD_TLS},etcd.prefix=/team-a/,{auth}")]));
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").expect("deployment");
    let argv: Vec<String> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    assert_eq!(argv[0], "operator");
    let flags = Operator::try_parse_from(&argv).unwrap_or_else(|e| panic!("{e}\n{argv:?}")).args;
    assert!(flags.etcd_auth, "etcd.auth.enabled reaches the operator: {argv:?}");
    // The operator's own etcd user and password come from its Secret, never from the spec.
    let operator_env = &deployment["spec"]["template"]["spec"]["containers"][0]["env"];
    for (name, key) in [("NINELIVES_ETCD_USER", "username"), ("NINELIVES_ETCD_PASSWORD", "password")] {
        let var = operator_env.as_array().expect("env").iter().find(|e| e["name"] == name).expect(name);
        assert_eq!(var["valueFrom"]["secretKeyRef"]["name"], "ninelives-etcd-operator");
        assert_eq!(var["valueFrom"]["secretKeyRef"]["key"], key);
        assert!(var.get("value").is_none());
    }
    // Each agent authenticates with its own node's certificate, given once.
    let daemonset = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("daemonset");
    let agent = &daemonset["spec"]["template"]["spec"];
    let agent_args: Vec<&str> =
        agent["containers"][0]["args"].as_array().expect("args").iter().filter_map(Value::as_str).collect();
    let certs: Vec<&&str> = agent_args.iter().filter(|a| a.starts_with("--etcd-cert-file=")).collect();
    assert_eq!(certs, [&"--etcd-cert-file=/etc/ninelives/etcd-agent/tls.crt"], "{agent_args:?}");
    assert!(agent_args.contains(&"--etcd-ca-file=/etc/ninelives/etcd/ca.crt"), "{agent_args:?}");
    let host = agent["volumes"].as_array().expect("volumes").iter().find(|v| v["name"] == "etcd-agent-cert");
    assert_eq!(host.expect("agent cert volume")["hostPath"]["path"], "/etc/ninelives/etcd-agent");
    let manifest = serde_json::json!({
        "apiVersion": "ninelives.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": { "name": "psa", "namespace": "training", "uid": "0b5e1c55-0000-4000-8000-000000000001" },
        "spec": {
            "model": { "preset": "tiny" },
            "topology": { "nodes": 2, "chipsPerNode": 8, "spareNodes": 1, "chipMemory": "1Gi" },
            "data": { "datasets": ["/data"], "globalBatchSize": 16, "microBatchSize": 4 },
            "training": { "steps": 30, "learningRate": { "peak": 0.003 } },
            "checkpoint": { "pvc": { "claimName": "checkpoints" }, "intervalSteps": 10 }
        }
    });
    let job: ninelives_core::TrainingJob = serde_json::from_value(manifest).expect("job");
    let pods = desired_pods(&job, &flags.template()).expect("pods");
    for pod in &pods {
        let spec = pod.spec.as_ref().expect("spec");
        let container = &spec.containers[0];
        let env: std::collections::BTreeMap<_, _> =
            container.env.iter().flatten().map(|e| (e.name.as_str(), e.value.clone())).collect();
        assert_eq!(env["NINELIVES_ETCD_PREFIX"].as_deref(), Some("/team-a/"));
        assert_eq!(
            env["NINELIVES_ETCD_ENDPOINTS"].as_deref(),
            Some("https://ninelives-etcd-client.ninelives-system.svc:2379")
        );
        assert_eq!(env["NINELIVES_ETCD_CA_FILE"].as_deref(), Some("/etc/ninelives/etcd/ca.crt"));
        assert_eq!(env["NINELIVES_METRICS_ADDR"].as_deref(), Some("0.0.0.0:9103"));
        assert_eq!(env["NINELIVES_ETCD_USER"].as_deref(), Some("ninelives-worker:training:psa"));
        assert_eq!(env["NINELIVES_ETCD_PASSWORD"], None, "from the job's Secret, not the spec");
        let mounts: Vec<&str> =
            container.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
        assert!(mounts.contains(&ETCD_TLS_MOUNT), "{mounts:?}");
        let etcd_volume =
            spec.volumes.iter().flatten().find(|v| v.name == "etcd-tls").expect("etcd-tls volume");
        assert_eq!(
            etcd_volume.secret.as_ref().and_then(|s| s.secret_name.as_deref()),
            Some("ninelives-etcd-client")
        );
        assert!(
            container
                .ports
                .iter()
                .flatten()
                .any(|p| p.name.as_deref() == Some("metrics") && p.container_port == 9103)
        );
    }

    let plane = ControlPlane::start().expect("control plane");
    plane.kubectl(&["create", "namespace", "training"]).expect("namespace");
    plane
        .kubectl(&[
            "label",
            "namespace",
            "training",
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest",
        ])
        .expect("label");
    let pod_list = |pods: &[k8s_openapi::api::core::v1::Pod]| {
        let items: Vec<Value> = pods
            .iter()
            .map(|p| {
                let mut v = serde_json::to_value(p).expect("pod JSON");
                v["apiVersion"] = "v1".into();
                v["kind"] = "Pod".into();
                // Owner references need the job to exist; admission is what is tested here.
                v["metadata"].as_object_mut().expect("metadata").remove("ownerReferences");
                v
            })
            .collect();
        serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items }).to_string()
    };
    let created = plane
        .kubectl_stdin(&["create", "-f", "-"], Some(&pod_list(&pods)))
        .unwrap_or_else(|e| panic!("worker pods refused under PSA restricted: {e}"));
    for name in ["psa-0", "psa-1", "psa-2"] {
        assert!(created.contains(&format!("pod/{name} created")), "{created}");
    }
    // As stored by the apiserver: the etcd password is a reference to the job's Secret.
    let stored = plane.kubectl(&["get", "pod", "psa-0", "-n", "training", "-o", "json"]).expect("get pod");
    let stored: Value = serde_json::from_str(&stored).expect("pod JSON");
    let env = stored["spec"]["containers"][0]["env"].as_array().expect("env");
    let password = env.iter().find(|e| e["name"] == "NINELIVES_ETCD_PASSWORD").expect("password variable");
    assert_eq!(password["valueFrom"]["secretKeyRef"]["name"], "psa-etcd-credentials");
    assert_eq!(password["valueFrom"]["secretKeyRef"]["key"], "password");
    assert!(password.get("value").is_none(), "{password}");
    // The namespace really enforces: the same pod without its securityContext is refused.
    let mut bare = pods[0].clone();
    bare.metadata.name = Some("bare".into());
    if let Some(spec) = bare.spec.as_mut() {
        spec.security_context = None;
        spec.containers[0].security_context = None;
    }
    let err = plane.kubectl_stdin(&["create", "-f", "-"], Some(&pod_list(&[bare]))).expect_err("bare pod");
    assert!(err.to_string().contains("violates PodSecurity \"restricted:latest\""), "{err}");
}

/// The agent's ClusterRole may patch any Node; the chart's ValidatingAdmissionPolicy narrows
/// that to the Node named in the agent's token, on the e2e apiserver.
#[test]
fn agent_may_patch_only_its_own_node() {
    let plane = ControlPlane::start().expect("control plane");
    plane.kubectl(&["create", "namespace", "ninelives-system"]).expect("namespace");
    let objects: Vec<String> = documents(&render(&[]))
        .into_iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some(
                    "ServiceAccount"
                        | "ClusterRole"
                        | "ClusterRoleBinding"
                        | "ValidatingAdmissionPolicy"
                        | "ValidatingAdmissionPolicyBinding"
                )
            )
        })
        .map(|d| d.to_string())
        .collect();
    let list = format!("{{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[{}]}}", objects.join(","));
    plane.kubectl_stdin(&["apply", "-f", "-"], Some(&list)).unwrap_or_else(|e| panic!("{e}"));
    for node in ["node-a", "node-b"] {
        let manifest =
            format!("{{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{{\"name\":\"{node}\"}}}}");
        plane.kubectl_stdin(&["create", "-f", "-"], Some(&manifest)).unwrap_or_else(|e| panic!("{e}"));
    }
    let agent = "--as=system:serviceaccount:ninelives-system:ninelives-agent";
    let on_a = "--as-user-extra=authentication.kubernetes.io/node-name=node-a";
    let patch = |extra: &[&str], node: &str, value: &str| {
        let mut args = vec![agent];
        args.extend_from_slice(extra);
        let label = format!("ninelives.io/test={value}");
        args.extend_from_slice(&["label", "--overwrite", "node", node, &label]);
        plane.kubectl(&args)
    };
    // The policy takes effect once the apiserver has loaded it (asynchronously).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut attempt = 0u32;
    let refused = loop {
        // A new value each time: kubectl sends nothing when the label already has it.
        attempt += 1;
        match patch(&[on_a], "node-b", &format!("x{attempt}")) {
            Err(e) => break e.to_string(),
            Ok(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(500))
            }
            Ok(out) => panic!("the agent on node-a patched node-b: {out}"),
        }
    };
    assert!(refused.contains("may only change its own Node, not node-b"), "{refused}");
    patch(&[on_a], "node-a", "1").unwrap_or_else(|e| panic!("the agent may patch its own node: {e}"));
    // The chip-health condition goes through nodes/status; kubectl would GET it first (not
    // granted), so the PATCH is sent as the agent would send it, impersonated by the admin.
    let kubeconfig: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(plane.kubeconfig()).expect("kubeconfig"))
            .expect("YAML");
    let cluster = &kubeconfig["clusters"][0]["cluster"];
    let user = &kubeconfig["users"][0]["user"];
    let file = |v: &Value| v.as_str().expect("path").to_string();
    let status_patch = |node: &str| {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "-X", "PATCH", "--cacert", &file(&cluster["certificate-authority"])])
            .args(["--cert", &file(&user["client-certificate"]), "--key", &file(&user["client-key"])])
            .args(["-H", "Content-Type: application/merge-patch+json"])
            .args(["-H", "Impersonate-User: system:serviceaccount:ninelives-system:ninelives-agent"])
            .args(["-H", "Impersonate-Extra-authentication.kubernetes.io%2Fnode-name: node-a"])
            .args(["-d", r#"{"status":{"conditions":[{"type":"ChipHealthy","status":"False","reason":"Test","message":"x"}]}}"#])
            .arg(format!("{}/api/v1/nodes/{node}/status", cluster["server"].as_str().expect("server")));
        run(curl, None).unwrap_or_else(|e| panic!("{e}"))
    };
    let other = status_patch("node-b");
    assert!(other.contains("its own Node, not node-b") && other.contains("\"code\": 403"), "{other}");
    let own = status_patch("node-a");
    assert!(own.contains("ChipHealthy") && !own.contains("\"code\": 403"), "{own}");
    let no_claim = patch(&[], "node-a", "2").expect_err("a token without a node claim");
    assert!(no_claim.to_string().contains("its own Node"), "{no_claim}");
    // The RBAC test above is unchanged: the agent may still patch nodes at all.
    let labels =
        plane.kubectl(&["get", "node", "node-a", "-o", "jsonpath={.metadata.labels}"]).expect("node");
    assert!(labels.contains("\"ninelives.io/test\":\"1\""), "{labels}");
}

/// PodGroups for Volcano and the coscheduling plugin, created by the operator against their
/// CRDs on the e2e apiserver, and a multi-node job on a ReadWriteOnce claim refused.
#[tokio::test]
async fn operator_creates_podgroups_and_refuses_an_unshared_checkpoint_claim() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams, PostParams};
    use ninelives_core::TrainingJob;
    use ninelives_core::job::JobPhase;
    use ninelives_e2e::{OperatorProcess, WorkerCommand, wait_for};
    use std::time::Duration;

    let plane = ControlPlane::start().expect("control plane");
    let crds = tools::repo_root().join("e2e/tests/fixtures/podgroup-crds.yaml").display().to_string();
    plane.kubectl(&["apply", "-f", &crds]).unwrap_or_else(|e| panic!("{e}"));
    plane
        .kubectl(&[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/podgroups.scheduling.volcano.sh",
            "crd/podgroups.scheduling.x-k8s.io",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    let claim = r#"{"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{"name":"ckpt-rwo","namespace":"default"},
        "spec":{"accessModes":["ReadWriteOnce"],"resources":{"requests":{"storage":"1Gi"}}}}"#;
    plane.kubectl_stdin(&["create", "-f", "-"], Some(claim)).unwrap_or_else(|e| panic!("{e}"));
    let operator = OperatorProcess::start(&plane, "op-gang", &WorkerCommand::StandIn, 15).expect("operator");
    let client = plane.client().await.expect("client");
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), "default");
    let job = |name: &str, pod: Value, checkpoint: Value| -> TrainingJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "ninelives.io/v1alpha1",
            "kind": "TrainingJob",
            "metadata": { "name": name, "namespace": "default", "labels": { "kueue.x-k8s.io/queue-name": "team-a" } },
            "spec": {
                "model": { "preset": "tiny" },
                "topology": { "nodes": 3, "chipsPerNode": 8, "spareNodes": 1, "chipMemory": "1Gi" },
                "data": { "datasets": ["/usr/share/common-licenses"], "globalBatchSize": 16, "microBatchSize": 4 },
                "training": { "steps": 30, "learningRate": { "peak": 0.003 } },
                "checkpoint": checkpoint,
                "pod": pod
            }
        }))
        .expect("job")
    };
    let path =
        |name: &str| serde_json::json!({ "path": format!("/tmp/ninelives-e2e/{name}"), "intervalSteps": 10 });
    for manifest in [
        job("gang-v", serde_json::json!({ "schedulerName": "volcano" }), path("gang-v")),
        job("gang-c", serde_json::json!({ "schedulerName": "scheduler-plugins-scheduler" }), path("gang-c")),
        job(
            "rwo",
            serde_json::json!({}),
            serde_json::json!({ "pvc": { "claimName": "ckpt-rwo" }, "intervalSteps": 10 }),
        ),
    ] {
        jobs.create(&PostParams::default(), &manifest).await.expect("create");
    }
    let timeout = Duration::from_secs(60);
    for (resource, job) in
        [("podgroups.scheduling.volcano.sh", "gang-v"), ("podgroups.scheduling.x-k8s.io", "gang-c")]
    {
        let group: Value = wait_for(&format!("{resource}/{job}"), timeout, || async {
            let out = plane.kubectl(&["get", resource, job, "-o", "json"]).ok()?;
            serde_json::from_str(&out).ok()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", operator.log_tail()));
        assert_eq!(group["spec"]["minMember"], 3, "{group}");
        assert_eq!(group["metadata"]["ownerReferences"][0]["name"], job);
        assert_eq!(group["metadata"]["labels"]["kueue.x-k8s.io/queue-name"], "team-a");
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let of = |job: &'static str| {
        let pods = pods.clone();
        async move {
            let list =
                pods.list(&ListParams::default().labels(&format!("ninelives.io/job={job}"))).await.ok()?;
            (list.items.len() == 4).then_some(list.items)
        }
    };
    let volcano = wait_for("gang-v pods", timeout, || of("gang-v")).await.expect("gang-v pods");
    assert!(volcano.iter().all(|p| {
        p.metadata.annotations.as_ref().is_some_and(|a| a["scheduling.k8s.io/group-name"] == "gang-v")
    }));
    assert!(
        volcano.iter().all(|p| p
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l["kueue.x-k8s.io/queue-name"] == "team-a"))
    );
    let cosched = wait_for("gang-c pods", timeout, || of("gang-c")).await.expect("gang-c pods");
    assert!(
        cosched.iter().all(|p| p
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l["scheduling.x-k8s.io/pod-group"] == "gang-c"))
    );

    let message = wait_for("rwo to be Invalid", timeout, || async {
        let status = jobs.get("rwo").await.ok()?.status?;
        (status.phase == Some(JobPhase::Invalid))
            .then(|| status.conditions.iter().map(|c| c.message.clone()).collect::<Vec<_>>().join(" | "))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.log_tail()));
    assert!(message.contains("\"ckpt-rwo\" has access modes [ReadWriteOnce]"), "{message}");
    assert!(message.contains("needs ReadWriteMany"), "{message}");
    assert!(of("rwo").await.is_none(), "a refused job gets no pods");
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
