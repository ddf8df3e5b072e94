//! The recovery brain on Kubernetes: the operator (`--recovery=brain`) runs a TrainingJob as
//! four expert-parallel member pods plus a spare on the test bed's fake nodes, with one node
//! agent per node on simulated chips (the DaemonSet's pods: the node runner runs no DaemonSets,
//! so the test starts them as processes). A chip fails, then a whole node is lost; each must be
//! recovered by the brain (the chip by a reroute from memory, since every expert has two
//! replicas; the node by the spare, filled from its buddies' host memory: `peerCopies: 1`, issue
//! 21), recorded in the job's status and Events with its source, and the job must finish
//! with parameters bit-identical to an uninterrupted single-process run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};
use ninelives_core::TrainingJob;
use ninelives_core::job::JobPhase;
use ninelives_core::keyspace::Keyspace;
use ninelives_core::recovery::{RecoveryState, TriggerKind};
use ninelives_e2e::members::{Agents, digest_in, progress, reference_digest};
use ninelives_e2e::{Harness, OperatorProcess, WorkerCommand, tools, wait_for};

const NS: &str = "default";
const JOB: &str = "ladder";
const STEPS: u64 = 30;

fn manifest(checkpoints: &Path) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "ninelives.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": { "name": JOB, "namespace": NS },
        "spec": {
            "model": { "preset": "tiny" },
            "topology": { "nodes": 4, "chipsPerNode": 8, "spareNodes": 1, "chipMemory": "1Gi" },
            // Every expert twice: a chip fault leaves a live replica of each (reroute).
            "parallelism": { "expertParallelSize": 32, "redundantExperts": 8 },
            "data": { "datasets": ["/usr/share/common-licenses"], "globalBatchSize": 16, "microBatchSize": 4, "seed": 42 },
            "training": { "steps": STEPS, "learningRate": { "peak": 0.003, "warmupSteps": 5 } },
            // One in-memory copy of each member's state on another node, refreshed every step.
            "checkpoint": { "path": checkpoints.display().to_string(), "intervalSteps": 5, "keepLast": 3, "peerCopies": 1 },
            "failurePolicy": {
                "heartbeatTtlSeconds": 3, "maxRecoveries": 5, "minHealthyFraction": 0.5,
                "allowedTiers": ["reroute", "reshard", "restore", "replace"], "recoveryTimeoutSeconds": 90
            }
        }
    })
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

async fn job(h: &Harness) -> Option<TrainingJob> {
    Api::<TrainingJob>::namespaced(h.client.clone(), NS).get_opt(JOB).await.ok().flatten()
}

async fn pod(h: &Harness, name: &str) -> Option<Pod> {
    Api::<Pod>::namespaced(h.client.clone(), NS).get_opt(name).await.ok().flatten()
}

async fn node_of(h: &Harness, pod_name: &str) -> Option<String> {
    pod(h, pod_name).await?.spec?.node_name
}

async fn wait_step(h: &Harness, etcd: &mut etcd_client::Client, step: u64) {
    let etcd = std::sync::Arc::new(tokio::sync::Mutex::new(etcd.clone()));
    let reached = wait_for(&format!("step {step}"), Duration::from_secs(240), || {
        let etcd = etcd.clone();
        async move { progress(&mut *etcd.lock().await, NS, JOB).await.filter(|s| *s >= step) }
    })
    .await;
    if let Err(e) = reached {
        panic!("{e}; status {:?}", job(h).await.and_then(|j| j.status));
    }
}

async fn event_notes(h: &Harness) -> Vec<(String, String)> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(h.client.clone(), NS);
    let events = api.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    events
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(JOB))
        .flat_map(|e| {
            // A repeated Event is one object with a series count.
            let times = e.series.as_ref().map_or(1, |s| s.count.max(1));
            let entry = (e.reason.unwrap_or_default(), e.note.unwrap_or_default());
            std::iter::repeat_n(entry, usize::try_from(times).unwrap_or(1))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chip_fault_and_node_loss_are_recovered_by_the_brain_and_the_result_is_exact() {
    let h = Harness::start(5).await.expect("test bed");
    let ninelives = tools::ninelives().expect("ninelives binary");
    let work = tempfile::tempdir().expect("temp dir");
    let checkpoints = work.path().join("checkpoints");
    let etcd_url = h.plane.etcd.endpoint();
    let mut etcd = etcd_client::Client::connect([etcd_url.as_str()], None).await.expect("etcd");

    let nodes: Vec<String> = (0..5).map(|i| format!("node-{i}")).collect();
    let mut agents = Agents::start(&ninelives, &etcd_url, &nodes, 8, 3, work.path()).expect("agents");

    let _operator = OperatorProcess::start(&h.plane, "op-0", &WorkerCommand::Members, 15).expect("operator");
    let manifest = manifest(&checkpoints);
    let document: TrainingJob = serde_json::from_value(manifest.clone()).expect("manifest");
    Api::<TrainingJob>::namespaced(h.client.clone(), NS)
        .create(&PostParams::default(), &document)
        .await
        .expect("create the job");

    // 1. A chip of rank 1's node fails (uncorrectable ECC) while training.
    wait_step(&h, &mut etcd, 6).await;
    let chip_node = node_of(&h, &format!("{JOB}-1")).await.expect("rank 1 is scheduled");
    agents.inject(&ninelives, &chip_node, 3, "ecc").expect("inject");
    let chip_recovered = wait_for("the chip recovery in status", Duration::from_secs(120), || async {
        job(&h).await?.status.filter(|s| s.recent_recoveries.len() == 1)
    })
    .await;
    if let Err(e) = chip_recovered {
        panic!("{e}; status {:?}", job(&h).await.and_then(|j| j.status));
    }

    // 2. Rank 2's whole node is lost: its agent and its worker die together.
    wait_step(&h, &mut etcd, 16).await;
    let lost = node_of(&h, &format!("{JOB}-2")).await.expect("rank 2 is scheduled");
    let spare = node_of(&h, &format!("{JOB}-4")).await.expect("the spare is scheduled");
    let lost_at = unix_now();
    h.nodes.lose(&lost);
    agents.kill(&lost);
    assert!(h.nodes.crash(NS, &format!("{JOB}-2")), "rank 2's process was running");

    let done = wait_for("the job to succeed", Duration::from_secs(360), || async {
        job(&h).await?.status.filter(|s| s.phase == Some(JobPhase::Succeeded))
    })
    .await;
    let status = match done {
        Ok(s) => s,
        Err(e) => panic!("{e}; status {:?}", job(&h).await.and_then(|j| j.status)),
    };

    // Recorded: one recovery per fault, by the rung the ladder should pick.
    assert_eq!(status.recoveries, 2, "{status:?}");
    let records = &status.recent_recoveries;
    assert!(records[0].trigger.starts_with(&format!("chip {chip_node}/3")), "{records:?}");
    for r in records {
        eprintln!(
            "recovery: {} tier={:?} detect_s={:?} resume_s={:.2} steps_lost={} source={:?}",
            r.trigger, r.tier, r.detection_seconds, r.recovery_seconds, r.steps_lost, r.source
        );
    }
    // Every expert kept a live replica: the members drop the failed chip's replicas and go on
    // from memory.
    let chip = (records[0].tier, records[0].steps_lost);
    assert_eq!(chip, (ninelives_core::job::RecoveryTier::Reroute, 0), "{records:?}");
    assert_eq!(records[0].source.as_deref(), Some("memory"), "{records:?}");
    assert!(records[1].trigger.contains(&lost), "{records:?}");
    assert_eq!(records[1].tier, ninelives_core::job::RecoveryTier::Replace, "{records:?}");
    // The spare is filled from the buddies' host memory: at most the step in flight is lost.
    assert_eq!(records[1].source.as_deref(), Some("peer"), "{records:?}");
    assert!(records[1].steps_lost <= 1, "{records:?}");
    assert!(records.iter().all(|r| r.recovery_seconds > 0.0 && r.recovery_seconds < 90.0), "{records:?}");
    // A lost node carries no fault time (its lease just expires): measure detection here, from
    // the brain's record, against the heartbeat TTL (3 s) plus one second.
    let key = Keyspace::default().job(NS, JOB).recovery();
    let record = etcd.get(key.as_str(), None).await.expect("read the recovery record");
    let state = RecoveryState::parse(&key, record.kvs().first().expect("a recovery record").value())
        .expect("a well-formed record");
    let node = state.history.iter().find(|r| r.kind == TriggerKind::Node).expect("the node recovery");
    let detect = node.detected_at - lost_at;
    eprintln!("node loss: detected {detect:.2} s after the kill, resumed {:.2} s later", node.resume_s);
    assert!((0.0..=4.0).contains(&detect), "detected {detect:.2} s after the kill");
    // The spare took over rank 2.
    assert_eq!(node_of(&h, &format!("{JOB}-2")).await.as_deref(), Some(spare.as_str()));
    let notes = event_notes(&h).await;
    let recovered: Vec<&String> = notes.iter().filter(|(r, _)| r == "Recovered").map(|(_, n)| n).collect();
    assert_eq!(recovered.len(), 2, "{notes:?}");
    assert!(
        recovered.iter().any(|n| n.contains("by replace") && n.contains("from peer memory at step")),
        "{notes:?}"
    );
    assert!(notes.iter().any(|(r, _)| r == "Recovering"), "{notes:?}");

    // Exact: the leader's final digest equals an uninterrupted single-process run.
    let pods_dir: PathBuf = h.plane.dir().join("pods");
    let digest = digest_in(&pods_dir, NS, &format!("{JOB}-0")).expect("the leader printed its digest");
    let manifest_file = work.path().join("job.json");
    std::fs::write(&manifest_file, serde_json::to_vec(&manifest).expect("json")).expect("write manifest");
    let reference = reference_digest(&ninelives, &manifest_file, STEPS, &work.path().join("reference"))
        .expect("the reference run");
    assert_eq!(digest, reference, "the recovered job must equal the uninterrupted run");
}
