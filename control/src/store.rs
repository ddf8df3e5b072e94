//! Where the brain's inputs and its record live: a small trait over etcd.

use std::collections::BTreeMap;
use std::future::Future;

use ninelives_core::writer::WriterRecord;

use crate::error::ControlError;

/// One read of a job's keys and the node keys: what changed since the previous read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    /// `true`: `kvs` holds every key (a first read, or a re-sync) and replaces whatever the
    /// reader held; `false`: only the keys changed since the previous read of `listing`.
    pub full: bool,
    /// The listing these changes continue (a store counts its full reads): a reader that did
    /// not see that full read asks for one ([`BrainStore::resync`]).
    pub listing: u64,
    /// Every key under the job's root (but the plan's group values, read on demand with
    /// [`BrainStore::get_many`]) and under `nodes/` that changed, in key order, with its value
    /// now (`None`: deleted).
    pub kvs: Vec<(String, Option<Vec<u8>>)>,
    /// The modification revision of the job's `recovery` record (0: it does not exist). A write
    /// is applied only if the record still has this revision.
    pub record_revision: i64,
}

/// The keys a reader holds, kept by applying each read's [`Changes`] (for tests and tools: the
/// control loop keeps only what it parses, see [`LiveObservation`]).
///
/// [`LiveObservation`]: ninelives_core::recovery::LiveObservation
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mirror {
    kvs: BTreeMap<String, Vec<u8>>,
    listing: Option<u64>,
    record_revision: i64,
}

impl Mirror {
    /// Applies `changes`; `false` (nothing applied) when they continue a listing this mirror
    /// did not see in full.
    pub fn apply(&mut self, changes: Changes) -> bool {
        if changes.full {
            self.kvs.clear();
        } else if self.listing != Some(changes.listing) {
            return false;
        }
        self.listing = Some(changes.listing);
        self.record_revision = changes.record_revision;
        for (key, value) in changes.kvs {
            match value {
                Some(v) => self.kvs.insert(key, v),
                None => self.kvs.remove(&key),
            };
        }
        true
    }

    /// Every key held, in key order, with its value.
    pub fn kvs(&self) -> Vec<(String, Vec<u8>)> {
        self.kvs.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The value at `key`.
    pub fn value(&self, key: &str) -> Option<&[u8]> {
        self.kvs.get(key).map(Vec::as_slice)
    }

    /// The record revision of the last read applied.
    pub fn record_revision(&self) -> i64 {
        self.record_revision
    }
}

/// What a guarded write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// Applied; the record now has this revision.
    Committed {
        /// The record's new modification revision.
        revision: i64,
    },
    /// Not applied: the record changed since it was read (another writer, or this one's
    /// previous write raced a restart). The next round reads it again.
    Fenced,
}

/// Unguarded writes go in transactions of at most this many operations (etcd's default
/// `--max-txn-ops` is 128)…
pub const BATCH_OPS: usize = 100;
/// …and at most this many bytes of keys and values (etcd's default `--max-request-bytes` is
/// 1.5 MiB).
pub const BATCH_BYTES: usize = 1024 * 1024;

/// Splits `puts` into batches of at most [`BATCH_OPS`] puts and [`BATCH_BYTES`] bytes (a single
/// larger put makes a batch of its own).
pub fn batches(puts: Vec<(String, String)>) -> Vec<Vec<(String, String)>> {
    let mut out: Vec<Vec<(String, String)>> = Vec::new();
    let mut bytes = 0;
    for (key, value) in puts {
        let size = key.len() + value.len();
        match out.last_mut() {
            Some(batch) if batch.len() < BATCH_OPS && bytes + size <= BATCH_BYTES => {
                bytes += size;
                batch.push((key, value));
            }
            _ => {
                bytes = size;
                out.push(vec![(key, value)]);
            }
        }
    }
    out
}

/// The store of one job's coordination keys.
pub trait BrainStore: Send {
    /// Reads what changed in the job's keys and the node keys since the previous read (every
    /// key on the first read, and whenever the store lost track).
    fn read(&mut self) -> impl Future<Output = Result<Changes, ControlError>> + Send;

    /// Makes the next [`read`](BrainStore::read) a full one (a reader that starts afresh).
    fn resync(&mut self);

    /// Claims the job's writer key for `writer` (with a compare on the record it replaces), so
    /// that every later [`write`](BrainStore::write) of this store also requires the key to
    /// still hold `writer`. [`ControlError::Fenced`] when a writer of the same or a newer epoch
    /// holds it.
    fn claim(&mut self, writer: &WriterRecord) -> impl Future<Output = Result<(), ControlError>> + Send;

    /// Writes `puts` in one transaction, only if the job's `recovery` record still has
    /// `record_revision` (0: it must not exist) and, once this store [claimed](BrainStore::claim)
    /// the job, the writer key still holds its claim ([`ControlError::Fenced`] otherwise).
    fn write(
        &mut self,
        puts: Vec<(String, String)>,
        record_revision: i64,
    ) -> impl Future<Output = Result<Written, ControlError>> + Send;

    /// The values at `keys`, in order (`None`: absent).
    fn get_many(
        &mut self,
        keys: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Option<Vec<u8>>>, ControlError>> + Send;

    /// Writes `puts` without a guard, in [`batches`]: only values nothing refers to yet (a
    /// generation's group values, named by the commit record written after them).
    fn put_unguarded(
        &mut self,
        puts: Vec<(String, String)>,
    ) -> impl Future<Output = Result<(), ControlError>> + Send;

    /// The keys (not the values) under `prefix`.
    fn list_keys(&mut self, prefix: String)
    -> impl Future<Output = Result<Vec<String>, ControlError>> + Send;

    /// Deletes `keys` in batches of at most [`BATCH_OPS`], each only if the job's `recovery`
    /// record still has `record_revision`; [`Written::Fenced`] at the first batch that was not.
    /// A key ending in `/` deletes every key under it (no ninelives key ends in `/`).
    fn delete_guarded(
        &mut self,
        keys: Vec<String>,
        record_revision: i64,
    ) -> impl Future<Output = Result<Written, ControlError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_etcds_operation_and_byte_limits() {
        let puts =
            |n: usize, size: usize| (0..n).map(|i| (format!("k{i}"), "x".repeat(size))).collect::<Vec<_>>();
        let small = batches(puts(250, 10));
        assert_eq!(small.iter().map(Vec::len).collect::<Vec<_>>(), [100, 100, 50]);
        let big = batches(puts(5, 400 * 1024));
        assert_eq!(big.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
        assert!(big.iter().all(|b| b.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() <= BATCH_BYTES));
        assert!(batches(Vec::new()).is_empty());
    }
}
