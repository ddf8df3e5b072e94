//! Helpers shared by the agent's acceptance tests: an in-process agent over simulated chips,
//! and an etcd client to observe it.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use ninelives_agent::etcd::{EtcdConfig, EtcdSource};
use ninelives_agent::probe::DirProbe;
use ninelives_agent::{Agent, AgentConfig};
use ninelives_core::keyspace::{ChipRecord, Keyspace};

pub const PREFIX: &str = "/nltest/";

pub fn keys() -> Keyspace {
    Keyspace::new(PREFIX)
}

pub async fn client(endpoint: &str) -> Client {
    Client::connect([endpoint], None).await.expect("etcd client")
}

/// An agent config for `node` over `count` simulated chips in `dir`.
pub fn config(endpoint: &str, node: &str, dir: &Path, count: u32) -> AgentConfig {
    let source = EtcdSource::Config(EtcdConfig { endpoints: vec![endpoint.to_string()], tls: None });
    let mut config = AgentConfig::new(node, source, Arc::new(DirProbe::new(dir)));
    config.keys = keys();
    config.ttl = 3;
    config.simulate = Some((dir.to_path_buf(), count));
    config.poll_interval = Duration::from_millis(50);
    config
}

/// Starts an agent and waits until it is ready (lease held, chip states in sync).
pub async fn start(config: AgentConfig) -> Agent {
    let agent = Agent::start(config).await.expect("agent starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.is_ready() {
        assert!(Instant::now() < deadline, "agent not ready within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent
}

pub async fn chip_record(client: &mut Client, node: &str, chip: u32) -> Option<ChipRecord> {
    let key = keys().chip(node, chip);
    let resp = client.get(key.as_str(), None).await.ok()?;
    resp.kvs().first().and_then(|kv| ChipRecord::parse(&key, kv.value()).ok())
}

/// Polls until `pred` holds for chip `chip`'s record, or panics after `within`.
pub async fn wait_chip(
    client: &mut Client,
    node: &str,
    chip: u32,
    within: Duration,
    what: &str,
    pred: impl Fn(&ChipRecord) -> bool,
) -> ChipRecord {
    let deadline = Instant::now() + within;
    loop {
        if let Some(r) = chip_record(client, node, chip).await
            && pred(&r)
        {
            return r;
        }
        assert!(Instant::now() < deadline, "chip {chip} of {node}: {what} not seen within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn alive(client: &mut Client, node: &str) -> bool {
    let resp = client.get(keys().node_alive(node), None).await.expect("get alive");
    !resp.kvs().is_empty()
}

/// Number of keys under the test prefix.
pub async fn key_count(client: &mut Client) -> usize {
    let resp =
        client.get(PREFIX, Some(GetOptions::new().with_prefix().with_count_only())).await.expect("count");
    resp.count() as usize
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
