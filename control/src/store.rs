//! Where the brain's inputs and its record live: a small trait over etcd.

use std::future::Future;

use crate::error::ControlError;

/// One read of a job's keys and the node keys.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Every key under the job's root and under `nodes/`, with its value.
    pub kvs: Vec<(String, Vec<u8>)>,
    /// The modification revision of the job's `recovery` record (0: it does not exist). A write
    /// is applied only if the record still has this revision.
    pub record_revision: i64,
}

impl Snapshot {
    /// The value at `key`.
    pub fn value(&self, key: &str) -> Option<&[u8]> {
        self.kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_slice())
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

/// The store of one job's coordination keys.
pub trait BrainStore: Send {
    /// Reads the job's keys and the node keys.
    fn read(&mut self) -> impl Future<Output = Result<Snapshot, ControlError>> + Send;

    /// Writes `puts` in one transaction, only if the job's `recovery` record still has
    /// `record_revision` (0: it must not exist).
    fn write(
        &mut self,
        puts: Vec<(String, String)>,
        record_revision: i64,
    ) -> impl Future<Output = Result<Written, ControlError>> + Send;
}
