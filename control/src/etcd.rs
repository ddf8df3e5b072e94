//! [`BrainStore`] on a real etcd.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, KvClient, Txn, TxnOp, TxnOpResponse, WatchClient,
};
use ninelives_core::keyspace::{JobKeys, Keyspace};
use ninelives_core::writer::{Claim, WriterRecord};

use crate::error::ControlError;
use crate::store::{BATCH_OPS, BrainStore, Changes, Written, batches};
use crate::view::{Range, View};

/// Deadline of every etcd call: a stalled etcd fails the round, never hangs the loop.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Claims of the writer key lost to concurrent claimants before giving up.
const CLAIM_ATTEMPTS: usize = 5;

/// Largest response the store decodes (the client's default is 4 MiB): a safety margin over the
/// reads it makes, none of which should come near it now that no value exceeds 512 KiB.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// The end of the range of every key starting with `prefix` (etcd's `--prefix`).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// One job's keys in etcd. [`read`](BrainStore::read) answers from an in-memory view of the
/// job's keys (but the plan's group values) and `nodes/`, listed once and then fed by one watch
/// (see the `view` module): a round costs O(changes), not O(cluster).
pub struct EtcdStore {
    client: Client,
    kv: KvClient,
    watch: WatchClient,
    job: JobKeys,
    /// The writer this store claimed the job for: every write compares it.
    claimed: Option<WriterRecord>,
    view: View,
}

impl EtcdStore {
    /// The keys of job `namespace/name` under `keys`, through `client`.
    pub fn new(client: Client, keys: Keyspace, namespace: &str, name: &str) -> Self {
        let job = keys.job(namespace, name);
        let kv = client.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
        let watch = client.watch_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
        // The job's keys around the plan's group values (read on demand, only when the commit
        // record changes), and the node keys.
        let groups = job.plan_groups();
        let ranges = vec![
            Range { start: job.root().as_bytes().to_vec(), end: groups.as_bytes().to_vec() },
            Range { start: prefix_end(&groups), end: prefix_end(job.root()) },
            Range { start: keys.nodes().into_bytes(), end: prefix_end(&keys.nodes()) },
        ];
        let view = View::new(ranges, job.recovery(), job.root().to_string(), CALL_TIMEOUT);
        Self { client, kv, watch, job, claimed: None, view }
    }

    /// Uses `client` from now on (the adapter reconnected after an error); the view is listed
    /// again through it.
    pub fn replace_client(&mut self, client: Client) {
        self.kv = client.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
        self.watch = client.watch_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
        self.client = client;
        self.view.invalidate();
    }

    /// How many times the view was listed (the first read, then once per re-sync: a compacted
    /// or cancelled watch, a failed read, a fenced write). Steady state adds none.
    pub fn lists(&self) -> u64 {
        self.view.lists()
    }

    /// The guards of a garbage collection: the record read, and the claimed writer's epoch.
    fn gc_guards(&self, record_revision: i64) -> Vec<Compare> {
        let mut guards = vec![Compare::mod_revision(self.job.recovery(), CompareOp::Equal, record_revision)];
        if let Some(ours) = &self.claimed {
            guards.push(Compare::value(self.job.writer(), CompareOp::Equal, ours.to_json()));
        }
        guards
    }

    /// The deposition of `ours` by `current` (the writer key's value, parsed).
    fn fenced(&self, ours: &WriterRecord, current: Option<&[u8]>) -> ControlError {
        let key = self.job.writer();
        let current = current.map(|v| WriterRecord::parse(&key, v).ok()).unwrap_or(None);
        ControlError::Fenced { job: self.job.root().to_string(), ours: ours.clone(), current }
    }

    fn etcd_err(&self, op: &'static str) -> impl Fn(etcd_client::Error) -> ControlError + '_ {
        move |source| ControlError::Etcd { op, prefix: self.job.root().to_string(), source }
    }
}

async fn bounded<T>(
    op: &'static str,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<Result<T, etcd_client::Error>, ControlError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| ControlError::Timeout { op, seconds: CALL_TIMEOUT.as_secs() })
}

impl BrainStore for EtcdStore {
    async fn read(&mut self) -> Result<Changes, ControlError> {
        self.view.read(&self.kv, &self.watch).await
    }

    fn resync(&mut self) {
        self.view.resync();
    }

    async fn claim(&mut self, writer: &WriterRecord) -> Result<(), ControlError> {
        let key = self.job.writer();
        // Each lost race means another writer claimed in between: judge its claim again.
        for _ in 0..CLAIM_ATTEMPTS {
            let mut client = self.client.clone();
            let got =
                bounded("claim", client.get(key.as_str(), None)).await?.map_err(self.etcd_err("claim"))?;
            let (current, revision) = match got.kvs().first() {
                Some(kv) => {
                    let record = WriterRecord::parse(&key, kv.value())
                        .map_err(|e| ControlError::Malformed { key: key.clone(), reason: e.reason })?;
                    (Some(record), kv.mod_revision())
                }
                None => (None, 0),
            };
            match writer.claim_over(current.as_ref()) {
                Claim::Held => {}
                Claim::Refused => {
                    let current = current.map(|c| c.to_json().into_bytes());
                    return Err(self.fenced(writer, current.as_deref()));
                }
                Claim::Take => {
                    // The compare on the replaced record's revision: two claimants racing over
                    // the same old epoch cannot both win.
                    let txn = Txn::new()
                        .when(vec![Compare::mod_revision(key.as_str(), CompareOp::Equal, revision)])
                        .and_then(vec![TxnOp::put(key.as_str(), writer.to_json(), None)]);
                    let response =
                        bounded("claim", client.txn(txn)).await?.map_err(self.etcd_err("claim"))?;
                    if !response.succeeded() {
                        continue;
                    }
                    if let Some(h) = response.header() {
                        self.view.committed(&[(key.clone(), writer.to_json())], h.revision());
                    }
                }
            }
            self.claimed = Some(writer.clone());
            return Ok(());
        }
        Err(self.fenced(writer, None))
    }

    async fn write(
        &mut self,
        puts: Vec<(String, String)>,
        record_revision: i64,
    ) -> Result<Written, ControlError> {
        let mut guards = vec![Compare::mod_revision(self.job.recovery(), CompareOp::Equal, record_revision)];
        // Fencing by epoch: a deposed writer's transaction fails whatever record it read.
        if let Some(ours) = &self.claimed {
            guards.push(Compare::value(self.job.writer(), CompareOp::Equal, ours.to_json()));
        }
        let ops = puts.iter().map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None)).collect::<Vec<_>>();
        let txn = Txn::new().when(guards).and_then(ops).or_else(vec![TxnOp::get(self.job.writer(), None)]);
        let mut client = self.client.clone();
        let response = match bounded("write", client.txn(txn)).await {
            Ok(Ok(response)) => response,
            // Applied or not, unknown: the view lists again rather than guess.
            Ok(Err(e)) => {
                self.view.invalidate();
                return Err(self.etcd_err("write")(e));
            }
            Err(e) => {
                self.view.invalidate();
                return Err(e);
            }
        };
        if !response.succeeded() {
            // The record (or the writer key) changed under this store: its view is stale.
            self.view.invalidate();
            if let Some(ours) = &self.claimed {
                let current = response.op_responses().into_iter().find_map(|op| match op {
                    TxnOpResponse::Get(get) => Some(get.kvs().first().map(|kv| kv.value().to_vec())),
                    _ => None,
                });
                let current = current.flatten();
                if current.as_deref() != Some(ours.to_json().as_bytes()) {
                    return Err(self.fenced(ours, current.as_deref()));
                }
            }
            return Ok(Written::Fenced);
        }
        let Some(revision) = response.header().map(|h| h.revision()) else {
            self.view.invalidate();
            return Err(self.etcd_err("write")(etcd_client::Error::InvalidArgs(
                "etcd answered without a header".into(),
            )));
        };
        self.view.committed(&puts, revision);
        Ok(Written::Committed { revision })
    }

    async fn get_many(&mut self, keys: Vec<String>) -> Result<Vec<Option<Vec<u8>>>, ControlError> {
        // One transaction per batch: a batch reads one revision; the commit record that named
        // these keys is what makes them consistent.
        let mut out = Vec::with_capacity(keys.len());
        for batch in keys.chunks(BATCH_OPS) {
            let ops = batch.iter().map(|k| TxnOp::get(k.as_str(), None)).collect::<Vec<_>>();
            let mut client = self.kv.clone();
            let response =
                bounded("get", client.txn(Txn::new().and_then(ops))).await?.map_err(self.etcd_err("get"))?;
            for op in response.op_responses() {
                let TxnOpResponse::Get(get) = op else { continue };
                out.push(get.kvs().first().map(|kv| kv.value().to_vec()));
            }
        }
        Ok(out)
    }

    async fn put_unguarded(&mut self, puts: Vec<(String, String)>) -> Result<(), ControlError> {
        for batch in batches(puts) {
            let ops = batch.into_iter().map(|(k, v)| TxnOp::put(k, v, None)).collect::<Vec<_>>();
            let mut client = self.kv.clone();
            bounded("put", client.txn(Txn::new().and_then(ops))).await?.map_err(self.etcd_err("put"))?;
        }
        Ok(())
    }

    async fn list_keys(&mut self, prefix: String) -> Result<Vec<String>, ControlError> {
        let options = GetOptions::new().with_prefix().with_keys_only();
        let mut client = self.kv.clone();
        let response = bounded("list", client.get(prefix.as_str(), Some(options)))
            .await?
            .map_err(self.etcd_err("list"))?;
        Ok(response.kvs().iter().filter_map(|kv| kv.key_str().ok().map(str::to_string)).collect())
    }

    async fn delete_guarded(
        &mut self,
        keys: Vec<String>,
        record_revision: i64,
    ) -> Result<Written, ControlError> {
        for batch in keys.chunks(BATCH_OPS) {
            let prefix = |k: &str| k.ends_with('/').then(|| DeleteOptions::new().with_prefix());
            let ops = batch.iter().map(|k| TxnOp::delete(k.as_str(), prefix(k))).collect::<Vec<_>>();
            let txn = Txn::new().when(self.gc_guards(record_revision)).and_then(ops);
            let mut client = self.kv.clone();
            let response = bounded("delete", client.txn(txn)).await?.map_err(self.etcd_err("delete"))?;
            if !response.succeeded() {
                self.view.invalidate();
                return Ok(Written::Fenced);
            }
        }
        Ok(Written::Committed { revision: record_revision })
    }
}
