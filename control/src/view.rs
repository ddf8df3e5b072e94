//! The brain's in-memory view of its keys in etcd, fed by one watch (issue 22 item 2).
//!
//! A full read of `nodes/` and the job's keys costs O(cluster) bytes and CPU in etcd every
//! round (~350 ms at 2,000 nodes). The view opens one watch stream (one watcher per range,
//! each created, hence in sync, before anything is read), then lists the ranges once at
//! revision `R`; events after `R` feed it, so a round costs O(changes). (A watcher created from
//! a past revision starts out of sync and etcd only catches it up every 100 ms: changes made
//! right after such a list would show late.)
//!
//! Each [`read`](View::read) asks the stream for a progress notification (twice, see `drain`)
//! and applies every event received before it, under a deadline: the answer proves etcd is
//! alive (a stalled or dead etcd fails the read as before, which is what the outage logic
//! counts), and the view is as fresh as the watch. A cancelled watcher (its start revision compacted, a lost leader), an
//! ended or failed stream, a missed deadline, or a fenced write drops the view: the next read
//! lists again. The store's own committed writes are applied at once at their revision, so the
//! record revision the next guarded write compares is exact.
//!
//! etcd before 3.4.24/3.5.8 may send a progress notification ahead of events already queued on
//! the stream (etcd issue 15220): the view may then miss a change made a few milliseconds before
//! the read, and shows it at the next one. Writes stay exact: they are guarded by the record's
//! revision, and a fenced write re-lists.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{
    EventType, GetOptions, KvClient, Txn, TxnOp, TxnOpResponse, WatchClient, WatchOptions, WatchStream,
};
use tokio::time::Instant;

use crate::error::ControlError;
use crate::store::Changes;

/// The progress notification etcd sends for a progress request (no watcher's id).
const PROGRESS_WATCH_ID: i64 = -1;

/// A key range `[start, end)`.
#[derive(Clone, Debug)]
pub(crate) struct Range {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
}

impl Range {
    fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && key < self.end.as_slice()
    }
}

/// What a drained watch said.
enum Drained {
    /// Every event before the progress notification is applied.
    Current,
    /// A watcher was cancelled (compaction, lost leader): list again.
    Cancelled,
}

/// The keys of some ranges, as of the watch's progress.
pub(crate) struct View {
    ranges: Vec<Range>,
    record_key: String,
    /// The job's prefix, for errors.
    prefix: String,
    deadline: Duration,
    /// Value and modification revision by key.
    kvs: BTreeMap<String, (Vec<u8>, i64)>,
    /// The watch feeding the view (`None`: list first).
    stream: Option<WatchStream>,
    /// Lists made so far (the first one included).
    lists: u64,
    /// The revision of the last list: events up to it are in the list already.
    listed_at: i64,
    /// Keys changed since the last read, with their value now (`None`: deleted).
    pending: BTreeMap<String, Option<Vec<u8>>>,
    /// The next read hands out every key (a reader starts afresh).
    resync: bool,
}

impl View {
    /// A view of `ranges` (not listed yet); `record_key` is the key whose revision guards writes.
    pub fn new(ranges: Vec<Range>, record_key: String, prefix: String, deadline: Duration) -> Self {
        Self {
            ranges,
            record_key,
            prefix,
            deadline,
            kvs: BTreeMap::new(),
            stream: None,
            lists: 0,
            listed_at: 0,
            pending: BTreeMap::new(),
            resync: false,
        }
    }

    /// Lists made so far (the first read lists; every re-sync lists again).
    pub fn lists(&self) -> u64 {
        self.lists
    }

    /// Drops the view: the next read lists again (a fenced write, a new client, an error).
    pub fn invalidate(&mut self) {
        self.stream = None;
    }

    /// Makes the next read hand out every key (from memory: the watch stays).
    pub fn resync(&mut self) {
        self.resync = true;
    }

    fn etcd_err(&self, op: &'static str) -> impl Fn(etcd_client::Error) -> ControlError + '_ {
        move |source| ControlError::Etcd { op, prefix: self.prefix.clone(), source }
    }

    fn timeout(&self, op: &'static str) -> ControlError {
        ControlError::Timeout { op, seconds: self.deadline.as_secs() }
    }

    /// What changed since the last read, as of the latest progress of the watch (every key
    /// after a list: the first read, a re-sync, or when there is no watch).
    pub async fn read(&mut self, kv: &KvClient, watch: &WatchClient) -> Result<Changes, ControlError> {
        if self.stream.is_some() {
            match self.drain().await {
                Ok(Drained::Current) if self.resync => return Ok(self.everything()),
                Ok(Drained::Current) => return Ok(self.changes()),
                Ok(Drained::Cancelled) => {}
                // A slow etcd: the read fails (the outage logic counts it) but the watch stays.
                // Its events arrive in order and any later progress notification covers them,
                // so nothing is lost; listing every key again would only add load to an etcd
                // already too slow to answer.
                Err(e @ ControlError::Timeout { .. }) => return Err(e),
                Err(e) => {
                    // Whatever the stream did, it cannot be trusted any more.
                    self.stream = None;
                    return Err(e);
                }
            }
        }
        self.list(kv, watch).await?;
        Ok(self.everything())
    }

    fn record_revision(&self) -> i64 {
        self.kvs.get(&self.record_key).map_or(0, |(_, r)| *r)
    }

    /// Every key, as a full read of the current listing.
    fn everything(&mut self) -> Changes {
        self.pending.clear();
        self.resync = false;
        Changes {
            full: true,
            listing: self.lists,
            kvs: self.kvs.iter().map(|(k, (v, _))| (k.clone(), Some(v.clone()))).collect(),
            record_revision: self.record_revision(),
        }
    }

    /// The keys changed since the last read.
    fn changes(&mut self) -> Changes {
        Changes {
            full: false,
            listing: self.lists,
            kvs: std::mem::take(&mut self.pending).into_iter().collect(),
            record_revision: self.record_revision(),
        }
    }

    /// Watches every range from now on one stream (each watcher created, so in sync with etcd
    /// and sent every later event), then lists them at one revision `R` (one transaction):
    /// events up to `R` are skipped, the later ones applied.
    async fn list(&mut self, kv: &KvClient, watch: &WatchClient) -> Result<(), ControlError> {
        self.stream = None;
        let mut stream = self.watch_from(watch, None).await?;
        let mut created = 0;
        let deadline = Instant::now() + self.deadline;
        while created < self.ranges.len() {
            let message = tokio::time::timeout_at(deadline, stream.message()).await;
            let message = message.map_err(|_| self.timeout("watch"))?.map_err(self.etcd_err("watch"))?;
            let Some(response) = message else {
                let ended = etcd_client::Error::WatchError("the watch stream ended".into());
                return Err(self.etcd_err("watch")(ended));
            };
            if response.canceled() {
                let refused = etcd_client::Error::WatchError(response.cancel_reason().to_string());
                return Err(self.etcd_err("watch")(refused));
            }
            // Events before the list are in the list.
            created += usize::from(response.created());
        }
        let ops = self
            .ranges
            .iter()
            .map(|r| TxnOp::get(r.start.clone(), Some(GetOptions::new().with_range(r.end.clone()))))
            .collect::<Vec<_>>();
        let mut kv = kv.clone();
        let response = tokio::time::timeout(self.deadline, kv.txn(Txn::new().and_then(ops)))
            .await
            .map_err(|_| self.timeout("read"))?
            .map_err(self.etcd_err("read"))?;
        let revision = response.header().map(|h| h.revision()).ok_or_else(|| {
            self.etcd_err("read")(etcd_client::Error::InvalidArgs("etcd answered without a header".into()))
        })?;
        let mut kvs = BTreeMap::new();
        for op in response.op_responses() {
            let TxnOpResponse::Get(get) = op else { continue };
            for kv in get.kvs() {
                let Ok(key) = kv.key_str() else { continue };
                kvs.insert(key.to_string(), (kv.value().to_vec(), kv.mod_revision()));
            }
        }
        self.kvs = kvs;
        self.pending.clear();
        self.listed_at = revision;
        self.stream = Some(stream);
        self.lists += 1;
        Ok(())
    }

    /// One stream with a watcher per range, from `revision` (`None`: from now).
    async fn watch_from(
        &self,
        watch: &WatchClient,
        revision: Option<i64>,
    ) -> Result<WatchStream, ControlError> {
        let options = |r: &Range| {
            Some(WatchOptions::new().with_range(r.end.clone()).with_start_revision(revision.unwrap_or(0)))
        };
        let mut watch = watch.clone();
        let call = async {
            let mut ranges = self.ranges.iter();
            let Some(first) = ranges.next() else {
                return Err(etcd_client::Error::WatchError("no range to watch".into()));
            };
            let mut stream = watch.watch(first.start.clone(), options(first)).await?;
            for r in ranges {
                stream.watch(r.start.clone(), options(r)).await?;
            }
            Ok(stream)
        };
        tokio::time::timeout(self.deadline, call)
            .await
            .map_err(|_| self.timeout("watch"))?
            .map_err(self.etcd_err("watch"))
    }

    /// Requests a progress notification and applies every event up to it, twice, within the
    /// deadline: etcd 3.4.23 may send the first answer ahead of events already queued for the
    /// stream (etcd issue 15220); by the second one etcd has had a round trip to send them.
    async fn drain(&mut self) -> Result<Drained, ControlError> {
        let deadline = Instant::now() + self.deadline;
        let Some(mut stream) = self.stream.take() else { return Ok(Drained::Cancelled) };
        for _ in 0..2 {
            match self.drain_once(&mut stream, deadline).await {
                Ok(Drained::Current) => {}
                Ok(Drained::Cancelled) => return Ok(Drained::Cancelled),
                Err(e) => {
                    if matches!(e, ControlError::Timeout { .. }) {
                        self.stream = Some(stream);
                    }
                    return Err(e);
                }
            }
        }
        self.stream = Some(stream);
        Ok(Drained::Current)
    }

    async fn drain_once(
        &mut self,
        stream: &mut WatchStream,
        deadline: Instant,
    ) -> Result<Drained, ControlError> {
        let sent = tokio::time::timeout_at(deadline, stream.request_progress()).await;
        sent.map_err(|_| self.timeout("watch"))?.map_err(self.etcd_err("watch"))?;
        loop {
            let message = tokio::time::timeout_at(deadline, stream.message()).await;
            let message = message.map_err(|_| self.timeout("watch"))?.map_err(self.etcd_err("watch"))?;
            let Some(response) = message else {
                let ended = etcd_client::Error::WatchError("the watch stream ended".into());
                return Err(self.etcd_err("watch")(ended));
            };
            if response.canceled() || response.compact_revision() > 0 {
                tracing::debug!(
                    prefix = %self.prefix,
                    compacted = response.compact_revision(),
                    reason = response.cancel_reason(),
                    "the view's watch was cancelled; listing again"
                );
                return Ok(Drained::Cancelled);
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                if kv.mod_revision() <= self.listed_at {
                    continue;
                }
                let Ok(key) = kv.key_str() else { continue };
                match event.event_type() {
                    EventType::Put => self.put(key, kv.value(), kv.mod_revision()),
                    EventType::Delete => self.delete(key, kv.mod_revision()),
                }
            }
            if response.watch_id() == PROGRESS_WATCH_ID && response.events().is_empty() && !response.created()
            {
                return Ok(Drained::Current);
            }
        }
    }

    /// A put at `revision`, unless the view holds the key at a newer revision already (the
    /// store's own write applied before its event arrived).
    fn put(&mut self, key: &str, value: &[u8], revision: i64) {
        if !self.ranges.iter().any(|r| r.contains(key.as_bytes())) {
            return;
        }
        match self.kvs.get_mut(key) {
            Some((_, held)) if *held > revision => return,
            Some(entry) => *entry = (value.to_vec(), revision),
            None => {
                self.kvs.insert(key.to_string(), (value.to_vec(), revision));
            }
        }
        self.pending.insert(key.to_string(), Some(value.to_vec()));
    }

    fn delete(&mut self, key: &str, revision: i64) {
        if self.kvs.get(key).is_some_and(|(_, held)| *held <= revision) {
            self.kvs.remove(key);
            self.pending.insert(key.to_string(), None);
        }
    }

    /// The store's own committed puts, at their revision: the next read sees them (and the
    /// record's exact revision) without waiting for their events. Deletes are left to the watch.
    pub fn committed(&mut self, puts: &[(String, String)], revision: i64) {
        if self.stream.is_none() {
            return;
        }
        for (key, value) in puts {
            self.put(key, value.as_bytes(), revision);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic is the failure report

    use etcd_client::{Client, CompactionOptions};

    use super::*;

    /// A watch whose next revision was compacted is cancelled by etcd (as a watch that fell too
    /// far behind is): the read lists again and shows the writes made meanwhile.
    #[tokio::test]
    async fn a_watch_from_a_compacted_revision_is_listed_again() {
        let etcd = ninelives_testkit::EtcdServer::start().unwrap();
        let mut client = Client::connect([etcd.endpoint()], None).await.unwrap();
        let (kv, watch) = (client.kv_client(), client.watch_client());
        let range = Range { start: b"/v/".to_vec(), end: b"/v0".to_vec() };
        let mut v = View::new(vec![range], "/v/record".into(), "/v/".into(), Duration::from_secs(5));
        client.put("/v/record", "1", None).await.unwrap();
        let first = v.read(&kv, &watch).await.unwrap();
        let listed_at = first.record_revision;
        assert_eq!(v.lists(), 1);
        // History moves on and is compacted; the watch is replaced by one from just after the
        // first list, as if the stream had lagged behind since.
        client.put("/v/record", "2", None).await.unwrap();
        let third = client.put("/v/other", "3", None).await.unwrap().header().unwrap().revision();
        client.compact(third, Some(CompactionOptions::new().with_physical())).await.unwrap();
        v.stream = Some(v.watch_from(&watch, Some(listed_at + 1)).await.unwrap());
        // etcd cancels the lagging watcher from its sync loop (every 100 ms), possibly after it
        // answered a progress request: a read or two may still show the old view.
        let mut read = Changes::default();
        for _ in 0..50 {
            read = tokio::time::timeout(Duration::from_secs(10), v.read(&kv, &watch)).await.unwrap().unwrap();
            if v.lists() > 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(v.lists(), 2, "the cancelled watch was not replaced by a list");
        assert!(read.full, "a new listing is handed out whole");
        let value = |key: &str| read.kvs.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.clone());
        assert_eq!(value("/v/record"), Some(b"2".to_vec()));
        assert_eq!(value("/v/other"), Some(b"3".to_vec()));
        assert_eq!(read.record_revision, third - 1);
    }

    fn view() -> View {
        let range = Range { start: b"a".to_vec(), end: b"m".to_vec() };
        View::new(vec![range], "b".into(), "p".into(), Duration::from_secs(1))
    }

    #[test]
    fn events_apply_by_revision_and_outside_keys_are_ignored() {
        let mut v = view();
        v.put("b", b"1", 5);
        v.put("z", b"outside", 6);
        let c = v.changes();
        assert_eq!((c.full, c.record_revision), (false, 5));
        assert_eq!(c.kvs, vec![("b".to_string(), Some(b"1".to_vec()))]);
        assert!(v.changes().kvs.is_empty(), "a change is handed out once");
        // The store's own write applied first; its event (and an older one) arriving later do
        // not move the key back.
        v.put("b", b"3", 9);
        v.put("b", b"2", 7);
        v.put("b", b"3", 9);
        let c = v.changes();
        assert_eq!(c.kvs, vec![("b".to_string(), Some(b"3".to_vec()))]);
        assert_eq!(c.record_revision, 9);
        v.delete("b", 8);
        let c = v.changes();
        assert_eq!((c.kvs.len(), c.record_revision), (0, 9), "a delete older than the value held removed it");
        v.put("c", b"4", 11);
        assert_eq!(v.everything().kvs.len(), 2, "a re-sync hands out every key");
        v.delete("b", 12);
        let c = v.changes();
        assert_eq!((c.kvs, c.record_revision), (vec![("b".to_string(), None)], 0));
    }
}
