//! Rendezvous through etcd: membership under a lease, the generation's plan, per-generation
//! acknowledgements, and the watcher that tells a running step a newer generation exists.
//!
//! Keys (see `ninelives_core::keyspace`): `members/<rank>` (this worker's address, under its
//! lease), `placement` ([`DistPlan`], written by the control loop), `acks/<gen>/<rank>` (the step
//! a member has when it joins a generation). The generation's leader also reports for the
//! recovery brain: `progress` ([`ProgressRecord`], after every step) and `checkpoints/<step>`
//! ([`CheckpointRecord`], one per committed checkpoint still kept).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, PutOptions, TlsOptions};
use ninelives_core::keyspace::JobKeys;
use ninelives_core::recovery::{CheckpointRecord, ProgressRecord};
use serde::{Deserialize, Serialize};

use super::state::Shared;
use crate::error::{Result, WorkerError};
use ninelives_core::generation::DistPlan;

/// Longest one etcd request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the watcher reads the plan's generation.
const WATCH_PERIOD: Duration = Duration::from_millis(100);

/// The value at `members/<rank>`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MemberRecord {
    /// Worker rank (= node index in the job).
    pub rank: u32,
    /// Where its peers connect.
    pub addr: SocketAddr,
    /// Its process id (for people reading etcd and for the launcher).
    pub pid: u32,
}

/// The value at `acks/<gen>/<rank>`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    /// Updates the member has applied.
    pub step: u64,
}

fn etcd_err(op: &str) -> impl Fn(etcd_client::Error) -> WorkerError + '_ {
    move |e| WorkerError::Rendezvous(format!("etcd {op}: {e}"))
}

async fn within<T>(
    op: &str,
    fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => r.map_err(etcd_err(op)),
        Err(_) => Err(WorkerError::Rendezvous(format!("etcd {op} timed out after {REQUEST_TIMEOUT:?}"))),
    }
}

/// An etcd connection with its own small runtime, used from synchronous code.
pub struct Etcd {
    rt: tokio::runtime::Runtime,
    client: Client,
    keys: JobKeys,
}

/// PEM files for TLS to etcd (`https://` endpoints): the CA of etcd's serving certificate and,
/// for client-certificate authentication, this worker's certificate and key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdTlsFiles {
    /// CA bundle of etcd's serving certificate.
    pub ca: Option<PathBuf>,
    /// Client certificate.
    pub cert: Option<PathBuf>,
    /// Key of the client certificate.
    pub key: Option<PathBuf>,
}

impl EtcdTlsFiles {
    /// Whether any file is set (TLS is used only then).
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    fn options(&self) -> Result<TlsOptions> {
        let read = |path: &Path| {
            std::fs::read(path)
                .map_err(|e| WorkerError::Rendezvous(format!("etcd TLS file {}: {e}", path.display())))
        };
        let mut tls = TlsOptions::new();
        if let Some(ca) = &self.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?)),
            (None, None) => {}
            _ => {
                return Err(WorkerError::Rendezvous(
                    "etcd TLS needs both a client certificate and its key".into(),
                ));
            }
        }
        Ok(tls)
    }
}

impl Etcd {
    /// Connects to `endpoints` without TLS.
    pub fn connect(endpoints: &[String], keys: JobKeys) -> Result<Self> {
        Self::connect_tls(endpoints, keys, &EtcdTlsFiles::default())
    }

    /// Connects to `endpoints`, with TLS when `tls` names any file.
    pub fn connect_tls(endpoints: &[String], keys: JobKeys, tls: &EtcdTlsFiles) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(|e| WorkerError::Rendezvous(format!("runtime: {e}")))?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if tls.is_set() {
            options = options.with_tls(tls.options()?);
        }
        let client = rt.block_on(within("connect", Client::connect(endpoints, Some(options))))?;
        Ok(Self { rt, client, keys })
    }

    /// The job's keys.
    pub fn keys(&self) -> &JobKeys {
        &self.keys
    }

    /// Reads one key.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut c = self.client.clone();
        let resp = self.rt.block_on(within("get", c.get(key, None)))?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Reads every key under `prefix`, as (key, value).
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let mut c = self.client.clone();
        let resp = self.rt.block_on(within("get", c.get(prefix, Some(GetOptions::new().with_prefix()))))?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec()))
            .collect())
    }

    /// Writes one key, optionally under a lease.
    pub fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<()> {
        let mut c = self.client.clone();
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        self.rt.block_on(within("put", c.put(key, value, options)))?;
        Ok(())
    }

    /// Deletes one key, or every key under it with `prefix`.
    pub fn delete(&self, key: &str, prefix: bool) -> Result<()> {
        let mut c = self.client.clone();
        let options = prefix.then(|| etcd_client::DeleteOptions::new().with_prefix());
        self.rt.block_on(within("delete", c.delete(key, options)))?;
        Ok(())
    }

    /// The published plan, if any. A value that does not parse is an error (never a guess).
    pub fn plan(&self) -> Result<Option<DistPlan>> {
        let key = self.keys.placement();
        match self.get(&key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| WorkerError::Rendezvous(format!("malformed value at {key}: {e}"))),
        }
    }

    /// Reports the last completed step and its loss at `progress`.
    pub fn put_progress(&self, step: u64, loss: f64) -> Result<()> {
        let record = ProgressRecord { step, loss: Some(loss) };
        let value = serde_json::to_vec(&record).map_err(|e| WorkerError::Rendezvous(e.to_string()))?;
        self.put(&self.keys.progress(), value, None)
    }

    /// The reported progress, if any (a value that does not parse is an error).
    pub fn progress(&self) -> Result<Option<ProgressRecord>> {
        let key = self.keys.progress();
        match self.get(&key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| WorkerError::Rendezvous(format!("malformed value at {key}: {e}"))),
        }
    }

    /// Records the checkpoint committed at `step` in `location` under `checkpoints/<step>`.
    pub fn put_checkpoint(&self, step: u64, location: &Path) -> Result<()> {
        let record = CheckpointRecord { step, location: Some(location.display().to_string()) };
        let value = serde_json::to_vec(&record).map_err(|e| WorkerError::Rendezvous(e.to_string()))?;
        self.put(&self.keys.checkpoint(step), value, None)
    }

    /// Deletes the record of the checkpoint of `step` (retention removed it).
    pub fn delete_checkpoint(&self, step: u64) -> Result<()> {
        self.delete(&self.keys.checkpoint(step), false)
    }

    /// Checkpoint records by step (malformed values, or a step differing from the key's, are
    /// skipped with a warning).
    pub fn checkpoints(&self) -> Result<BTreeMap<u64, CheckpointRecord>> {
        let prefix = self.keys.checkpoints();
        let mut out = BTreeMap::new();
        for (key, value) in self.get_prefix(&prefix)? {
            let step = key.strip_prefix(&prefix).and_then(|s| s.parse::<u64>().ok());
            match (step, serde_json::from_slice::<CheckpointRecord>(&value)) {
                (Some(step), Ok(record)) if record.step == step => {
                    out.insert(step, record);
                }
                _ => tracing::warn!("malformed checkpoint record at {key}"),
            }
        }
        Ok(out)
    }

    /// Registered members by rank (malformed values are skipped with a warning).
    pub fn members(&self) -> Result<BTreeMap<u32, MemberRecord>> {
        let mut out = BTreeMap::new();
        for (key, value) in self.get_prefix(&self.keys.members())? {
            match serde_json::from_slice::<MemberRecord>(&value) {
                Ok(m) => {
                    out.insert(m.rank, m);
                }
                Err(e) => tracing::warn!("malformed value at {key}: {e}"),
            }
        }
        Ok(out)
    }

    /// Acknowledgements of `generation` by rank.
    pub fn acks(&self, generation: u64) -> Result<BTreeMap<u32, u64>> {
        let prefix = self.keys.acks(generation);
        let mut out = BTreeMap::new();
        for (key, value) in self.get_prefix(&prefix)? {
            let rank = key.strip_prefix(&prefix).and_then(|r| r.parse::<u32>().ok());
            match (rank, serde_json::from_slice::<Ack>(&value)) {
                (Some(rank), Ok(ack)) => {
                    out.insert(rank, ack.step);
                }
                _ => tracing::warn!("malformed acknowledgement at {key}"),
            }
        }
        Ok(out)
    }
}

/// One member's session: its lease (kept alive in the background) and registration.
pub struct Session {
    etcd: Arc<Etcd>,
    rank: u32,
    lease: i64,
}

impl Session {
    /// Grants a lease of `ttl` seconds and keeps it alive every `ttl / 3`.
    pub fn start(etcd: Arc<Etcd>, rank: u32, ttl: i64) -> Result<Self> {
        let mut c = etcd.client.clone();
        let lease = etcd.rt.block_on(within("lease-grant", c.lease_grant(ttl.max(1), None)))?.id();
        let period = Duration::from_secs_f64(ttl.max(1) as f64 / 3.0);
        let mut c = etcd.client.clone();
        etcd.rt.spawn(async move {
            let Ok(Ok((mut keeper, mut stream))) =
                tokio::time::timeout(REQUEST_TIMEOUT, c.lease_keep_alive(lease)).await
            else {
                tracing::error!("cannot keep lease {lease} alive");
                return;
            };
            loop {
                if keeper.keep_alive().await.is_err() {
                    tracing::warn!("lease keep-alive failed");
                }
                match tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    _ => {
                        tracing::error!("lease {lease} lost; membership will expire");
                        return;
                    }
                }
                tokio::time::sleep(period).await;
            }
        });
        Ok(Self { etcd, rank, lease })
    }

    /// Publishes this member's address under its lease.
    pub fn register(&self, addr: SocketAddr) -> Result<()> {
        let record = MemberRecord { rank: self.rank, addr, pid: std::process::id() };
        let value = serde_json::to_vec(&record).map_err(|e| WorkerError::Rendezvous(e.to_string()))?;
        self.etcd.put(&self.etcd.keys.member(self.rank), value, Some(self.lease))
    }

    /// Acknowledges joining `generation` at `step`.
    pub fn ack(&self, generation: u64, step: u64) -> Result<()> {
        let value = serde_json::to_vec(&Ack { step }).map_err(|e| WorkerError::Rendezvous(e.to_string()))?;
        self.etcd.put(&self.etcd.keys.ack(generation, &self.rank.to_string()), value, None)
    }

    /// Polls the plan's generation into `shared.seen_generation` until the process stops.
    pub fn watch_generation(&self, shared: Arc<Shared>) {
        let mut c = self.etcd.client.clone();
        let key = self.etcd.keys.placement();
        self.etcd.rt.spawn(async move {
            #[derive(Deserialize)]
            struct Header {
                generation: u64,
            }
            while !shared.stop.load(Ordering::SeqCst) {
                if let Ok(Ok(resp)) = tokio::time::timeout(REQUEST_TIMEOUT, c.get(key.as_str(), None)).await
                    && let Some(kv) = resp.kvs().first()
                    && let Ok(h) = serde_json::from_slice::<Header>(kv.value())
                {
                    shared.seen_generation.fetch_max(h.generation, Ordering::SeqCst);
                }
                tokio::time::sleep(WATCH_PERIOD).await;
            }
        });
    }

    /// Leaves at once (revokes the lease, deleting the membership key).
    pub fn leave(&self) {
        let mut c = self.etcd.client.clone();
        if let Err(e) = self.etcd.rt.block_on(within("lease-revoke", c.lease_revoke(self.lease))) {
            tracing::warn!("{e}");
        }
    }
}
