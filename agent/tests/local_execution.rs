//! Local execution against a real etcd: the agent relays a generation's commands to a worker
//! listening on loopback HTTP and acknowledges the generation in etcd.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ninelives_agent::exec::{
    AckRecord, ControlRecord, ExpertLoad, ExpertSource, HttpWorker, JobBinding, WorkerCommand,
};
use ninelives_testkit::EtcdServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A worker control endpoint that records every command and answers after `delay`.
async fn fake_worker(delay: Duration) -> (String, Arc<Mutex<Vec<WorkerCommand>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read until the body announced by content-length is complete.
                loop {
                    let n = stream.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if body.len() >= len {
                            assert!(head.starts_with("POST /ninelives/v1/command "), "{head}");
                            record.lock().unwrap().push(serde_json::from_str(body).unwrap());
                            break;
                        }
                    }
                    if n == 0 {
                        return;
                    }
                }
                tokio::time::sleep(delay).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    (url, seen)
}

async fn wait_ack(observer: &mut etcd_client::Client, key: &str) -> AckRecord {
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
    let (url, seen) = fake_worker(Duration::ZERO).await;
    let mut cfg = config(&etcd.endpoint(), "node-x", dir.path(), 2);
    cfg.jobs = vec![JobBinding {
        namespace: "default".into(),
        name: "tiny".into(),
        workers: vec![Arc::new(HttpWorker::new(&url))],
    }];
    let agent = start(cfg).await;
    let job = keys().job("default", "tiny");
    let mut observer = client(&etcd.endpoint()).await;

    // Generation 1: a plain reroute.
    observer.put(job.placement(), r#"{"generation":1,"experts":[]}"#, None).await.unwrap();
    let ack = wait_ack(&mut observer, &job.ack(1, "node-x")).await;
    assert_eq!((ack.kind.as_str(), ack.outcome.as_str()), ("reroute", "applied"));

    // Generation 2: reshard — control first, then placement (the documented order).
    let load = ExpertLoad { layer: 1, expert: 9, chip: 0, source: ExpertSource::Checkpoint { step: 40 } };
    let control = ControlRecord {
        generation: 2,
        load_experts: [("node-x".to_string(), vec![load.clone()])].into(),
        ..Default::default()
    };
    observer.put(job.control(), serde_json::to_string(&control).unwrap(), None).await.unwrap();
    observer.put(job.placement(), r#"{"generation":2}"#, None).await.unwrap();
    let ack = wait_ack(&mut observer, &job.ack(2, "node-x")).await;
    assert_eq!((ack.kind.as_str(), ack.outcome.as_str()), ("reshard", "applied"));

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
    let (url, _seen) = fake_worker(Duration::from_secs(30)).await;
    let mut cfg = config(&etcd.endpoint(), "node-s", dir.path(), 2);
    cfg.jobs = vec![JobBinding {
        namespace: "default".into(),
        name: "slow".into(),
        workers: vec![Arc::new(HttpWorker::new(&url))],
    }];
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
    assert_eq!((ack.kind.as_str(), ack.outcome.as_str()), ("restore", "timeout"));
    assert!(ack.seconds >= 1.0 && ack.seconds < 2.0, "{}", ack.seconds);
    let metrics =
        prometheus::TextEncoder::new().encode_to_string(&agent.metrics().registry().gather()).unwrap();
    assert!(
        metrics.contains(r#"ninelives_agent_apply_total{kind="restore",outcome="timeout"} 1"#),
        "{metrics}"
    );
    agent.shutdown().await;
}
