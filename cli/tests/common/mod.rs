//! What the CLI's process-level tests share: a small job manifest, the uninterrupted
//! single-process reference and the parameter digest every run prints.

#![allow(clippy::unwrap_used, dead_code)] // test helpers: a panic is the failure report; each test uses a part

use std::path::Path;
use std::process::Command;

/// The `ninelives` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ninelives");

/// A small MoE (2 layers × 4 routed experts, 2 micro-batches of 2 per step on 32-token
/// sequences) on one-chip nodes: fast enough to train hundreds of steps in a test.
pub struct SmallJob<'a> {
    /// `metadata.name`.
    pub name: &'a str,
    /// Nodes (one chip each), also the expert-parallel size.
    pub nodes: u32,
    /// `training.steps`.
    pub steps: u64,
    /// `checkpoint.intervalSteps`.
    pub interval: u64,
    /// `checkpoint.keepLast`.
    pub keep_last: u32,
    /// `parallelism.redundantExperts`.
    pub redundant: u32,
    /// `checkpoint.peerCopies`.
    pub peer_copies: u32,
}

impl SmallJob<'_> {
    /// The defaults: 4 nodes, 8 steps, a checkpoint every 2, keep 10, no redundancy or copies.
    pub fn named(name: &str) -> SmallJob<'_> {
        SmallJob { name, nodes: 4, steps: 8, interval: 2, keep_last: 10, redundant: 0, peer_copies: 0 }
    }

    /// Writes `<dir>/<name>.yaml` and returns its path.
    pub fn write(&self, dir: &Path) -> String {
        let text = format!(
            r#"apiVersion: ninelives.io/v1alpha1
kind: TrainingJob
metadata:
  name: {name}
spec:
  model:
    layers: 2
    hiddenSize: 64
    heads: 2
    vocabSize: 256
    routedExperts: 4
    zeroExperts: 1
    topK: 2
    expertFfnSize: 64
    seqLen: 32
  topology:
    nodes: {nodes}
    chipsPerNode: 1
    chipMemory: 1Gi
  parallelism:
    expertParallelSize: {nodes}
    redundantExperts: {redundant}
  data:
    datasets: [/usr/share/common-licenses]
    globalBatchSize: 8
    microBatchSize: 2
    seed: 7
  training:
    steps: {steps}
    learningRate:
      peak: 0.003
      min: 0.0003
      warmupSteps: 2
      schedule: cosine
    adamw:
      beta1: 0.9
      beta2: 0.95
      epsilon: 1.0e-8
      weightDecay: 0.1
    gradClip: 1.0
  checkpoint:
    path: {ckpt}
    intervalSteps: {interval}
    keepLast: {keep_last}
    peerCopies: {peer_copies}
  failurePolicy:
    heartbeatTtlSeconds: 3
    maxRecoveries: 20
    minHealthyFraction: 0.5
    allowedTiers: [reroute, reshard, restore, replace]
    recoveryTimeoutSeconds: 60
"#,
            name = self.name,
            nodes = self.nodes,
            redundant = self.redundant,
            steps = self.steps,
            interval = self.interval,
            keep_last = self.keep_last,
            peer_copies = self.peer_copies,
            // Every test passes --checkpoint-dir; this path is never written.
            ckpt = dir.join("overridden-by-checkpoint-dir").display(),
        );
        let path = dir.join(format!("{}.yaml", self.name));
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    }
}

/// The parameter digest a worker or launch prints last (`params_sha256=<hex>`, possibly after a
/// prefix).
pub fn digest_of(stdout: &str) -> String {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.contains("params_sha256="))
        .unwrap_or_else(|| panic!("no digest in:\n{stdout}"));
    line[line.find("params_sha256=").unwrap() + "params_sha256=".len()..].to_string()
}

/// One process's digest after `steps` (the manifest's own without): the uninterrupted reference.
pub fn single(manifest: &str, checkpoints: &Path, steps: Option<u64>) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(["worker", "train", manifest, "--threads", "1"]).arg("--checkpoint-dir").arg(checkpoints);
    if let Some(steps) = steps {
        cmd.args(["--steps", &steps.to_string()]);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    digest_of(&stdout)
}

/// The first placement the control loop would publish for a [`SmallJob`] of `nodes` members
/// (members wait for it): what tests that run members without a brain write at `placement`.
pub fn initial_placement(nodes: u32) -> Vec<u8> {
    use ninelives_core::generation::{Restore, initial_plan, one_chip_workers};
    let plan = initial_plan(&one_chip_workers(2, 4, 0, nodes), Restore::Fresh).unwrap();
    serde_json::to_vec(&plan).unwrap()
}

/// A finished `ninelives demo` run: its report and what it printed.
pub struct DemoRun {
    /// `report.json`.
    pub report: serde_json::Value,
    /// Standard output (the narration and the digest).
    pub stdout: String,
}

/// Runs `ninelives demo --manifest <manifest> <args>` with its work directory and report under
/// `dir`, and asserts it succeeded.
pub fn demo(manifest: &Path, args: &[&str], dir: &Path) -> DemoRun {
    let report_dir = dir.join("report");
    let out = Command::new(BIN)
        .arg("demo")
        .arg("--manifest")
        .arg(manifest)
        .args(args)
        .arg("--report")
        .arg(&report_dir)
        .arg("--work-dir")
        .arg(dir.join("work"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let report = serde_json::from_slice(&std::fs::read(report_dir.join("report.json")).unwrap()).unwrap();
    DemoRun { report, stdout }
}
