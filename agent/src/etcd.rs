//! The node's side of the etcd protocol: one lease, one presence key, chip states on change.
//!
//! ```text
//! session:  [keep the old lease if etcd still has it | grant a new one (TTL)]
//!           put <prefix>nodes/<node>/alive (under the lease)
//!           get <prefix>nodes/<node>/chips/  → what etcd holds (malformed values skipped)
//!           put every chip whose desired state differs from what etcd holds
//!           loop: keepalive every TTL/3 │ desired state changed → put the differing chips
//!                 │ shutdown → revoke the lease (presence gone at once) and return
//! on error: backoff (100 ms doubling to 5 s, jittered), new session; desired states are a level,
//!           so a fault that happened during the outage is written once when etcd is back.
//! ```
//!
//! A healthy idle node therefore sends etcd nothing but one keepalive every TTL/3.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, PutOptions, TlsOptions};
use ninelives_core::keyspace::{ChipRecord, ChipState, Keyspace};
use serde::Serialize;
use tokio::sync::watch;

use crate::error::AgentError;
use crate::events::{AgentEvent, AgentMetrics};
use crate::node::{DesiredStates, same_state, unix_now};

/// TLS material for etcd (`--etcd-ca-file`, `--etcd-cert-file`, `--etcd-key-file`), all PEM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// CA bundle that signed the etcd server certificate.
    pub ca: Option<PathBuf>,
    /// Client certificate (for etcd's `--client-cert-auth`).
    pub cert: Option<PathBuf>,
    /// Client private key.
    pub key: Option<PathBuf>,
}

/// How to reach etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs (`http://` or, with TLS, `https://`).
    pub endpoints: Vec<String>,
    /// TLS material; `None` for plain HTTP.
    pub tls: Option<EtcdTls>,
}

fn read_pem(path: &Path) -> Result<Vec<u8>, AgentError> {
    std::fs::read(path).map_err(|source| AgentError::TlsFile { path: path.to_path_buf(), source })
}

impl EtcdConfig {
    /// Connects (the channel reconnects by itself; requests fail while etcd is unreachable).
    pub async fn connect(&self) -> Result<Client, AgentError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            // Detect a dead connection quickly instead of waiting for TCP timeouts.
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            let mut config = TlsOptions::new();
            if let Some(ca) = &tls.ca {
                config = config.ca_certificate(Certificate::from_pem(read_pem(ca)?));
            }
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                config = config.identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?));
            }
            options = options.with_tls(config);
        }
        Client::connect(&self.endpoints, Some(options))
            .await
            .map_err(|source| AgentError::Etcd { op: "connect", source })
    }
}

/// Where the presence session gets its client.
#[derive(Clone)]
pub enum EtcdSource {
    /// Connect afresh for every session (what a real agent does).
    Config(EtcdConfig),
    /// Share an existing client (benchmarks running thousands of agents in one process).
    Shared(Box<Client>),
}

impl EtcdSource {
    /// A client for one session.
    pub async fn client(&self) -> Result<Client, AgentError> {
        match self {
            EtcdSource::Config(config) => config.connect().await,
            EtcdSource::Shared(client) => Ok(Client::clone(client)),
        }
    }
}

/// The presence key's value, for people reading etcd.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PresenceValue<'a> {
    node: &'a str,
    chips: usize,
    agent_version: &'static str,
    since: f64,
}

/// Runs `fut` under a deadline, labelling failures with `op`.
async fn within<T>(
    op: &'static str,
    limit: Duration,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, AgentError> {
    until_deadline(op, tokio::time::Instant::now() + limit, fut).await
}

/// Runs `fut` until `deadline`, labelling failures with `op`.
async fn until_deadline<T>(
    op: &'static str,
    deadline: tokio::time::Instant,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, AgentError> {
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(AgentError::Etcd { op, source }),
        Err(_) => Err(AgentError::EtcdTimeout(op)),
    }
}

/// Reconnection delays: 100 ms doubling to 5 s, jittered ±25 % so thousands of agents that lost
/// etcd together do not come back in lockstep.
#[derive(Debug)]
pub struct Backoff {
    attempt: u32,
    seed: u64,
}

impl Backoff {
    /// A fresh backoff; `seed` spreads the jitter (e.g. a hash of the node name).
    pub fn new(seed: u64) -> Self {
        Self { attempt: 0, seed }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let base = 100u64.saturating_mul(1 << self.attempt.min(6)).min(5_000);
        self.attempt += 1;
        // xorshift over the seed and the clock: cheap, good enough for jitter.
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::from(d.subsec_nanos()));
        let mut x = self.seed ^ nanos ^ u64::from(self.attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let jitter = (x % 500) as f64 / 1000.0 - 0.25;
        Duration::from_millis((base as f64 * (1.0 + jitter)) as u64)
    }

    /// Back to the shortest delay after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Hash of a string, for jitter seeds.
pub fn seed_of(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Reads a node's chip records from etcd. Malformed values are reported and left out.
pub async fn read_chip_records(
    client: &mut Client,
    keys: &Keyspace,
    node: &str,
    limit: Duration,
    metrics: &AgentMetrics,
) -> Result<BTreeMap<u32, ChipRecord>, AgentError> {
    let prefix = keys.node_chips(node);
    let resp = within("get-chips", limit, client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())))
        .await?;
    let mut records = BTreeMap::new();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let Some(index) = key.strip_prefix(&prefix).and_then(|i| i.parse::<u32>().ok()) else {
            AgentEvent::MalformedValue { key: &key, reason: "not a chip key" }.emit(metrics);
            continue;
        };
        match ChipRecord::parse(&key, kv.value()) {
            Ok(record) => {
                records.insert(index, record);
            }
            Err(e) => AgentEvent::MalformedValue { key: &key, reason: &e.reason }.emit(metrics),
        }
    }
    Ok(records)
}

/// The quarantines recorded in etcd by a previous run of the agent, by chip.
pub fn quarantines(records: &BTreeMap<u32, ChipRecord>) -> BTreeMap<u32, String> {
    records
        .iter()
        .filter(|(_, r)| r.state == ChipState::Quarantined)
        .map(|(&i, r)| (i, r.code.clone()))
        .collect()
}

/// Holds a node's presence in etcd and keeps its chip states there in sync.
pub struct Presence {
    source: EtcdSource,
    keys: Keyspace,
    node: String,
    ttl: i64,
    metrics: AgentMetrics,
    lease: Option<i64>,
    /// What etcd holds, as far as this agent knows (reloaded every session).
    written: BTreeMap<u32, ChipRecord>,
    connected: bool,
}

impl Presence {
    /// Presence of `node` with a lease of `ttl` seconds (at least 2).
    pub fn new(source: EtcdSource, keys: Keyspace, node: &str, ttl: i64, metrics: AgentMetrics) -> Self {
        Self {
            source,
            keys,
            node: node.to_string(),
            ttl: ttl.max(2),
            metrics,
            lease: None,
            written: BTreeMap::new(),
            connected: false,
        }
    }

    fn request_limit(&self) -> Duration {
        // Long enough that a loaded etcd is waited for rather than hammered with retries (a
        // retry storm of thousands of agents is worse than slow answers), short enough that a
        // dead connection is noticed before the lease expires.
        Duration::from_secs_f64((self.ttl as f64 / 2.0).clamp(1.0, 10.0))
    }

    /// Runs sessions until `shutdown` turns true, then revokes the lease.
    /// `on_sync` is called with `true` whenever the lease is held and chip states are in sync,
    /// with `false` when the connection is lost (it drives `/ready`).
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<DesiredStates>,
        mut shutdown: watch::Receiver<bool>,
        on_sync: impl Fn(bool) + Send,
    ) {
        let mut backoff = Backoff::new(seed_of(&self.node));
        // Wait for the chips' first judgement, so "in sync" never means "nothing judged yet".
        tokio::select! {
            first = desired.changed() => if first.is_err() { return },
            _ = shutdown.changed() => return,
        }
        loop {
            if *shutdown.borrow() {
                return;
            }
            let result = self.session(&mut desired, &mut shutdown, &on_sync, &mut backoff).await;
            match result {
                Ok(()) => return,
                Err(e) => {
                    let text = e.to_string();
                    AgentEvent::EtcdError { op: e.metric_label(), error: &text }.emit(&self.metrics);
                    if self.connected {
                        self.connected = false;
                        AgentEvent::EtcdConnection { connected: false }.emit(&self.metrics);
                        on_sync(false);
                    }
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                // A dropped sender means the agent is gone: stop instead of spinning.
                changed = shutdown.changed() => if changed.is_err() { return },
            }
        }
    }

    async fn session(
        &mut self,
        desired: &mut watch::Receiver<DesiredStates>,
        shutdown: &mut watch::Receiver<bool>,
        on_sync: &impl Fn(bool),
        backoff: &mut Backoff,
    ) -> Result<(), AgentError> {
        let limit = self.request_limit();
        let mut client = self.source.client().await?;

        // Keep the lease when etcd still has it (an outage shorter than the TTL): no churn
        // for the operator watching presence.
        // `lease_keep_alive` reads the first answer itself and fails with `LeaseKeepAliveError`
        // when etcd no longer has the lease (TTL 0): that lease is gone for good, so forget it and
        // grant a new one. Propagating that error instead (issue 19) retried the dead lease
        // forever and the node never re-registered after an outage longer than the TTL.
        // Timeouts and transport errors keep the lease: etcd may still hold it.
        // The stream that proved the lease alive is the one kept: a second stream per session
        // would double the streams etcd holds when thousands of agents reconnect at once.
        let mut reused = None;
        if let Some(id) = self.lease {
            match within("keepalive", limit, client.lease_keep_alive(id)).await {
                Ok(pair) => reused = Some(pair),
                Err(e) if e.lease_gone() => self.lease = None,
                Err(e) => return Err(e),
            }
        }
        let lease = if reused.is_some() {
            self.lease.unwrap_or_default()
        } else {
            let grant = within("grant", limit, client.lease_grant(self.ttl, None)).await?;
            self.lease = Some(grant.id());
            grant.id()
        };
        let chips = desired.borrow().len();
        let presence = serde_json::to_string(&PresenceValue {
            node: &self.node,
            chips,
            agent_version: env!("CARGO_PKG_VERSION"),
            since: unix_now(),
        })
        .unwrap_or_default();
        if reused.is_none() {
            let put = client.put(
                self.keys.node_alive(&self.node),
                presence,
                Some(PutOptions::new().with_lease(lease)),
            );
            within("put-alive", limit, put).await?;
        }
        AgentEvent::LeaseAcquired { lease, ttl: self.ttl, reused: reused.is_some() }.emit(&self.metrics);

        let (mut keeper, mut stream) = match reused {
            Some(pair) => pair,
            None => match within("keepalive", limit, client.lease_keep_alive(lease)).await {
                Ok(pair) => pair,
                Err(e) => {
                    if e.lease_gone() {
                        self.lease = None;
                    }
                    return Err(e);
                }
            },
        };
        // etcd's last word on the lease: it lives until then. A keep-alive answer is awaited
        // until that moment, not for a fixed request limit: giving up on a slow etcd while the
        // lease still lives would open a new session (new streams, new reads) on an etcd
        // already too slow to answer, and thousands of agents doing so at once grow etcd's
        // memory without bound (the 6,250-node scale run, session 8).
        let mut expires =
            tokio::time::Instant::now() + Duration::from_secs(u64::try_from(self.ttl).unwrap_or(1));
        self.written = read_chip_records(&mut client, &self.keys, &self.node, limit, &self.metrics).await?;
        self.reconcile(&mut client, desired, limit).await?;
        self.connected = true;
        backoff.reset();
        AgentEvent::EtcdConnection { connected: true }.emit(&self.metrics);
        on_sync(true);

        let period = Duration::from_secs_f64(self.ttl as f64 / 3.0);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut monitor_running = true;
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        // Revoke so the departure is seen at once, not after the TTL.
                        let revoked = within("revoke", limit, client.lease_revoke(lease)).await;
                        self.lease = None;
                        return revoked.map(|_| ());
                    }
                }
                changed = desired.changed(), if monitor_running => {
                    match changed {
                        Ok(()) => self.reconcile(&mut client, desired, limit).await?,
                        // The chip monitor stopped: nothing more to publish; keep presence.
                        Err(_) => monitor_running = false,
                    }
                }
                _ = tick.tick() => {
                    let started = Instant::now();
                    let until = expires.max(tokio::time::Instant::now() + limit);
                    until_deadline("keepalive", until, keeper.keep_alive()).await?;
                    let resp = until_deadline("keepalive", until, stream.message()).await?;
                    match resp {
                        Some(r) if r.ttl() > 0 => {
                            let ttl = Duration::from_secs(u64::try_from(r.ttl()).unwrap_or(0));
                            // Counted from the request: the answer may have waited in a queue.
                            expires = tokio::time::Instant::from_std(started) + ttl;
                            AgentEvent::KeepAlive { latency: started.elapsed() }.emit(&self.metrics);
                        }
                        _ => {
                            self.lease = None;
                            return Err(AgentError::LeaseLost(lease));
                        }
                    }
                }
            }
        }
    }

    /// Writes every chip whose desired state differs from what etcd holds.
    async fn reconcile(
        &mut self,
        client: &mut Client,
        desired: &mut watch::Receiver<DesiredStates>,
        limit: Duration,
    ) -> Result<(), AgentError> {
        let wanted: Vec<(u32, crate::node::DesiredChip)> = desired
            .borrow_and_update()
            .iter()
            .filter(|(index, d)| !self.written.get(index).is_some_and(|w| same_state(w, &d.record)))
            .map(|(&i, d)| (i, d.clone()))
            .collect();
        for (index, chip) in wanted {
            let value = serde_json::to_string(&chip.record).unwrap_or_default();
            within("put-chip", limit, client.put(self.keys.chip(&self.node, index), value, None)).await?;
            AgentEvent::ChipPublished {
                chip: index,
                state: chip.record.state,
                latency: chip.observed_at.elapsed(),
            }
            .emit(&self.metrics);
            self.written.insert(index, chip.record);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::new(seed_of("node-a"));
        let first = b.next_delay();
        assert!((75..=125).contains(&first.as_millis()), "{first:?}");
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(6_250), "{d:?}");
        }
        assert!(b.next_delay() >= Duration::from_millis(3_750));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }

    #[test]
    fn only_quarantined_records_are_restored() {
        let rec = |state, code: &str| ChipRecord { state, code: code.into(), since: 1.0 };
        let records = BTreeMap::from([
            (0, rec(ChipState::Healthy, "ok")),
            (3, rec(ChipState::Quarantined, "flapping:link-down")),
            (5, rec(ChipState::Failed, "link-down")),
        ]);
        assert_eq!(quarantines(&records), BTreeMap::from([(3, "flapping:link-down".to_string())]));
    }
}
