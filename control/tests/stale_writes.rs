//! Stale member writes on a real etcd (issue 19 item 3): once a newer generation is in force, a
//! worker that is not a member of it (a node dropped while its process lived on, or its buffered
//! writes replayed late) writing progress, an acknowledgement or a checkpoint record changes
//! nothing the brain decides.

#![allow(clippy::unwrap_used)] // test: a panic is the failure report

use etcd_client::Client;
use ninelives_control::{ControlLoop, EffectError, Effects, EtcdStore, JobIdentity, Progress, Round};
use ninelives_core::generation::Restore;
use ninelives_core::keyspace::Keyspace;
use ninelives_core::recovery::{
    BrainConfig, BrainPhase, MemberAck, Observation, ProgressRecord, StaleReason, decide,
};
use ninelives_core::writer::WriterRecord;
use ninelives_testkit::EtcdServer;

mod fixture;
use fixture::{NS, Published};

const JOB: &str = "stale";

/// The fixture's job with one replica per expert (a lost node rolls back), no spares.
fn brain() -> BrainConfig {
    fixture::brain(0)
}

fn identity() -> JobIdentity {
    fixture::identity_named(JOB)
}

async fn round(control: &mut ControlLoop<EtcdStore>, fx: &mut Published, now: f64) -> Round {
    match control.step(fx, now).await.unwrap() {
        Progress::Ran(round) => *round,
        other => panic!("round at {now}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_worker_writing_after_a_newer_generation_changes_nothing() {
    let etcd = EtcdServer::start().unwrap();
    let mut client = fixture::client_with_nodes(&etcd.endpoint()).await;
    let keys = Keyspace::default();
    let job = keys.job(NS, JOB);
    let store = EtcdStore::new(client.clone(), keys.clone(), NS, JOB);
    let writer = WriterRecord::new("op-a", 1_000_000);
    let mut control = ControlLoop::new(brain(), identity(), store, None).with_writer(writer);
    let mut fx = Published::default();
    round(&mut control, &mut fx, 1000.0).await;
    for rank in 0..4u32 {
        client.put(job.member(rank), "{}", None).await.unwrap();
        let ack = MemberAck { step: 0, generation: Some(1) };
        client.put(job.ack(1, &rank.to_string()), serde_json::to_string(&ack).unwrap(), None).await.unwrap();
    }
    let progress = ProgressRecord { step: 40, loss: Some(2.0), generation: Some(1), rank: Some(0) };
    client.put(job.progress(), serde_json::to_string(&progress).unwrap(), None).await.unwrap();
    client.put(job.checkpoint(25), r#"{"step":25,"generation":1}"#, None).await.unwrap();
    let started = round(&mut control, &mut fx, 1001.0).await;
    assert_eq!(started.state.phase, BrainPhase::Running, "{started:?}");

    // Node n3 is lost (no spare): a generation without rank 3, rolled back to step 25.
    client.delete(keys.node_alive("n3"), None).await.unwrap();
    client.delete(job.member(3), None).await.unwrap();
    let lost = round(&mut control, &mut fx, 1002.0).await;
    assert_eq!(lost.state.phase, BrainPhase::Recovering);
    let newer = fx.0.last().unwrap().clone();
    assert!(newer.generation() > 1 && !newer.members.contains(&3), "{newer:?}");
    assert_eq!(newer.restore, Restore::Checkpoint { step: 25 });

    // Rank 3's process lived on: it reports the job's last step, acknowledges the new
    // generation and records a checkpoint past the rollback, all stamped generation 1 or as
    // a non-member.
    let g = newer.generation();
    let zombie = ProgressRecord { step: 300, loss: Some(1.0), generation: Some(1), rank: Some(3) };
    client.put(job.progress(), serde_json::to_string(&zombie).unwrap(), None).await.unwrap();
    let ack = MemberAck { step: 25, generation: Some(g) };
    client.put(job.ack(g, "3"), serde_json::to_string(&ack).unwrap(), None).await.unwrap();
    client.put(job.checkpoint(50), r#"{"step":50,"generation":1}"#, None).await.unwrap();
    let seen = round(&mut control, &mut fx, 1003.0).await;
    assert_eq!(seen.state, lost.state, "a stale member's writes changed the brain's record");
    let obs = &seen.observation;
    assert_eq!((obs.step, obs.checkpoints.iter().copied().collect::<Vec<_>>()), (None, vec![25]));
    assert!(obs.joined.get(&g).is_none_or(|j| !j.contains(&3)), "{obs:?}");
    let mut reasons: Vec<StaleReason> = obs.stale.iter().map(|s| s.reason.clone()).collect();
    reasons.sort_by_key(|r| format!("{r:?}"));
    assert_eq!(
        reasons,
        [
            StaleReason::AbandonedTimeline { written: 1, current: g, rollback_to: 25 },
            StaleReason::NotAMember { rank: 3, generation: g },
            StaleReason::OlderGeneration { written: 1, current: g },
        ]
    );
    // The same keys read without judging them against the generation in force would have
    // ended the job: the zombie's step 300 is the job's last.
    let kvs = all_kvs(&mut client, &keys).await;
    let kvs = kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
    let (naive, _) = Observation::from_kvs(&keys, NS, JOB, 1003.0, kvs);
    let decision = decide(&brain(), &lost.state, &naive, Some(&newer.placement)).unwrap();
    assert_eq!(decision.state.phase, BrainPhase::Succeeded, "the test no longer exercises a stale write");

    // The generation's members join and step on: the recovery completes, the job runs on.
    for &rank in &newer.members {
        client
            .put(
                job.ack(g, &rank.to_string()),
                serde_json::to_string(&MemberAck { step: 25, generation: Some(g) }).unwrap(),
                None,
            )
            .await
            .unwrap();
    }
    let fresh = ProgressRecord { step: 26, loss: Some(2.0), generation: Some(g), rank: Some(0) };
    client.put(job.progress(), serde_json::to_string(&fresh).unwrap(), None).await.unwrap();
    let resumed = round(&mut control, &mut fx, 1004.0).await;
    assert_eq!(resumed.observation.step, Some(26));
    assert_eq!(resumed.state.phase, BrainPhase::Running, "{:?}", resumed.state);
    assert_eq!(resumed.state.history.len(), 1);
}

/// Every key under the job and the nodes, as the loop reads them.
async fn all_kvs(client: &mut Client, keys: &Keyspace) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for prefix in [keys.nodes(), keys.job(NS, JOB).root().to_string()] {
        let got = client.get(prefix, Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
        out.extend(got.kvs().iter().map(|kv| (kv.key_str().unwrap().to_string(), kv.value().to_vec())));
    }
    out
}

/// A loop handed a store someone else already read (its first listing consumed) asks for a
/// full read: it sees the nodes written before, not just what changed after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_over_a_store_read_before_takes_a_full_read_first() {
    let etcd = EtcdServer::start().unwrap();
    let client = fixture::client_with_nodes(&etcd.endpoint()).await;
    let keys = Keyspace::default();
    let mut store = EtcdStore::new(client.clone(), keys.clone(), NS, JOB);
    let first = ninelives_control::BrainStore::read(&mut store).await.unwrap();
    assert!(first.full && !first.kvs.is_empty());
    let mut control = ControlLoop::new(brain(), identity(), store, None);
    let mut fx = Published::default();
    let seen = round(&mut control, &mut fx, 1000.0).await;
    let alive = seen.observation.nodes.values().filter(|n| n.alive).count();
    assert_eq!(alive, fixture::names().len(), "{:?}", seen.observation.nodes);
    assert_eq!(control.store_mut().lists(), 1, "the re-sync listed etcd again");
}
