//! Peer copies (issue 21) under faults the default schedule does not inject, with real
//! processes (`ninelives demo`: etcd, agents on simulated chips, one worker member per node, the
//! recovery brain): two faults in different failure domains at the same step recover from the
//! buddies' host memory; a fault that takes a member and its buddy (the only holder of its
//! copy) falls back to the disk checkpoint. Both end bit-identical to an uninterrupted run.
//!
//! examples/tiny.yaml with checkpoints every 10 steps; 4 members, buddy of rank r is r + 1
//! (mod 4), so rank r's copy lives on rank r + 1.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ninelives");
const STEPS: &str = "20";

/// examples/tiny.yaml with a checkpoint every 10 steps, written into `dir`.
fn manifest(dir: &Path) -> PathBuf {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny.yaml");
    let text = std::fs::read_to_string(tiny).unwrap();
    assert!(text.contains("peerCopies: 1"), "examples/tiny.yaml keeps one peer copy");
    let changed = text.replace("intervalSteps: 25", "intervalSteps: 10");
    assert_ne!(changed, text, "examples/tiny.yaml no longer says intervalSteps: 25");
    let path = dir.join("tiny.yaml");
    std::fs::write(&path, changed).unwrap();
    path
}

/// What a demo run left: its report, its stdout and the member logs.
struct Run {
    report: serde_json::Value,
    stdout: String,
    logs: String,
}

impl Run {
    /// (trigger, tier, source, steps lost) of each recovery.
    fn recoveries(&self) -> Vec<(String, String, String, u64)> {
        self.report["recoveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["trigger"].as_str().unwrap().to_string(),
                    r["tier"].as_str().unwrap().to_string(),
                    r["source"].as_str().unwrap_or("").to_string(),
                    r["steps_lost"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    /// Member log lines that say a checkpoint was read.
    fn checkpoint_reads(&self) -> Vec<&str> {
        self.logs
            .lines()
            .filter(|l| l.contains("loaded checkpoint") || l.contains("restored checkpoint"))
            .collect()
    }

    fn assert_exact(&self) {
        let stdout = &self.stdout;
        assert_eq!(self.report["params_match"], serde_json::Value::Bool(true), "{stdout}");
        assert_eq!(self.report["max_abs_diff"].as_f64(), Some(0.0), "{stdout}");
        assert_eq!(self.report["steps"].as_u64(), Some(20), "{stdout}");
    }
}

fn demo(faults: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let report_dir = dir.path().join("report");
    let mut cmd = Command::new(BIN);
    cmd.arg("demo")
        .arg("--manifest")
        .arg(manifest(dir.path()))
        .args(["--steps", STEPS, "--threads", "1", "--timeout-secs", "600"])
        .arg("--report")
        .arg(&report_dir)
        .arg("--work-dir")
        .arg(&work)
        .env("NO_COLOR", "1");
    for f in faults {
        cmd.args(["--fault", f]);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    // The demo's recovery table, for `--nocapture`.
    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("trigger"))
        .take_while(|l| !l.starts_with("final"))
        .collect();
    eprintln!("{faults:?}:\n{}", table.join("\n"));
    let report = serde_json::from_slice(&std::fs::read(report_dir.join("report.json")).unwrap()).unwrap();
    let mut logs = String::new();
    for entry in std::fs::read_dir(work.join("logs")).unwrap().filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("worker-") && name.ends_with(".log") {
            logs.push_str(&std::fs::read_to_string(entry.path()).unwrap());
        }
    }
    Run { report, stdout, logs }
}

/// A chip of node 1 (its experts move to other members) and the whole of node 3 (a spare takes
/// its index) at the same step: rank 1 is alive with its memory, rank 3's copy is on rank 0.
#[test]
fn a_chip_and_another_whole_node_at_once_recover_from_peer_memory() {
    let run = demo(&["chip:1/3@12", "node:3@12"]);
    let stdout = &run.stdout;
    let recoveries = run.recoveries();
    assert!(!recoveries.is_empty() && recoveries.len() <= 2, "{recoveries:?}\n{stdout}");
    // The node loss folds into the chip's recovery or follows it; either way the spare takes
    // rank 3 (replace) and is filled from rank 0's copy.
    assert!(recoveries.iter().any(|(_, tier, ..)| tier == "replace"), "{recoveries:?}\n{stdout}");
    assert!(stdout.contains("spare spare-0 replaces node-3"), "{stdout}");
    for (trigger, _, source, lost) in &recoveries {
        assert_eq!(source, "peer", "{trigger} restored from {source}\n{stdout}");
        assert!(*lost <= 1, "{trigger} lost {lost} steps\n{stdout}");
    }
    let reads = run.checkpoint_reads();
    assert!(reads.is_empty(), "a member read a checkpoint:\n{}", reads.join("\n"));
    assert!(run.logs.contains("restored from peer memory"), "no member log shows a peer restore");
    run.assert_exact();
}

/// Node 1 and the worker process of rank 2, rank 1's only buddy, at the same step: rank 1's
/// state survives nowhere in memory, so the job rolls back to the step-10 checkpoint.
#[test]
fn a_member_lost_with_its_buddy_falls_back_to_the_checkpoint() {
    let run = demo(&["node:1@12", "worker:2@12"]);
    let stdout = &run.stdout;
    let recoveries = run.recoveries();
    assert!(!recoveries.is_empty() && recoveries.len() <= 2, "{recoveries:?}\n{stdout}");
    // The recovery that brings rank 1 back reads the disk; 12 or 13 steps done, back to 10.
    let (trigger, _, source, lost) = recoveries.last().unwrap();
    assert_eq!(source, "checkpoint", "{trigger}: {recoveries:?}\n{stdout}");
    assert!((2..=3).contains(lost), "{trigger} lost {lost} steps (back to step 10)\n{stdout}");
    assert!(!run.checkpoint_reads().is_empty(), "no member log shows the checkpoint read");
    run.assert_exact();
}
