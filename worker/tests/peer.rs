//! In-memory peer copies (issue 21) with members as threads of this process, a real etcd and
//! real authenticated TCP: a `Restore::Peer` generation rolls members back to a snapshot held in
//! host memory — an expert moved off a member whose chip failed, a lost member replaced by a
//! fresh one — and the job ends bit-identical to one process, without reading a checkpoint.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ninelives_core::generation::{DistPlan, GenerationTier, Restore, initial_plan, one_chip_workers};
use ninelives_core::job::ModelPreset;
use ninelives_core::keyspace::{JobKeys, Keyspace};
use ninelives_core::model::ModelDims;
use ninelives_core::recovery::PeerRecord;
use ninelives_testkit::EtcdServer;
use ninelives_worker::dist::auth::{JobAuth, JobKey};
use ninelives_worker::dist::link::Security;
use ninelives_worker::dist::member::{MemberEvent, MemberOptions, run_member};
use ninelives_worker::dist::rendezvous::Etcd;
use ninelives_worker::error::WorkerError;
use ninelives_worker::trainer::run_with_threads;
use ninelives_worker::{CheckpointStore, Trainer, TrainerConfig};

type Hook = Arc<dyn Fn(u32, &MemberEvent<'_>) + Send + Sync>;
type Outcome = Result<Option<String>, WorkerError>;

/// Everything the members of one run share.
#[derive(Clone)]
struct Run {
    endpoint: String,
    keys: JobKeys,
    config: TrainerConfig,
    store: CheckpointStore,
    hook: Arc<Mutex<Option<Hook>>>,
}

impl Run {
    fn new(etcd: &EtcdServer, job: &str, config: &TrainerConfig, dir: &Path) -> Self {
        let keys = Keyspace::default().job("test", job);
        let link = Etcd::connect(&[etcd.endpoint()], keys.clone()).unwrap();
        link.delete(keys.root(), true).unwrap();
        Self {
            endpoint: etcd.endpoint(),
            keys,
            config: config.clone(),
            store: CheckpointStore::open(dir, 10).unwrap(),
            hook: Arc::new(Mutex::new(None)),
        }
    }

    fn link(&self) -> Etcd {
        Etcd::connect(std::slice::from_ref(&self.endpoint), self.keys.clone()).unwrap()
    }

    /// Starts member `rank` on a thread.
    fn spawn(&self, rank: u32) -> JoinHandle<Outcome> {
        self.spawn_hooked(rank, None)
    }

    /// Starts member `rank` on a thread with its own `hook` (instead of the run's).
    fn spawn_with(&self, rank: u32, hook: Hook) -> JoinHandle<Outcome> {
        self.spawn_hooked(rank, Some(hook))
    }

    fn spawn_hooked(&self, rank: u32, own: Option<Hook>) -> JoinHandle<Outcome> {
        let run = self.clone();
        let options = MemberOptions {
            rank,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            ttl_seconds: 3,
            step_timeout: Duration::from_secs(30),
            join_timeout: Duration::from_secs(60),
            // Checkpoints only at the end: a peer restore must not need one.
            checkpoint_every: 1000,
            security: Security::Authenticated(JobAuth::new(
                "test/peer".to_string(),
                JobKey::from_bytes(b"a test job key of thirty-two bytes").unwrap(),
            )),
            reconnect_attempts: ninelives_worker::dist::member::DEFAULT_RECONNECT_ATTEMPTS,
        };
        std::thread::spawn(move || {
            let etcd =
                Arc::new(Etcd::connect(std::slice::from_ref(&run.endpoint), run.keys.clone()).unwrap());
            let hook = run.hook.clone();
            let corpus = common::demo_corpus();
            run_with_threads(1, || {
                run_member(run.config.clone(), corpus, run.store.clone(), etcd, &options, |e| {
                    let h = own.clone().or_else(|| hook.lock().unwrap().clone());
                    if let Some(h) = h {
                        h(rank, &e);
                    }
                })
            })
            .unwrap()
        })
    }

    /// The first generation: `workers` members, each with one buddy.
    fn first_plan(&self, workers: u32) -> DistPlan {
        let shape = one_chip_workers(self.config.dims.layers, self.config.dims.routed_experts, 0, workers);
        let mut plan = initial_plan(&shape, Restore::Fresh).unwrap();
        plan.buddies = ninelives_core::peer::buddies(&plan.members, 1, None);
        plan.peer_interval_steps = 1;
        plan
    }

    fn publish(&self, plan: &DistPlan) {
        self.link().put(&self.keys.placement(), serde_json::to_vec(plan).unwrap(), None).unwrap();
    }
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

/// The peer records members published.
fn peer_records(run: &Run) -> BTreeMap<u32, PeerRecord> {
    run.link()
        .get_prefix(&run.keys.peers())
        .unwrap()
        .into_iter()
        .filter_map(|(k, v)| Some((k.rsplit('/').next()?.parse().ok()?, serde_json::from_slice(&v).ok()?)))
        .collect()
}

/// (rank, generation) -> the step the member continued from.
type Joined = Arc<Mutex<BTreeMap<(u32, u64), u64>>>;

/// Publishes `next(plan, step)` as generation 2 once rank 0 took its snapshot of `at`, then
/// holds rank 0 (so no member completes another step) until every member saw it.
fn publish_at(
    run: &Run,
    at: u64,
    next: impl Fn(DistPlan) -> DistPlan + Send + Sync + 'static,
) -> (Arc<Mutex<bool>>, Joined) {
    let published = Arc::new(Mutex::new(false));
    let joined: Joined = Arc::default();
    let hook: Hook = {
        let (run, published, joined) = (run.clone(), published.clone(), joined.clone());
        Arc::new(move |rank, e| {
            if let MemberEvent::Joined { generation, step, .. } = e {
                joined.lock().unwrap().insert((rank, *generation), *step);
            }
            if let MemberEvent::PeerSnapshot { step, .. } = e
                && rank == 0
                && *step == at
                && !*published.lock().unwrap()
            {
                let current = run.link().plan().unwrap().unwrap();
                let mut plan = next(current);
                plan.placement.generation += 1;
                run.publish(&plan);
                *published.lock().unwrap() = true;
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    *run.hook.lock().unwrap() = Some(hook);
    (published, joined)
}

fn no_checkpoint_before_the_end(dir: &Path, steps: u64) {
    let store = CheckpointStore::open(dir, 10).unwrap();
    let saved: Vec<u64> = store.list().unwrap().into_iter().map(|(s, _, _)| s).collect();
    assert_eq!(saved, [steps], "only the final checkpoint exists: the restore read none");
}

/// (b) A member's chip fails while the member lives: one of its experts moves to another
/// member, everyone rolls back to the snapshot of the step before; the moved expert comes from
/// the previous owner's host memory.
#[test]
fn an_expert_moved_off_a_failed_chip_is_restored_from_peer_memory_bit_identically() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let steps = 8;
    let config = common::small_config(steps);
    let run = Run::new(&etcd, "moved", &config, dir.path());
    let (layers, routed) = (config.dims.layers, config.dims.routed_experts);
    let (published, joined) = publish_at(&run, 3, move |mut plan| {
        let expert = plan.experts[&2][0];
        plan.experts.get_mut(&2).unwrap().retain(|&e| e != expert);
        plan.experts.get_mut(&1).unwrap().push(expert);
        plan.experts.get_mut(&1).unwrap().sort();
        plan.restore = Restore::Peer { step: 2 };
        plan.tier = GenerationTier::Reshard;
        plan.check(layers, routed).unwrap();
        plan
    });
    let members: Vec<_> = (0..3).map(|r| run.spawn(r)).collect();
    run.publish(&run.first_plan(3));
    let outcomes: Vec<Outcome> = members.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(*published.lock().unwrap(), "the peer generation was published");
    let digest = outcomes.into_iter().map(Result::unwrap).next().unwrap().expect("the leader's digest");
    assert_eq!(digest, single_process(&config, steps), "a peer restore changes no bit");
    no_checkpoint_before_the_end(dir.path(), steps);
    let joined = joined.lock().unwrap();
    for rank in 0..3 {
        assert_eq!(joined.get(&(rank, 2)), Some(&2), "rank {rank} continues from step 2 ({joined:?})");
    }
    let records = peer_records(&run);
    assert_eq!(records.len(), 3, "{records:?}");
    assert!(records.values().all(|r| r.generation == 2 && !r.own.is_empty()), "{records:?}");
}

/// (a) A member is lost (its thread leaves, its memory with it) and a fresh member on a spare
/// takes its experts: they come from the buddy's copy, the dense parameters from a survivor.
#[test]
fn a_replacement_member_is_filled_from_buddy_copies_bit_identically() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let steps = 8;
    let config = common::small_config(steps);
    let run = Run::new(&etcd, "replace", &config, dir.path());
    let spare: Arc<Mutex<Option<JoinHandle<Outcome>>>> = Arc::new(Mutex::new(None));
    let (layers, routed) = (config.dims.layers, config.dims.routed_experts);
    let (published, joined) = {
        let (run2, spare) = (run.clone(), spare.clone());
        publish_at(&run, 3, move |mut plan| {
            // Rank 2 is gone; rank 3 (a fresh process on a spare) takes its experts.
            let lost = plan.experts.remove(&2).unwrap();
            plan.experts.insert(3, lost);
            plan.members = vec![0, 1, 3];
            plan.buddies = ninelives_core::peer::buddies(&plan.members, 1, None);
            // Step 3's copies may not all be acknowledged yet; step 2's are.
            plan.restore = Restore::Peer { step: 2 };
            plan.tier = GenerationTier::Replace;
            plan.check(layers, routed).unwrap();
            // The spare starts once its generation is published, as the brain starts it (a
            // spare reading the generation before could find itself no member of it).
            let (run3, generation) = (run2.clone(), plan.placement.generation + 1);
            *spare.lock().unwrap() = Some(std::thread::spawn(move || {
                while run3.link().plan().ok().flatten().is_none_or(|p| p.generation() < generation) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                run3.spawn(3).join().unwrap()
            }));
            plan
        })
    };
    let members: Vec<_> = (0..3).map(|r| run.spawn(r)).collect();
    run.publish(&run.first_plan(3));
    let mut outcomes: Vec<Outcome> = members.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(*published.lock().unwrap(), "the peer generation was published");
    let lost = outcomes.remove(2);
    assert!(matches!(lost, Err(WorkerError::Rendezvous(_))), "rank 2 is no member any more: {lost:?}");
    let replacement = spare.lock().unwrap().take().unwrap().join().unwrap();
    assert_eq!(replacement.unwrap(), None, "the replacement finished (not the leader)");
    let digest = outcomes.remove(0).unwrap().expect("the leader's digest");
    assert_eq!(digest, single_process(&config, steps), "a replacement from peer copies changes no bit");
    no_checkpoint_before_the_end(dir.path(), steps);
    let joined = joined.lock().unwrap();
    for rank in [0, 1, 3] {
        assert_eq!(joined.get(&(rank, 2)), Some(&2), "rank {rank} continues from step 2 ({joined:?})");
    }
}

/// The settled generation (same plan, `Restore::InMemory`) that the brain publishes as soon as
/// every member acknowledged a replace can arrive while the replacement still fetches its state:
/// it continues that peer restore in the settled generation instead of failing for lack of
/// state (which the brain saw as a second failure and restored from disk: issue 21's node-loss
/// double recovery).
#[test]
fn a_settled_generation_during_the_replacements_fetch_continues_the_peer_restore() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let steps = 8;
    let config = common::small_config(steps);
    let run = Run::new(&etcd, "settled", &config, dir.path());
    let spare: Arc<Mutex<Option<JoinHandle<Outcome>>>> = Arc::new(Mutex::new(None));
    let settled = Arc::new(Mutex::new(false));
    let (layers, routed) = (config.dims.layers, config.dims.routed_experts);
    let (published, joined) = {
        let (run2, spare, settled) = (run.clone(), spare.clone(), settled.clone());
        publish_at(&run, 3, move |mut plan| {
            let lost = plan.experts.remove(&2).unwrap();
            plan.experts.insert(3, lost);
            plan.members = vec![0, 1, 3];
            plan.buddies = ninelives_core::peer::buddies(&plan.members, 1, None);
            plan.restore = Restore::Peer { step: 2 };
            plan.tier = GenerationTier::Replace;
            plan.check(layers, routed).unwrap();
            // The replacement joins generation 2 (acknowledged, state not fetched yet): the
            // settled generation 3 is published then, and the replacement held until it saw it.
            let (run3, settled) = (run2.clone(), settled.clone());
            let hook: Hook = Arc::new(move |rank, e| {
                if let MemberEvent::Joined { generation: 2, .. } = e
                    && rank == 3
                    && !*settled.lock().unwrap()
                {
                    let mut next = run3.link().plan().unwrap().unwrap();
                    next.placement.generation += 1;
                    next.restore = Restore::InMemory;
                    next.tier = GenerationTier::Settled;
                    run3.publish(&next);
                    *settled.lock().unwrap() = true;
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
            // The spare starts once its generation is published, as in the test above (one
            // that reads generation 1 exits, no member of it, and the others wait it out).
            let (run3, generation) = (run2.clone(), plan.placement.generation + 1);
            *spare.lock().unwrap() = Some(std::thread::spawn(move || {
                while run3.link().plan().ok().flatten().is_none_or(|p| p.generation() < generation) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                run3.spawn_with(3, hook).join().unwrap()
            }));
            plan
        })
    };
    let members: Vec<_> = (0..3).map(|r| run.spawn(r)).collect();
    run.publish(&run.first_plan(3));
    let mut outcomes: Vec<Outcome> = members.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(*published.lock().unwrap(), "the replace generation was published");
    assert!(*settled.lock().unwrap(), "the settled generation was published during the replacement's join");
    outcomes.remove(2).unwrap_err();
    let replacement = spare.lock().unwrap().take().unwrap().join().unwrap();
    assert_eq!(replacement.unwrap(), None, "the replacement finished its restore and the job");
    let digest = outcomes.remove(0).unwrap().expect("the leader's digest");
    assert_eq!(digest, single_process(&config, steps), "the continued restore changes no bit");
    no_checkpoint_before_the_end(dir.path(), steps);
    let joined = joined.lock().unwrap();
    for rank in [0, 1] {
        assert_eq!(joined.get(&(rank, 3)), Some(&2), "rank {rank} continues from step 2 ({joined:?})");
    }
}

/// (c) A generation asking for a step nobody keeps fails every member's join with a clear
/// error (the brain then falls back to a disk checkpoint).
#[test]
fn a_step_nobody_holds_fails_the_join_cleanly() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = common::small_config(50);
    let run = Run::new(&etcd, "missing", &config, dir.path());
    publish_at(&run, 2, |mut plan| {
        plan.restore = Restore::Peer { step: 1_000 };
        plan.tier = GenerationTier::Restore;
        plan
    });
    let members: Vec<_> = (0..2).map(|r| run.spawn(r)).collect();
    run.publish(&run.first_plan(2));
    for (rank, h) in members.into_iter().enumerate() {
        match h.join().unwrap() {
            Err(WorkerError::NoPeerSnapshot { step: 1_000, missing }) => {
                assert!(missing.contains(&format!("rank {rank}")), "{missing}");
            }
            other => panic!("rank {rank}: {other:?}"),
        }
    }
}

/// Cost of peer copies (BENCHMARKS.md "Peer copies: cost"): `workers` members train
/// `examples/tiny.yaml` for `steps` steps with one buddy each and without, with the `tiny` model
/// and with the `small` one (~38 M parameters); prints host memory, bytes on the wire per step
/// against the analytical minimum, and the mean step time. `PEER_COST_PRESETS=small` measures one.
/// `cargo test -p ninelives-worker --test peer -- --ignored --nocapture peer_copy_cost`
#[test]
#[ignore = "a measurement, minutes long"]
fn peer_copy_cost() {
    let presets = std::env::var("PEER_COST_PRESETS").unwrap_or_else(|_| "tiny,small".into());
    for preset in presets.split(',') {
        let dims = match preset {
            "tiny" => ModelDims::preset(ModelPreset::Tiny),
            "small" => ModelDims::preset(ModelPreset::Small),
            other => panic!("PEER_COST_PRESETS: unknown preset {other} (tiny, small)"),
        };
        println!("preset={preset}");
        peer_copy_cost_of(dims);
    }
}

fn peer_copy_cost_of(dims: ModelDims) {
    let steps = 12;
    let workers = 3;
    let mut config = common::tiny_config(steps);
    config.dims = dims;
    let etcd = EtcdServer::start().unwrap();
    // Expert state (parameters + two moments) per member: the copy's analytical minimum.
    let expert_bytes: usize = ninelives_worker::params::param_specs(&config.dims)
        .iter()
        .filter(|s| s.name.contains(".experts."))
        .map(|s| s.shape.iter().product::<usize>() * 12)
        .sum();
    let per_member = expert_bytes as f64 / f64::from(workers);
    for (round, copies) in [(0, false), (1, true), (2, false), (3, true)] {
        let dir = tempfile::tempdir().unwrap();
        let run = Run::new(&etcd, &format!("cost{round}"), &config, dir.path());
        let seconds = Arc::new(Mutex::new(Vec::new()));
        let last = Arc::new(Mutex::new(BTreeMap::new()));
        let hook: Hook = {
            let (seconds, last) = (seconds.clone(), last.clone());
            Arc::new(move |rank, e| match e {
                // Step 1 pays for start-up; the rest is the steady state.
                MemberEvent::Step(r) if rank == 0 && r.step > 1 => seconds.lock().unwrap().push(r.seconds),
                MemberEvent::PeerSnapshot { own_bytes, held_bytes, sent_bytes, .. } => {
                    last.lock().unwrap().insert(rank, (*own_bytes, *held_bytes, *sent_bytes));
                }
                _ => {}
            })
        };
        *run.hook.lock().unwrap() = Some(hook);
        let members: Vec<_> = (0..workers).map(|r| run.spawn(r)).collect();
        let mut plan = run.first_plan(workers);
        if !copies {
            plan.buddies.clear();
        }
        run.publish(&plan);
        for h in members {
            h.join().unwrap().unwrap();
        }
        let s = seconds.lock().unwrap();
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        let last = last.lock().unwrap();
        let n = last.len().max(1) as f64;
        let own = last.values().map(|v| v.0 as f64).sum::<f64>() / n;
        let held = last.values().map(|v| v.1 as f64).sum::<f64>() / n;
        // The last snapshot event reports the copies of steps 1..steps-1 sent so far.
        let sent = last.values().map(|v| v.2 as f64).sum::<f64>() / n / (steps - 1) as f64;
        println!(
            "copies={copies} step_ms={:.1} own_MiB={:.2} held_MiB={:.2} wire_per_step_KiB={:.1} minimum_KiB={:.1}",
            mean * 1e3,
            own / 1048576.0,
            held / 1048576.0,
            sent / 1024.0,
            per_member / 1024.0
        );
    }
}
