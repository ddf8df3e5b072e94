//! Members of an expert-parallel job (real `ninelives worker train --rank` processes, a real
//! etcd, real TCP) through control-plane and worker faults (issue 19), without a control loop:
//! the test publishes the first generation and checks what the members do on their own.
//!
//! - etcd paused (SIGSTOP) for 15 s mid-run: members keep stepping, re-register under new
//!   leases once etcd is back, and end bit-identical to one process;
//! - one member of a 3-member etcd cluster killed mid-run: members fail over to the others;
//! - one worker paused (SIGSTOP) for less than the step timeout: no step is abandoned;
//! - the checkpoint filesystem (a small tmpfs; mounting needs root/CAP_SYS_ADMIN) is full for a
//!   save: the save fails and is cleaned up, training goes on, the next save commits.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ninelives_core::keyspace::{JobKeys, Keyspace};
use ninelives_core::recovery::ProgressRecord;
use ninelives_testkit::{EtcdCluster, EtcdServer};
use ninelives_worker::dist::auth::JobKey;
use ninelives_worker::dist::rendezvous::Etcd;

mod common;
use common::{BIN, SmallJob, digest_of};
/// The step timeout the members run with.
const STEP_TIMEOUT_SECONDS: u64 = 20;

fn job_keys(name: &str) -> JobKeys {
    Keyspace::default().job("default", name)
}

/// One member process, its stdout lines with arrival times, its stderr in a file.
struct Member {
    rank: u32,
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    log: PathBuf,
}

impl Member {
    fn spawn(
        manifest: &str,
        rank: u32,
        endpoints: &[String],
        checkpoints: &Path,
        key: &Path,
        dir: &Path,
    ) -> Self {
        let log = dir.join(format!("rank-{rank}.log"));
        let mut child = Command::new(BIN)
            .args(["worker", "train", manifest, "--rank", &rank.to_string(), "--threads", "1"])
            .arg("--etcd")
            .arg(endpoints.join(","))
            .arg("--checkpoint-dir")
            .arg(checkpoints)
            .arg("--job-key-file")
            .arg(key)
            .args(["--step-timeout-seconds", &STEP_TIMEOUT_SECONDS.to_string()])
            // The job's heartbeat TTL (3 s), shorter than the default (the step timeout), so the
            // pauses below outlast the lease and re-registration is exercised.
            .args(["--membership-ttl-seconds", "3"])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Self { rank, child, lines, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The newest completed step reported.
    fn step(&self) -> u64 {
        self.lines.lock().unwrap().iter().rev().find_map(|(_, l)| step_of(l)).unwrap_or(0)
    }

    /// Steps completed in `[from, to)`.
    fn steps_between(&self, from: Instant, to: Instant) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, l)| *at >= from && *at < to && step_of(l).is_some())
            .count()
    }

    fn text(&self) -> String {
        let lines = self.lines.lock().unwrap();
        lines.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    fn report(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        format!(
            "--- rank {} stdout:\n{}\n--- rank {} log tail:\n{}",
            self.rank,
            self.text(),
            self.rank,
            tail.join("\n")
        )
    }

    /// Waits (bounded) until the member reported `step`.
    fn wait_step(&self, step: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.step() < step {
            assert!(
                Instant::now() < deadline,
                "rank {} not at step {step} within {limit:?}\n{}",
                self.rank,
                self.report()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for a stdout line matching `pred`.
    fn wait_line(&self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.lines.lock().unwrap().iter().map(|(_, l)| l).find(|l| pred(l)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "rank {}: no {what} within {limit:?}\n{}",
                self.rank,
                self.report()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for the process to exit successfully; returns its stdout.
    fn finish(&mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100)); // the reader drains the pipe
                assert!(status.success(), "rank {} failed ({status})\n{}", self.rank, self.report());
                return self.text();
            }
            assert!(
                Instant::now() < deadline,
                "rank {} still running after {limit:?}\n{}",
                self.rank,
                self.report()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn step_of(line: &str) -> Option<u64> {
    line.strip_prefix("step=")?.split_whitespace().next()?.parse().ok()
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// A job of `nodes` members: its key file, the members, and the first generation published.
struct Job {
    name: String,
    members: Vec<Member>,
}

impl Job {
    fn start(
        manifest: &str,
        name: &str,
        nodes: u32,
        endpoints: &[String],
        checkpoints: &Path,
        dir: &Path,
    ) -> Self {
        let key = dir.join(format!("{name}.key"));
        JobKey::create_file(&key).unwrap();
        let keys = job_keys(name);
        let etcd = Etcd::connect(endpoints, keys.clone()).unwrap();
        etcd.delete(keys.root(), true).unwrap();
        let members: Vec<Member> =
            (0..nodes).map(|rank| Member::spawn(manifest, rank, endpoints, checkpoints, &key, dir)).collect();
        // What the control loop would publish first (the members wait for it).
        etcd.put(&keys.placement(), common::initial_placement(nodes), None).unwrap();
        Self { name: name.to_string(), members }
    }

    /// Waits for every member; returns the leader's digest after checking nothing was aborted.
    fn finish(&mut self, limit: Duration) -> String {
        let outs: Vec<String> = self.members.iter_mut().map(|m| m.finish(limit)).collect();
        for (rank, out) in outs.iter().enumerate() {
            assert!(!out.contains("aborted generation="), "rank {rank} abandoned a step:\n{out}");
        }
        digest_of(&outs[0])
    }
}

/// `members/<rank>` → the lease it is held under.
fn member_leases(endpoint: &str, keys: &JobKeys) -> BTreeMap<u32, i64> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([endpoint], None).await.unwrap();
        let prefix = keys.members();
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            c.get(prefix.as_str(), Some(etcd_client::GetOptions::new().with_prefix())),
        )
        .await
        .unwrap()
        .unwrap();
        resp.kvs()
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                Some((key.strip_prefix(&prefix)?.parse().ok()?, kv.lease()))
            })
            .collect()
    })
}

#[test]
fn members_keep_training_through_a_15_second_etcd_pause_and_re_register() {
    // Enough steps that training outlasts the pause on a fast machine: an idle 2-core AVX2 VM
    // makes ~57 steps/s here, so 1,000 steps could end inside the 15 s pause.
    const STEPS: u64 = 3000;
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start().unwrap();
    let m =
        SmallJob { nodes: 3, steps: STEPS, interval: 250, keep_last: 3, ..SmallJob::named("paused-etcd") }
            .write(dir.path());
    let expected = std::thread::scope(|s| {
        let reference = s.spawn(|| common::single(&m, &dir.path().join("single"), None));
        let mut job =
            Job::start(&m, "paused-etcd", 3, &[etcd.endpoint()], &dir.path().join("ckpt"), dir.path());
        let keys = job_keys(&job.name);
        job.members[0].wait_step(20, Duration::from_secs(30));
        let before = member_leases(&etcd.endpoint(), &keys);
        assert_eq!(before.len(), 3, "every member registered: {before:?}");

        let etcd_pid = etcd.pid().unwrap();
        signal(etcd_pid, "-STOP");
        let paused = Instant::now();
        let step_at_pause = job.members[0].step();
        std::thread::sleep(Duration::from_secs(15));
        let resumed = Instant::now();
        let step_at_resume = job.members[0].step();
        signal(etcd_pid, "-CONT");
        for member in &job.members {
            let during = member.steps_between(paused, resumed);
            assert!(
                during >= 20,
                "rank {} made only {during} steps while etcd was paused\n{}",
                member.rank,
                member.report()
            );
        }
        assert!(step_at_resume < STEPS, "training outlasts the pause (at step {step_at_resume} of {STEPS})");
        eprintln!("etcd paused 15 s: rank 0 went from step {step_at_pause} to {step_at_resume}");

        // etcd revoked the expired leases on resuming; every member is back under a new one.
        let deadline = Instant::now() + Duration::from_secs(20);
        let after = loop {
            let now = member_leases(&etcd.endpoint(), &keys);
            if now.len() == 3 && now.iter().all(|(rank, lease)| before.get(rank) != Some(lease)) {
                break now;
            }
            assert!(
                Instant::now() < deadline,
                "members not re-registered under new leases: {before:?} -> {now:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        eprintln!(
            "re-registered {:.1} s after etcd resumed: {before:?} -> {after:?}",
            resumed.elapsed().as_secs_f64()
        );

        let digest = job.finish(Duration::from_secs(90));
        // The leader's progress, buffered through the outage, is in etcd with its generation.
        let link = Etcd::connect(&[etcd.endpoint()], keys.clone()).unwrap();
        let progress: ProgressRecord =
            serde_json::from_slice(&link.get(&keys.progress()).unwrap().unwrap()).unwrap();
        assert_eq!((progress.step, progress.generation), (STEPS, Some(1)));
        let expected = reference.join().unwrap();
        assert_eq!(digest, expected, "bit-identical to the uninterrupted single process");
        expected
    });
    assert_eq!(expected.len(), 64);
}

#[test]
fn a_worker_paused_for_less_than_the_step_timeout_costs_no_abort() {
    const STEPS: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start().unwrap();
    let m =
        SmallJob { nodes: 3, steps: STEPS, interval: 100, keep_last: 3, ..SmallJob::named("paused-worker") }
            .write(dir.path());
    std::thread::scope(|s| {
        let reference = s.spawn(|| common::single(&m, &dir.path().join("single"), None));
        let mut job =
            Job::start(&m, "paused-worker", 3, &[etcd.endpoint()], &dir.path().join("ckpt"), dir.path());
        job.members[0].wait_step(10, Duration::from_secs(30));
        let keys = job_keys(&job.name);
        let before = member_leases(&etcd.endpoint(), &keys);
        let paused = job.members[1].pid();
        signal(paused, "-STOP");
        let at = job.members[0].step();
        std::thread::sleep(Duration::from_secs(5)); // longer than the lease TTL (3 s), shorter than the step timeout
        let stalled = job.members[0].step();
        signal(paused, "-CONT");
        assert!(stalled <= at + 1, "the others wait for the paused peer (steps {at} -> {stalled})");
        job.members[0].wait_step(stalled + 5, Duration::from_secs(STEP_TIMEOUT_SECONDS));
        // Its lease expired while it was stopped; it registered again under a new one.
        let deadline = Instant::now() + Duration::from_secs(10);
        while member_leases(&etcd.endpoint(), &keys).get(&1).is_none_or(|l| before.get(&1) == Some(l)) {
            assert!(
                Instant::now() < deadline,
                "rank 1 not re-registered after its pause\n{}",
                job.members[1].report()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let digest = job.finish(Duration::from_secs(60));
        assert_eq!(digest, reference.join().unwrap(), "bit-identical to the uninterrupted single process");
    });
}

#[test]
fn members_fail_over_when_one_etcd_of_three_is_killed() {
    const STEPS: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = EtcdCluster::start().unwrap();
    let endpoints = cluster.endpoints().to_vec();
    let m = SmallJob { nodes: 2, steps: STEPS, interval: 100, keep_last: 3, ..SmallJob::named("failover") }
        .write(dir.path());
    std::thread::scope(|s| {
        let reference = s.spawn(|| common::single(&m, &dir.path().join("single"), None));
        let mut job = Job::start(&m, "failover", 2, &endpoints, &dir.path().join("ckpt"), dir.path());
        let keys = job_keys(&job.name);
        job.members[0].wait_step(10, Duration::from_secs(30));
        // The first endpoint: every member's client may be using it.
        cluster.kill(0);
        let killed = Instant::now();
        // Through the survivors: the membership stays and progress keeps arriving.
        let link = Etcd::connect(&endpoints[1..], keys.clone()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // The survivors elect a new leader right after the kill: this test's own read may
            // meet "leader changed" like any client, and retries (bounded by the deadline).
            let progress: Option<ProgressRecord> = match link.get(&keys.progress()) {
                Ok(value) => value.map(|v| serde_json::from_slice(&v).unwrap()),
                Err(e) if e.is_transient_etcd() => None,
                Err(e) => panic!("reading progress through the survivors: {e}"),
            };
            let step = job.members[0].step();
            if killed.elapsed() > Duration::from_secs(5)
                && let Some(p) = &progress
                && p.step + 20 >= step
                && step > 0
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "progress stopped reaching etcd after the kill: {progress:?} vs step {step}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let leases = member_leases(&endpoints[1], &keys);
        assert_eq!(leases.len(), 2, "both members still registered: {leases:?}");
        let digest = job.finish(Duration::from_secs(60));
        assert_eq!(digest, reference.join().unwrap(), "bit-identical to the uninterrupted single process");
    });
}

/// A small tmpfs mounted for the test (needs root or CAP_SYS_ADMIN), unmounted on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test fills a real filesystem: it mounts a tmpfs, which needs root or CAP_SYS_ADMIN ({})",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Fills the filesystem of `dir` with one file until it has no space left.
fn fill(file: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(file).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling {}: {e}", file.display()),
        }
    }
    let _ = f.sync_all();
}

#[test]
fn a_full_checkpoint_disk_fails_one_save_and_training_goes_on() {
    const STEPS: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start().unwrap();
    let m = SmallJob { nodes: 2, steps: STEPS, interval: 10, keep_last: 3, ..SmallJob::named("full-disk") }
        .write(dir.path());
    let disk = Tmpfs::mount(dir.path().join("disk"), "16m");
    let checkpoints = disk.path.join("ckpt");
    std::fs::create_dir_all(&checkpoints).unwrap();
    let ballast = disk.path.join("ballast");
    fill(&ballast);
    std::thread::scope(|s| {
        let reference = s.spawn(|| common::single(&m, &dir.path().join("single"), None));
        let mut job = Job::start(&m, "full-disk", 2, &[etcd.endpoint()], &checkpoints, dir.path());
        // The first save (step 10) finds the disk full.
        let failed = job.members[0]
            .wait_line("failed save", Duration::from_secs(60), |l| l.starts_with("save_failed step="));
        assert!(failed.starts_with("save_failed step=10 ") && failed.contains("No space left"), "{failed}");
        let leftovers: Vec<_> =
            std::fs::read_dir(&checkpoints).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(
            !leftovers.iter().any(|f| f == "step-0000000010"),
            "the failed save was cleaned up: {leftovers:?}"
        );
        std::fs::remove_file(&ballast).unwrap(); // space is back
        job.members[0].wait_line("next commit", Duration::from_secs(60), |l| l == "committed step=20");
        let digest = job.finish(Duration::from_secs(60));
        assert_eq!(digest, reference.join().unwrap(), "bit-identical to the uninterrupted single process");
        let out = job.members[0].text();
        assert_eq!(out.lines().filter(|l| l.starts_with("save_failed")).count(), 1, "{out}");
        // The etcd records name the committed checkpoints only.
        let keys = job_keys(&job.name);
        let link = Etcd::connect(&[etcd.endpoint()], keys).unwrap();
        let recorded: Vec<u64> = link.checkpoints().unwrap().into_keys().collect();
        assert_eq!(recorded, [20, 30, 40], "keepLast 3, step 10 never committed");
    });
}
