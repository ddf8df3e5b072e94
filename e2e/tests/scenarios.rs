//! e2e scenarios: the operator (a real `ninelives operator` process) against a real
//! kube-apiserver and etcd, with pods run as local processes by the node runner.
//!
//! Each scenario starts its own control plane; they run one at a time (2-core CI machines).

use std::time::Duration;

use etcd_client::GetOptions;
use k8s_openapi::api::core::v1::{Event, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use ninelives_core::TrainingJob;
use ninelives_core::job::JobPhase;
use ninelives_core::keyspace::Keyspace;
use ninelives_e2e::jobs::{NAMESPACE as NS, job_manifest as job};
use ninelives_e2e::{Harness, wait_for};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const LONG: Duration = Duration::from_secs(90);

async fn create(h: &Harness, manifest: serde_json::Value) -> TrainingJob {
    h.create_job(manifest).await.expect("create TrainingJob")
}

async fn wait_phase(h: &Harness, name: &str, want: JobPhase, timeout: Duration) {
    h.wait_job_phase(name, want, timeout).await.unwrap_or_else(|e| panic!("{e}"));
}

async fn condition(h: &Harness, name: &str, type_: &str) -> Option<(String, String, String)> {
    let api: Api<TrainingJob> = Api::namespaced(h.client.clone(), NS);
    let job = api.get(name).await.ok()?;
    let c = job.status?.conditions.into_iter().find(|c| c.type_ == type_)?;
    Some((c.status, c.reason, c.message))
}

async fn event_reasons(h: &Harness, name: &str) -> Vec<String> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(h.client.clone(), NS);
    let events = api.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    let mut reasons: Vec<String> = events
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reason)
        .collect();
    // Core v1 view of the same Events, in case the recorder fell back to it.
    let core: Api<Event> = Api::namespaced(h.client.clone(), NS);
    let more = core.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    reasons.extend(
        more.into_iter().filter(|e| e.involved_object.name.as_deref() == Some(name)).filter_map(|e| e.reason),
    );
    reasons
}

#[tokio::test]
async fn job_runs_to_success_with_its_pods_and_service() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let h = Harness::start(3).await.expect("harness");
    let operator = h.operator("operator-a", 15).expect("operator");
    create(&h, job("tiny", 2, 1, 50)).await;

    let pods = wait_for("3 pods", LONG, || async {
        let pods = h.pods_of("tiny").await;
        (pods.len() == 3).then_some(pods)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.log_tail()));
    let mut names: Vec<_> = pods.iter().map(|p| p.name_any()).collect();
    names.sort();
    assert_eq!(names, ["tiny-0", "tiny-1", "tiny-2"]);
    for pod in &pods {
        let spec = pod.spec.as_ref().expect("pod spec");
        assert_eq!(spec.hostname.as_deref(), Some(pod.name_any().as_str()));
        assert_eq!(spec.subdomain.as_deref(), Some("tiny"));
        let owner = &pod.owner_references()[0];
        assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("TrainingJob", "tiny"));
    }
    let services: Api<Service> = Api::namespaced(h.client.clone(), NS);
    let service = services.get("tiny").await.expect("headless service");
    assert_eq!(service.spec.and_then(|s| s.cluster_ip).as_deref(), Some("None"));

    wait_phase(&h, "tiny", JobPhase::Running, LONG).await;
    let (ready, _, message) = condition(&h, "tiny", "Ready").await.expect("Ready condition");
    assert_eq!(ready, "True", "{message}");
    // Each pod ran on its own node.
    let nodes: std::collections::BTreeSet<_> =
        h.pods_of("tiny").await.iter().filter_map(|p| p.spec.as_ref()?.node_name.clone()).collect();
    assert_eq!(nodes.len(), 3, "anti-affinity: one worker per node");

    wait_phase(&h, "tiny", JobPhase::Succeeded, LONG).await;
    assert_eq!(condition(&h, "tiny", "Succeeded").await.map(|c| c.0).as_deref(), Some("True"));
    wait_for("the spare pod to be deleted", LONG, || async {
        (h.pods_of("tiny").await.len() == 2).then_some(())
    })
    .await
    .expect("spare deleted after success");
    let reasons = event_reasons(&h, "tiny").await;
    for reason in ["CreatedWorkers", "Running", "Succeeded"] {
        assert!(reasons.iter().any(|r| r == reason), "event {reason} missing from {reasons:?}");
    }
    let metrics = operator.metrics();
    assert!(metrics.contains("ninelives_operator_jobs{phase=\"Succeeded\"} 1"), "{metrics}");
    assert!(metrics.contains("ninelives_operator_leader 1"), "{metrics}");
    assert!(metrics.contains("ninelives_operator_reconcile_duration_seconds_count"), "{metrics}");
}

#[tokio::test]
async fn crashed_worker_is_replaced_and_the_job_still_succeeds() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let h = Harness::start(2).await.expect("harness");
    let _operator = h.operator("operator-a", 15).expect("operator");
    create(&h, job("crashy", 2, 0, 100)).await;
    wait_phase(&h, "crashy", JobPhase::Running, LONG).await;
    let before = h.pods_of("crashy").await.into_iter().find(|p| p.name_any() == "crashy-1").expect("pod");

    assert!(h.nodes.crash(NS, "crashy-1"), "crashy-1 has a process to kill");
    let replaced = wait_for("crashy-1 to be replaced", LONG, || async {
        h.pods_of("crashy").await.into_iter().find(|p| p.name_any() == "crashy-1" && p.uid() != before.uid())
    })
    .await
    .expect("replacement pod");
    assert_ne!(replaced.uid(), before.uid());
    wait_phase(&h, "crashy", JobPhase::Succeeded, LONG).await;
    let api: Api<TrainingJob> = Api::namespaced(h.client.clone(), NS);
    let status = api.get("crashy").await.expect("job").status.expect("status");
    assert_eq!(status.recoveries, 1);
    assert!(event_reasons(&h, "crashy").await.iter().any(|r| r == "WorkerFailed"));
}

#[tokio::test]
async fn suspend_removes_pods_and_resume_brings_them_back() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let h = Harness::start(2).await.expect("harness");
    let _operator = h.operator("operator-a", 15).expect("operator");
    create(&h, job("pausable", 2, 0, 3000)).await;
    wait_phase(&h, "pausable", JobPhase::Running, LONG).await;

    let api: Api<TrainingJob> = Api::namespaced(h.client.clone(), NS);
    let suspend = |on: bool| serde_json::json!({ "spec": { "suspend": on } });
    api.patch("pausable", &PatchParams::default(), &Patch::Merge(suspend(true))).await.expect("suspend");
    wait_phase(&h, "pausable", JobPhase::Suspended, LONG).await;
    wait_for("pods to be gone", LONG, || async { h.pods_of("pausable").await.is_empty().then_some(()) })
        .await
        .expect("no pods while suspended");
    assert!(h.nodes.running_pods().is_empty(), "processes stopped: {:?}", h.nodes.running_pods());
    assert_eq!(condition(&h, "pausable", "Suspended").await.map(|c| c.0).as_deref(), Some("True"));

    api.patch("pausable", &PatchParams::default(), &Patch::Merge(suspend(false))).await.expect("resume");
    wait_phase(&h, "pausable", JobPhase::Running, LONG).await;
    assert_eq!(h.pods_of("pausable").await.len(), 2);
    let reasons = event_reasons(&h, "pausable").await;
    assert!(
        reasons.iter().any(|r| r == "Suspended") && reasons.iter().any(|r| r == "Resumed"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn delete_removes_pods_service_and_etcd_keys_then_the_finalizer() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let h = Harness::start(2).await.expect("harness");
    let _operator = h.operator("operator-a", 15).expect("operator");
    let created = create(&h, job("doomed", 2, 0, 3000)).await;
    wait_phase(&h, "doomed", JobPhase::Running, LONG).await;
    let api: Api<TrainingJob> = Api::namespaced(h.client.clone(), NS);
    let finalizers = api.get("doomed").await.expect("job").finalizers().to_vec();
    assert_eq!(finalizers, ["ninelives.io/cleanup"]);
    assert!(created.finalizers().is_empty(), "the operator adds the finalizer, not the user");

    // What workers and the operator keep in etcd for a running job.
    let keys = Keyspace::default().job(NS, "doomed");
    let mut etcd = etcd_client::Client::connect([h.plane.etcd.endpoint()], None).await.expect("etcd");
    etcd.put(keys.placement(), "{\"generation\":1}", None).await.expect("put");
    etcd.put(keys.member(0), "node-0", None).await.expect("put");
    etcd.put(Keyspace::default().job(NS, "doomed-other").placement(), "{}", None).await.expect("put");

    api.delete("doomed", &DeleteParams::default()).await.expect("delete");
    wait_for("the job to be gone", LONG, || async {
        api.get_opt("doomed").await.ok()?.is_none().then_some(())
    })
    .await
    .expect("finalizer removed");
    assert!(h.pods_of("doomed").await.is_empty(), "pods deleted");
    assert!(h.nodes.running_pods().is_empty(), "pod processes stopped");
    let services: Api<Service> = Api::namespaced(h.client.clone(), NS);
    assert!(services.get_opt("doomed").await.expect("get service").is_none(), "service deleted");
    let left = etcd.get(keys.root(), Some(GetOptions::new().with_prefix())).await.expect("get");
    assert_eq!(left.count(), 0, "job keys deleted");
    let other = etcd.get(Keyspace::default().job(NS, "doomed-other").placement(), None).await.expect("get");
    assert_eq!(other.count(), 1, "another job's keys are untouched");
}

#[tokio::test]
async fn standby_takes_over_when_the_leader_is_killed_and_the_job_continues() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let h = Harness::start(2).await.expect("harness");
    let lease = 3;
    let mut a = h.operator("operator-a", lease).expect("operator a");
    wait_for("operator-a to lead", LONG, || async {
        (h.lease_holder().await.as_deref() == Some("operator-a")).then_some(())
    })
    .await
    .expect("first leader");
    let mut b = h.operator("operator-b", lease).expect("operator b");
    create(&h, job("steady", 2, 0, 250)).await;
    wait_phase(&h, "steady", JobPhase::Running, LONG).await;
    assert!(b.metrics().contains("ninelives_operator_leader 0"), "b is standby");
    let uids: Vec<_> = h.pods_of("steady").await.iter().filter_map(|p| p.uid()).collect();

    a.kill();
    let killed = std::time::Instant::now();
    wait_for("operator-b to take the lease", Duration::from_secs(lease * 3), || async {
        (h.lease_holder().await.as_deref() == Some("operator-b")).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", b.log_tail()));
    let takeover = killed.elapsed();
    assert!(takeover <= Duration::from_secs(lease + 2), "takeover took {takeover:?}");

    wait_phase(&h, "steady", JobPhase::Succeeded, LONG).await;
    let after: Vec<_> = h.pods_of("steady").await.iter().filter_map(|p| p.uid()).collect();
    assert_eq!(after, uids, "the new leader did not disturb the running workers");
    assert!(b.metrics().contains("ninelives_operator_leader 1"));

    // Graceful shutdown hands the lease over at once.
    assert_eq!(b.terminate().expect("terminate"), Some(0));
    assert_eq!(h.lease_holder().await, None, "lease released on SIGTERM");
}

#[tokio::test]
async fn invalid_jobs_are_rejected_by_cel_or_marked_invalid_until_fixed() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let h = Harness::start(2).await.expect("harness");
    let operator = h.operator("operator-a", 15).expect("operator");

    // CEL rules in the CRD: the apiserver itself refuses the object.
    let mut zero_nodes = job("zero", 2, 0, 10);
    zero_nodes["spec"]["topology"]["nodes"] = 0.into();
    let rejected = h.plane.kubectl_stdin(&["apply", "-f", "-"], Some(&zero_nodes.to_string()));
    let message = rejected.expect_err("apiserver rejects nodes: 0").to_string();
    assert!(message.contains("nodes must be at least 1"), "{message}");

    // Cross-field rule only the core validator knows: peer copies need more nodes.
    let mut crowded = job("crowded", 2, 0, 10);
    crowded["spec"]["checkpoint"]["peerCopies"] = 2.into();
    let spec: TrainingJob = serde_json::from_value(crowded.clone()).expect("job");
    let expected: Vec<String> =
        ninelives_core::validate::validate_spec(&spec.spec).iter().map(ToString::to_string).collect();
    assert!(!expected.is_empty(), "the test job must be invalid to the core validator");
    create(&h, crowded).await;
    wait_phase(&h, "crowded", JobPhase::Invalid, LONG).await;
    let (status, reason, message) = condition(&h, "crowded", "Invalid").await.expect("Invalid condition");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "InvalidSpec"));
    assert_eq!(message, expected.join("; "));
    assert!(h.pods_of("crowded").await.is_empty());

    // Not retried in a loop: no reconciles while nothing changes.
    let count = |m: String| {
        m.lines().find(|l| l.starts_with("ninelives_operator_reconciles_total")).map(str::to_string)
    };
    let before = count(operator.metrics());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count(operator.metrics()), before, "invalid job reconciled again without a change");

    // Fixing the spec is the change it waits for.
    let api: Api<TrainingJob> = Api::namespaced(h.client.clone(), NS);
    let fix = serde_json::json!({ "spec": { "checkpoint": { "peerCopies": 1 } } });
    api.patch("crowded", &PatchParams::default(), &Patch::Merge(fix)).await.expect("fix");
    wait_phase(&h, "crowded", JobPhase::Running, LONG).await;
    assert_eq!(condition(&h, "crowded", "Invalid").await.map(|c| c.0).as_deref(), Some("False"));
}

#[tokio::test]
async fn two_jobs_run_at_once_beside_a_broken_one() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let h = Harness::start(4).await.expect("harness");
    let _operator = h.operator("operator-a", 15).expect("operator");
    let mut broken = job("broken", 2, 0, 10);
    broken["spec"]["checkpoint"]["peerCopies"] = 5.into();
    create(&h, broken).await;
    create(&h, job("left", 2, 0, 50)).await;
    create(&h, job("right", 2, 0, 50)).await;
    wait_phase(&h, "left", JobPhase::Running, LONG).await;
    wait_phase(&h, "right", JobPhase::Running, LONG).await;
    // Anti-affinity is per job: each job's workers on distinct nodes (jobs may share nodes).
    for name in ["left", "right"] {
        let nodes: std::collections::BTreeSet<_> =
            h.pods_of(name).await.iter().filter_map(|p| p.spec.as_ref()?.node_name.clone()).collect();
        assert_eq!(nodes.len(), 2, "{name}: one worker per node");
    }
    wait_phase(&h, "left", JobPhase::Succeeded, LONG).await;
    wait_phase(&h, "right", JobPhase::Succeeded, LONG).await;
    assert_eq!(h.job_phase("broken").await, Some(JobPhase::Invalid));
}
