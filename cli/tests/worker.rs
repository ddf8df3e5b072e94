//! `ninelives worker train` end to end through the real binary: kill -9 and resume, corrupt
//! checkpoint fallback, bad input.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_ninelives");
const STEPS: &str = "12";
const EVERY: &str = "4";

fn manifest() -> String {
    format!("{}/../examples/tiny.yaml", env!("CARGO_MANIFEST_DIR"))
}

fn train(dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "worker",
        "train",
        &manifest(),
        "--steps",
        STEPS,
        "--checkpoint-every",
        EVERY,
        "--threads",
        "2",
    ])
    .arg("--checkpoint-dir")
    .arg(dir)
    .args(extra)
    .env("NO_COLOR", "1")
    .env("RUST_LOG", "info");
    cmd
}

/// Removes ANSI colour sequences from a log line.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn digest(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "run failed: {}\n{}", stdout, String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().last().unwrap_or_default();
    line.strip_prefix("params_sha256=").unwrap_or_else(|| panic!("no digest line in {stdout}")).to_string()
}

#[test]
fn kill_9_after_a_commit_then_resume_reproduces_the_straight_run_and_corruption_falls_back() {
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train(straight_dir.path(), &[]).output().unwrap();
    let expected = digest(&straight);
    let progress = String::from_utf8_lossy(&straight.stdout);
    assert_eq!(progress.lines().filter(|l| l.starts_with("step=")).count(), 12, "one line per step");

    // Kill -9 as soon as the checkpoint of step 4 is committed.
    let dir = tempfile::tempdir().unwrap();
    let mut child = train(dir.path(), &[]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut saw_commit = false;
    for line in BufReader::new(stderr).lines() {
        let line = plain(&line.unwrap());
        if line.contains("checkpoint committed") && line.contains("step=4 ") {
            child.kill().unwrap(); // SIGKILL
            saw_commit = true;
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(saw_commit && !status.success(), "the first run was killed after committing step 4");

    let resumed = train(dir.path(), &["--resume"]).output().unwrap();
    let log = plain(&String::from_utf8_lossy(&resumed.stderr));
    assert!(log.contains("resumed from checkpoint"), "{log}");
    assert_eq!(digest(&resumed), expected, "kill -9 + resume == straight run");

    // Corrupt one byte of the newest checkpoint of the straight run (step 12): resuming falls
    // back to step 8, says so, retrains 8..12 and lands on the same digest.
    let shard = straight_dir.path().join("step-0000000012/experts/layer-0001-expert-00003.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() - 17;
    bytes[at] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();
    let fallback = train(straight_dir.path(), &["--resume"]).output().unwrap();
    let log = plain(&String::from_utf8_lossy(&fallback.stderr));
    assert!(
        log.contains("step-0000000012") && log.contains("checksum mismatch") && log.contains("falling back"),
        "{log}"
    );
    assert!(log.contains("resumed from checkpoint step=8"), "{log}");
    let stdout = String::from_utf8_lossy(&fallback.stdout);
    assert!(stdout.lines().next().unwrap_or_default().starts_with("step=9 "), "{stdout}");
    assert_eq!(digest(&fallback), expected);
}

#[test]
fn bad_input_exits_non_zero_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: ninelives.io/v1alpha1\nkind: TrainingJob\nspec: {}\n").unwrap();
    let out = Command::new(BIN)
        .args(["worker", "train"])
        .arg(&bad)
        .arg("--checkpoint-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is invalid"));

    // The manifest through an environment variable, with an unreadable dataset.
    let text = std::fs::read_to_string(manifest()).unwrap();
    let out = Command::new(BIN)
        .args(["worker", "train", "env:NINELIVES_JOB", "--dataset", "/nonexistent/corpus"])
        .arg("--checkpoint-dir")
        .arg(dir.path())
        .env("NINELIVES_JOB", text)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/corpus"));

    // Checkpoints exist but none is usable: exit 3, no silent fresh start.
    let step = dir.path().join("step-0000000004");
    std::fs::create_dir_all(&step).unwrap();
    std::fs::write(step.join("manifest.json"), "{ torn").unwrap();
    let out = Command::new(BIN)
        .args(["worker", "train", &manifest(), "--resume", "--steps", "5"])
        .arg("--checkpoint-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no usable checkpoint"));
}
