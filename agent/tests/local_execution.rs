//! Local execution against a real etcd: the agent relays a generation's commands to its local
//! workers and acknowledges the generation in etcd.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ninelives_agent::exec::{JobBinding, LocalWorker, WorkerCommand, WorkerFuture};
use ninelives_core::recovery::{
    Ack, AckOutcome, ApplyKind, ControlRecord, LoadSource, LocalLoad, RestoreSource,
};
use ninelives_testkit::EtcdServer;

/// A local worker that records every command and finishes each after `delay`.
struct RecordingWorker {
    delay: Duration,
    seen: Arc<Mutex<Vec<WorkerCommand>>>,
}

impl LocalWorker for RecordingWorker {
    fn endpoint(&self) -> String {
        "recording-worker".into()
    }

    fn apply<'a>(&'a self, command: &'a WorkerCommand) -> WorkerFuture<'a> {
        Box::pin(async move {
            self.seen.lock().unwrap().push(command.clone());
            tokio::time::sleep(self.delay).await;
            Ok(())
        })
    }
}

/// The job `default/<name>` with one [`RecordingWorker`], and what that worker sees.
fn recorded_job(name: &str, delay: Duration) -> (JobBinding, Arc<Mutex<Vec<WorkerCommand>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let worker = RecordingWorker { delay, seen: seen.clone() };
    let binding =
        JobBinding { namespace: "default".into(), name: name.into(), workers: vec![Arc::new(worker)] };
    (binding, seen)
}

fn metrics_text(agent: &ninelives_agent::Agent) -> String {
    prometheus::TextEncoder::new().encode_to_string(&agent.metrics().registry().gather()).unwrap()
}

async fn wait_ack(observer: &mut etcd_client::Client, key: &str) -> Ack {
    for _ in 0..200 {
        let resp = observer.get(key, None).await.unwrap();
        if let Some(kv) = resp.kvs().first() {
            return serde_json::from_slice(kv.value()).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no ack at {key} within 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_are_relayed_to_the_worker_and_acknowledged() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (binding, seen) = recorded_job("tiny", Duration::ZERO);
    let mut cfg = config(&etcd.endpoint(), "node-x", dir.path(), 2);
    cfg.jobs = vec![binding];
    let agent = start(cfg).await;
    let job = keys().job("default", "tiny");
    let mut observer = client(&etcd.endpoint()).await;

    // Generation 1: a plain reroute.
    observer.put(job.placement(), r#"{"generation":1,"experts":[]}"#, None).await.unwrap();
    let ack = wait_ack(&mut observer, &job.ack(1, "node-x")).await;
    assert_eq!((ack.kind, ack.outcome), (Some(ApplyKind::Reroute), AckOutcome::Applied));

    // Generation 2: reshard — control first, then placement (the documented order).
    let load = LocalLoad { layer: 1, expert: 9, chip: 0, source: LoadSource::Checkpoint { step: 40 } };
    let control = ControlRecord {
        generation: 2,
        load_experts: [("node-x".to_string(), vec![load.clone()])].into(),
        ..Default::default()
    };
    observer.put(job.control(), serde_json::to_string(&control).unwrap(), None).await.unwrap();
    observer.put(job.placement(), r#"{"generation":2}"#, None).await.unwrap();
    let ack = wait_ack(&mut observer, &job.ack(2, "node-x")).await;
    assert_eq!((ack.kind, ack.outcome), (Some(ApplyKind::Reshard), AckOutcome::Applied));

    // A malformed placement is skipped, not fatal: generation 3 still applies afterwards.
    observer.put(job.placement(), "{{garbage", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    observer.put(job.placement(), r#"{"generation":3}"#, None).await.unwrap();
    wait_ack(&mut observer, &job.ack(3, "node-x")).await;

    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            WorkerCommand::Reroute { generation: 1 },
            WorkerCommand::LoadExperts { generation: 2, experts: vec![load] },
            WorkerCommand::Reroute { generation: 2 },
            WorkerCommand::Reroute { generation: 3 },
        ]
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_worker_is_reported_as_a_timeout() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (binding, _seen) = recorded_job("slow", Duration::from_secs(30));
    let mut cfg = config(&etcd.endpoint(), "node-s", dir.path(), 2);
    cfg.jobs = vec![binding];
    let agent = start(cfg).await;
    let job = keys().job("default", "slow");
    let mut observer = client(&etcd.endpoint()).await;
    let control = ControlRecord {
        generation: 4,
        restore_step: Some(100),
        timeout_seconds: Some(1.0),
        ..Default::default()
    };
    observer.put(job.control(), serde_json::to_string(&control).unwrap(), None).await.unwrap();
    observer.put(job.placement(), r#"{"generation":4}"#, None).await.unwrap();
    let ack = wait_ack(&mut observer, &job.ack(4, "node-s")).await;
    assert_eq!((ack.kind, ack.outcome), (Some(ApplyKind::Restore), AckOutcome::Timeout));
    let seconds = ack.seconds.unwrap_or_default();
    assert!((1.0..2.0).contains(&seconds), "{seconds}");
    let metrics = metrics_text(&agent);
    assert!(
        metrics.contains(r#"ninelives_agent_apply_total{kind="restore",outcome="timeout"} 1"#),
        "{metrics}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_timeout_is_reported_and_the_default_applies() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (binding, seen) = recorded_job("odd", Duration::ZERO);
    let mut cfg = config(&etcd.endpoint(), "node-t", dir.path(), 2);
    cfg.jobs = vec![binding];
    let agent = start(cfg).await;
    let job = keys().job("default", "odd");
    let mut observer = client(&etcd.endpoint()).await;
    // Untrusted input: a deadline no Duration can hold (it used to panic the executor).
    let control = r#"{"generation":5,"restoreStep":100,"timeoutSeconds":1e20}"#;
    observer.put(job.control(), control, None).await.unwrap();
    observer.put(job.placement(), r#"{"generation":5}"#, None).await.unwrap();
    let ack = wait_ack(&mut observer, &job.ack(5, "node-t")).await;
    assert_eq!((ack.kind, ack.outcome), (Some(ApplyKind::Restore), AckOutcome::Applied));
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            WorkerCommand::Restore { generation: 5, source: RestoreSource::Checkpoint { step: 100 } },
            WorkerCommand::Reroute { generation: 5 },
        ]
    );
    let metrics = metrics_text(&agent);
    assert!(metrics.contains("ninelives_agent_malformed_values_total 1"), "{metrics}");
    agent.shutdown().await;
}
