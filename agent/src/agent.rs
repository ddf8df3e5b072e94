//! The agent process: wires the probe, the health state machines, etcd presence, the Kubernetes
//! node report, local execution and the admin endpoint together, and shuts them down in order.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ninelives_core::keyspace::Keyspace;
use ninelives_telemetry::{AdminServer, Readiness};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::AgentError;
use crate::etcd::{Backoff, EtcdSource, Presence, quarantines, read_chip_records, seed_of};
use crate::events::{AgentEvent, AgentMetrics};
use crate::exec::{Executor, JobBinding};
use crate::faults::FaultTable;
use crate::health::HealthPolicy;
use crate::kubernetes::NodeReporter;
use crate::node::{DEFAULT_POLL_INTERVAL, NodeHealth};
use crate::probe::ChipProbe;
use crate::simulate::SimulatedAsic;

/// Everything one agent needs.
pub struct AgentConfig {
    /// Node name (the Kubernetes node name in a cluster).
    pub node: String,
    /// Where etcd is.
    pub etcd: EtcdSource,
    /// The keyspace (prefix).
    pub keys: Keyspace,
    /// Lease TTL in seconds; keepalives every TTL/3.
    pub ttl: i64,
    /// Chip readings.
    pub probe: Arc<dyn ChipProbe>,
    /// With `Some((dir, n))`, create `n` simulated chips in `dir` and advance their heartbeats.
    pub simulate: Option<(PathBuf, u32)>,
    /// How often chips are read.
    pub poll_interval: Duration,
    /// Health thresholds.
    pub policy: HealthPolicy,
    /// Fault code → action.
    pub fault_table: FaultTable,
    /// Admin endpoint (`/metrics`, `/live`, `/ready`), if any.
    pub metrics_addr: Option<SocketAddr>,
    /// Report a Node condition and taint through this Kubernetes client.
    pub kube: Option<::kube::Client>,
    /// Jobs with workers on this node, whose placement generations the agent applies.
    pub jobs: Vec<JobBinding>,
    /// Longest wait for in-flight local commands after shutdown begins.
    pub drain_grace: Duration,
}

impl AgentConfig {
    /// A configuration with defaults for everything but identity, etcd and probe.
    pub fn new(node: &str, etcd: EtcdSource, probe: Arc<dyn ChipProbe>) -> Self {
        Self {
            node: node.to_string(),
            etcd,
            keys: Keyspace::default(),
            ttl: 10,
            probe,
            simulate: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
            policy: HealthPolicy::default(),
            fault_table: FaultTable::default(),
            metrics_addr: None,
            kube: None,
            jobs: Vec::new(),
            drain_grace: Duration::from_secs(10),
        }
    }
}

/// A running agent.
pub struct Agent {
    metrics: AgentMetrics,
    ready: Readiness,
    admin_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    presence: JoinHandle<()>,
    others: Vec<JoinHandle<()>>,
    drain: Vec<JoinHandle<()>>,
    drain_grace: Duration,
}

impl Agent {
    /// Starts the agent. Returns once the admin endpoint is bound; chips are judged once the
    /// agent has read its previous chip records from etcd (so a restart never lifts a
    /// quarantine) and everything else runs in background tasks.
    pub async fn start(config: AgentConfig) -> Result<Self, AgentError> {
        let metrics = AgentMetrics::new().map_err(|e| AgentError::Admin(std::io::Error::other(e)))?;
        let ready = Readiness::default();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut others = Vec::new();

        let mut admin_addr = None;
        if let Some(addr) = config.metrics_addr {
            let server = AdminServer::bind(addr, metrics.registry().clone(), ready.clone())
                .await
                .map_err(AgentError::Admin)?;
            admin_addr = Some(server.local_addr().map_err(AgentError::Admin)?);
            let mut stop = shutdown_rx.clone();
            others.push(tokio::spawn(async move {
                let _ = server
                    .serve(async move { while stop.changed().await.is_ok() && !*stop.borrow() {} })
                    .await;
            }));
        }

        if let Some((dir, count)) = &config.simulate {
            let sim = SimulatedAsic::create(dir, *count)
                .map_err(|source| AgentError::ChipsDir { path: dir.clone(), source })?;
            others.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    if let Err(e) = sim.tick() {
                        tracing::warn!(error = %e, "simulated heartbeat failed");
                    }
                }
            }));
        }

        let chips = config.probe.discover()?;
        tracing::info!(node = %config.node, chips = chips.len(), "agent starting");

        let (desired_tx, desired_rx) = watch::channel(Default::default());
        let probe = config.probe.clone();
        let monitor_metrics = metrics.clone();
        let poll_interval = config.poll_interval;
        let policy = config.policy.clone();
        let table = config.fault_table.clone();
        let source = config.etcd.clone();
        let keys = config.keys.clone();
        let node = config.node.clone();
        let mut monitor_stop = shutdown_rx.clone();
        let (isolated_tx, isolated_rx) = watch::channel(false);
        others.push(tokio::spawn(async move {
            let Some(previous) =
                read_previous(&source, &keys, &node, &monitor_metrics, &mut monitor_stop).await
            else {
                return;
            };
            let mut health =
                NodeHealth::new(&chips, &policy, table, &quarantines(&previous), &monitor_metrics);
            health.poll(probe.as_ref(), &monitor_metrics);
            desired_tx.send_replace(health.desired().clone());
            let mut tick = tokio::time::interval(poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = monitor_stop.changed() => return,
                }
                if health.poll(probe.as_ref(), &monitor_metrics) {
                    desired_tx.send_replace(health.desired().clone());
                    let isolated = health.is_isolated();
                    isolated_tx.send_if_modified(|i| std::mem::replace(i, isolated) != isolated);
                }
            }
        }));

        if let Some(client) = config.kube.clone() {
            let reporter = NodeReporter::new(client, &config.node, metrics.clone());
            others.push(tokio::spawn(reporter.run(desired_rx.clone(), isolated_rx, shutdown_rx.clone())));
        }

        let presence = Presence::new(
            config.etcd.clone(),
            config.keys.clone(),
            &config.node,
            config.ttl,
            metrics.clone(),
        );
        let sync_ready = ready.clone();
        let presence = tokio::spawn(
            presence.run(desired_rx, shutdown_rx.clone(), move |in_sync| sync_ready.set(in_sync)),
        );

        let mut drain = Vec::new();
        for binding in config.jobs {
            let executor = Executor::new(
                config.etcd.clone(),
                config.keys.clone(),
                &config.node,
                binding,
                metrics.clone(),
            );
            drain.push(tokio::spawn(executor.run(shutdown_rx.clone())));
        }

        Ok(Self {
            metrics,
            ready,
            admin_addr,
            shutdown,
            presence,
            others,
            drain,
            drain_grace: config.drain_grace,
        })
    }

    /// The metrics (shared with the admin endpoint).
    pub fn metrics(&self) -> &AgentMetrics {
        &self.metrics
    }

    /// Whether the lease is held and chip states are in sync.
    pub fn is_ready(&self) -> bool {
        self.ready.get()
    }

    /// The admin endpoint's bound address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Graceful shutdown: revoke the lease first (departure seen at once), then let in-flight
    /// local commands finish within the drain grace, then stop everything.
    pub async fn shutdown(self) {
        self.ready.set(false);
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.presence).await;
        for task in self.drain {
            if tokio::time::timeout(self.drain_grace, task).await.is_err() {
                tracing::warn!("local command still running after the drain grace; abandoning it");
            }
        }
        for task in &self.others {
            task.abort();
        }
        for task in self.others {
            let _ = task.await;
        }
    }
}

/// Reads the node's previous chip records, retrying with backoff until etcd answers; `None`
/// when shutdown comes first.
async fn read_previous(
    source: &EtcdSource,
    keys: &Keyspace,
    node: &str,
    metrics: &AgentMetrics,
    stop: &mut watch::Receiver<bool>,
) -> Option<std::collections::BTreeMap<u32, ninelives_core::keyspace::ChipRecord>> {
    let mut backoff = Backoff::new(seed_of(node));
    loop {
        let attempt = async {
            let mut client = source.client().await?;
            read_chip_records(&mut client, keys, node, Duration::from_secs(10), metrics).await
        };
        match attempt.await {
            Ok(records) => return Some(records),
            Err(e) => {
                let text = e.to_string();
                AgentEvent::EtcdError { op: e.metric_label(), error: &text }.emit(metrics);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = stop.changed() => return None,
        }
    }
}
