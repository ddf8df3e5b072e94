//! Expert-parallel throughput and traffic: `ninelives worker launch` of `examples/tiny.yaml` with
//! 1, 2 and 4 worker processes against a real etcd on this machine.
//!
//! Run: `cargo bench -j 1 -p ninelives --bench launch` (env `NINELIVES_BENCH_STEPS`, default 6).
//! Prints per W: median tokens/s of the steps after the first, and per step the bytes every
//! worker put on the wire: the expert all-to-all (requests + replies, framing included), its
//! analytical minimum (the activations that must cross workers: for every token routed to an
//! expert served by another worker, `hidden × 4` bytes out and back in forward, and again in
//! backward), and the collective rounds (dense-gradient all-gather, norm partials, barriers).

#![allow(clippy::unwrap_used)] // a benchmark: a panic is the report

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ninelives");

fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

fn main() {
    let steps: u32 = std::env::var("NINELIVES_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    let etcd = ninelives_testkit::EtcdServer::start().unwrap();
    let manifest = format!("{}/../examples/tiny.yaml", env!("CARGO_MANIFEST_DIR"));
    println!("workers  tokens/s  a2a_bytes/step  a2a_min/step  collective_bytes/step  (tiny, {steps} steps)");
    for workers in [1u32, 2, 4] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .args([
                "worker",
                "launch",
                &manifest,
                "--workers",
                &workers.to_string(),
                "--etcd",
                &etcd.endpoint(),
            ])
            .arg("--checkpoint-dir")
            .arg(dir.path())
            .args(["--steps", &steps.to_string(), "--checkpoint-every", "1000", "--threads", "1"])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let mut rates: Vec<f64> = stdout
            .lines()
            .filter(|l| l.starts_with("[rank 0] step="))
            .skip(1)
            .filter_map(|l| field(l, "tokens_per_s"))
            .collect();
        rates.sort_by(f64::total_cmp);
        let median = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
        let traffic: Vec<&str> = stdout.lines().filter(|l| l.contains("] traffic ")).collect();
        let sum = |key: &str| traffic.iter().filter_map(|l| field(l, key)).sum::<f64>() / f64::from(steps);
        println!(
            "{workers:>7}  {median:>8.0}  {:>14.0}  {:>12.0}  {:>21.0}",
            sum("expert_bytes"),
            sum("a2a_payload_bytes"),
            sum("collective_bytes")
        );
    }
}
