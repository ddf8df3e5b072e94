//! The etcd store's watch-fed view (issue 22 item 2) on a real etcd: it follows other clients'
//! puts and deletes without listing again, its record revision guards writes exactly, a fenced
//! write, a compaction past the watch and a restart of etcd each make it list again, a stopped
//! etcd fails the read as an outage, and what its reads' changes add up to is what a full read
//! of etcd returns and what [`MemoryStore`] returns for the same writes; a quiet read hands out
//! nothing.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use std::time::Duration;

use etcd_client::{Client, CompactionOptions, GetOptions, Txn, TxnOp};
use ninelives_control::{BrainStore, Changes, EtcdStore, MemoryStore, Mirror, Written};
use ninelives_core::keyspace::{JobKeys, Keyspace};

const NS: &str = "ml";
const JOB: &str = "watched";

/// The store's keys, read in full from etcd (what `read` returned before the view).
async fn truth(client: &Client, keys: &Keyspace, job: &JobKeys) -> Vec<(String, Vec<u8>)> {
    let mut kv = client.kv_client();
    let mut out = Vec::new();
    for prefix in [job.root().to_string(), keys.nodes()] {
        let got = kv.get(prefix.as_str(), Some(GetOptions::new().with_prefix())).await.unwrap();
        for kv in got.kvs() {
            let key = kv.key_str().unwrap().to_string();
            if !key.starts_with(&job.plan_groups()) {
                out.push((key, kv.value().to_vec()));
            }
        }
    }
    out.sort();
    out
}

/// One read, applied to `seen` (which must follow the store's listing).
async fn read(store: &mut EtcdStore, seen: &mut Mirror) -> Changes {
    let changes = store.read().await.unwrap();
    assert!(
        seen.apply(changes.clone()),
        "changes continue a listing the reader never saw whole: {changes:?}"
    );
    changes
}

/// Reads until the view shows etcd's keys (the watch delivers within milliseconds; etcd 3.4.23
/// may answer a progress request ahead of a queued event, which the next read then shows).
async fn caught_up(
    store: &mut EtcdStore,
    seen: &mut Mirror,
    client: &Client,
    keys: &Keyspace,
    job: &JobKeys,
) {
    let want = truth(client, keys, job).await;
    for _ in 0..50 {
        read(store, seen).await;
        if seen.kvs() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the view never showed etcd's keys: {:?}\nwant {want:?}", seen.kvs())
}

async fn revision_of(client: &mut Client, key: &str) -> i64 {
    client.get(key, None).await.unwrap().kvs().first().map_or(0, |kv| kv.mod_revision())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_follows_etcd_and_lists_again_only_when_it_must() {
    tokio::time::timeout(Duration::from_secs(120), scenario()).await.expect("bounded test");
}

async fn scenario() {
    let mut etcd = ninelives_testkit::EtcdServer::start().unwrap();
    let mut client = Client::connect([etcd.endpoint()], None).await.unwrap();
    let keys = Keyspace::default();
    let job = keys.job(NS, JOB);
    let mut store = EtcdStore::new(client.clone(), keys.clone(), NS, JOB);
    let mut memory = MemoryStore::new(keys.clone(), NS, JOB);
    let mut seen = Mirror::default();

    // Before anything: an empty view, one list, handed out whole.
    let empty = read(&mut store, &mut seen).await;
    assert!(empty.full && empty.kvs.is_empty() && empty.record_revision == 0, "{empty:?}");
    assert_eq!(store.lists(), 1);

    // Other clients' puts and deletes, inside and outside the view's ranges.
    let puts = [
        (keys.node_alive("n0"), "{}".to_string()),
        (keys.node_alive("n1"), "{}".to_string()),
        (keys.chip("n1", 3), r#"{"state":"failed"}"#.to_string()),
        (job.member(0), r#"{"rank":0}"#.to_string()),
        (job.ack(1, "0"), r#"{"step":0}"#.to_string()),
        (job.plan_group(0, "abc"), "group value: not in the view".to_string()),
        ("/unrelated".to_string(), "x".to_string()),
    ];
    for (k, v) in &puts {
        client.put(k.as_str(), v.as_str(), None).await.unwrap();
        memory.put(k.as_str(), v.as_str());
    }
    client.delete(keys.node_alive("n0"), None).await.unwrap();
    memory.delete(&keys.node_alive("n0"));
    caught_up(&mut store, &mut seen, &client, &keys, &job).await;
    let mut in_memory = Mirror::default();
    assert!(in_memory.apply(memory.read().await.unwrap()));
    assert_eq!(seen.kvs(), in_memory.kvs(), "the etcd and memory stores disagree");
    assert!(seen.value(&job.plan_group(0, "abc")).is_none() && seen.value("/unrelated").is_none());
    assert_eq!(store.lists(), 1, "the view listed again to see other clients' writes");
    // Nothing changed: a read hands out nothing (a quiet round costs O(changes)); a re-sync
    // hands out every key again, from memory, without a list.
    let quiet = read(&mut store, &mut seen).await;
    assert!(!quiet.full && quiet.kvs.is_empty(), "a quiet read handed out {quiet:?}");
    store.resync();
    let whole = read(&mut store, &mut seen).await;
    assert!(whole.full && whole.kvs.len() == in_memory.kvs().len(), "{whole:?}");
    assert_eq!((seen.kvs(), store.lists()), (in_memory.kvs(), 1));

    // Its own guarded write: the record's exact revision at the next read, without a list.
    let record = vec![(job.recovery(), r#"{"phase":"Running"}"#.to_string())];
    let Written::Committed { revision } = store.write(record.clone(), 0).await.unwrap() else {
        panic!("first write fenced")
    };
    let own = read(&mut store, &mut seen).await;
    assert_eq!(own.record_revision, revision);
    assert_eq!(own.kvs, vec![(job.recovery(), Some(br#"{"phase":"Running"}"#.to_vec()))], "its own write");
    assert_eq!(revision_of(&mut client, &job.recovery()).await, revision);

    // Another writer changes the record: a write guarded by the old revision is fenced, the
    // view lists again and then holds the other writer's revision.
    let other = client.put(job.recovery(), r#"{"phase":"Other"}"#, None).await.unwrap();
    let theirs = other.header().unwrap().revision();
    assert_eq!(store.write(record.clone(), revision).await.unwrap(), Written::Fenced);
    let after = read(&mut store, &mut seen).await;
    assert_eq!((after.full, after.record_revision, store.lists()), (true, theirs, 2));
    assert_eq!(seen.value(&job.recovery()), Some(&br#"{"phase":"Other"}"#[..]));

    // Many writes while the store does not read, then a compaction of all history: whether the
    // watch kept up or was cancelled (its next revision compacted), the view shows etcd's keys.
    for batch in 0..20 {
        let ops = (0..100)
            .map(|i| TxnOp::put(keys.chip(&format!("n{batch}"), i), "x".repeat(2048), None))
            .collect::<Vec<_>>();
        client.txn(Txn::new().and_then(ops)).await.unwrap();
    }
    let head = client.get("/", None).await.unwrap().header().unwrap().revision();
    client.compact(head, Some(CompactionOptions::new().with_physical())).await.unwrap();
    caught_up(&mut store, &mut seen, &client, &keys, &job).await;

    // etcd stops: the read fails as an outage (the watch stream breaks or the progress request
    // gets no answer within the deadline), never a stale view.
    let lists_before = store.lists();
    etcd.stop();
    let failed = tokio::time::timeout(Duration::from_secs(15), store.read()).await.expect("bounded read");
    let err = failed.expect_err("a read with etcd stopped answered");
    assert!(err.is_unreachable(), "{err}");

    // etcd back (same data, same port), a write made while the store was cut off: the view
    // lists again and shows it.
    etcd.restart().unwrap();
    let mut again = Client::connect([etcd.endpoint()], None).await.unwrap();
    again.put(keys.node_alive("n9"), "{}", None).await.unwrap();
    let mut shown = false;
    for _ in 0..100 {
        if let Ok(changes) = store.read().await {
            assert!(seen.apply(changes), "changes after the restart continue a listing the reader never saw");
            if seen.value(&keys.node_alive("n9")).is_some() {
                shown = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(shown, "the view never showed the write made after the restart");
    assert!(store.lists() > lists_before, "the view did not list again after the restart");
    assert_eq!(seen.kvs(), truth(&again, &keys, &job).await);
    assert_eq!(seen.record_revision(), revision_of(&mut again, &job.recovery()).await);

    // Its group reads are unaffected: one transaction per batch, values in order.
    let values = store.get_many(vec![job.plan_group(0, "abc"), job.plan_group(1, "none")]).await.unwrap();
    assert_eq!(values, vec![Some(b"group value: not in the view".to_vec()), None]);
}
