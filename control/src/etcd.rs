//! [`BrainStore`] on a real etcd.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use ninelives_core::keyspace::{JobKeys, Keyspace};

use crate::error::ControlError;
use crate::store::{BrainStore, Snapshot, Written};

/// Deadline of every etcd call: a stalled etcd fails the round, never hangs the loop.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// One job's keys in etcd.
pub struct EtcdStore {
    client: Client,
    keys: Keyspace,
    job: JobKeys,
}

impl EtcdStore {
    /// The keys of job `namespace/name` under `keys`, through `client`.
    pub fn new(client: Client, keys: Keyspace, namespace: &str, name: &str) -> Self {
        let job = keys.job(namespace, name);
        Self { client, keys, job }
    }

    /// Uses `client` from now on (the adapter reconnected after an error).
    pub fn replace_client(&mut self, client: Client) {
        self.client = client;
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
        // One transaction: the job's keys and the node keys from the same revision.
        let prefix = || Some(GetOptions::new().with_prefix());
        let txn = Txn::new()
            .and_then(vec![TxnOp::get(self.job.root(), prefix()), TxnOp::get(self.keys.nodes(), prefix())]);
        let mut client = self.client.clone();
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

    async fn write(
        &mut self,
        puts: Vec<(String, String)>,
        record_revision: i64,
    ) -> Result<Written, ControlError> {
        let guard = Compare::mod_revision(self.job.recovery(), CompareOp::Equal, record_revision);
        let ops = puts.into_iter().map(|(k, v)| TxnOp::put(k, v, None)).collect::<Vec<_>>();
        let txn = Txn::new().when(vec![guard]).and_then(ops);
        let mut client = self.client.clone();
        let response = bounded("write", client.txn(txn)).await?.map_err(self.etcd_err("write"))?;
        if !response.succeeded() {
            return Ok(Written::Fenced);
        }
        let revision = response.header().map_or(record_revision, |h| h.revision());
        Ok(Written::Committed { revision })
    }
}
