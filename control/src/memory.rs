//! [`BrainStore`] in memory, with etcd's revision semantics, for fast scenario tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use ninelives_core::keyspace::{JobKeys, Keyspace, MalformedValue};
use ninelives_core::writer::{Claim, WriterRecord};

use crate::error::ControlError;
use crate::store::{BATCH_OPS, BrainStore, Changes, Written, batches};

#[derive(Default)]
struct Keys {
    revision: i64,
    /// Value and modification revision by key.
    kvs: BTreeMap<String, (Vec<u8>, i64)>,
    /// Every write, in order: (revision, key, value). Tests read the history from it.
    history: Vec<(i64, String, Vec<u8>)>,
}

/// A job's keys in memory. Clones share the same keys, so a test plays agents and members
/// through one clone while the loop owns another. A clone starts with the claim of the store it
/// was cloned from: two writers are two clones that each [claim](BrainStore::claim).
#[derive(Clone)]
pub struct MemoryStore {
    keys: Keyspace,
    job: JobKeys,
    inner: Arc<Mutex<Keys>>,
    /// The writer this clone claimed the job for: every write compares it.
    claimed: Option<WriterRecord>,
    /// Reads so far (each one a full listing).
    listings: u64,
}

impl MemoryStore {
    /// An empty store for job `namespace/name`.
    pub fn new(keys: Keyspace, namespace: &str, name: &str) -> Self {
        let job = keys.job(namespace, name);
        Self { keys, job, inner: Arc::default(), claimed: None, listings: 0 }
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
    /// Every read is a full one (a new listing): the store is for tests and small jobs.
    async fn read(&mut self) -> Result<Changes, ControlError> {
        let (root, nodes, record) = (self.job.root().to_string(), self.keys.nodes(), self.job.recovery());
        let groups = self.job.plan_groups();
        self.listings += 1;
        let listing = self.listings;
        Ok(self.with(|k| Changes {
            full: true,
            listing,
            kvs: k
                .kvs
                .iter()
                .filter(|(key, _)| {
                    (key.starts_with(&root) && !key.starts_with(&groups)) || key.starts_with(&nodes)
                })
                .map(|(key, (v, _))| (key.clone(), Some(v.clone())))
                .collect(),
            record_revision: k.kvs.get(&record).map_or(0, |(_, r)| *r),
        }))
    }

    fn resync(&mut self) {}

    async fn claim(&mut self, writer: &WriterRecord) -> Result<(), ControlError> {
        let key = self.job.writer();
        let found: Result<Option<WriterRecord>, MalformedValue> = self.with(|k| {
            let current = match k.kvs.get(&key) {
                Some((v, _)) => Some(WriterRecord::parse(&key, v)?),
                None => None,
            };
            // Judged and written under one lock: etcd's compare on the replaced revision.
            if writer.claim_over(current.as_ref()) == Claim::Take {
                let value = writer.to_json().into_bytes();
                k.revision += 1;
                k.history.push((k.revision, key.clone(), value.clone()));
                k.kvs.insert(key.clone(), (value, k.revision));
                return Ok(None);
            }
            Ok(current)
        });
        let current = found.map_err(|e| ControlError::Malformed { key: key.clone(), reason: e.reason })?;
        match writer.claim_over(current.as_ref()) {
            Claim::Refused => {
                Err(ControlError::Fenced { job: self.job.root().to_string(), ours: writer.clone(), current })
            }
            Claim::Take | Claim::Held => {
                self.claimed = Some(writer.clone());
                Ok(())
            }
        }
    }

    async fn write(
        &mut self,
        puts: Vec<(String, String)>,
        record_revision: i64,
    ) -> Result<Written, ControlError> {
        let (record, writer) = (self.job.recovery(), self.job.writer());
        let claimed = self.claimed.clone();
        // The writer compare, the record compare and the puts under one lock: one transaction.
        let outcome = self.with(|k| {
            if let Some(ours) = claimed {
                let current = k.kvs.get(&writer).map(|(v, _)| v.clone());
                if current.as_deref() != Some(ours.to_json().as_bytes()) {
                    return Err((ours, current));
                }
            }
            if k.kvs.get(&record).map_or(0, |(_, r)| *r) != record_revision {
                return Ok(Written::Fenced);
            }
            k.revision += 1;
            for (key, value) in puts {
                k.history.push((k.revision, key.clone(), value.clone().into_bytes()));
                k.kvs.insert(key, (value.into_bytes(), k.revision));
            }
            Ok(Written::Committed { revision: k.revision })
        });
        outcome.map_err(|(ours, current)| ControlError::Fenced {
            job: self.job.root().to_string(),
            ours,
            current: current.and_then(|v| WriterRecord::parse(&writer, &v).ok()),
        })
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
