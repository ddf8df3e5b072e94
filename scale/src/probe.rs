//! The per-round cost of the observation as it was before issue 22 item 1 (the whole plan in
//! the one `placement` value, the job prefix read every round), past the limits it hit.
//!
//! The real loop cannot publish or read the reference layout's generation beyond ~250 nodes
//! (etcd's request limit, then the client's 4 MiB response limit, which `EtcdStore` cannot
//! raise). This probe measures what a round would cost if both limits were lifted: N real
//! agents, the brain's own first generation (from the pure `decide`, written in one
//! transaction to an etcd started with a raised `--max-request-bytes`), a registered member
//! and an ack per rank, then rounds of exactly what `ControlLoop::step` does when nothing
//! changes: the same one-transaction read of the job and `nodes/` prefixes (through a client
//! whose response limit is raised), `Observation::from_kvs`, parsing the placement, the plan
//! and the record, and `decide`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use ninelives_agent::etcd::EtcdSource;
use ninelives_agent::{Agent, AgentConfig};
use ninelives_core::generation::{DistPlan, from_published_generation};
use ninelives_core::keyspace::Keyspace;
use ninelives_core::placement::Placement;
use ninelives_core::recovery::{Action, BrainConfig, MemberAck, Observation, RecoveryState, decide};
use ninelives_testkit::EtcdServer;

use crate::{JOB, MemProbe, NS, ScaleError, TXN_OPS, node_name, thread_cpu_ns};

/// What one probe measured.
#[derive(Clone, Debug, Default)]
pub struct Probe {
    /// Nodes.
    pub nodes: u32,
    /// Wall time of the first `decide` (the initial placement), seconds.
    pub first_decide_s: f64,
    /// The placement value (DistPlan JSON), bytes.
    pub placement_bytes: u64,
    /// The control record, bytes.
    pub control_bytes: u64,
    /// The recovery record, bytes.
    pub record_bytes: u64,
    /// Wall time of the generation's one-transaction write, seconds.
    pub publish_s: f64,
    /// Keys and bytes returned by one round's read.
    pub read_keys: u64,
    /// Bytes of one round's read.
    pub read_bytes: u64,
    /// Mean wall time of the read, ms.
    pub read_ms: f64,
    /// Mean CPU of the read (client decode), ms.
    pub read_cpu_ms: f64,
    /// Mean CPU of parsing the observation, placement, plan and record, ms.
    pub parse_cpu_ms: f64,
    /// Mean CPU of `decide` with nothing changed, ms.
    pub decide_cpu_ms: f64,
    /// etcd DB size after the generation, bytes.
    pub db_bytes: f64,
}

/// Runs the probe at `nodes` (with `spares`) from `manifest`; `rounds` steady rounds.
pub fn probe(manifest: &str, nodes: u32, spares: u32, rounds: u32) -> Result<Probe, ScaleError> {
    let err = |what: &'static str| move |e: String| ScaleError(format!("{what}: {e}"));
    let text = std::fs::read_to_string(manifest).map_err(|e| err("manifest")(e.to_string()))?;
    let mut job =
        ninelives_core::manifest::parse_job(&text).map_err(|v| err("manifest")(format!("{v:?}")))?;
    job.spec.topology.nodes = nodes;
    job.spec.topology.spare_nodes = spares;
    let brain =
        BrainConfig::from_spec(&job.spec).map_err(|e| err("brain")(e.to_string()))?.for_expert_parallel();
    let chips = job.spec.topology.chips_per_node;
    let etcd =
        EtcdServer::start_with_args(&["--max-request-bytes=268435456", "--quota-backend-bytes=8589934592"])
            .map_err(|e| err("etcd")(e.to_string()))?;
    let keys = Keyspace::new("/scale/");
    let job_keys = keys.job(NS, JOB);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| err("runtime")(e.to_string()))?;
    let mut out = Probe { nodes, ..Probe::default() };
    runtime.block_on(async {
        let connect = || async {
            Client::connect([etcd.endpoint()], None).await.map_err(|e| err("connect")(e.to_string()))
        };
        let mut pool = Vec::new();
        for _ in 0..16 {
            pool.push(connect().await?);
        }
        let total = nodes + spares;
        let mut agents = Vec::new();
        for n in 0..total {
            let probe = Arc::new(MemProbe::new(chips));
            let source = EtcdSource::Shared(Box::new(pool[n as usize % pool.len()].clone()));
            let mut config = AgentConfig::new(&node_name(n), source, probe);
            config.keys = keys.clone();
            config.ttl = 5;
            agents.push(Agent::start(config).await.map_err(|e| err("agent")(e.to_string()))?);
            if agents.len().is_multiple_of(500) || agents.len() == total as usize {
                let deadline = Instant::now() + Duration::from_secs(120);
                while agents.iter().any(|a| !a.is_ready()) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let client = connect().await?;
        let mut kv = client.kv_client().max_decoding_message_size(1 << 30);
        let read_txn = || {
            Txn::new().and_then(vec![
                TxnOp::get(job_keys.root(), Some(GetOptions::new().with_prefix())),
                TxnOp::get(keys.nodes(), Some(GetOptions::new().with_prefix())),
            ])
        };
        let read = |kv: &mut etcd_client::KvClient| {
            let mut kv = kv.clone();
            let txn = read_txn();
            async move {
                let r = kv.txn(txn).await.map_err(|e| err("read")(e.to_string()))?;
                let mut kvs = Vec::new();
                for op in r.op_responses() {
                    let TxnOpResponse::Get(get) = op else { continue };
                    for kv in get.kvs() {
                        kvs.push((kv.key_str().unwrap_or_default().to_string(), kv.value().to_vec()));
                    }
                }
                Ok::<_, ScaleError>(kvs)
            }
        };
        // The first generation, as the loop would publish it.
        let kvs = read(&mut kv).await?;
        let now = ninelives_control::unix_now();
        let (obs, _) =
            Observation::from_kvs(&keys, NS, JOB, now, kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        let state0 =
            RecoveryState::new((0..nodes).map(node_name).collect(), (nodes..total).map(node_name).collect());
        let t = Instant::now();
        let decision = decide(&brain, &state0, &obs, None).map_err(|e| err("decide")(e.to_string()))?;
        out.first_decide_s = t.elapsed().as_secs_f64();
        let Some((placement, control)) = decision.actions.iter().find_map(|a| match a {
            Action::PublishPlacement { placement, control } => Some((placement, control)),
            _ => None,
        }) else {
            return Err(ScaleError("the first decision published nothing".into()));
        };
        let plan = from_published_generation(&brain, &decision.state, placement, control, None)
            .map_err(|e| err("plan")(e.to_string()))?;
        // Before issue 22 item 1: the whole plan in the one `placement` value.
        let encode = |e: serde_json::Error| err("writes")(e.to_string());
        let writes = [
            (job_keys.control(), serde_json::to_string(control).map_err(encode)?),
            (job_keys.placement(), serde_json::to_string(&plan).map_err(encode)?),
            (job_keys.recovery(), decision.state.to_json()),
        ];
        for (k, v) in writes.iter() {
            if *k == job_keys.placement() {
                out.placement_bytes = v.len() as u64;
            } else if *k == job_keys.control() {
                out.control_bytes = v.len() as u64;
            } else if *k == job_keys.recovery() {
                out.record_bytes = v.len() as u64;
            }
        }
        let t = Instant::now();
        let ops = writes.iter().map(|(k, v)| TxnOp::put(k.clone(), v.clone(), None)).collect::<Vec<_>>();
        kv.txn(Txn::new().and_then(ops)).await.map_err(|e| err("publish")(e.to_string()))?;
        out.publish_s = t.elapsed().as_secs_f64();
        // Every member registered and acked.
        let mut c = client.clone();
        let lease = c.lease_grant(600, None).await.map_err(|e| err("lease")(e.to_string()))?.id();
        let ack = serde_json::to_string(&MemberAck { step: 0, generation: Some(plan.generation()) })
            .unwrap_or_default();
        let mut ops = Vec::new();
        for r in 0..nodes {
            ops.push(TxnOp::put(
                job_keys.member(r),
                format!(r#"{{"rank":{r},"addr":"127.0.0.1:0","pid":0}}"#),
                Some(PutOptions::new().with_lease(lease)),
            ));
            ops.push(TxnOp::put(job_keys.ack(plan.generation(), &r.to_string()), ack.clone(), None));
        }
        for chunk in ops.chunks(TXN_OPS) {
            kv.txn(Txn::new().and_then(chunk.to_vec())).await.map_err(|e| err("members")(e.to_string()))?;
        }
        // Steady rounds on this thread's CPU clock... the read's decode runs on the runtime's
        // workers, so it is measured on a current-thread runtime in a thread of its own.
        let state = decision.state.clone();
        let endpoint = etcd.endpoint();
        let (keys2, job_keys2, brain2) = (keys.clone(), job_keys.clone(), brain.clone());
        let measured = std::thread::spawn(move || -> Result<(f64, f64, f64, f64, u64, u64), ScaleError> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ScaleError(e.to_string()))?;
            rt.block_on(async move {
                let client =
                    Client::connect([endpoint], None).await.map_err(|e| ScaleError(e.to_string()))?;
                let mut kv = client.kv_client().max_decoding_message_size(1 << 30);
                let (mut wall, mut rcpu, mut pcpu, mut dcpu, mut nkeys, mut nbytes) =
                    (0.0, 0.0, 0.0, 0.0, 0, 0);
                for _ in 0..rounds {
                    let (t, c) = (Instant::now(), thread_cpu_ns());
                    let r = kv
                        .txn(Txn::new().and_then(vec![
                            TxnOp::get(job_keys2.root(), Some(GetOptions::new().with_prefix())),
                            TxnOp::get(keys2.nodes(), Some(GetOptions::new().with_prefix())),
                        ]))
                        .await
                        .map_err(|e| ScaleError(e.to_string()))?;
                    let mut kvs = Vec::new();
                    for op in r.op_responses() {
                        let TxnOpResponse::Get(get) = op else { continue };
                        for kv in get.kvs() {
                            kvs.push((kv.key_str().unwrap_or_default().to_string(), kv.value().to_vec()));
                        }
                    }
                    wall += t.elapsed().as_secs_f64() * 1e3;
                    let c1 = thread_cpu_ns();
                    rcpu += (c1 - c) as f64 / 1e6;
                    nkeys = kvs.len() as u64;
                    nbytes = kvs.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
                    let now = ninelives_control::unix_now();
                    let (obs, _) = Observation::from_kvs(
                        &keys2,
                        NS,
                        JOB,
                        now,
                        kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                    );
                    let pk = job_keys2.placement();
                    let bytes =
                        kvs.iter().find(|(k, _)| *k == pk).map(|(_, v)| v.as_slice()).unwrap_or_default();
                    let placement: Placement =
                        serde_json::from_slice(bytes).map_err(|e| ScaleError(e.to_string()))?;
                    let _plan: Option<DistPlan> = serde_json::from_slice(bytes).ok();
                    let rk = job_keys2.recovery();
                    let rb =
                        kvs.iter().find(|(k, _)| *k == rk).map(|(_, v)| v.as_slice()).unwrap_or_default();
                    let record = RecoveryState::parse(&rk, rb).map_err(|e| ScaleError(e.to_string()))?;
                    let c2 = thread_cpu_ns();
                    pcpu += (c2 - c1) as f64 / 1e6;
                    let _ = decide(&brain2, &record, &obs, Some(&placement))
                        .map_err(|e| ScaleError(e.to_string()))?;
                    dcpu += (thread_cpu_ns() - c2) as f64 / 1e6;
                }
                let n = f64::from(rounds.max(1));
                Ok((wall / n, rcpu / n, pcpu / n, dcpu / n, nkeys, nbytes))
            })
        });
        let _ = state;
        let (w, r, p, d, k, b) = tokio::task::spawn_blocking(move || measured.join())
            .await
            .map_err(|e| ScaleError(e.to_string()))?
            .map_err(|_| ScaleError("probe thread panicked".into()))??;
        (out.read_ms, out.read_cpu_ms, out.parse_cpu_ms, out.decide_cpu_ms, out.read_keys, out.read_bytes) =
            (w, r, p, d, k, b);
        let addr = etcd
            .endpoint()
            .trim_start_matches("http://")
            .parse()
            .map_err(|e: std::net::AddrParseError| ScaleError(e.to_string()))?;
        out.db_bytes = crate::counters(addr).db;
        for a in agents {
            a.shutdown().await;
        }
        Ok::<_, ScaleError>(())
    })?;
    Ok(out)
}
