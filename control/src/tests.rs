//! Scenarios of the loop against an in-memory store: what the adapters see, what is written.

#![allow(clippy::unwrap_used)] // a panic is the failure report

use ninelives_core::generation::{DistPlan, GenerationTier, PlacementValue, Restore};
use ninelives_core::keyspace::Keyspace;
use ninelives_core::recovery::{BrainPhase, CompletedRecovery, RecoveryState, Rung};

use super::*;

#[path = "../tests/fixture/mod.rs"]
mod fixture;
use fixture::{JOB, NS, brain, identity, names};

/// The plan in force in the store: its commit record at `placement` and the group values it names.
fn stored_plan(cluster: &Cluster) -> DistPlan {
    let job = cluster.job();
    let value = PlacementValue::parse(&cluster.store.get(&job.placement()).unwrap()).unwrap();
    let PlacementValue::Record(record) = value else { panic!("the loop wrote a whole plan at placement") };
    let groups: Vec<_> = (0..)
        .zip(record.group_keys(&job))
        .map(|(g, key)| record.parse_group(g, &cluster.store.get(&key).unwrap()).unwrap())
        .collect();
    record.assemble(&groups).unwrap()
}

/// An adapter that writes down every effect.
#[derive(Default)]
struct Recorder {
    table: Option<RecoveryState>,
    log: Vec<String>,
    recoveries: Vec<CompletedRecovery>,
    plans: Vec<DistPlan>,
    fail_start: bool,
}

impl Effects for Recorder {
    async fn node_table(&mut self) -> Result<Option<RecoveryState>, EffectError> {
        Ok(self.table.clone())
    }
    async fn published(&mut self, plan: &DistPlan) -> Result<(), EffectError> {
        self.log.push(format!("published {} {}", plan.generation(), plan.tier));
        self.plans.push(plan.clone());
        Ok(())
    }
    async fn start_member(&mut self, rank: u32, node: &str, _: Option<u64>) -> Result<(), EffectError> {
        if self.fail_start {
            return Err(EffectError::new("start-member", "no such binary"));
        }
        self.log.push(format!("start {rank} on {node}"));
        Ok(())
    }
    async fn record_recovery(&mut self, r: &CompletedRecovery) -> Result<(), EffectError> {
        self.log.push(format!("recovered by {}", r.tier.as_str()));
        self.recoveries.push(r.clone());
        Ok(())
    }
    async fn phase_changed(&mut self, _: &RecoveryState, state: &RecoveryState) -> Result<(), EffectError> {
        self.log.push(format!("phase {}", state.phase.as_str()));
        Ok(())
    }
}

/// The cluster around the loop: agents and members writing their keys.
struct Cluster {
    store: MemoryStore,
    keys: Keyspace,
}

impl Cluster {
    fn new() -> Self {
        let keys = Keyspace::default();
        let store = MemoryStore::new(keys.clone(), NS, JOB);
        for n in names() {
            store.put(keys.node_alive(&n), "{}");
        }
        Self { store, keys }
    }
    fn job(&self) -> ninelives_core::keyspace::JobKeys {
        self.keys.job(NS, JOB)
    }
    fn join(&self, generation: u64, step: u64) {
        for rank in 0..4 {
            self.store.put(self.job().member(rank), "{}");
            self.store.put(self.job().ack(generation, &rank.to_string()), format!(r#"{{"step":{step}}}"#));
        }
    }
    fn fail_chip(&self, node: &str, chip: u32) {
        let record = r#"{"state":"failed","code":"hbm-ecc-uncorrectable","since":1001.0}"#;
        self.store.put(self.keys.chip(node, chip), record);
    }
}

async fn ran<S: BrainStore>(lp: &mut ControlLoop<S>, fx: &mut Recorder, now: f64) -> Box<Round> {
    match lp.step(fx, now).await.unwrap() {
        Progress::Ran(round) => round,
        other => panic!("expected a round, got {other:?}"),
    }
}

#[tokio::test]
async fn a_job_starts_and_a_chip_with_replicas_is_rerouted_without_a_rollback() {
    let cluster = Cluster::new();
    let mut lp = ControlLoop::new(brain(8), identity(), cluster.store.clone(), None);
    let mut fx = Recorder::default();
    assert_eq!(lp.step(&mut fx, 1000.0).await.unwrap(), Progress::NotStarted, "no node table yet");
    assert!(cluster.store.get(&cluster.job().placement()).is_none());

    fx.table = Some(RecoveryState::new(names(), vec![]));
    let first = ran(&mut lp, &mut fx, 1000.0).await;
    assert_eq!(first.published.len(), 1);
    assert_eq!(
        (first.published[0].tier, first.published[0].restore),
        (GenerationTier::Initial, Restore::Fresh)
    );
    assert_eq!(
        &fx.log[..5],
        ["published 1 initial", "start 0 on n0", "start 1 on n1", "start 2 on n2", "start 3 on n3"]
    );
    // The record and the plan went into the store together.
    let stored = stored_plan(&cluster);
    assert_eq!(stored, first.published[0]);
    let values = cluster.store.clone().read().await.unwrap();
    assert!(
        values.kvs.iter().all(|(k, _)| !k.starts_with(&cluster.job().plan_groups())),
        "the loop reads groups on demand"
    );
    let record = RecoveryState::parse("r", &cluster.store.get(&cluster.job().recovery()).unwrap()).unwrap();
    assert_eq!(record, first.state);

    cluster.join(1, 0);
    assert_eq!(ran(&mut lp, &mut fx, 1001.0).await.state.phase, BrainPhase::Running);

    cluster.fail_chip("n1", 2);
    let reroute = ran(&mut lp, &mut fx, 1002.0).await;
    assert_eq!(reroute.state.phase, BrainPhase::Recovering);
    assert_eq!(reroute.published[0].tier, GenerationTier::Reroute);
    assert_eq!(reroute.published[0].restore, Restore::InMemory, "no rollback: every expert had a replica");

    cluster.join(2, 7);
    let settled = ran(&mut lp, &mut fx, 1003.0).await;
    assert_eq!(settled.state.phase, BrainPhase::Running);
    assert_eq!(fx.recoveries.len(), 1);
    assert_eq!((fx.recoveries[0].tier, fx.recoveries[0].steps_lost), (Rung::Reroute, 0));
    assert!(
        fx.log.ends_with(&["recovered by reroute".to_string(), "phase running".to_string()]),
        "{:?}",
        fx.log
    );
    // Quiet rounds write nothing.
    let writes = cluster.store.history(&cluster.job().recovery()).len();
    ran(&mut lp, &mut fx, 1004.0).await;
    assert_eq!(cluster.store.history(&cluster.job().recovery()).len(), writes);
    // Settled: the acknowledgements of older generations are collected, the current one's kept.
    let current = stored_plan(&cluster).generation();
    cluster.join(current, 7);
    ran(&mut lp, &mut fx, 1005.0).await;
    assert!(cluster.store.get(&cluster.job().ack(1, "0")).is_none(), "generation 1's acks stayed");
    assert!(cluster.store.get(&cluster.job().ack(current, "0")).is_some());
}

/// A store through which another writer changes the record between this loop's read and write
/// (a deposed operator resumed after a pause, racing the new leader).
struct Interloper(MemoryStore, String);

impl BrainStore for Interloper {
    async fn read(&mut self) -> Result<Changes, ControlError> {
        self.0.read().await
    }
    fn resync(&mut self) {
        self.0.resync();
    }
    async fn claim(&mut self, writer: &ninelives_core::writer::WriterRecord) -> Result<(), ControlError> {
        self.0.claim(writer).await
    }
    async fn write(&mut self, puts: Vec<(String, String)>, revision: i64) -> Result<Written, ControlError> {
        let newer = RecoveryState::new(names(), vec!["other-writer".into()]);
        self.0.put(self.1.clone(), newer.to_json());
        self.0.write(puts, revision).await
    }
    async fn get_many(&mut self, keys: Vec<String>) -> Result<Vec<Option<Vec<u8>>>, ControlError> {
        self.0.get_many(keys).await
    }
    async fn put_unguarded(&mut self, puts: Vec<(String, String)>) -> Result<(), ControlError> {
        self.0.put_unguarded(puts).await
    }
    async fn list_keys(&mut self, prefix: String) -> Result<Vec<String>, ControlError> {
        self.0.list_keys(prefix).await
    }
    async fn delete_guarded(&mut self, keys: Vec<String>, revision: i64) -> Result<Written, ControlError> {
        self.0.delete_guarded(keys, revision).await
    }
}

#[tokio::test]
async fn a_writer_whose_read_is_stale_publishes_nothing() {
    let cluster = Cluster::new();
    let store = Interloper(cluster.store.clone(), cluster.job().recovery());
    let mut lp = ControlLoop::new(brain(8), identity(), store, None);
    let mut fx = Recorder { table: Some(RecoveryState::new(names(), vec![])), ..Default::default() };
    assert_eq!(lp.step(&mut fx, 1000.0).await.unwrap(), Progress::Fenced);
    assert!(cluster.store.get(&cluster.job().placement()).is_none(), "the stale writer published");
    assert!(fx.log.is_empty(), "effects of an unapplied decision ran: {:?}", fx.log);
    // The record is the other writer's, untouched.
    let record = RecoveryState::parse("r", &cluster.store.get(&cluster.job().recovery()).unwrap()).unwrap();
    assert_eq!(record.spares, ["other-writer"]);
}

#[tokio::test]
async fn malformed_records_stop_the_job_without_writing() {
    for key in [Cluster::new().job().placement(), Cluster::new().job().recovery()] {
        let cluster = Cluster::new();
        cluster.store.put(key.clone(), "{not json");
        let mut lp = ControlLoop::new(brain(8), identity(), cluster.store.clone(), None);
        let mut fx = Recorder { table: Some(RecoveryState::new(names(), vec![])), ..Default::default() };
        let err = lp.step(&mut fx, 1000.0).await.unwrap_err();
        assert!(matches!(&err, ControlError::Malformed { key: k, .. } if *k == key), "{err}");
        assert_eq!(err.label(), "malformed");
        assert!(fx.log.is_empty());
        assert_eq!(cluster.store.history(&cluster.job().control()).len(), 0);
    }
}

#[tokio::test]
async fn an_effect_that_fails_is_reported_with_its_label_and_the_decision_stays_written() {
    let cluster = Cluster::new();
    let mut lp = ControlLoop::new(brain(8), identity(), cluster.store.clone(), None);
    let mut fx =
        Recorder { table: Some(RecoveryState::new(names(), vec![])), fail_start: true, ..Default::default() };
    let err = lp.step(&mut fx, 1000.0).await.unwrap_err();
    assert_eq!(err.label(), "start-member");
    // The generation is committed; the next round does not publish it again.
    assert!(cluster.store.get(&cluster.job().placement()).is_some());
    fx.fail_start = false;
    let next = ran(&mut lp, &mut fx, 1001.0).await;
    assert!(next.published.is_empty());
}

#[tokio::test]
async fn a_finished_job_is_left_alone() {
    let cluster = Cluster::new();
    let mut done = RecoveryState::new(names(), vec![]);
    done.phase = BrainPhase::Succeeded;
    cluster.store.put(cluster.job().recovery(), done.to_json());
    let mut lp = ControlLoop::new(brain(8), identity(), cluster.store.clone(), None);
    let mut fx = Recorder::default();
    assert!(
        matches!(lp.step(&mut fx, 1000.0).await.unwrap(), Progress::Finished(s) if s.phase == BrainPhase::Succeeded)
    );
    assert_eq!(cluster.store.history(&cluster.job().recovery()).len(), 1);
}

#[tokio::test]
async fn the_etcd_store_reads_one_revision_and_fences_stale_writes() {
    let etcd = ninelives_testkit::EtcdServer::start().unwrap();
    let client = etcd_client::Client::connect([etcd.endpoint()], None).await.unwrap();
    let keys = Keyspace::default();
    let job = keys.job(NS, JOB);
    let mut store = EtcdStore::new(client.clone(), keys.clone(), NS, JOB);
    let mut other = client.clone();
    other.put(keys.node_alive("n0"), "{}", None).await.unwrap();
    other.put("/unrelated", "x", None).await.unwrap();
    let empty = store.read().await.unwrap();
    assert_eq!(empty.record_revision, 0);
    assert_eq!(empty.kvs.len(), 1, "only node and job keys: {:?}", empty.kvs);
    let Written::Committed { revision } =
        store.write(vec![(job.recovery(), "{}".into()), (job.control(), "{}".into())], 0).await.unwrap()
    else {
        panic!("first write fenced")
    };
    assert_eq!(store.read().await.unwrap().record_revision, revision);
    // A writer that still believes the record absent is fenced, and writes nothing.
    assert_eq!(store.write(vec![(job.control(), "stale".into())], 0).await.unwrap(), Written::Fenced);
    let control = other.get(job.control(), None).await.unwrap();
    assert_eq!(control.kvs()[0].value(), b"{}");
    // With the current revision the write goes through.
    assert!(matches!(
        store.write(vec![(job.control(), "new".into())], revision).await.unwrap(),
        Written::Committed { .. }
    ));
}

/// Fencing by writer epoch (issue 19 item 3): two drivers over one store, the older deposed.
mod fencing {
    use ninelives_core::writer::WriterRecord;

    use super::*;

    fn writer(holder: &str, epoch: u64) -> WriterRecord {
        WriterRecord::new(holder, epoch)
    }

    fn deposed(result: Result<Progress, ControlError>, by: &WriterRecord) {
        match result {
            Err(ControlError::Fenced { current, .. }) => assert_eq!(current.as_ref(), Some(by)),
            other => panic!("expected the older writer to be deposed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_newer_epoch_deposes_the_driving_writer_which_then_writes_nothing() {
        let cluster = Cluster::new();
        let table = || Recorder { table: Some(RecoveryState::new(names(), vec![])), ..Default::default() };
        let (a, b) = (writer("op-a", 3), writer("op-b", 4));
        let mut old =
            ControlLoop::new(brain(8), identity(), cluster.store.clone(), None).with_writer(a.clone());
        let mut fx_old = table();
        assert_eq!(ran(&mut old, &mut fx_old, 1000.0).await.published.len(), 1);
        assert_eq!(cluster.store.get(&cluster.job().writer()), Some(a.to_json().into_bytes()));
        cluster.join(1, 0);
        ran(&mut old, &mut fx_old, 1001.0).await;

        // The new leader claims the job; a chip fails; the old one (resumed) decides a reroute.
        let mut new =
            ControlLoop::new(brain(8), identity(), cluster.store.clone(), None).with_writer(b.clone());
        let mut fx_new = table();
        assert!(ran(&mut new, &mut fx_new, 1002.0).await.published.is_empty(), "nothing to publish yet");
        cluster.fail_chip("n1", 2);
        let before = cluster.store.history(&cluster.job().placement()).len();
        deposed(old.step(&mut fx_old, 1003.0).await, &b);
        assert_eq!(
            cluster.store.history(&cluster.job().placement()).len(),
            before,
            "the deposed writer published"
        );
        assert!(!fx_old.log.iter().any(|l| l.starts_with("published 2")), "{:?}", fx_old.log);
        // Deposed for good: later rounds fail the same way without reading or writing.
        deposed(old.step(&mut fx_old, 1004.0).await, &b);

        // The new leader publishes the reroute itself, exactly once.
        let reroute = ran(&mut new, &mut fx_new, 1005.0).await;
        assert_eq!(reroute.published.iter().map(DistPlan::generation).collect::<Vec<_>>(), [2]);
        assert_eq!(cluster.store.history(&cluster.job().placement()).len(), before + 1);
    }

    #[tokio::test]
    async fn a_writer_older_than_the_holder_never_starts_and_its_own_epoch_is_kept() {
        let cluster = Cluster::new();
        let b = writer("op-b", 4);
        cluster.store.put(cluster.job().writer(), b.to_json());
        let mut fx = Recorder { table: Some(RecoveryState::new(names(), vec![])), ..Default::default() };
        for stale in [writer("op-a", 3), writer("op-a", 4)] {
            let mut lp =
                ControlLoop::new(brain(8), identity(), cluster.store.clone(), None).with_writer(stale);
            let err = lp.step(&mut fx, 1000.0).await.unwrap_err();
            assert!(err.is_fenced() && err.label() == "fenced", "{err}");
        }
        assert!(cluster.store.get(&cluster.job().placement()).is_none() && fx.log.is_empty());
        assert_eq!(
            cluster.store.history(&cluster.job().writer()).len(),
            1,
            "the holder's claim was overwritten"
        );
        // The holder itself (a driver restarted within its term) drives on without a new claim.
        let mut again = ControlLoop::new(brain(8), identity(), cluster.store.clone(), None).with_writer(b);
        assert_eq!(ran(&mut again, &mut fx, 1000.0).await.published.len(), 1);
        assert_eq!(cluster.store.history(&cluster.job().writer()).len(), 1);
    }

    #[tokio::test]
    async fn a_malformed_writer_key_stops_the_claim_without_writing() {
        let cluster = Cluster::new();
        cluster.store.put(cluster.job().writer(), "{not json");
        let mut lp = ControlLoop::new(brain(8), identity(), cluster.store.clone(), None)
            .with_writer(writer("op-a", 1));
        let mut fx = Recorder { table: Some(RecoveryState::new(names(), vec![])), ..Default::default() };
        let err = lp.step(&mut fx, 1000.0).await.unwrap_err();
        assert_eq!(err.label(), "malformed", "{err}");
        assert!(cluster.store.get(&cluster.job().placement()).is_none());
    }
}
