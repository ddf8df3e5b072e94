//! [`BrainStore`] in memory, with etcd's revision semantics, for fast scenario tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use ninelives_core::keyspace::{JobKeys, Keyspace};

use crate::error::ControlError;
use crate::store::{BATCH_OPS, BrainStore, Snapshot, Written, batches};

#[derive(Default)]
struct Keys {
    revision: i64,
    /// Value and modification revision by key.
    kvs: BTreeMap<String, (Vec<u8>, i64)>,
    /// Every write, in order: (revision, key, value). Tests read the history from it.
    history: Vec<(i64, String, Vec<u8>)>,
}

/// A job's keys in memory. Clones share the same keys, so a test plays agents and members
/// through one clone while the loop owns another.
#[derive(Clone)]
pub struct MemoryStore {
    keys: Keyspace,
    job: JobKeys,
    inner: Arc<Mutex<Keys>>,
}

impl MemoryStore {
    /// An empty store for job `namespace/name`.
    pub fn new(keys: Keyspace, namespace: &str, name: &str) -> Self {
        let job = keys.job(namespace, name);
        Self { keys, job, inner: Arc::default() }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Keys) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Writes `value` at `key` (as an agent or member would).
    pub fn put(&self, key: impl Into<String>, value: impl Into<Vec<u8>>) {
        let (key, value) = (key.into(), value.into());
        self.with(|k| {
            k.revision += 1;
            k.history.push((k.revision, key.clone(), value.clone()));
            k.kvs.insert(key, (value, k.revision));
        });
    }

    /// Deletes `key` (a lease expired, a member died).
    pub fn delete(&self, key: &str) {
        self.with(|k| {
            k.revision += 1;
            k.kvs.remove(key);
        });
    }

    /// The value at `key`.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.with(|k| k.kvs.get(key).map(|(v, _)| v.clone()))
    }

    /// Every value ever written at `key`, with its revision, oldest first.
    pub fn history(&self, key: &str) -> Vec<(i64, Vec<u8>)> {
        self.with(|k| {
            k.history.iter().filter(|(_, h, _)| h == key).map(|(r, _, v)| (*r, v.clone())).collect()
        })
    }
}

impl BrainStore for MemoryStore {
    async fn read(&mut self) -> Result<Snapshot, ControlError> {
        let (root, nodes, record) = (self.job.root().to_string(), self.keys.nodes(), self.job.recovery());
        let groups = self.job.plan_groups();
        Ok(self.with(|k| Snapshot {
            kvs: k
                .kvs
                .iter()
                .filter(|(key, _)| {
                    (key.starts_with(&root) && !key.starts_with(&groups)) || key.starts_with(&nodes)
                })
                .map(|(key, (v, _))| (key.clone(), v.clone()))
                .collect(),
            record_revision: k.kvs.get(&record).map_or(0, |(_, r)| *r),
        }))
    }

    async fn write(
        &mut self,
        puts: Vec<(String, String)>,
        record_revision: i64,
    ) -> Result<Written, ControlError> {
        let record = self.job.recovery();
        Ok(self.with(|k| {
            if k.kvs.get(&record).map_or(0, |(_, r)| *r) != record_revision {
                return Written::Fenced;
            }
            k.revision += 1;
            for (key, value) in puts {
                k.history.push((k.revision, key.clone(), value.clone().into_bytes()));
                k.kvs.insert(key, (value.into_bytes(), k.revision));
            }
            Written::Committed { revision: k.revision }
        }))
    }

    async fn get_many(&mut self, keys: Vec<String>) -> Result<Vec<Option<Vec<u8>>>, ControlError> {
        Ok(self.with(|k| keys.iter().map(|key| k.kvs.get(key).map(|(v, _)| v.clone())).collect()))
    }

    async fn put_unguarded(&mut self, puts: Vec<(String, String)>) -> Result<(), ControlError> {
        for batch in batches(puts) {
            self.with(|k| {
                k.revision += 1;
                for (key, value) in batch {
                    k.history.push((k.revision, key.clone(), value.clone().into_bytes()));
                    k.kvs.insert(key, (value.into_bytes(), k.revision));
                }
            });
        }
        Ok(())
    }

    async fn list_keys(&mut self, prefix: String) -> Result<Vec<String>, ControlError> {
        Ok(self.with(|k| k.kvs.keys().filter(|key| key.starts_with(&prefix)).cloned().collect()))
    }

    async fn delete_guarded(
        &mut self,
        keys: Vec<String>,
        record_revision: i64,
    ) -> Result<Written, ControlError> {
        let record = self.job.recovery();
        let mut written = Written::Committed { revision: record_revision };
        for batch in keys.chunks(BATCH_OPS) {
            written = self.with(|k| {
                if k.kvs.get(&record).map_or(0, |(_, r)| *r) != record_revision {
                    return Written::Fenced;
                }
                k.revision += 1;
                for key in batch {
                    if key.ends_with('/') {
                        k.kvs.retain(|stored, _| !stored.starts_with(key.as_str()));
                    } else {
                        k.kvs.remove(key);
                    }
                }
                Written::Committed { revision: record_revision }
            });
            if written == Written::Fenced {
                break;
            }
        }
        Ok(written)
    }
}
