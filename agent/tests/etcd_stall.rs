//! Issue 19: an etcd stall (SIGSTOP) longer than the agent's lease TTL must not cost the node its
//! presence for good; a stall shorter than the TTL must keep the same lease (no churn).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ninelives_agent::simulate::{Fault, inject};
use ninelives_core::keyspace::ChipState;
use ninelives_testkit::EtcdServer;

const TTL: i64 = 2;

fn signal(etcd: &EtcdServer, sig: &str) {
    let pid = etcd.pid().unwrap();
    let status = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// The lease of the node's presence key, if present.
async fn presence_lease(observer: &mut etcd_client::Client, node: &str) -> Option<i64> {
    let resp = observer.get(keys().node_alive(node), None).await.ok()?;
    resp.kvs().first().map(|kv| kv.lease())
}

async fn wait_presence(observer: &mut etcd_client::Client, node: &str, within: Duration) -> (i64, Duration) {
    let started = Instant::now();
    loop {
        if let Some(lease) = presence_lease(observer, node).await {
            return (lease, started.elapsed());
        }
        assert!(started.elapsed() < within, "presence of {node} not back within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_longer_than_ttl_re_registers_under_a_new_lease() {
    let _ = tracing_subscriber::fmt().with_env_filter("ninelives_agent=info").with_test_writer().try_init();
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut observer = client(&etcd.endpoint()).await;
    let mut cfg = config(&etcd.endpoint(), "node-s", dir.path(), 4);
    cfg.ttl = TTL;
    let agent = start(cfg).await;
    let (before, _) = wait_presence(&mut observer, "node-s", Duration::from_secs(5)).await;

    signal(&etcd, "-STOP");
    tokio::time::sleep(Duration::from_secs(4)).await;
    signal(&etcd, "-CONT");
    let resumed = Instant::now();

    let bound = Duration::from_secs(TTL as u64 + 3);
    // The old lease expires once etcd runs again; the presence must come back under a new one.
    let (after, _) = loop {
        let (lease, _) =
            wait_presence(&mut observer, "node-s", bound.saturating_sub(resumed.elapsed())).await;
        if lease != before {
            break (lease, resumed.elapsed());
        }
        assert!(resumed.elapsed() < bound, "presence still under the expired lease {before:x}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let back = resumed.elapsed();
    println!("stall 4 s > TTL {TTL} s: presence back under lease {after:x} {back:?} after resume");
    assert!(back <= bound, "{back:?} > TTL + 3 s");
    let ready_by = Instant::now() + Duration::from_secs(3);
    while !agent.is_ready() {
        assert!(Instant::now() < ready_by, "agent not ready again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Chip states are still published after the re-registration.
    inject(dir.path(), 2, &Fault::LinkDown).unwrap();
    wait_chip(&mut observer, "node-s", 2, Duration::from_secs(3), "failed", |r| r.state == ChipState::Failed)
        .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_shorter_than_ttl_keeps_the_same_lease() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut observer = client(&etcd.endpoint()).await;
    let mut cfg = config(&etcd.endpoint(), "node-b", dir.path(), 4);
    cfg.ttl = 6;
    let agent = start(cfg).await;
    let (before, _) = wait_presence(&mut observer, "node-b", Duration::from_secs(5)).await;

    signal(&etcd, "-STOP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(&etcd, "-CONT");
    // Several keepalive periods after the resume: the same lease still holds the presence.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(presence_lease(&mut observer, "node-b").await, Some(before), "presence churned");
    inject(dir.path(), 1, &Fault::LinkDown).unwrap();
    wait_chip(&mut observer, "node-b", 1, Duration::from_secs(3), "failed", |r| r.state == ChipState::Failed)
        .await;
    agent.shutdown().await;
}

/// A value of the agent's own metrics: the sample count of a histogram, or a counter's total.
fn metric(agent: &ninelives_agent::Agent, name: &str) -> f64 {
    let families = agent.metrics().registry().gather();
    let Some(family) = families.iter().find(|f| f.name() == name) else { return 0.0 };
    family
        .get_metric()
        .iter()
        .map(|m| m.get_histogram().get_sample_count() as f64 + m.get_counter().get_value())
        .sum()
}

/// An etcd that answers a keep-alive late, but while the lease still lives, is slow, not gone:
/// the agent keeps its session (no new streams, no re-reads: thousands of agents reconnecting
/// at once to a slow etcd grew its memory until it was killed in the 6,250-node scale run). The
/// stall starts right after a keep-alive answer, so the lease lives a full TTL (6 s) from then;
/// it lasts 5.4 s, past the fixed limit the agent used to wait (TTL/3 to the next keep-alive +
/// TTL/2). The client sends no HTTP/2 pings, so only the agent's own deadlines are tested.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_answered_late_within_the_lease_keeps_the_session() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut observer = client(&etcd.endpoint()).await;
    let mut cfg = config(&etcd.endpoint(), "node-k", dir.path(), 4);
    cfg.ttl = 6;
    cfg.etcd = ninelives_agent::etcd::EtcdSource::Shared(Box::new(client(&etcd.endpoint()).await));
    let agent = start(cfg).await;
    let (before, _) = wait_presence(&mut observer, "node-k", Duration::from_secs(5)).await;

    let answered = metric(&agent, "ninelives_agent_lease_keepalive_seconds");
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&agent, "ninelives_agent_lease_keepalive_seconds") <= answered {
        assert!(Instant::now() < deadline, "no keep-alive answered within 5 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    signal(&etcd, "-STOP");
    let stalled = Instant::now();
    let mut lost_ready = false;
    while stalled.elapsed() < Duration::from_millis(5400) {
        lost_ready |= !agent.is_ready();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&etcd, "-CONT");
    // Past the next keep-alive.
    let resumed = Instant::now();
    while resumed.elapsed() < Duration::from_secs(3) {
        lost_ready |= !agent.is_ready();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!lost_ready, "the agent left its session during a stall its lease outlived");
    assert_eq!(metric(&agent, "ninelives_agent_etcd_errors_total"), 0.0, "etcd errors during the stall");
    assert_eq!(presence_lease(&mut observer, "node-k").await, Some(before), "presence churned");
    agent.shutdown().await;
}
