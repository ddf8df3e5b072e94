//! Expert-parallel training with members as threads of this process, a real etcd and real TCP:
//! W members produce the same parameters, bit for bit, as one member and as the single-process
//! trainer. (Process-level tests, including kill -9, are in `cli/tests/launch.rs`.)

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ninelives_core::generation::{Restore, initial_plan, one_chip_workers};
use ninelives_core::keyspace::{JobKeys, Keyspace};
use ninelives_testkit::EtcdServer;
use ninelives_worker::dist::auth::{JobAuth, JobKey};
use ninelives_worker::dist::link::Security;
use ninelives_worker::dist::member::{MemberEvent, MemberOptions, run_member};
use ninelives_worker::dist::rendezvous::Etcd;
use ninelives_worker::trainer::run_with_threads;
use ninelives_worker::{CheckpointStore, Trainer, TrainerConfig};

/// Called with every member's events (rank first); runs on the member's thread.
type Hook = Arc<dyn Fn(u32, &MemberEvent<'_>) + Send + Sync>;

/// A hook that fails the test when a step is abandoned (no fault was injected).
fn no_aborts() -> Hook {
    Arc::new(|rank, e| {
        if let MemberEvent::Aborted { reason, .. } = e {
            panic!("rank {rank} aborted: {reason}");
        }
    })
}

/// How the members of one run are set up.
struct Setup<'a> {
    workers: u32,
    redundant: u32,
    keep_last: usize,
    listen: [u8; 4],
    advertise: Option<&'a str>,
    hook: Hook,
}

impl Setup<'_> {
    fn new(workers: u32, redundant: u32) -> Self {
        Self { workers, redundant, keep_last: 10, listen: [127, 0, 0, 1], advertise: None, hook: no_aborts() }
    }
}

fn job_keys(job: &str) -> JobKeys {
    Keyspace::default().job("test", job)
}

fn distributed(
    etcd: &EtcdServer,
    job: &str,
    workers: u32,
    redundant: u32,
    config: &TrainerConfig,
    dir: &Path,
) -> String {
    run_members(etcd, job, &Setup::new(workers, redundant), config, dir)
}

/// Trains `config` with `setup.workers` members as threads; returns the leader's digest.
fn run_members(
    etcd: &EtcdServer,
    job: &str,
    setup: &Setup<'_>,
    config: &TrainerConfig,
    dir: &Path,
) -> String {
    let keys = job_keys(job);
    let shape =
        one_chip_workers(config.dims.layers, config.dims.routed_experts, setup.redundant, setup.workers);
    let workers = setup.workers;
    let store = CheckpointStore::open(dir, setup.keep_last).unwrap();
    let endpoints = vec![etcd.endpoint()];
    let link = Etcd::connect(&endpoints, keys.clone()).unwrap();
    link.delete(keys.root(), true).unwrap();
    let corpus = common::demo_corpus();
    let members: Vec<_> = (0..workers)
        .map(|rank| {
            let (config, corpus, store, endpoints, keys) =
                (config.clone(), corpus.clone(), store.clone(), endpoints.clone(), keys.clone());
            let hook = setup.hook.clone();
            let options = MemberOptions {
                rank,
                listen: SocketAddr::from((setup.listen, 0)),
                advertise: setup.advertise.map(str::to_string),
                ttl_seconds: 3,
                step_timeout: Duration::from_secs(30),
                join_timeout: Duration::from_secs(60),
                checkpoint_every: 2,
                security: Security::Authenticated(JobAuth::new(
                    format!("test/{job}"),
                    JobKey::from_bytes(b"a test job key of thirty-two bytes").unwrap(),
                )),
            };
            std::thread::spawn(move || {
                let etcd = Arc::new(Etcd::connect(&endpoints, keys).unwrap());
                run_with_threads(1, || run_member(config, corpus, store, etcd, &options, |e| hook(rank, &e)))
                    .unwrap()
                    .unwrap()
            })
        })
        .collect();
    // What the control loop publishes first (members wait for it).
    let first = initial_plan(&shape, Restore::Fresh).unwrap();
    link.put(&keys.placement(), serde_json::to_vec(&first).unwrap(), None).unwrap();
    let digests: Vec<Option<String>> = members.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(digests[0].is_some(), "the leader reports the digest");
    assert!(digests[1..].iter().all(Option::is_none), "only the leader reports");
    digests[0].clone().unwrap()
}

/// The single-process trainer's digest after `steps` steps.
fn single_process(config: &TrainerConfig, steps: u64) -> String {
    let mut single = Trainer::new(config.clone(), common::demo_corpus()).unwrap();
    run_with_threads(1, || {
        for _ in 0..steps {
            single.train_step().unwrap();
        }
        single.params_sha256().unwrap()
    })
    .unwrap()
}

#[test]
fn members_train_bit_identically_to_one_process() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = common::small_config(3);

    let expected = single_process(&config, 3);

    let one = distributed(&etcd, "one", 1, 0, &config, &dir.path().join("one"));
    assert_eq!(one, expected, "one member == the single-process trainer");
    let three = distributed(&etcd, "three", 3, 0, &config, &dir.path().join("three"));
    assert_eq!(three, expected, "three members == one process");
    // Every expert on two members: replicas split the micro-batches and must stay identical.
    let replicated = distributed(&etcd, "replicated", 3, 4, &config, &dir.path().join("replicated"));
    assert_eq!(replicated, expected, "replicated experts == one process");
}

#[test]
fn the_leader_reports_progress_and_the_kept_checkpoints_in_etcd() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = common::small_config(5);
    let link = Arc::new(Etcd::connect(&[etcd.endpoint()], job_keys("records")).unwrap());
    // Listening on every interface, as in a pod, peers must be told a reachable address.
    let registered = Arc::new(Mutex::new(BTreeMap::new()));
    let hook: Hook = {
        let (link, registered) = (link.clone(), registered.clone());
        Arc::new(move |rank, e| match e {
            MemberEvent::Aborted { reason, .. } => panic!("rank {rank} aborted: {reason}"),
            MemberEvent::Joined { .. } => {
                let record = link.members().unwrap().remove(&rank).unwrap();
                registered.lock().unwrap().insert(rank, record.addr);
            }
            _ => {}
        })
    };
    let setup =
        Setup { keep_last: 2, listen: [0, 0, 0, 0], advertise: Some("127.0.0.1"), hook, ..Setup::new(2, 0) };
    let store_dir = dir.path().join("records");
    let digest = run_members(&etcd, "records", &setup, &config, &store_dir);
    assert_eq!(digest, single_process(&config, 5));

    for (rank, addr) in registered.lock().unwrap().iter() {
        assert_eq!(addr.ip(), IpAddr::from([127, 0, 0, 1]), "rank {rank} registered {addr}");
        assert_ne!(addr.port(), 0, "rank {rank} registered the listener's actual port");
    }
    assert_eq!(registered.lock().unwrap().len(), 2);

    let progress = link.progress().unwrap().expect("the leader reported progress");
    assert_eq!(progress.step, 5);
    assert!(progress.loss.is_some_and(f64::is_finite), "{progress:?}");
    // Commits at 2, 4 and the last step 5; keep-last-2 removed 2, and its record with it.
    let store = CheckpointStore::open(&store_dir, 2).unwrap();
    let kept: Vec<u64> = store.list().unwrap().into_iter().filter(|e| e.2).map(|e| e.0).collect();
    assert_eq!(kept, [5, 4]);
    let records = link.checkpoints().unwrap();
    assert_eq!(records.keys().copied().collect::<Vec<_>>(), [4, 5]);
    for (step, record) in &records {
        assert_eq!(record.step, *step);
        assert_eq!(record.location.as_deref(), Some(store.step_dir(*step).to_str().unwrap()));
    }
}

#[test]
fn a_reroute_that_drops_a_replica_continues_from_memory_bit_identically() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let steps = 6;
    let config = common::small_config(steps);
    let link = Arc::new(Etcd::connect(&[etcd.endpoint()], job_keys("subset")).unwrap());
    // (rank, generation) -> experts held, from the Joined events.
    let joined = Arc::new(Mutex::new(BTreeMap::new()));
    let dropped_from = Arc::new(Mutex::new(None));
    let (layers, routed) = (config.dims.layers, config.dims.routed_experts);
    let hook: Hook = {
        let (link, joined, dropped_from) = (link.clone(), joined.clone(), dropped_from.clone());
        Arc::new(move |rank, e| match e {
            MemberEvent::Joined { generation, experts, .. } => {
                joined.lock().unwrap().insert((rank, *generation), *experts);
            }
            // Once the leader completed step 2, publish what the operator would after moving
            // one replica away: the same members, one of them holding one expert less.
            // (Once: the leader may redo step 2 if it rolls back to agree with the others.)
            MemberEvent::Step(r) if rank == 0 && r.step == 2 && dropped_from.lock().unwrap().is_none() => {
                let mut next = link.plan().unwrap().unwrap();
                let (member, expert) = next
                    .experts
                    .iter()
                    .rev()
                    .find_map(|(&m, held)| held.iter().find(|&&e| next.holders(e).len() > 1).map(|&e| (m, e)))
                    .expect("a replicated expert");
                next.experts.get_mut(&member).unwrap().retain(|&e| e != expert);
                next.placement.generation += 1;
                next.restore = Restore::InMemory;
                next.tier = ninelives_core::generation::GenerationTier::Reroute;
                next.check(layers, routed).unwrap();
                link.put(&link.keys().placement(), serde_json::to_vec(&next).unwrap(), None).unwrap();
                *dropped_from.lock().unwrap() = Some(member);
            }
            _ => {}
        })
    };
    let setup = Setup { hook, ..Setup::new(3, 4) };
    let digest = run_members(&etcd, "subset", &setup, &config, &dir.path().join("subset"));
    assert_eq!(digest, single_process(&config, steps), "a reroute from memory changes no bit");

    let member = dropped_from.lock().unwrap().expect("the next generation was published");
    let joined = joined.lock().unwrap();
    for rank in 0..3 {
        let before = joined[&(rank, 1)];
        let after = joined.get(&(rank, 2)).copied();
        let expected = if rank == member { before - 1 } else { before };
        assert_eq!(after, Some(expected), "rank {rank} in generation 2 ({joined:?})");
    }
}

/// A `checkpoint{step}` generation that keeps every member's experts (what the restore tier
/// publishes for the survivors of a worker crash): the members roll back into the memory they
/// have (`Trainer::restore_dir`) and finish bit-identically to one process.
#[test]
fn a_checkpoint_generation_rolls_members_back_in_place_bit_identically() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Enough steps that the members are still training when the new generation appears.
    let steps = 16;
    let config = common::small_config(steps);
    let link = Arc::new(Etcd::connect(&[etcd.endpoint()], job_keys("rollback")).unwrap());
    // (rank, generation) -> the step the generation continues from, from the Joined events.
    let joined = Arc::new(Mutex::new(BTreeMap::new()));
    let published = Arc::new(Mutex::new(false));
    let hook: Hook = {
        let (link, joined, published) = (link.clone(), joined.clone(), published.clone());
        Arc::new(move |rank, e| match e {
            MemberEvent::Joined { generation, step, .. } => {
                joined.lock().unwrap().insert((rank, *generation), *step);
            }
            // Once the checkpoint of step 2 is committed (training has moved on), publish what
            // the operator would for a restore: the same members and experts, from step 2.
            MemberEvent::Committed(done) if rank == 0 && done.step == 2 && !*published.lock().unwrap() => {
                let mut next = link.plan().unwrap().unwrap();
                next.placement.generation += 1;
                next.restore = Restore::Checkpoint { step: 2 };
                next.tier = ninelives_core::generation::GenerationTier::Restore;
                link.put(&link.keys().placement(), serde_json::to_vec(&next).unwrap(), None).unwrap();
                *published.lock().unwrap() = true;
            }
            _ => {}
        })
    };
    let setup = Setup { hook, ..Setup::new(2, 0) };
    let digest = run_members(&etcd, "rollback", &setup, &config, &dir.path().join("rollback"));
    assert!(*published.lock().unwrap(), "the restore generation was published");
    assert_eq!(digest, single_process(&config, steps), "a rollback to a checkpoint changes no bit");
    let joined = joined.lock().unwrap();
    for rank in 0..2 {
        assert_eq!(joined.get(&(rank, 2)), Some(&2), "rank {rank} continues from step 2 ({joined:?})");
    }
}

/// A restore generation whose checkpoint turns out corrupt (a flipped byte in its dense shard):
/// every member falls back to the newest older committed checkpoint, the same one, and the job
/// still ends bit-identical to one process (the corrupt step is trained and saved again).
#[test]
fn a_restore_to_a_corrupt_checkpoint_falls_back_to_the_previous_one() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let steps = 16;
    let config = common::small_config(steps);
    let checkpoints = dir.path().join("corrupt");
    let link = Arc::new(Etcd::connect(&[etcd.endpoint()], job_keys("corrupt")).unwrap());
    let joined = Arc::new(Mutex::new(BTreeMap::new()));
    let published = Arc::new(Mutex::new(false));
    let hook: Hook = {
        let (link, joined, published, checkpoints) =
            (link.clone(), joined.clone(), published.clone(), checkpoints.clone());
        Arc::new(move |rank, e| match e {
            MemberEvent::Joined { generation, step, .. } => {
                joined.lock().unwrap().insert((rank, *generation), *step);
            }
            MemberEvent::Committed(done) if rank == 0 && done.step == 4 && !*published.lock().unwrap() => {
                let shard =
                    CheckpointStore::open(&checkpoints, 10).unwrap().step_dir(4).join("dense.safetensors");
                let mut bytes = std::fs::read(&shard).unwrap();
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0x40;
                std::fs::write(&shard, bytes).unwrap();
                let mut next = link.plan().unwrap().unwrap();
                next.placement.generation += 1;
                next.restore = Restore::Checkpoint { step: 4 };
                next.tier = ninelives_core::generation::GenerationTier::Restore;
                link.put(&link.keys().placement(), serde_json::to_vec(&next).unwrap(), None).unwrap();
                *published.lock().unwrap() = true;
            }
            _ => {}
        })
    };
    let setup = Setup { hook, ..Setup::new(2, 0) };
    let digest = run_members(&etcd, "corrupt", &setup, &config, &checkpoints);
    assert!(*published.lock().unwrap(), "the restore generation was published");
    let joined = joined.lock().unwrap();
    for rank in 0..2 {
        assert_eq!(joined.get(&(rank, 2)), Some(&2), "rank {rank} fell back to step 2 ({joined:?})");
    }
    assert_eq!(digest, single_process(&config, steps), "the fallback changes no bit");
    let store = CheckpointStore::open(&checkpoints, 10).unwrap();
    store.verify_dir(&store.step_dir(4)).expect("step 4 was saved again, intact");
}
