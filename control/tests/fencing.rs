//! Fencing by writer epoch on a real etcd (issue 19 item 3): a driver paused while a newer
//! writer claims the job writes nothing once it resumes, as etcd's revision history shows.

#![allow(clippy::unwrap_used)] // test: a panic is the failure report

use etcd_client::{Client, GetOptions};
use ninelives_control::{
    BrainStore, ControlError, ControlLoop, EffectError, Effects, EtcdStore, JobIdentity, Progress,
};
use ninelives_core::generation::DistPlan;
use ninelives_core::keyspace::Keyspace;
use ninelives_core::recovery::BrainConfig;
use ninelives_core::writer::WriterRecord;
use ninelives_testkit::EtcdServer;

mod fixture;
use fixture::{JOB, NS, Published, identity};

fn brain() -> BrainConfig {
    fixture::brain(8)
}

/// The generation a placement value (the plan, or its commit record) names.
fn generation_of(value: &[u8]) -> u64 {
    let value: serde_json::Value = serde_json::from_slice(value).unwrap();
    value["generation"].as_u64().unwrap_or_else(|| panic!("no generation in {value}"))
}

/// Every value `key` ever had, with the revision that wrote it, from etcd's revision history.
async fn history(client: &mut Client, key: &str) -> Vec<(i64, Vec<u8>)> {
    let head = client.get(key, None).await.unwrap().header().unwrap().revision();
    let mut seen: Vec<(i64, Vec<u8>)> = Vec::new();
    for revision in 1..=head {
        let got = client.get(key, Some(GetOptions::new().with_revision(revision))).await.unwrap();
        if let Some(kv) = got.kvs().first()
            && seen.last().is_none_or(|(r, _)| *r != kv.mod_revision())
        {
            seen.push((kv.mod_revision(), kv.value().to_vec()));
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_deposed_by_a_newer_epoch_publishes_nothing_in_etcds_history() {
    let etcd = EtcdServer::start().unwrap();
    let mut client = fixture::client_with_nodes(&etcd.endpoint()).await;
    let keys = Keyspace::default();
    let job = keys.job(NS, JOB);
    let (a, b) = (WriterRecord::new("op-a", 1_000_000), WriterRecord::new("op-b", 1_000_001));
    let store = EtcdStore::new(client.clone(), keys.clone(), NS, JOB);
    let mut old = ControlLoop::new(brain(), identity(), store, None).with_writer(a.clone());
    let mut fx_old = Published::default();
    assert!(matches!(old.step(&mut fx_old, 1000.0).await.unwrap(), Progress::Ran(_)));
    assert_eq!(fx_old.0.len(), 1, "generation 1 published by the first writer");
    for rank in 0..4 {
        client.put(job.member(rank), "{}", None).await.unwrap();
        client.put(job.ack(1, &rank.to_string()), r#"{"step":0}"#, None).await.unwrap();
    }
    assert!(matches!(old.step(&mut fx_old, 1001.0).await.unwrap(), Progress::Ran(_)));

    // While the first writer is paused, a new leader claims the job (and has not published
    // yet: the record's revision is unchanged, so only the epoch can fence the old writer).
    let mut new_store = EtcdStore::new(client.clone(), keys.clone(), NS, JOB);
    new_store.claim(&b).await.unwrap();
    let claimed_at = client.get(job.writer(), None).await.unwrap().kvs()[0].mod_revision();
    // A chip fails; the first writer resumes, reads it and decides a reroute: deposed, nothing
    // written, and it stays stopped.
    let chip = r#"{"state":"failed","code":"hbm-ecc-uncorrectable","since":1001.0}"#;
    client.put(keys.chip("n1", 2), chip, None).await.unwrap();
    for now in [1002.0, 1003.0] {
        match old.step(&mut fx_old, now).await {
            Err(ControlError::Fenced { ours, current, .. }) => {
                assert_eq!((&ours, current.as_ref()), (&a, Some(&b)));
            }
            other => panic!("the paused writer was not fenced: {other:?}"),
        }
    }
    assert_eq!(fx_old.0.len(), 1, "the deposed writer reported a publication");
    // The claim of an older epoch is refused too (the deposed driver restarted).
    let mut restarted = EtcdStore::new(client.clone(), keys.clone(), NS, JOB);
    assert!(restarted.claim(&a).await.unwrap_err().is_fenced());

    // The new leader publishes the reroute.
    let mut new = ControlLoop::new(brain(), identity(), new_store, None).with_writer(b.clone());
    let mut fx_new = Published::default();
    assert!(matches!(new.step(&mut fx_new, 1004.0).await.unwrap(), Progress::Ran(_)));
    assert_eq!(fx_new.0.iter().map(DistPlan::generation).collect::<Vec<_>>(), [2]);

    // etcd's history: one content per generation, generations strictly increasing, and every
    // write after the new claim is the new writer's.
    let placements = history(&mut client, &job.placement()).await;
    let generations: Vec<u64> = placements.iter().map(|(_, v)| generation_of(v)).collect();
    assert_eq!(generations, [1, 2], "placement history {placements:?}");
    let after: Vec<&Vec<u8>> = placements.iter().filter(|(r, _)| *r > claimed_at).map(|(_, v)| v).collect();
    assert_eq!(after.len(), 1, "placement writes after the claim: {after:?}");
    assert_eq!(generation_of(after[0]), fx_new.0[0].generation());
    for key in [job.recovery(), job.control()] {
        let writes = history(&mut client, &key).await;
        let late = writes.iter().filter(|(r, _)| *r > claimed_at).count();
        assert_eq!(late, 1, "{key}: only the new writer's publication follows its claim: {writes:?}");
    }
    let holder = client.get(job.writer(), None).await.unwrap();
    assert_eq!(WriterRecord::parse("w", holder.kvs()[0].value()).unwrap(), b);
}
