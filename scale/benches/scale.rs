//! The scale run (issue 22 item 3).
//!
//! ```text
//! cargo bench -p ninelives-scale --bench scale -- [--nodes 500,1000,2000,6250] [--faults 5]
//!     [--idle-secs 10] [--round-ms 200] [--agent-poll-ms 100] [--agent-ttl 5] [--connections 16]
//!     [--stall-secs 6] [--agent-own-connections] [--etcd-arg --max-request-bytes=67108864] [--manifest examples/longcat-2.0.yaml]
//! ```
//!
//! `--agent-ttl` overrides the manifest's heartbeat TTL for the agents and the brain's outage
//! policy (keepalives cost one request per node per TTL/3); `--connections` is the number of
//! gRPC connections the in-process agents share; `--stall-secs` stops etcd (SIGSTOP) for that
//! long after the idle window, before the faults; `--agent-own-connections` makes every agent
//! connect afresh for each session, as a real agent does, instead of sharing the pool.
//!
//! ```text
//! ```
//!
//! Per node count: real etcd, the agents, the simulated members and the real control loop at
//! the reference layout scaled to N nodes; prints a markdown table per run.

#![allow(missing_docs)]

use ninelives_scale::{Kind, Options, Report, percentile, run};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut nodes = vec![500u32];
    let mut faults = 5usize;
    let mut idle = 10u64;
    let mut round = 200u64;
    let mut agent_poll = 100u64;
    let mut agent_ttl: Option<i64> = None;
    let mut connections = 16usize;
    let mut stall: Option<u64> = None;
    let mut own = false;
    let mut etcd_args = Vec::new();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut manifest = format!("{root}/examples/longcat-2.0.yaml");
    let mut probe: Vec<u32> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--nodes" => nodes = value.split(',').filter_map(|v| v.parse().ok()).collect(),
            "--faults" => faults = value.parse().unwrap_or(faults),
            "--idle-secs" => idle = value.parse().unwrap_or(idle),
            "--round-ms" => round = value.parse().unwrap_or(round),
            "--agent-poll-ms" => agent_poll = value.parse().unwrap_or(agent_poll),
            "--agent-ttl" => agent_ttl = value.parse().ok(),
            "--connections" => connections = value.parse().unwrap_or(connections),
            "--stall-secs" => stall = value.parse().ok(),
            "--agent-own-connections" => {
                own = true;
                i += 1;
                continue;
            }
            "--etcd-arg" => etcd_args.push(value),
            "--manifest" => manifest = value,
            "--probe" => probe = value.split(',').filter_map(|v| v.parse().ok()).collect(),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
    else {
        eprintln!("no runtime");
        std::process::exit(1);
    };
    if !probe.is_empty() {
        println!(
            "| nodes | first decide s | placement value MB | control KB | record KB | publish txn s | keys read/round | MB read/round | read wall ms | read CPU ms | parse CPU ms | decide CPU ms | etcd DB MB |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for n in &probe {
            match ninelives_scale::probe(&manifest, *n, (*n / 100).max(8), 10) {
                Ok(p) => println!(
                    "| {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.2} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
                    p.nodes,
                    p.first_decide_s,
                    p.placement_bytes as f64 / 1e6,
                    p.control_bytes as f64 / 1e3,
                    p.record_bytes as f64 / 1e3,
                    p.publish_s,
                    p.read_keys,
                    p.read_bytes as f64 / 1e6,
                    p.read_ms,
                    p.read_cpu_ms,
                    p.parse_cpu_ms,
                    p.decide_cpu_ms,
                    p.db_bytes / 1e6
                ),
                Err(e) => println!("| {n} | probe failed: {e} |"),
            }
        }
        return;
    }
    let mut reports = Vec::new();
    for n in nodes {
        let mut o = Options::for_nodes(&manifest, n);
        o.faults_per_kind = faults;
        o.idle = std::time::Duration::from_secs(idle);
        o.round = std::time::Duration::from_millis(round);
        o.agent_poll = std::time::Duration::from_millis(agent_poll);
        o.etcd_args = etcd_args.clone();
        o.agent_ttl = agent_ttl;
        o.connections = connections;
        o.stall = stall.map(std::time::Duration::from_secs);
        o.agent_own_connections = own;
        match runtime.block_on(run(&o)) {
            Ok(r) => reports.push(r),
            Err(e) => eprintln!("{n} nodes: harness error: {e}"),
        }
    }
    print_tables(&reports, &etcd_args);
}

fn ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |s| format!("{:.0}", s * 1e3))
}

fn print_tables(reports: &[Report], etcd_args: &[String]) {
    println!("\netcd flags: {etcd_args:?}; load average at the end: {}", ninelives_scale::load_average());
    println!(
        "| nodes | chips | gen 1 joined | idle round wall ms | loop CPU ms/round | read ms | keys read/round | bytes read/round | placement value | recovery record | largest value written | largest txn | idle etcd req/s | idle etcd MB/s | etcd DB MB | RSS MB | view lists | agents' TTL | agents started | not in sync at start | loop CPU total s | idle CPU harness/etcd cores | etcd peak RSS MB | broke |"
    );
    println!(
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for r in reports {
        println!(
            "| {} | {} | {} s | {:.1} | {:.1} | {:.1} | {} | {:.2} MB | {:.2} MB | {:.1} KB | {:.2} MB | {:.2} MB | {:.0} | {:.1} | {:.1} | {:.0} | {} | {} s | {:.1} s | {} | {:.1} | {:.2}/{:.2} | {:.0} | {} |",
            r.nodes,
            r.chips,
            r.first_generation_s.map_or("–".into(), |s| format!("{s:.1}")),
            r.idle_round_ms,
            r.idle_cpu_ms,
            r.idle_read_ms,
            r.read_keys,
            r.read_bytes as f64 / 1e6,
            r.placement_bytes as f64 / 1e6,
            r.record_bytes as f64 / 1e3,
            r.largest_write as f64 / 1e6,
            r.largest_txn as f64 / 1e6,
            r.idle_etcd_rps,
            r.idle_etcd_bps / 1e6,
            r.db_bytes / 1e6,
            r.rss_bytes as f64 / 1e6,
            r.view_lists,
            r.agent_ttl,
            r.startup_s,
            r.stragglers,
            r.loop_cpu_s,
            r.idle_process_cpu,
            r.idle_etcd_cpu,
            r.etcd_rss_peak as f64 / 1e6,
            r.broke.clone().unwrap_or_else(|| "no".into()).replace('|', "/"),
        );
    }
    for r in reports.iter().filter(|r| r.stall.is_some()) {
        println!("\n{} nodes, etcd stall: {}", r.nodes, r.stall.clone().unwrap_or_default());
    }
    println!(
        "\n| nodes | group values written | collected | largest group value | largest value stored | members' plan read (last generation) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in reports {
        println!(
            "| {} | {} | {} | {:.1} KB | {:.1} KB | {:.2} MB |",
            r.nodes,
            r.group_writes,
            r.group_deletes,
            r.largest_group as f64 / 1e3,
            r.largest_stored as f64 / 1e3,
            r.member_plan_bytes as f64 / 1e6
        );
    }
    println!(
        "\n| nodes | fault | n | visible→detected p50/p99/max ms | visible→committed p50/p99/max | visible→all acked p50/p99/max | visible→completed p50/p99/max | injected→committed p50/p99/max | etcd requests/failure | etcd MB/failure | apiserver writes/failure (events+status+pods) | tiers |"
    );
    println!("|---:|---|---:|---|---|---|---|---|---:|---:|---|---|");
    for r in reports {
        for kind in [Kind::Chip, Kind::Node, Kind::Rack, Kind::Flap] {
            let f: Vec<_> = r.faults.iter().filter(|f| f.kind == kind).collect();
            if f.is_empty() {
                continue;
            }
            let col = |get: fn(&ninelives_scale::FaultResult) -> Option<f64>| {
                let v: Vec<f64> = f.iter().filter_map(|x| get(x)).collect();
                format!(
                    "{}/{}/{} ({} of {})",
                    ms(percentile(&v, 50.0)),
                    ms(percentile(&v, 99.0)),
                    ms(percentile(&v, 100.0)),
                    v.len(),
                    f.len()
                )
            };
            let injected =
                |x: &ninelives_scale::FaultResult| x.committed.zip(x.inject_to_visible).map(|(c, v)| c + v);
            let v: Vec<f64> = f.iter().filter_map(|x| injected(x)).collect();
            let from_injection = format!(
                "{}/{}/{}",
                ms(percentile(&v, 50.0)),
                ms(percentile(&v, 99.0)),
                ms(percentile(&v, 100.0))
            );
            let n = f.len() as f64;
            let kube = |get: fn(&ninelives_scale::KubeWrites) -> u64| {
                f.iter().map(|x| get(&x.kube) as f64).sum::<f64>() / n
            };
            let writes = format!(
                "{:.1} ({:.1}+{:.1}+{:.1})",
                kube(ninelives_scale::KubeWrites::total),
                kube(|k| k.events),
                kube(|k| k.status),
                kube(|k| k.pods)
            );
            let req = f.iter().map(|x| x.requests).sum::<f64>() / f.len() as f64;
            let mb = f.iter().map(|x| x.bytes).sum::<f64>() / f.len() as f64 / 1e6;
            let mut tiers: Vec<String> = f.iter().flat_map(|x| x.tiers.clone()).collect();
            tiers.sort();
            tiers.dedup();
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1} | {} | {} |",
                r.nodes,
                kind.as_str(),
                f.len(),
                col(|x| x.detected),
                col(|x| x.committed),
                col(|x| x.acked),
                col(|x| x.completed),
                from_injection,
                req,
                mb,
                writes,
                tiers.join(", ")
            );
        }
    }
}
