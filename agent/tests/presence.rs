//! Presence acceptance tests: the agent runs in a child process (this test binary re-executed),
//! killed with SIGKILL or stopped with SIGTERM, against a real etcd.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ninelives_testkit::EtcdServer;

const CHILD_ENV: &str = "NINELIVES_TEST_AGENT_CHILD";
const TTL: u64 = 3;

/// Not a test: the body of the child process. It does nothing unless re-executed by the tests.
#[test]
#[ignore = "child-process body of the presence tests"]
fn child_agent_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let mut parts = spec.splitn(3, '|');
    let (Some(endpoint), Some(node), Some(dir)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("bad child spec {spec:?}");
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        let mut cfg = config(endpoint, node, std::path::Path::new(dir), 8);
        cfg.ttl = TTL as i64;
        let agent = start(cfg).await;
        term.recv().await;
        agent.shutdown().await;
    });
}

fn spawn_agent(endpoint: &str, node: &str, dir: &std::path::Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child_agent_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{endpoint}|{node}|{}", dir.display()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_alive(
    observer: &mut etcd_client::Client,
    node: &str,
    want: bool,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    while alive(observer, node).await != want {
        assert!(started.elapsed() < within, "presence of {node} not {want} within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_disappears_within_ttl_plus_one_second() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut observer = client(&etcd.endpoint()).await;
    let mut child = spawn_agent(&etcd.endpoint(), "node-k", dir.path());
    wait_alive(&mut observer, "node-k", true, Duration::from_secs(20)).await;
    // Let a keepalive or two pass so the lease is in its steady state.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    child.kill().unwrap(); // SIGKILL: no chance to revoke
    child.wait().unwrap();
    let gone = wait_alive(&mut observer, "node-k", false, Duration::from_secs(TTL + 5)).await;
    println!("kill -9: presence gone after {gone:?} (TTL {TTL} s)");
    assert!(gone <= Duration::from_secs(TTL + 1), "{gone:?} > TTL + 1 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_revokes_presence_within_one_second() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut observer = client(&etcd.endpoint()).await;
    let mut child = spawn_agent(&etcd.endpoint(), "node-t", dir.path());
    wait_alive(&mut observer, "node-t", true, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let gone = wait_alive(&mut observer, "node-t", false, Duration::from_secs(TTL + 5)).await;
    println!("SIGTERM: presence gone after {gone:?}");
    assert!(gone <= Duration::from_secs(1), "{gone:?} > 1 s: lease not revoked");
    let exit = child.wait().unwrap();
    assert!(exit.success(), "agent exited with {exit}");
}
