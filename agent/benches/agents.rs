//! Thousands of node agents in one process against one real etcd.
//!
//! ```text
//! cargo bench -p ninelives-agent --bench agents -- [--nodes 100,1000,6250] [--idle-secs 30]
//!     [--faults 200] [--connections 32] [--poll-ms 200] [--ttl 10] [--naive-max 1000] [--batch 250]
//! ```
//!
//! For each scale: start a fresh etcd, start N agents in batches of `--batch` (8 chips each,
//! in-memory probes, sharing a pool of gRPC connections), measure etcd requests/s over an idle window (from etcd's own
//! `grpc_server_msg_received_total`, which counts unary calls and every stream message such as
//! lease keepalives) and key writes (`etcd_mvcc_put_total`), then inject faults at random chips
//! and measure fault-to-visible latency (injection → the chip's new state seen by a watcher).
//! At scales up to `--naive-max` nodes, the same idle window is measured for the alternative a user might pick: one
//! lease per chip (8 keepalive streams per node), and the ratio of etcd requests is printed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, PutOptions, WatchOptions};
use ninelives_agent::etcd::EtcdSource;
use ninelives_agent::faults;
use ninelives_agent::probe::{ChipProbe, ChipReading, ProbeError};
use ninelives_agent::{Agent, AgentConfig};
use ninelives_core::keyspace::Keyspace;
use ninelives_testkit::{EtcdServer, http_get};

const CHIPS: u32 = 8;

/// In-memory chips: heartbeat derived from the clock, a fault flag per chip.
struct MemProbe {
    started: Instant,
    faulty: Vec<AtomicBool>,
}

impl MemProbe {
    fn new() -> Self {
        Self { started: Instant::now(), faulty: (0..CHIPS).map(|_| AtomicBool::new(false)).collect() }
    }
}

impl ChipProbe for MemProbe {
    fn discover(&self) -> Result<Vec<u32>, ProbeError> {
        Ok((0..CHIPS).collect())
    }

    fn read(&self, index: u32) -> Result<ChipReading, ProbeError> {
        let beat = self.started.elapsed().as_millis() as u64 / 50;
        let mut reading = ChipReading::healthy(beat);
        if self.faulty.get(index as usize).is_some_and(|f| f.load(Ordering::Relaxed)) {
            reading.error_code = faults::HBM_ECC_UNCORRECTABLE.to_string();
        }
        Ok(reading)
    }

    fn take_clear_request(&self, _index: u32) -> bool {
        false
    }
}

struct Options {
    nodes: Vec<usize>,
    idle_secs: u64,
    faults: usize,
    connections: usize,
    poll_ms: u64,
    ttl: i64,
    naive_max: usize,
    batch: usize,
}

fn options() -> Options {
    let mut o = Options {
        nodes: vec![100, 1000, 6250],
        idle_secs: 30,
        faults: 200,
        connections: 32,
        poll_ms: 200,
        ttl: 10,
        naive_max: 1000,
        batch: 250,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--nodes" => o.nodes = value.split(',').filter_map(|v| v.parse().ok()).collect(),
            "--idle-secs" => o.idle_secs = value.parse().unwrap_or(o.idle_secs),
            "--faults" => o.faults = value.parse().unwrap_or(o.faults),
            "--connections" => o.connections = value.parse().unwrap_or(o.connections),
            "--poll-ms" => o.poll_ms = value.parse().unwrap_or(o.poll_ms),
            "--ttl" => o.ttl = value.parse().unwrap_or(o.ttl),
            "--batch" => o.batch = value.parse::<usize>().unwrap_or(o.batch).max(1),
            "--naive-max" => o.naive_max = value.parse().unwrap_or(o.naive_max),
            // `cargo bench` passes --bench; ignore anything else.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// (gRPC messages received, keys put) from etcd's /metrics.
fn etcd_counters(addr: SocketAddr) -> (f64, f64) {
    let text = http_get(addr, "/metrics").unwrap_or_default();
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    };
    let puts = sum("etcd_mvcc_put_total").max(sum("etcd_debugging_mvcc_put_total"));
    (sum("grpc_server_msg_received_total"), puts)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Row {
    nodes: usize,
    startup: Duration,
    idle_rps: f64,
    idle_puts: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    seen: usize,
    naive_rps: Option<f64>,
}

async fn measure_idle(addr: SocketAddr, secs: u64) -> (f64, f64) {
    let (m0, p0) = etcd_counters(addr);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (m1, p1) = etcd_counters(addr);
    ((m1 - m0) / secs as f64, p1 - p0)
}

async fn run_scale(o: &Options, nodes: usize) -> Row {
    let etcd = EtcdServer::start().expect("etcd");
    let addr: SocketAddr = etcd.endpoint().trim_start_matches("http://").parse().expect("addr");
    let keys = Keyspace::new("/bench/");
    let mut pool = Vec::new();
    for _ in 0..o.connections.max(1) {
        pool.push(Client::connect([etcd.endpoint()], None).await.expect("connect"));
    }

    let started = Instant::now();
    let mut agents = Vec::with_capacity(nodes);
    let mut probes = Vec::with_capacity(nodes);
    for n in 0..nodes {
        let probe = Arc::new(MemProbe::new());
        let source = EtcdSource::Shared(Box::new(pool[n % pool.len()].clone()));
        let mut config = AgentConfig::new(&format!("node-{n:05}"), source, probe.clone());
        config.keys = keys.clone();
        config.ttl = o.ttl;
        config.poll_interval = Duration::from_millis(o.poll_ms);
        agents.push(Agent::start(config).await.expect("agent"));
        probes.push(probe);
        // Roll out in batches, as a DaemonSet does: thousands of agents registering in the same
        // instant is a start-up storm no real cluster sees.
        if agents.len() % o.batch == 0 || agents.len() == nodes {
            while agents.iter().any(|a| !a.is_ready()) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let startup = started.elapsed();
    eprintln!("{nodes} agents ready in {startup:.1?}");
    // Let start-up traffic drain before the idle window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle_rps, idle_puts) = measure_idle(addr, o.idle_secs).await;
    eprintln!("{nodes} agents idle: {idle_rps:.0} etcd requests/s, {idle_puts} puts");

    // Fault-to-visible: a watcher on the node keys; faults injected at ~50/s at random chips.
    let mut watch_client = Client::connect([etcd.endpoint()], None).await.expect("connect");
    let mut stream =
        watch_client.watch(keys.nodes(), Some(WatchOptions::new().with_prefix())).await.expect("watch");
    let injected: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let (inj, lat) = (injected.clone(), latencies.clone());
    let watcher = tokio::spawn(async move {
        while let Ok(Some(msg)) = stream.message().await {
            let now = Instant::now();
            for e in msg.events() {
                if e.event_type() != EventType::Put {
                    continue;
                }
                let Some(kv) = e.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let injected_at = inj.lock().expect("lock").remove(&key);
                if let Some(at) = injected_at
                    && String::from_utf8_lossy(kv.value()).contains("failed")
                {
                    lat.lock().expect("lock").push(now.duration_since(at));
                }
            }
        }
    });
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut chosen = std::collections::HashSet::new();
    let count = o.faults.min(nodes * CHIPS as usize);
    while chosen.len() < count {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let node = (rng % nodes as u64) as usize;
        let chip = ((rng >> 32) % u64::from(CHIPS)) as u32;
        if !chosen.insert((node, chip)) {
            continue;
        }
        injected.lock().expect("lock").insert(keys.chip(&format!("node-{node:05}"), chip), Instant::now());
        probes[node].faulty[chip as usize].store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    watcher.abort();
    let mut lat = latencies.lock().expect("lock").clone();
    lat.sort();
    let seen = lat.len();
    let (p50, p99, max) =
        (percentile(&lat, 50.0), percentile(&lat, 99.0), lat.last().copied().unwrap_or_default());
    eprintln!("{nodes} agents: {seen}/{count} faults visible, p50 {p50:?} p99 {p99:?} max {max:?}");

    for agent in agents {
        agent.shutdown().await;
    }

    let naive_rps =
        if nodes <= o.naive_max { Some(naive_idle(o, &etcd, &pool, addr, nodes).await) } else { None };
    Row { nodes, startup, idle_rps, idle_puts, p50, p99, max, seen: seen.min(count), naive_rps }
}

/// The naive alternative: every chip holds its own lease (with its key under it) and keeps it
/// alive at TTL/3 — presence per chip instead of per node.
async fn naive_idle(o: &Options, etcd: &EtcdServer, pool: &[Client], addr: SocketAddr, nodes: usize) -> f64 {
    let period = Duration::from_secs_f64(o.ttl as f64 / 3.0);
    let established = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in 0..nodes {
        for chip in 0..CHIPS {
            let mut client = pool[(n * CHIPS as usize + chip as usize) % pool.len()].clone();
            let key = format!("/naive/nodes/node-{n:05}/chips/{chip}");
            let ttl = o.ttl;
            let established = established.clone();
            tasks.push(tokio::spawn(async move {
                let Ok(lease) = client.lease_grant(ttl, None).await else { return };
                let _ = client
                    .put(key, r#"{"state":"healthy"}"#, Some(PutOptions::new().with_lease(lease.id())))
                    .await;
                let Ok((mut keeper, mut stream)) = client.lease_keep_alive(lease.id()).await else { return };
                established.fetch_add(1, Ordering::Relaxed);
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
                    if keeper.keep_alive().await.is_err() || stream.message().await.is_err() {
                        return;
                    }
                }
            }));
        }
    }
    // Measure only once every chip's lease is kept alive (start-up traffic excluded).
    let want = nodes * CHIPS as usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    while established.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let up = established.load(Ordering::Relaxed);
    if up < want {
        eprintln!("naive: only {up}/{want} chip leases established within 120 s");
    }
    tokio::time::sleep(period).await;
    let _ = etcd;
    let (rps, _) = measure_idle(addr, o.idle_secs).await;
    eprintln!("naive per-chip leases, {nodes} nodes: {rps:.0} etcd requests/s");
    for t in tasks {
        t.abort();
    }
    rps
}

fn main() {
    let o = options();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut rows = Vec::new();
    for &nodes in &o.nodes {
        rows.push(runtime.block_on(run_scale(&o, nodes)));
    }
    println!(
        "\nnode agents vs one etcd: TTL {} s (keepalive every {:.1} s), probe poll {} ms, {} shared gRPC connections, idle window {} s",
        o.ttl,
        o.ttl as f64 / 3.0,
        o.poll_ms,
        o.connections,
        o.idle_secs
    );
    println!(
        "| nodes | chips | start-up | idle etcd req/s | idle key writes | faults seen | fault→visible p50 | p99 | max | naive per-chip leases req/s | naive / ninelives |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let (naive, ratio) = match r.naive_rps {
            Some(n) => (format!("{n:.0}"), format!("{:.1}×", n / r.idle_rps.max(1e-9))),
            None => ("–".into(), "–".into()),
        };
        println!(
            "| {} | {} | {:.1} s | {:.0} | {} | {}/{} | {:.0} ms | {:.0} ms | {:.0} ms | {naive} | {ratio} |",
            r.nodes,
            r.nodes * CHIPS as usize,
            r.startup.as_secs_f64(),
            r.idle_rps,
            r.idle_puts,
            r.seen,
            o.faults.min(r.nodes * CHIPS as usize),
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.max.as_secs_f64() * 1e3,
        );
    }
}
