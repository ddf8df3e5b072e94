//! `ninelives demo` end to end: real etcd, real agents on simulated chips, real worker processes
//! and the recovery brain, with the default fault schedule (chip ECC error, node loss, worker
//! crash). Every fault must be detected and recovered by the expected tier, a rollback from the
//! buddies' host memory (peer copies, issue 21) losing at most one step without a checkpoint
//! read, the final parameters must equal an uninterrupted run, no committed checkpoint may be lost, and no
//! process may outlive the demo — Ctrl-C included.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::BIN;

fn manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny.yaml")
}

/// Processes whose command line mentions `dir` (every child of a demo runs inside its work dir).
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// Waits (bounded) until no process uses `dir`; returns the stragglers otherwise.
fn no_orphans(dir: &Path) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_using(dir);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every member log of a run (`worker-<rank>.log`; a restarted member appends to its rank's).
fn member_logs(dir: &Path) -> String {
    let mut all = String::new();
    for entry in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("worker-") && name.ends_with(".log") {
            all.push_str(&std::fs::read_to_string(entry.path()).unwrap());
        }
    }
    all
}

fn committed(dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().join("manifest.json").is_file())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    steps.sort_unstable();
    steps
}

#[test]
fn default_faults_are_each_recovered_by_the_expected_tier_and_the_result_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let report_dir = dir.path().join("report");
    let run =
        common::demo(&manifest(), &["--steps", "60", "--threads", "1", "--timeout-secs", "900"], dir.path());
    let (report, stdout) = (run.report, run.stdout);
    let recoveries = report["recoveries"].as_array().unwrap();
    let tiers: Vec<(&str, &str)> =
        recoveries.iter().map(|r| (r["trigger"].as_str().unwrap(), r["tier"].as_str().unwrap())).collect();
    // Defaults for 4 nodes × 8 chips and 60 steps: chip:1/3@12, node:2@27, worker:3@42.
    assert_eq!(tiers.len(), 3, "one recovery per fault: {tiers:?}\n{stdout}");
    let (chip, chip_tier) = tiers[0];
    assert_eq!(chip, "chip:1/3", "{stdout}");
    // Reroute when every expert of the chip has a live replica, reshard otherwise.
    assert!(matches!(chip_tier, "reroute" | "reshard"), "{tiers:?}\n{stdout}");
    assert_eq!(tiers[1], ("node:2", "replace"), "{stdout}");
    assert_eq!(tiers[2], ("worker:3", "restore"), "{stdout}");
    for r in recoveries {
        let detect = r["detect_s"].as_f64().unwrap();
        assert!((0.0..=4.0).contains(&detect), "detection took {detect} s (TTL 3 s): {r}");
        assert!(r["resume_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    // Steps lost are measured from the step lines. The faults fire once their step completed
    // (the worker may finish one more before it is stopped); checkpoints every 25 steps.
    // examples/tiny.yaml keeps peer copies (peerCopies 1, a snapshot every step), so a rollback
    // goes to the newest peer snapshot: at most one step lost and no checkpoint read.
    let lost = |i: usize| recoveries[i]["steps_lost"].as_u64().unwrap();
    let source = |i: usize| recoveries[i]["source"].as_str().unwrap_or("").to_string();
    if chip_tier == "reroute" {
        // Every expert of the chip kept a live replica: nothing rolls back.
        assert_eq!((lost(0), source(0).as_str()), (0, "memory"), "a reroute loses nothing\n{stdout}");
    } else {
        assert_eq!(source(0), "peer", "the chip fault's reshard restores peer memory\n{stdout}");
        assert!(lost(0) <= 1, "a peer rollback loses at most one step: {}\n{stdout}", lost(0));
    }
    // The spare that replaces the lost node is filled from the buddies, and the node loss is
    // one recovery (no second one from disk: checked by the count of recoveries above).
    assert_eq!(source(1), "peer", "the node loss restores peer memory\n{stdout}");
    assert!(lost(1) <= 1, "a peer rollback loses at most one step: {}\n{stdout}", lost(1));
    // The worker crash still recovers: from its buddy's copy, or else from the step-25 checkpoint.
    match source(2).as_str() {
        "peer" => assert!(lost(2) <= 1, "a peer rollback loses at most one step: {}\n{stdout}", lost(2)),
        "checkpoint" => {
            assert!((17..=18).contains(&lost(2)), "restore rolls back to step 25: {}\n{stdout}", lost(2))
        }
        other => panic!("the worker crash restored from {other:?}\n{stdout}"),
    }
    // The members' own logs agree: no member read a checkpoint (unless the worker crash fell
    // back to one), and the peer restores say so.
    let logs = member_logs(&work.join("logs"));
    let reads: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("loaded checkpoint") || l.contains("restored checkpoint"))
        .collect();
    if source(2) == "peer" {
        assert!(reads.is_empty(), "a member read a checkpoint:\n{}", reads.join("\n"));
    }
    assert!(logs.contains("restored from peer memory"), "no member log shows a peer restore");

    assert_eq!(report["params_match"], serde_json::Value::Bool(true), "{stdout}");
    assert_eq!(report["max_abs_diff"].as_f64(), Some(0.0));
    assert_eq!(report["steps"].as_u64(), Some(60));
    assert!(report["final_loss"].as_f64().unwrap() < 5.55, "the loss fell below ln(256)");
    assert!(report["goodput"].as_f64().unwrap() > 0.0);
    for chart in ["loss.svg", "throughput.svg"] {
        let svg = std::fs::read_to_string(report_dir.join(chart)).unwrap();
        assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{chart}");
    }
    assert!(stdout.contains("final parameters equal the uninterrupted reference run"), "{stdout}");

    // No checkpoint lost: every interval checkpoint and the final one are committed (keepLast 3).
    assert_eq!(committed(&work.join("checkpoints")), vec![25, 50, 60], "{stdout}");
    let left = no_orphans(&work);
    assert!(left.is_empty(), "processes outlived the demo:\n{}", left.join("\n"));
}

#[test]
fn ctrl_c_stops_every_process_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let mut child = Command::new(BIN)
        .arg("demo")
        .arg("--manifest")
        .arg(manifest())
        .args(["--steps", "300", "--threads", "1", "--no-reference"])
        .arg("--work-dir")
        .arg(&work)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the demo's children exist (etcd, agents, the worker), then interrupt it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while processes_using(&work).len() < 7 {
        assert!(
            Instant::now() < deadline,
            "the demo did not start its processes: {:?}",
            processes_using(&work)
        );
        assert!(child.try_wait().unwrap().is_none(), "the demo exited early");
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        assert!(Instant::now() < deadline, "the demo did not stop within 30 s of Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, Some(130));
    let left = no_orphans(&work);
    assert!(left.is_empty(), "processes outlived the demo:\n{}", left.join("\n"));
}
