//! [`BrainStore`] on a real etcd.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, KvClient, Txn, TxnOp, TxnOpResponse,
};
use ninelives_core::keyspace::{JobKeys, Keyspace};
use ninelives_core::writer::{Claim, WriterRecord};

use crate::error::ControlError;
use crate::store::{BATCH_OPS, BrainStore, Snapshot, Written, batches};

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

/// One job's keys in etcd.
pub struct EtcdStore {
    client: Client,
    kv: KvClient,
    keys: Keyspace,
    job: JobKeys,
    /// The writer this store claimed the job for: every write compares it.
    claimed: Option<WriterRecord>,
}

impl EtcdStore {
    /// The keys of job `namespace/name` under `keys`, through `client`.
    pub fn new(client: Client, keys: Keyspace, namespace: &str, name: &str) -> Self {
        let job = keys.job(namespace, name);
        let kv = client.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
        Self { client, kv, keys, job, claimed: None }
    }

    /// Uses `client` from now on (the adapter reconnected after an error).
    pub fn replace_client(&mut self, client: Client) {
        self.kv = client.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
        self.client = client;
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
    async fn read(&mut self) -> Result<Snapshot, ControlError> {
        // One transaction: the job's keys and the node keys from the same revision. The plan's
        // group values are left out (read on demand, only when the commit record changes).
        let groups = self.job.plan_groups();
        let range = |end: Vec<u8>| Some(GetOptions::new().with_range(end));
        let txn = Txn::new().and_then(vec![
            TxnOp::get(self.job.root(), range(groups.as_bytes().to_vec())),
            TxnOp::get(prefix_end(&groups), range(prefix_end(self.job.root()))),
            TxnOp::get(self.keys.nodes(), Some(GetOptions::new().with_prefix())),
        ]);
        let mut client = self.kv.clone();
        let response = bounded("read", client.txn(txn)).await?.map_err(self.etcd_err("read"))?;
        let record_key = self.job.recovery();
        let mut snapshot = Snapshot::default();
        for op in response.op_responses() {
            let TxnOpResponse::Get(get) = op else { continue };
            for kv in get.kvs() {
                let Ok(key) = kv.key_str() else { continue };
                if key == record_key {
                    snapshot.record_revision = kv.mod_revision();
                }
                snapshot.kvs.push((key.to_string(), kv.value().to_vec()));
            }
        }
        Ok(snapshot)
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
        let ops = puts.into_iter().map(|(k, v)| TxnOp::put(k, v, None)).collect::<Vec<_>>();
        let txn = Txn::new().when(guards).and_then(ops).or_else(vec![TxnOp::get(self.job.writer(), None)]);
        let mut client = self.client.clone();
        let response = bounded("write", client.txn(txn)).await?.map_err(self.etcd_err("write"))?;
        if !response.succeeded() {
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
        let revision = response.header().map_or(record_revision, |h| h.revision());
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
                return Ok(Written::Fenced);
            }
        }
        Ok(Written::Committed { revision: record_revision })
    }
}
