//! The `ninelives` binary as users run it.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::process::Command;

fn ninelives(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ninelives"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn crd_prints_the_committed_file() {
    let (code, stdout, _) = ninelives(&["crd"]);
    assert_eq!(code, 0);
    assert_eq!(
        stdout,
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/trainingjob.yaml")).unwrap()
    );
}

#[test]
fn validate_accepts_the_examples() {
    let (code, stdout, stderr) = ninelives(&["validate", "examples/tiny.yaml", "examples/longcat-2.0.yaml"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("2 TrainingJob(s) valid"), "{stdout}");
}

#[test]
fn validate_reports_each_problem_with_document_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let tiny =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tiny.yaml")).unwrap();
    let bad = tiny.replace("chipsPerNode: 8", "chipsPerNode: 0").replace("name: tiny", "name: broken");
    let file = dir.path().join("jobs.yaml");
    std::fs::write(&file, format!("{tiny}\n---\n{bad}")).unwrap();
    let (code, stdout, stderr) = ninelives(&["validate", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stdout.contains("document 1 (tiny): valid"), "{stdout}");
    assert!(
        stderr.contains(
            "document 2 (broken): spec.topology.chipsPerNode: chipsPerNode must be between 1 and 64"
        ),
        "{stderr}"
    );
}

#[test]
fn validate_survives_garbage_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.yaml");
    std::fs::write(&garbage, b"\xff\xfe{{{{").unwrap();
    let (code, _, stderr) = ninelives(&["validate", garbage.to_str().unwrap(), "/nonexistent.yaml"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("garbage.yaml: cannot read"), "{stderr}");
    assert!(stderr.contains("/nonexistent.yaml: cannot read"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
