//! Real processes: a supervised child and its own children die with the supervisor.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ninelives_local::Supervisor;

/// Whether a process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 is the state; Z = zombie (dead, waiting to be reaped by its parent).
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `sh` that starts a background `sleep` (a grandchild) and writes its pid to a file.
fn family(sup: &mut Supervisor, dir: &Path, name: &str) -> (u32, u32) {
    let pidfile = dir.join(format!("{name}.pid"));
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("sleep 300 & echo $! > {}; wait", pidfile.display()));
    let id = sup.spawn(name, cmd).expect("spawn");
    let child = sup.pid(id).expect("pid");
    wait_until("the grandchild pid", || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.trim().parse::<u32>().is_ok())
    });
    let grandchild = std::fs::read_to_string(&pidfile).expect("pidfile").trim().parse().expect("pid");
    assert!(alive(child) && alive(grandchild));
    (child, grandchild)
}

#[test]
fn dropping_the_supervisor_kills_children_and_grandchildren() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sup = Supervisor::new(dir.path().join("logs")).expect("supervisor");
    let (a, a2) = family(&mut sup, dir.path(), "a");
    let (b, b2) = family(&mut sup, dir.path(), "b");
    drop(sup);
    for pid in [a, a2, b, b2] {
        wait_until("every process to be gone", || !alive(pid));
    }
}

#[test]
fn a_panic_unwinding_through_the_supervisor_leaves_no_orphans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    let result = std::panic::catch_unwind(move || {
        let mut sup = Supervisor::new(path.join("logs")).expect("supervisor");
        let pids = family(&mut sup, &path, "p");
        std::fs::write(path.join("pids"), format!("{} {}", pids.0, pids.1)).expect("write");
        panic!("boom");
    });
    assert!(result.is_err());
    let pids = std::fs::read_to_string(dir.path().join("pids")).expect("pids");
    for pid in pids.split_whitespace().map(|p| p.parse::<u32>().expect("pid")) {
        wait_until("every process to be gone", || !alive(pid));
    }
}

#[test]
fn kill_takes_the_whole_group_and_reports_the_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sup = Supervisor::new(dir.path().join("logs")).expect("supervisor");
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("sleep 300 & echo $! > {}; wait", dir.path().join("k.pid").display()));
    let id = sup.spawn("k", cmd).expect("spawn");
    wait_until("pidfile", || {
        std::fs::read_to_string(dir.path().join("k.pid")).is_ok_and(|s| !s.trim().is_empty())
    });
    let grandchild: u32 =
        std::fs::read_to_string(dir.path().join("k.pid")).expect("pid").trim().parse().expect("pid");
    assert_eq!(sup.exited(id).expect("known"), None);
    sup.kill(id).expect("kill");
    let status = sup.exited(id).expect("known").expect("exited");
    assert!(!status.success());
    wait_until("grandchild gone", || !alive(grandchild));
}

#[test]
fn terminate_gives_a_grace_period_and_logs_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sup = Supervisor::new(dir.path().join("logs")).expect("supervisor");
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg("trap 'echo got-term; exit 7' TERM; echo started; while true; do sleep 0.05; done");
    let id = sup.spawn("graceful", cmd).expect("spawn");
    wait_until("started", || sup.log_tail(id, 5).contains("started"));
    let status = sup.terminate(id, Duration::from_secs(5)).expect("terminate").expect("status");
    assert_eq!(status.code(), Some(7));
    assert!(sup.log_tail(id, 5).contains("got-term"));
}

#[test]
fn a_missing_program_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sup = Supervisor::new(dir.path().join("logs")).expect("supervisor");
    let err = sup.spawn("ghost", Command::new("/nonexistent/ninelives-ghost")).expect_err("missing");
    let text = err.to_string();
    assert!(text.contains("cannot start ghost") && text.contains("/nonexistent/ninelives-ghost"), "{text}");
}
