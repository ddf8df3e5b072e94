//! Expert-parallel training with members as threads of this process, a real etcd and real TCP:
//! W members produce the same parameters, bit for bit, as one member and as the single-process
//! trainer. (Process-level tests, including kill -9, are in `cli/tests/launch.rs`.)

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// One member advertising another host than the others (`advertise` is everyone else's).
    advertise_one: Option<(u32, &'a str)>,
    reconnect_attempts: u32,
    hook: Hook,
}

impl Setup<'_> {
    fn new(workers: u32, redundant: u32) -> Self {
        Self {
            workers,
            redundant,
            keep_last: 10,
            listen: [127, 0, 0, 1],
            advertise: None,
            advertise_one: None,
            reconnect_attempts: ninelives_worker::dist::member::DEFAULT_RECONNECT_ATTEMPTS,
            hook: no_aborts(),
        }
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
                advertise: match setup.advertise_one {
                    Some((one, host)) if one == rank => Some(host.to_string()),
                    _ => setup.advertise.map(str::to_string),
                },
                ttl_seconds: 3,
                step_timeout: Duration::from_secs(30),
                join_timeout: Duration::from_secs(60),
                checkpoint_every: 2,
                security: Security::Authenticated(JobAuth::new(
                    format!("test/{job}"),
                    JobKey::from_bytes(b"a test job key of thirty-two bytes").unwrap(),
                )),
                reconnect_attempts: setup.reconnect_attempts,
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
                // A predecessor's record whose deletion never reached etcd (it exited during an
                // outage after retention removed the directory): the next commit clears it.
                let stale = serde_json::json!({"step": 1, "location": "/gone/step-000000000001"});
                link.put(&job_keys("records").checkpoint(1), stale.to_string().into_bytes(), None).unwrap();
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
    // Commits at 2, 4 and the last step 5; keep-last-2 removed 2, and its record with it; the
    // stale record of step 1 went with the commits too.
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

/// A loopback TCP proxy in front of one member: it forwards every connection to `target`, and
/// on command resets them (RST to both ends: SO_LINGER 0, then close).
struct Proxy {
    /// Cut the next connection that carries a chunk from its client: forward half of the chunk,
    /// then reset (once).
    cut_next: Arc<AtomicBool>,
    /// Reset every connection, open or new, until cleared.
    refuse: Arc<AtomicBool>,
    /// Connections reset so far.
    resets: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(listen: SocketAddr, target: SocketAddr) -> Self {
        let listener = TcpListener::bind(listen).unwrap();
        listener.set_nonblocking(true).unwrap();
        let proxy = Self {
            cut_next: Arc::default(),
            refuse: Arc::default(),
            resets: Arc::default(),
            stop: Arc::default(),
        };
        let (cut, refuse, resets, stop) =
            (proxy.cut_next.clone(), proxy.refuse.clone(), proxy.resets.clone(), proxy.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                if refuse.load(Ordering::SeqCst) {
                    reset(client, None, &resets);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else { continue };
                let (cut, refuse, resets, stop) = (cut.clone(), refuse.clone(), resets.clone(), stop.clone());
                std::thread::spawn(move || pump(client, server, &cut, &refuse, &resets, &stop));
            }
        });
        proxy
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Closes both ends with a reset (SO_LINGER 0).
fn reset(a: TcpStream, b: Option<TcpStream>, resets: &AtomicU64) {
    for s in std::iter::once(a).chain(b) {
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
    }
    resets.fetch_add(1, Ordering::SeqCst);
}

/// Forwards bytes both ways (non-blocking, one buffer per direction) until either end closes,
/// the proxy stops, or a reset is ordered.
fn pump(
    client: TcpStream,
    server: TcpStream,
    cut: &AtomicBool,
    refuse: &AtomicBool,
    resets: &AtomicU64,
    stop: &AtomicBool,
) {
    use std::io::{ErrorKind, Read, Write};
    client.set_nonblocking(true).unwrap();
    server.set_nonblocking(true).unwrap();
    let (mut up, mut down) = (Vec::new(), Vec::new());
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if refuse.load(Ordering::SeqCst) {
            return reset(client, Some(server), resets);
        }
        let (mut progress, mut cut_now) = (false, false);
        for (from, to, buf, upward) in
            [(&client, &server, &mut up, true), (&server, &client, &mut down, false)]
        {
            if buf.is_empty() {
                match { from }.read(&mut chunk) {
                    Ok(0) => return, // an orderly end: both sockets close with it
                    Ok(n) => {
                        progress = true;
                        if upward && n >= 2 && cut.swap(false, Ordering::SeqCst) {
                            // Half a chunk reaches the member, then the connection is reset
                            // mid-frame, mid-step.
                            let mut to = to;
                            let _ = to.set_nonblocking(false);
                            let _ = to.write_all(&chunk[..n / 2]);
                            cut_now = true;
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
            if !buf.is_empty() {
                match { to }.write(buf) {
                    Ok(n) => {
                        progress = true;
                        buf.drain(..n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        }
        if cut_now {
            return reset(client, Some(server), resets);
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The proxy of a run, started once the proxied member joined.
type SharedProxy = Arc<Mutex<Option<Proxy>>>;

/// What the members of a run with a proxy reported.
#[derive(Default)]
struct Seen {
    /// (rank, generation) of every join.
    joined: Vec<(u32, u64)>,
    /// (rank, reason) of every abandoned step.
    aborted: Vec<(u32, String)>,
    /// Links re-established, and reconnect budgets exhausted, over all members.
    restored: u64,
    failed: u64,
}

/// Rank 1 advertises 127.0.0.2, where a proxy listens (started once rank 1 joins, from its
/// registered address) and forwards to rank 1's listener on 127.0.0.1: rank 0's link to rank 1
/// goes through the proxy. `on_step(rank 0's step, proxy)` injects the fault; `after` gets
/// every event first. Returns the leader's digest.
fn run_through_proxy(
    etcd: &EtcdServer,
    job: &str,
    config: &TrainerConfig,
    dir: &Path,
    reconnect_attempts: u32,
    on_step: impl Fn(u64, &Proxy) + Send + Sync + 'static,
    after: impl Fn(u32, &MemberEvent<'_>, &Proxy) + Send + Sync + 'static,
) -> (String, SharedProxy, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let link = Arc::new(Etcd::connect(&[etcd.endpoint()], job_keys(job)).unwrap());
    let proxy: SharedProxy = Arc::default();
    let hook: Hook = {
        let (proxy, seen) = (proxy.clone(), seen.clone());
        Arc::new(move |rank, e| {
            let mut slot = proxy.lock().unwrap();
            match e {
                MemberEvent::Joined { generation, .. } => {
                    seen.lock().unwrap().joined.push((rank, *generation));
                    if rank == 1 && slot.is_none() {
                        let advertised = link.members().unwrap()[&1].addr;
                        assert_eq!(advertised.ip(), IpAddr::from([127, 0, 0, 2]));
                        let target = SocketAddr::from(([127, 0, 0, 1], advertised.port()));
                        *slot = Some(Proxy::start(advertised, target));
                    }
                }
                MemberEvent::Aborted { reason, .. } => {
                    eprintln!("rank {rank} aborted: {reason}");
                    seen.lock().unwrap().aborted.push((rank, reason.to_string()))
                }
                MemberEvent::Reconnects { restored, failed, .. } => {
                    eprintln!("rank {rank}: {restored} links re-established, {failed} given up");
                    let mut seen = seen.lock().unwrap();
                    seen.restored += restored;
                    seen.failed += failed;
                }
                MemberEvent::Step(r) if rank == 0 => {
                    eprintln!("rank 0 step {}", r.step);
                    if let Some(p) = slot.as_ref() {
                        on_step(r.step, p);
                    }
                }
                _ => {}
            }
            if let Some(p) = slot.as_ref() {
                after(rank, e, p);
            }
        })
    };
    let setup = Setup { advertise_one: Some((1, "127.0.0.2")), reconnect_attempts, hook, ..Setup::new(2, 0) };
    let digest = run_members(etcd, job, &setup, config, dir);
    (digest, proxy, seen)
}

/// A reset connection between two live members (a real proxy in between sends RST to both ends
/// in the middle of a frame, mid-step) is re-established within the generation: the step's
/// messages the other side may not have received are sent again, repeats are ignored, and the
/// job finishes in its first generation, without a recovery, bit-identical to one process.
#[test]
fn a_reset_connection_is_re_established_in_the_same_generation_bit_identically() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let steps = 4;
    let config = common::small_config(steps);
    // Reset after steps 1 and 2 (each time the next chunk rank 0 sends to rank 1).
    let on_step = |step: u64, p: &Proxy| {
        if step == 1 || step == 2 {
            p.cut_next.store(true, Ordering::SeqCst);
        }
    };
    let (digest, proxy, seen) =
        run_through_proxy(&etcd, "reset", &config, &dir.path().join("reset"), 3, on_step, |_, _, _| {});
    let resets = proxy.lock().unwrap().as_ref().map(|p| p.resets.load(Ordering::SeqCst));
    let seen = seen.lock().unwrap();
    assert_eq!(resets, Some(2), "the proxy reset two connections");
    assert!(seen.aborted.is_empty(), "no step was abandoned: {:?}", seen.aborted);
    assert!(seen.joined.iter().all(|&(_, g)| g == 1), "one generation only: {:?}", seen.joined);
    assert_eq!(seen.failed, 0);
    assert!(seen.restored >= 2, "each reset link was re-established ({} reconnects)", seen.restored);
    assert_eq!(digest, single_process(&config, steps), "re-sent messages change no bit");
}

/// A reset that persists (the proxy resets every connection, new ones too) exhausts the
/// reconnect budget quickly, far within the step timeout (30 s here): the step is abandoned and
/// the failure escalates as before. The next generation (published here as the control loop
/// would, once the network is back) finishes the job bit-identically.
#[test]
fn a_reset_that_persists_past_the_reconnect_budget_escalates() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let steps = 4;
    let config = common::small_config(steps);
    let link = Arc::new(Etcd::connect(&[etcd.endpoint()], job_keys("persist")).unwrap());
    let armed = Arc::new(Mutex::new(None::<std::time::Instant>));
    let escalated_after = Arc::new(Mutex::new(None::<Duration>));
    let on_step = {
        let armed = armed.clone();
        move |step: u64, p: &Proxy| {
            let mut armed = armed.lock().unwrap();
            if step == 1 && armed.is_none() {
                p.refuse.store(true, Ordering::SeqCst);
                *armed = Some(std::time::Instant::now());
            }
        }
    };
    let after = {
        let (armed, escalated_after) = (armed.clone(), escalated_after.clone());
        move |_rank: u32, e: &MemberEvent<'_>, p: &Proxy| {
            let MemberEvent::Aborted { generation: 1, reason } = e else { return };
            let mut escalated = escalated_after.lock().unwrap();
            if escalated.is_none() && reason.contains("reconnect attempts failed") {
                *escalated = armed.lock().unwrap().map(|t| t.elapsed());
                // The network is back; the control loop publishes the next generation.
                p.refuse.store(false, Ordering::SeqCst);
                let mut next = link.plan().unwrap().unwrap();
                next.placement.generation += 1;
                next.restore = Restore::InMemory;
                next.tier = ninelives_core::generation::GenerationTier::Reroute;
                link.put(&link.keys().placement(), serde_json::to_vec(&next).unwrap(), None).unwrap();
            }
        }
    };
    let (digest, _proxy, seen) =
        run_through_proxy(&etcd, "persist", &config, &dir.path().join("persist"), 2, on_step, after);
    let seen = seen.lock().unwrap();
    let escalated =
        escalated_after.lock().unwrap().unwrap_or_else(|| panic!("no escalation: {:?}", seen.aborted));
    assert!(
        escalated < Duration::from_secs(10),
        "the budget, not the step timeout, bounded it: {escalated:?}"
    );
    assert!(seen.failed >= 1, "the exhausted budget is counted");
    assert!(seen.joined.iter().any(|&(_, g)| g == 2), "the next generation was joined: {:?}", seen.joined);
    assert_eq!(digest, single_process(&config, steps));
}
