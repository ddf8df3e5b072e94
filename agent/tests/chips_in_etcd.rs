//! Acceptance tests of chip health in etcd, against a real etcd started by the test harness.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use etcd_client::{EventType, GetOptions, WatchOptions};
use ninelives_agent::simulate::{Fault, inject, request_clear};
use ninelives_core::keyspace::ChipState;
use ninelives_testkit::EtcdServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_are_visible_in_etcd_within_one_second() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&etcd.endpoint(), "node-a", dir.path(), 8);
    cfg.policy.flap_limit = 1000; // this test measures latency, not flapping
    let agent = start(cfg).await;
    let mut observer = client(&etcd.endpoint()).await;
    let mut events =
        observer.watch(keys().node_chips("node-a"), Some(WatchOptions::new().with_prefix())).await.unwrap();

    let mut latencies = Vec::new();
    for round in 0..20u32 {
        let chip = round % 8;
        for (fault, expect) in [(Fault::HbmEcc, ChipState::Failed), (Fault::Recover, ChipState::Healthy)] {
            let injected = Instant::now();
            inject(dir.path(), chip, &fault).unwrap();
            loop {
                let msg = tokio::time::timeout(Duration::from_secs(2), events.message())
                    .await
                    .expect("no chip write within 2 s")
                    .unwrap()
                    .unwrap();
                let seen = msg.events().iter().any(|e| {
                    e.event_type() == EventType::Put
                        && e.kv().is_some_and(|kv| {
                            kv.key_str().ok() == Some(keys().chip("node-a", chip).as_str())
                                && String::from_utf8_lossy(kv.value()).contains(expect.as_str())
                        })
                });
                if seen {
                    break;
                }
            }
            latencies.push(injected.elapsed());
        }
    }
    latencies.sort();
    let (p50, p99, max) =
        (percentile(&latencies, 50.0), percentile(&latencies, 99.0), latencies[latencies.len() - 1]);
    println!("fault-to-visible over {} transitions: p50 {p50:?} p99 {p99:?} max {max:?}", latencies.len());
    assert!(p99 <= Duration::from_secs(1), "p99 {p99:?} > 1 s");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_chip_is_quarantined_across_restarts_until_cleared() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut observer = client(&etcd.endpoint()).await;
    let agent = start(config(&etcd.endpoint(), "node-f", dir.path(), 4)).await;
    let long = Duration::from_secs(3);

    for _ in 0..2 {
        inject(dir.path(), 1, &Fault::LinkDown).unwrap();
        wait_chip(&mut observer, "node-f", 1, long, "failed", |r| r.state == ChipState::Failed).await;
        inject(dir.path(), 1, &Fault::Recover).unwrap();
        wait_chip(&mut observer, "node-f", 1, long, "healthy", |r| r.state == ChipState::Healthy).await;
    }
    inject(dir.path(), 1, &Fault::LinkDown).unwrap();
    let q = wait_chip(&mut observer, "node-f", 1, long, "quarantined", |r| r.state == ChipState::Quarantined)
        .await;
    assert_eq!(q.code, "flapping:link-down");
    inject(dir.path(), 1, &Fault::Recover).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(chip_record(&mut observer, "node-f", 1).await.unwrap().state, ChipState::Quarantined);

    // A restarted agent keeps the quarantine it finds in etcd.
    agent.shutdown().await;
    let agent = start(config(&etcd.endpoint(), "node-f", dir.path(), 4)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(chip_record(&mut observer, "node-f", 1).await.unwrap().state, ChipState::Quarantined);

    request_clear(dir.path(), 1).unwrap();
    wait_chip(&mut observer, "node-f", 1, long, "healthy after clear", |r| r.state == ChipState::Healthy)
        .await;
    assert!(!dir.path().join("1/clear").exists(), "clear request not consumed");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_codes_isolate_the_chip_and_malformed_values_are_replaced() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut observer = client(&etcd.endpoint()).await;
    // Garbage left in etcd by someone else: logged, skipped, and overwritten with the truth.
    observer.put(keys().chip("node-u", 0), "{not json", None).await.unwrap();
    observer.put(keys().chip("node-u", 7), r#"{"state":"melted"}"#, None).await.unwrap();

    let agent = start(config(&etcd.endpoint(), "node-u", dir.path(), 8)).await;
    let long = Duration::from_secs(3);
    wait_chip(&mut observer, "node-u", 0, long, "rewritten", |r| r.state == ChipState::Healthy).await;
    wait_chip(&mut observer, "node-u", 7, long, "rewritten", |r| r.state == ChipState::Healthy).await;

    inject(dir.path(), 3, &Fault::Code("vendor-0xbeef".into())).unwrap();
    let r = wait_chip(&mut observer, "node-u", 3, long, "isolated", |r| r.state == ChipState::Failed).await;
    assert_eq!(r.code, "vendor-0xbeef");
    let metrics =
        prometheus::TextEncoder::new().encode_to_string(&agent.metrics().registry().gather()).unwrap();
    assert!(
        metrics.contains(r#"ninelives_agent_unknown_fault_codes_total{code="vendor-0xbeef"} 1"#),
        "unknown code not counted:\n{metrics}"
    );
    // Both garbage values are reported (once per read until they are overwritten).
    let malformed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ninelives_agent_malformed_values_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(malformed >= 2, "malformed values not reported: {malformed}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_during_an_etcd_outage_are_written_when_it_returns() {
    let mut etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = start(config(&etcd.endpoint(), "node-o", dir.path(), 8)).await;

    etcd.stop();
    let outage = Instant::now();
    inject(dir.path(), 2, &Fault::HbmEcc).unwrap();
    // A fault that comes and goes during the outage: the current truth (healthy) is what counts.
    inject(dir.path(), 5, &Fault::LinkDown).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    inject(dir.path(), 5, &Fault::Recover).unwrap();
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed())).await;
    assert!(!agent.is_ready(), "agent claims readiness without etcd");
    etcd.restart().unwrap();
    let back = Instant::now();

    let mut observer = client(&etcd.endpoint()).await;
    let r = wait_chip(&mut observer, "node-o", 2, Duration::from_secs(10), "failed", |r| {
        r.state == ChipState::Failed
    })
    .await;
    println!("fault during a 10 s outage written {:?} after etcd returned", back.elapsed());
    assert_eq!(r.code, "hbm-ecc-uncorrectable");
    assert_eq!(chip_record(&mut observer, "node-o", 5).await.unwrap().state, ChipState::Healthy);
    assert!(alive(&mut observer, "node-o").await, "presence not restored");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_idle_agent_writes_no_key_for_60_seconds() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut observer = client(&etcd.endpoint()).await;
    let agent = start(config(&etcd.endpoint(), "node-i", dir.path(), 8)).await;
    // Let start-up writes land before the watch begins.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let revision = observer.get(PREFIX, None).await.unwrap().header().unwrap().revision();
    let mut watch = observer
        .watch(PREFIX, Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1)))
        .await
        .unwrap();

    let mut writes = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, watch.message()).await {
            Err(_) => break,
            Ok(msg) => writes += msg.unwrap().map_or(0, |m| m.events().len()),
        }
    }
    let after = observer.get(PREFIX, Some(GetOptions::new().with_prefix())).await.unwrap();
    println!(
        "healthy idle agent: {writes} key writes in 60 s; revision {revision} -> {}",
        after.header().unwrap().revision()
    );
    assert_eq!(writes, 0);
    assert_eq!(after.header().unwrap().revision(), revision, "etcd revision moved");
    assert!(alive(&mut observer, "node-i").await, "presence lost: keepalives stopped");
    let metrics =
        prometheus::TextEncoder::new().encode_to_string(&agent.metrics().registry().gather()).unwrap();
    let keepalives = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ninelives_agent_lease_keepalive_seconds_count "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    println!("keepalives sent in the same time: {keepalives} (TTL 3 s)");
    assert!(keepalives >= 55, "only {keepalives} keepalives in 60 s at TTL 3 s");
    agent.shutdown().await;
}
