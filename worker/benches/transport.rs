//! What authenticating the expert-parallel transport costs (issue 23): the `tiny` job
//! (`examples/tiny.yaml`) trained by W members (threads of this process, real TCP on loopback,
//! a real etcd), alternately with the authenticated transport (handshake + AES-256-GCM on
//! every frame) and with the same transport in plaintext, in the same run. Prints per mode the
//! median step time of every round's steps after the first, and the overhead.
//!
//! `cargo bench -p ninelives-worker --bench transport --profile dev -- [WORKERS] [STEPS] [ROUNDS]`
//! (defaults 2, 12, 3).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ninelives_core::generation::{Restore, initial_plan, worker_shape};
use ninelives_core::keyspace::Keyspace;
use ninelives_core::recovery::BrainConfig;
use ninelives_worker::dist::auth::{JobAuth, JobKey};
use ninelives_worker::dist::link::Security;
use ninelives_worker::dist::member::{MemberEvent, MemberOptions, run_member};
use ninelives_worker::dist::rendezvous::Etcd;
use ninelives_worker::trainer::run_with_threads;
use ninelives_worker::{CheckpointStore, TrainerConfig};

type Error = Box<dyn std::error::Error + Send + Sync>;

const TINY: &str = include_str!("../../examples/tiny.yaml");

/// Trains `steps` steps with `workers` members; returns rank 0's step seconds.
fn run(
    etcd: &ninelives_testkit::EtcdServer,
    job: &str,
    workers: u32,
    steps: u64,
    security: &Security,
) -> Result<Vec<f64>, Error> {
    let manifest = ninelives_core::manifest::parse_job(TINY).map_err(|v| format!("{v:?}"))?;
    let mut config = TrainerConfig::from_job(&manifest)?;
    config.total_steps = steps;
    let shape = BrainConfig::from_spec(&manifest.spec)?.shape;
    let keys = Keyspace::default().job("bench", job);
    let endpoints = vec![etcd.endpoint()];
    let link = Etcd::connect(&endpoints, keys.clone())?;
    link.delete(keys.root(), true)?;
    let dir = tempfile::tempdir()?;
    let corpus = Arc::new(ninelives_worker::data::Corpus::load(&["/usr/share/common-licenses"])?);
    let seconds = Arc::new(Mutex::new(Vec::new()));
    let members: Vec<_> = (0..workers)
        .map(|rank| {
            let (config, corpus, endpoints, keys) =
                (config.clone(), corpus.clone(), endpoints.clone(), keys.clone());
            let store = CheckpointStore::open(dir.path(), 2);
            let options = MemberOptions {
                rank,
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                advertise: None,
                ttl_seconds: 5,
                step_timeout: Duration::from_secs(60),
                join_timeout: Duration::from_secs(120),
                checkpoint_every: 1_000_000,
                security: security.clone(),
                reconnect_attempts: ninelives_worker::dist::member::DEFAULT_RECONNECT_ATTEMPTS,
            };
            let seconds = seconds.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let store = store.map_err(|e| e.to_string())?;
                let etcd = Arc::new(Etcd::connect(&endpoints, keys).map_err(|e| e.to_string())?);
                let record = |e: MemberEvent<'_>| match e {
                    MemberEvent::Step(r) if rank == 0 => {
                        if let Ok(mut s) = seconds.lock() {
                            s.push(r.seconds);
                        }
                    }
                    MemberEvent::Aborted { reason, .. } => eprintln!("rank {rank} aborted: {reason}"),
                    _ => {}
                };
                run_with_threads(1, || run_member(config, corpus, store, etcd, &options, record))
                    .map_err(|e| e.to_string())?
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let first = initial_plan(&worker_shape(&shape, workers), Restore::Fresh)?;
    link.put(&keys.placement(), serde_json::to_vec(&first)?, None)?;
    for m in members {
        m.join().map_err(|_| "a member panicked")??;
    }
    let s = seconds.lock().map_err(|_| "poisoned")?.clone();
    Ok(s)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// MB/s of frame sealing (AES-256-GCM, in place) over 1 MiB frames on this machine.
fn tag_throughput() -> Result<f64, Error> {
    use ninelives_worker::dist::auth::{Handshake, Side};
    let auth = JobAuth::new("bench", JobKey::from_bytes(&[7; 32])?);
    let h = Handshake { generation: 1, client: 0, server: 1, client_nonce: [1; 32], server_nonce: [2; 32] };
    let mut key = auth.frame_key(Side::Client, &h);
    let mut body = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    let mut sink = 0u8;
    for _ in 0..256 {
        sink ^= key.seal(&mut body)[0];
    }
    std::hint::black_box(sink);
    Ok(256.0 * 1.048_576 / started.elapsed().as_secs_f64())
}

fn main() -> Result<(), Error> {
    ninelives_worker::trainer::pin_candle_elementwise_pool().map_err(|e| e.to_string())?;
    let arg =
        |i: usize, default: u64| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (workers, steps, rounds) = (u32::try_from(arg(1, 2))?, arg(2, 12), arg(3, 3));
    println!("frame sealing (AES-256-GCM, 1 MiB frames): {:.0} MB/s", tag_throughput()?);
    let etcd = ninelives_testkit::EtcdServer::start()?;
    let key = JobKey::from_bytes(JobKey::generate_text()?.as_bytes())?;
    let modes = [
        ("authenticated", Security::Authenticated(JobAuth::new("bench/tiny", key))),
        ("plaintext", Security::Plaintext),
    ];
    let mut by_mode: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let started = Instant::now();
    for round in 0..rounds {
        // Alternate which mode goes first, so a drift in machine load hits both alike.
        let order: Vec<usize> = if round % 2 == 0 { vec![0, 1] } else { vec![1, 0] };
        for i in order {
            let (name, security) = &modes[i];
            let s = run(&etcd, &format!("{name}-{round}"), workers, steps, security)?;
            println!(
                "round {round} {name:>13}: median step {:.4} s over {} steps",
                median(s[1..].to_vec()),
                s.len() - 1
            );
            by_mode.entry(name).or_default().extend(s.into_iter().skip(1));
        }
    }
    let auth = median(by_mode.remove("authenticated").unwrap_or_default());
    let plain = median(by_mode.remove("plaintext").unwrap_or_default());
    println!(
        "tiny, {workers} workers, {steps} steps x {rounds} rounds ({:.0} s): authenticated {auth:.4} s/step, plaintext {plain:.4} s/step, overhead {:+.2} %",
        started.elapsed().as_secs_f64(),
        (auth / plain - 1.0) * 100.0
    );
    Ok(())
}
