//! Rendezvous through etcd: membership under a lease, the generation's plan, per-generation
//! acknowledgements, and the watcher that tells a running step a newer generation exists.
//!
//! Keys (see `ninelives_core::keyspace`): `members/<rank>` (this worker's address, under its
//! lease), `placement` ([`DistPlan`], written by the control loop), `acks/<gen>/<rank>` (the step
//! a member has when it joins a generation). The generation's leader also reports for the
//! recovery brain: `progress` ([`ProgressRecord`], after every step) and `checkpoints/<step>`
//! ([`CheckpointRecord`], one per committed checkpoint still kept), each carrying the
//! generation it was written in, so a buffered write replayed late is recognisably stale.
//!
//! The control plane is not the data plane: a [`Session`] never makes training wait for etcd.
//! Its writes are buffered and delivered in the background (newest wins per key), its lease is
//! re-granted and its key put back after any failure, and every request has a deadline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, PutOptions, TlsOptions, Txn, TxnOp,
};
use ninelives_core::keyspace::JobKeys;
use ninelives_core::recovery::{CheckpointRecord, ProgressRecord};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::state::Shared;
use crate::error::{Result, WorkerError};
use ninelives_core::generation::{DistPlan, PlacementValue};

/// Longest one etcd request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Reads of the commit record and its groups before giving up when the groups keep vanishing.
const PLAN_READ_ATTEMPTS: usize = 3;
/// Group values read per request (each ≤ 512 KiB; the client decodes at most 4 MiB).
const GROUPS_PER_READ: usize = 6;
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
    /// The generation acknowledged (also in the key; absent in values written before it was
    /// added).
    #[serde(default)]
    pub generation: u64,
}

/// gRPC codes after which the same request can never succeed (InvalidArgument, NotFound,
/// AlreadyExists, PermissionDenied, FailedPrecondition, OutOfRange, Unimplemented,
/// Unauthenticated); every other failure (unreachable, paused, no leader, timed out) may pass.
const PERMANENT_GRPC_CODES: [i32; 8] = [3, 5, 6, 7, 9, 11, 12, 16];

fn etcd_err(op: &'static str) -> impl Fn(etcd_client::Error) -> WorkerError {
    move |e| {
        let transient = match &e {
            etcd_client::Error::GRpcStatus(status) => {
                !PERMANENT_GRPC_CODES.contains(&i32::from(status.code()))
            }
            etcd_client::Error::IoError(_)
            | etcd_client::Error::TransportError(_)
            | etcd_client::Error::LeaseKeepAliveError(_)
            | etcd_client::Error::WatchError(_) => true,
            _ => false,
        };
        WorkerError::Etcd { op, reason: e.to_string(), transient }
    }
}

async fn within<T>(
    op: &'static str,
    fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    within_for(op, REQUEST_TIMEOUT, fut).await
}

/// Every etcd request has a deadline: a paused or partitioned etcd costs at most `limit`.
async fn within_for<T>(
    op: &'static str,
    limit: Duration,
    fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(etcd_err(op)),
        Err(_) => {
            Err(WorkerError::Etcd { op, reason: format!("no answer within {limit:?}"), transient: true })
        }
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

/// An etcd user and its password, for etcd with authentication on: the job's worker user the
/// operator created (`ninelives_core::access::worker_user`), limited to the job's member keys.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdCredentials {
    /// The user name.
    pub user: String,
    /// Its password (never printed).
    pub password: String,
}

impl std::fmt::Debug for EtcdCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCredentials").field("user", &self.user).finish_non_exhaustive()
    }
}

impl Etcd {
    /// Connects to `endpoints` without TLS.
    pub fn connect(endpoints: &[String], keys: JobKeys) -> Result<Self> {
        Self::connect_tls(endpoints, keys, &EtcdTlsFiles::default())
    }

    /// Connects to `endpoints`, with TLS when `tls` names any file.
    pub fn connect_tls(endpoints: &[String], keys: JobKeys, tls: &EtcdTlsFiles) -> Result<Self> {
        Self::connect_as(endpoints, keys, tls, None)
    }

    /// [`Etcd::connect_tls`], authenticated as `credentials` when given (etcd with auth on);
    /// without them, etcd authenticates by the TLS client certificate's common name, if any.
    /// Wrong credentials fail here, not at the first write.
    pub fn connect_as(
        endpoints: &[String],
        keys: JobKeys,
        tls: &EtcdTlsFiles,
        credentials: Option<&EtcdCredentials>,
    ) -> Result<Self> {
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
        if let Some(c) = credentials {
            options = options.with_user(c.user.as_str(), c.password.as_str());
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

    /// The published plan, if any: the value at `placement` (a whole plan, or the control loop's
    /// commit record, whose group values are read after it). A value that does not parse is an
    /// error (never a guess).
    pub fn plan(&self) -> Result<Option<DistPlan>> {
        let key = self.keys.placement();
        // A newer generation that settled may collect the groups of the record just read: then
        // the next read finds the newer record.
        for _ in 0..PLAN_READ_ATTEMPTS {
            let Some(bytes) = self.get(&key)? else { return Ok(None) };
            let malformed = |e: String| WorkerError::Rendezvous(format!("malformed value at {key}: {e}"));
            let record = match PlacementValue::parse(&bytes).map_err(|e| malformed(e.to_string()))? {
                PlacementValue::Inline(plan) => return Ok(Some(*plan)),
                PlacementValue::Record(record) => record,
            };
            let keys = record.group_keys(&self.keys);
            let mut groups = Vec::with_capacity(keys.len());
            // Few gets per request: each value may be 512 KiB, the client decodes at most 4 MiB.
            for batch in keys.chunks(GROUPS_PER_READ) {
                let ops = batch.iter().map(|k| TxnOp::get(k.as_str(), None)).collect::<Vec<_>>();
                let mut c = self.client.clone();
                let resp = self.rt.block_on(within("get", c.txn(Txn::new().and_then(ops))))?;
                for op in resp.op_responses() {
                    if let etcd_client::TxnOpResponse::Get(get) = op {
                        groups.push(get.kvs().first().map(|kv| kv.value().to_vec()));
                    }
                }
            }
            if groups.iter().any(Option::is_none) {
                continue;
            }
            let parsed = (0..)
                .zip(groups.into_iter().flatten())
                .map(|(g, bytes)| record.parse_group(g, &bytes))
                .collect::<std::result::Result<Vec<_>, _>>()
                .and_then(|groups| record.assemble(&groups));
            return parsed.map(Some).map_err(|e| malformed(e.to_string()));
        }
        Err(WorkerError::Rendezvous(format!("the group values named at {key} keep disappearing")))
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

/// Shortest pause before trying etcd again after a failure.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between attempts: an outage of any length is retried at least this often.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Most buffered writes sent in one transaction (etcd allows 128 operations by default).
const MAX_OPS_PER_TXN: usize = 64;
/// How often an idle writer re-checks whether the session ended.
const IDLE_PERIOD: Duration = Duration::from_millis(500);

/// Exponential backoff with jitter: each pause is drawn uniformly from the upper half of the
/// current bound, which doubles up to its cap. The jitter keeps thousands of members that lost
/// etcd at the same moment from coming back at the same moment.
#[derive(Debug)]
pub struct Backoff {
    current: Duration,
    min: Duration,
    max: Duration,
    seed: std::hash::RandomState,
    draws: u64,
}

impl Backoff {
    /// Pauses from `min` (after a success) growing to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { current: min, min, max: max.max(min), seed: std::hash::RandomState::new(), draws: 0 }
    }

    /// After a success: the next failure waits the shortest pause again.
    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The next pause, in `[bound / 2, bound]`; the bound then doubles (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        use std::hash::BuildHasher;
        let bound = self.current;
        self.current = bound.saturating_mul(2).min(self.max);
        self.draws += 1;
        // 53 random bits as a fraction in [0, 1).
        let fraction = (self.seed.hash_one(self.draws) >> 11) as f64 / (1u64 << 53) as f64;
        bound.mul_f64(0.5 + 0.5 * fraction)
    }
}

/// Which key a buffered write goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    /// `acks/<generation>/<rank>`.
    Ack(u64),
    /// `checkpoints/<step>`.
    Checkpoint(u64),
    /// Every `checkpoints/<step>` below this step (a range delete).
    CheckpointsBefore(u64),
    /// `progress`.
    Progress,
    /// `peers/<rank>`.
    Peer,
    /// `loads/<rank>`.
    Load,
}

/// Writes for the recovery brain that are not in etcd yet, latest wins per key: only the newest
/// progress matters, and a checkpoint record's put and delete supersede each other.
#[derive(Debug, Default)]
struct Outbox {
    /// By key: `Some(value)` to put, `None` to delete.
    pending: BTreeMap<Slot, Option<Vec<u8>>>,
    /// A batch is being written (so [`Session::flush`] waits for it).
    in_flight: bool,
}

impl Outbox {
    /// Takes up to `limit` writes, acknowledgements first (members wait on them).
    fn take(&mut self, limit: usize) -> Vec<(Slot, Option<Vec<u8>>)> {
        let slots: Vec<Slot> = self.pending.keys().take(limit).copied().collect();
        let batch: Vec<_> =
            slots.into_iter().filter_map(|s| self.pending.remove(&s).map(|v| (s, v))).collect();
        self.in_flight = !batch.is_empty();
        batch
    }

    /// Puts back a batch that failed, except where a newer write to the same key, or a range
    /// delete covering it, was queued.
    fn put_back(&mut self, batch: Vec<(Slot, Option<Vec<u8>>)>) {
        for (slot, value) in batch {
            if !self.covered(slot) {
                self.pending.entry(slot).or_insert(value);
            }
        }
    }

    /// Queues a write, unless a pending range delete covers it.
    fn queue(&mut self, slot: Slot, value: Option<Vec<u8>>) {
        if !self.covered(slot) {
            self.pending.insert(slot, value);
        }
    }

    /// Queues the delete of every checkpoint record below `step`. It replaces the pending
    /// writes of those records: etcd refuses a put inside a range deleted in the same
    /// transaction, and a record below the oldest directory left has no checkpoint.
    fn forget_checkpoints_before(&mut self, step: u64) {
        self.pending
            .retain(|slot, _| !matches!(slot, Slot::Checkpoint(s) | Slot::CheckpointsBefore(s) if *s < step));
        self.pending.insert(Slot::CheckpointsBefore(step), None);
    }

    /// Whether a pending range delete covers `slot`'s checkpoint record.
    fn covered(&self, slot: Slot) -> bool {
        let Slot::Checkpoint(step) = slot else { return false };
        self.pending.keys().any(|k| matches!(k, Slot::CheckpointsBefore(end) if step < *end))
    }

    fn is_idle(&self) -> bool {
        self.pending.is_empty() && !self.in_flight
    }
}

/// One member's session with etcd: its registration under a lease that is kept alive and, once
/// lost (an etcd outage longer than the TTL, a revoked lease, a failed-over endpoint), granted
/// anew with the key put back; and the writes it buffers for the recovery brain. Nothing here
/// blocks training: every write is queued and delivered by a background task that retries with
/// backoff until etcd answers.
pub struct Session {
    etcd: Arc<Etcd>,
    rank: u32,
    lease: Arc<AtomicI64>,
    registrations: Arc<AtomicU64>,
    outbox: Arc<Mutex<Outbox>>,
    wake: Arc<Notify>,
    stop: Arc<AtomicBool>,
}

impl Session {
    /// Registers `addr` as `members/<rank>` under a lease of `ttl` seconds and starts the
    /// background tasks. Returns at once: registration is retried like every other write.
    pub fn start(etcd: Arc<Etcd>, rank: u32, ttl: i64, addr: SocketAddr) -> Result<Self> {
        let record = MemberRecord { rank, addr, pid: std::process::id() };
        let value = serde_json::to_vec(&record).map_err(|e| WorkerError::Rendezvous(e.to_string()))?;
        let session = Self {
            etcd: etcd.clone(),
            rank,
            lease: Arc::new(AtomicI64::new(0)),
            registrations: Arc::new(AtomicU64::new(0)),
            outbox: Arc::new(Mutex::new(Outbox::default())),
            wake: Arc::new(Notify::new()),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let registration = Registration {
            client: etcd.client.clone(),
            key: etcd.keys.member(rank),
            value,
            ttl: ttl.max(1),
            lease: session.lease.clone(),
            registrations: session.registrations.clone(),
            stop: session.stop.clone(),
        };
        etcd.rt.spawn(registration.run());
        let writer = Writer {
            client: etcd.client.clone(),
            keys: etcd.keys.clone(),
            rank,
            outbox: session.outbox.clone(),
            wake: session.wake.clone(),
            stop: session.stop.clone(),
        };
        etcd.rt.spawn(writer.run());
        Ok(session)
    }

    /// How many times `members/<rank>` was written (1 after the first registration; more after
    /// each recovery from a lost lease or an etcd error).
    pub fn registrations(&self) -> u64 {
        self.registrations.load(Ordering::SeqCst)
    }

    /// The lease currently held, if one was granted.
    pub fn lease(&self) -> Option<i64> {
        Some(self.lease.load(Ordering::SeqCst)).filter(|&l| l != 0)
    }

    fn queue(&self, slot: Slot, value: Option<Vec<u8>>) {
        if let Ok(mut outbox) = self.outbox.lock() {
            outbox.queue(slot, value);
        }
        self.wake.notify_one();
    }

    fn queue_json(&self, slot: Slot, value: &impl Serialize) {
        match serde_json::to_vec(value) {
            Ok(bytes) => self.queue(slot, Some(bytes)),
            Err(e) => tracing::warn!(?slot, "cannot encode a record for etcd: {e}"),
        }
    }

    /// Reports the last completed step of `generation` and its loss at `progress` (buffered;
    /// only the newest report is kept).
    pub fn report_progress(&self, generation: u64, step: u64, loss: f64) {
        let record =
            ProgressRecord { step, loss: Some(loss), generation: Some(generation), rank: Some(self.rank) };
        self.queue_json(Slot::Progress, &record);
    }

    /// Records the checkpoint committed at `step` in `location`, under `checkpoints/<step>`
    /// (buffered).
    pub fn record_checkpoint(&self, generation: u64, step: u64, location: &Path) {
        let record = CheckpointRecord {
            step,
            location: Some(location.display().to_string()),
            generation: Some(generation),
        };
        self.queue_json(Slot::Checkpoint(step), &record);
    }

    /// Deletes the record of the checkpoint of `step` (retention removed it; buffered).
    pub fn forget_checkpoint(&self, step: u64) {
        self.queue(Slot::Checkpoint(step), None);
    }

    /// Deletes every checkpoint record below `step`, the oldest checkpoint directory left
    /// (buffered). A predecessor that exited during an etcd outage never delivered the deletions
    /// it queued after retention removed directories: the next commit clears those records.
    pub fn forget_checkpoints_before(&self, step: u64) {
        if step == 0 {
            return;
        }
        if let Ok(mut outbox) = self.outbox.lock() {
            outbox.forget_checkpoints_before(step);
        }
        self.wake.notify_one();
    }

    /// Acknowledges joining `generation` at `step` (buffered: the generation barrier waits until
    /// every member's acknowledgement is in etcd).
    pub fn ack(&self, generation: u64, step: u64) {
        self.queue_json(Slot::Ack(generation), &Ack { step, generation });
    }

    /// Publishes what this member's host memory holds for a peer restore at `peers/<rank>`
    /// (buffered, latest wins).
    pub fn record_peers(&self, record: &ninelives_core::recovery::PeerRecord) {
        self.queue_json(Slot::Peer, record);
    }

    /// Publishes this member's token counts of one window at `loads/<rank>` (buffered, latest
    /// wins: a window not written before the next closes is superseded, never queued up).
    pub fn record_load(&self, record: &ninelives_core::recovery::LoadRecord) {
        self.queue_json(Slot::Load, record);
    }

    /// Waits up to `limit` for every buffered write to reach etcd; whether they all did.
    pub fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.outbox.lock().map_or(true, |o| o.is_idle()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls the plan's generation into `shared.seen_generation` until the process stops. A
    /// failed read is retried at the next period: the watcher outlives any outage.
    pub fn watch_generation(&self, shared: Arc<Shared>) {
        let mut c = self.etcd.client.clone();
        let key = self.etcd.keys.placement();
        self.etcd.rt.spawn(async move {
            #[derive(Deserialize)]
            struct Header {
                generation: u64,
            }
            while !shared.stop.load(Ordering::SeqCst) {
                if let Ok(resp) = within("get", c.get(key.as_str(), None)).await
                    && let Some(kv) = resp.kvs().first()
                    && let Ok(h) = serde_json::from_slice::<Header>(kv.value())
                {
                    shared.seen_generation.fetch_max(h.generation, Ordering::SeqCst);
                }
                tokio::time::sleep(WATCH_PERIOD).await;
            }
        });
    }

    /// Leaves at once: stops re-registering and revokes the lease, deleting the membership key.
    pub fn leave(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let Some(lease) = self.lease() else { return };
        let mut c = self.etcd.client.clone();
        if let Err(e) = self.etcd.rt.block_on(within("lease-revoke", c.lease_revoke(lease))) {
            tracing::warn!(rank = self.rank, "{e}");
        }
    }
}

impl Drop for Session {
    /// The tasks stop; the membership key stays until its lease expires (a finished member is
    /// not a lost one).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// The task that keeps `members/<rank>` in etcd.
struct Registration {
    client: Client,
    key: String,
    value: Vec<u8>,
    ttl: i64,
    lease: Arc<AtomicI64>,
    registrations: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// Why keeping a lease alive ended.
enum KeepAlive {
    /// The session ended.
    Stopped,
    /// etcd says the lease is gone (it expired during an outage, or was revoked).
    Expired,
    /// etcd did not answer, or the stream broke (the lease may still exist).
    Failed(WorkerError),
}

impl Registration {
    async fn run(mut self) {
        let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
        let mut current: Option<i64> = None;
        while !self.stop.load(Ordering::SeqCst) {
            let lease = match current {
                Some(lease) => lease,
                None => match within("lease-grant", self.client.lease_grant(self.ttl, None)).await {
                    Ok(granted) => granted.id(),
                    Err(e) => {
                        tracing::warn!("cannot grant the membership lease ({e}); retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                },
            };
            current = Some(lease);
            self.lease.store(lease, Ordering::SeqCst);
            let put = PutOptions::new().with_lease(lease);
            if let Err(e) =
                within("put", self.client.put(self.key.as_str(), self.value.clone(), Some(put))).await
            {
                if !e.is_transient_etcd() {
                    current = None; // "lease not found": it expired; take a new one
                }
                tracing::warn!("cannot register at {} ({e}); retrying", self.key);
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
            if self.stop.load(Ordering::SeqCst) {
                // Left while registering: take the key back out.
                let _ = within("lease-revoke", self.client.lease_revoke(lease)).await;
                return;
            }
            if self.registrations.fetch_add(1, Ordering::SeqCst) > 0 {
                tracing::info!(key = %self.key, lease, "re-registered");
            }
            backoff.reset();
            match self.keep_alive(lease).await {
                KeepAlive::Stopped => return,
                KeepAlive::Expired => {
                    tracing::warn!(lease, "membership lease expired; granting a new one and re-registering");
                    current = None;
                }
                KeepAlive::Failed(e) => {
                    tracing::warn!(lease, "keeping the membership lease alive failed ({e}); re-registering");
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// Renews `lease` every `ttl / 3` until it is lost, etcd fails, or the session ends.
    async fn keep_alive(&mut self, lease: i64) -> KeepAlive {
        let period = Duration::from_secs_f64(self.ttl as f64 / 3.0);
        // An answer later than the TTL is no better than none.
        let limit = REQUEST_TIMEOUT.min(Duration::from_secs(self.ttl.unsigned_abs()));
        let (mut keeper, mut stream) =
            match within_for("lease-keepalive", limit, self.client.lease_keep_alive(lease)).await {
                Ok(pair) => pair,
                Err(e) => return KeepAlive::Failed(e),
            };
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return KeepAlive::Stopped;
            }
            if let Err(e) = within_for("lease-keepalive", limit, keeper.keep_alive()).await {
                return KeepAlive::Failed(e);
            }
            match within_for("lease-keepalive", limit, stream.message()).await {
                Ok(Some(r)) if r.ttl() > 0 => {}
                Ok(Some(_)) => return KeepAlive::Expired,
                Ok(None) => {
                    let reason = "the keep-alive stream ended".into();
                    return KeepAlive::Failed(WorkerError::Etcd {
                        op: "lease-keepalive",
                        reason,
                        transient: true,
                    });
                }
                Err(e) => return KeepAlive::Failed(e),
            }
            tokio::time::sleep(period).await;
        }
    }
}

/// The task that delivers a session's buffered writes.
struct Writer {
    client: Client,
    keys: JobKeys,
    rank: u32,
    outbox: Arc<Mutex<Outbox>>,
    wake: Arc<Notify>,
    stop: Arc<AtomicBool>,
}

impl Writer {
    fn key(&self, slot: Slot) -> String {
        match slot {
            Slot::Ack(generation) => self.keys.ack(generation, &self.rank.to_string()),
            Slot::Checkpoint(step) => self.keys.checkpoint(step),
            Slot::CheckpointsBefore(_) => self.keys.checkpoint(0),
            Slot::Progress => self.keys.progress(),
            Slot::Peer => self.keys.peer(self.rank),
            Slot::Load => self.keys.load(self.rank),
        }
    }

    async fn run(mut self) {
        let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
        let mut failing_since: Option<Instant> = None;
        loop {
            let batch = match self.outbox.lock() {
                Ok(mut outbox) => outbox.take(MAX_OPS_PER_TXN),
                Err(_) => return,
            };
            if batch.is_empty() {
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
                let _ = tokio::time::timeout(IDLE_PERIOD, self.wake.notified()).await;
                continue;
            }
            let ops: Vec<TxnOp> = batch
                .iter()
                .map(|(slot, value)| match (slot, value) {
                    (Slot::CheckpointsBefore(end), _) => TxnOp::delete(
                        self.key(*slot),
                        Some(etcd_client::DeleteOptions::new().with_range(self.keys.checkpoint(*end))),
                    ),
                    (_, Some(v)) => TxnOp::put(self.key(*slot), v.clone(), None),
                    (_, None) => TxnOp::delete(self.key(*slot), None),
                })
                .collect();
            let result = within("txn", self.client.txn(Txn::new().and_then(ops))).await;
            let failed = match (result, self.outbox.lock()) {
                (Ok(_), Ok(mut outbox)) => {
                    outbox.in_flight = false;
                    None
                }
                (Err(e), Ok(mut outbox)) => {
                    outbox.in_flight = false;
                    outbox.put_back(batch);
                    Some(e)
                }
                (_, Err(_)) => return,
            };
            match failed {
                None => {
                    if let Some(since) = failing_since.take() {
                        tracing::info!(
                            "etcd answers again; buffered writes delivered after {:?}",
                            since.elapsed()
                        );
                    }
                    backoff.reset();
                }
                Some(e) => {
                    if failing_since.is_none() {
                        failing_since = Some(Instant::now());
                        tracing::warn!(
                            "cannot write to etcd ({e}); progress, checkpoint records and acknowledgements are buffered"
                        );
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, bound) in delays.iter().zip([100u64, 200, 400, 800, 800, 800]) {
            let bound = Duration::from_millis(bound);
            assert!(*d >= bound / 2 && *d <= bound, "{d:?} outside [{:?}, {bound:?}]", bound / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        let spread: std::collections::BTreeSet<Duration> = (0..20)
            .map(|_| {
                b.reset();
                b.next_delay()
            })
            .collect();
        assert!(spread.len() > 1, "jittered");
    }

    #[test]
    fn the_outbox_keeps_the_newest_write_per_key_and_acks_go_first() {
        let mut o = Outbox::default();
        o.pending.insert(Slot::Progress, Some(b"1".to_vec()));
        o.pending.insert(Slot::Checkpoint(4), Some(b"c4".to_vec()));
        o.pending.insert(Slot::Ack(2), Some(b"a2".to_vec()));
        let batch = o.take(2);
        assert_eq!(batch.iter().map(|b| b.0).collect::<Vec<_>>(), [Slot::Ack(2), Slot::Checkpoint(4)]);
        assert!(!o.is_idle());
        // While the batch is in flight, retention deletes checkpoint 4's record.
        o.pending.insert(Slot::Checkpoint(4), None);
        o.put_back(batch); // the batch failed
        o.in_flight = false;
        assert_eq!(o.pending[&Slot::Checkpoint(4)], None, "the newer delete wins over the failed put");
        assert_eq!(o.pending[&Slot::Ack(2)], Some(b"a2".to_vec()), "a failed write is retried");
        assert_eq!(o.take(10).len(), 3);
    }

    #[test]
    fn a_range_delete_replaces_the_writes_of_the_records_it_covers() {
        let mut o = Outbox::default();
        o.queue(Slot::Checkpoint(100), Some(b"c100".to_vec()));
        let batch = o.take(10); // the put of record 100 is in flight
        o.queue(Slot::Checkpoint(50), None);
        o.queue(Slot::Checkpoint(150), Some(b"c150".to_vec()));
        o.forget_checkpoints_before(125);
        // The batch failed: its put of record 100 must not come back into the same
        // transaction as the range delete covering it (etcd would refuse it every time).
        o.put_back(batch);
        o.queue(Slot::Checkpoint(75), None);
        let pending: Vec<Slot> = o.pending.keys().copied().collect();
        assert_eq!(pending, [Slot::Checkpoint(150), Slot::CheckpointsBefore(125)]);
    }

    #[test]
    fn acks_read_as_core_member_acks() {
        let ack: ninelives_core::recovery::MemberAck =
            serde_json::from_slice(&serde_json::to_vec(&Ack { step: 5, generation: 9 }).unwrap()).unwrap();
        assert_eq!((ack.step, ack.generation), (5, Some(9)));
        assert_eq!(serde_json::from_slice::<Ack>(br#"{"step":5}"#).unwrap(), Ack { step: 5, generation: 0 });
    }
}
