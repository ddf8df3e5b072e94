//! `ninelives worker launch`: expert-parallel training across real worker processes, with
//! rendezvous in a real etcd and the job's control loop deciding. Exactness against one worker,
//! kill -9 mid-step (the node is dropped and the experts it held re-placed from the checkpoint),
//! and loss of a fully replicated worker (dropped, continuing in memory, no checkpoint touched).

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ninelives_core::keyspace::Keyspace;
use ninelives_core::writer::WriterRecord;
use ninelives_testkit::EtcdServer;
use ninelives_worker::dist::rendezvous::Etcd;

mod common;
use common::{BIN, SmallJob, digest_of};

fn launch(manifest: &str, workers: u32, etcd: &EtcdServer, checkpoints: &Path, steps: u32) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["worker", "launch", manifest, "--workers", &workers.to_string(), "--etcd", &etcd.endpoint()])
        .arg("--checkpoint-dir")
        .arg(checkpoints)
        .args(["--steps", &steps.to_string(), "--threads", "1", "--step-timeout-seconds", "30"])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn");
    cmd
}

/// Runs a launch to completion, returning its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "launch failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// A running launch whose stdout lines arrive with their arrival time.
struct Running {
    child: std::process::Child,
    lines: mpsc::Receiver<(Instant, String)>,
    seen: Vec<String>,
}

impl Running {
    fn start(cmd: &mut Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((Instant::now(), line));
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    /// Waits (bounded) for a line matching `pred`; returns it and when it arrived.
    fn wait_for(&mut self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> (Instant, String) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return (at, line);
                    }
                }
                Err(_) => panic!("no {what} within {limit:?}; output so far:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// A line matching `pred` already seen, or else the next one (bounded): lines of different
    /// processes may come in either order.
    fn seen_or_wait(&mut self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        match self.seen.iter().find(|l| pred(l)) {
            Some(line) => line.clone(),
            None => self.wait_for(what, limit, pred).1,
        }
    }

    fn pid_of(&self, rank: u32) -> u32 {
        let prefix = format!("worker rank={rank} pid=");
        self.seen.iter().find_map(|l| l.strip_prefix(&prefix)).unwrap().parse().unwrap()
    }

    fn finish(mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        while let Ok((_, line)) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        let status = self.child.wait().unwrap();
        let all = self.seen.join("\n");
        assert!(status.success(), "launch failed:\n{all}");
        all
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kill_9(pid: u32) {
    let status = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(status.success());
}

#[test]
fn four_workers_train_bit_identically_to_one() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The `tiny` preset itself: 4 layers × 8 routed experts over 4 workers.
    let m = format!("{}/../examples/tiny.yaml", env!("CARGO_MANIFEST_DIR"));
    let one = run(&mut launch(&m, 1, &etcd, &dir.path().join("one"), 4));
    let four = run(&mut launch(&m, 4, &etcd, &dir.path().join("four"), 4));
    assert!(four.contains("generation=1 tier=initial members=[0, 1, 2, 3]"), "{four}");
    // The launcher claimed the job's writer key (issue 19): its publications were fenced by it.
    let keys = Keyspace::default().job("default", "tiny");
    let link = Etcd::connect(&[etcd.endpoint()], keys.clone()).unwrap();
    let writer = WriterRecord::parse("writer", &link.get(&keys.writer()).unwrap().unwrap()).unwrap();
    assert!(writer.holder.starts_with("launch-") && writer.epoch > 0, "{writer:?}");
    assert_eq!(four.lines().filter(|l| l.starts_with("[rank 0] step=")).count(), 4, "{four}");
    // Experts really are remote: rank 0 sent activations to its peers.
    assert!(
        four.lines().any(|l| l.starts_with("[rank 0] traffic") && !l.contains("a2a_payload_bytes=0")),
        "{four}"
    );
    assert_eq!(digest_of(&four), digest_of(&one), "4 workers == 1 worker");
    // The W-worker checkpoint is an ordinary checkpoint: a single process resumes from it.
    let single_digest = common::single(&m, &dir.path().join("single"), Some(4));
    assert_eq!(digest_of(&one), single_digest, "launch --workers 1 == worker train");
}

#[test]
fn kill_9_mid_step_aborts_drops_the_node_restores_from_the_checkpoint_and_stays_exact() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = SmallJob::named("reshard").write(dir.path());
    let expected = common::single(&m, &dir.path().join("single"), Some(6));

    let mut job = Running::start(&mut launch(&m, 4, &etcd, &dir.path().join("ckpt"), 6));
    // The leader records a checkpoint in etcd before it prints the line: the brain knows it.
    job.wait_for("the checkpoint of step 2", Duration::from_secs(120), |l| l == "[rank 0] committed step=2");
    let victim = job.pid_of(2);
    let killed = Instant::now();
    kill_9(victim);
    let (aborted, line) =
        job.wait_for("an abort", Duration::from_secs(30), |l| l.contains("] aborted generation=1"));
    let latency = aborted.duration_since(killed);
    assert!(latency < Duration::from_secs(3), "abort took {latency:?} (heartbeat TTL 3 s): {line}");
    // The members abort on the broken links (once reconnecting to the dead peer is refused) or on
    // generation 2, which the launcher publishes as soon as it sees the process exit: either
    // may come first.
    let regen = job.seen_or_wait("generation 2", Duration::from_secs(30), |l| l.starts_with("generation=2 "));
    // No spare: the brain's ladder ends at shrink (drop the node), rolling back to the checkpoint
    // because rank 2's experts had no other replica.
    assert!(regen.contains("tier=shrink") && regen.contains("members=[0, 1, 3]"), "{regen}");
    assert!(regen.contains("Checkpoint { step: 2 }") || regen.contains("Checkpoint { step: 4 }"), "{regen}");
    let out = job.finish(Duration::from_secs(180));
    assert_eq!(digest_of(&out), expected, "killed + resharded run == uninterrupted run\n{out}");
}

#[test]
fn losing_a_replicated_worker_continues_in_memory_and_stays_exact() {
    let etcd = EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Every expert twice, on two different workers.
    let m = SmallJob { redundant: 4, ..SmallJob::named("reroute") }.write(dir.path());
    let expected = common::single(&m, &dir.path().join("single"), Some(6));

    let mut job = Running::start(&mut launch(&m, 4, &etcd, &dir.path().join("ckpt"), 6));
    job.wait_for("step 3", Duration::from_secs(120), |l| l.starts_with("[rank 0] step=3 "));
    kill_9(job.pid_of(1));
    let (_, regen) =
        job.wait_for("generation 2", Duration::from_secs(30), |l| l.starts_with("generation=2 "));
    // Dropped without a rollback: every expert it held has a replica elsewhere.
    assert!(regen.contains("tier=shrink") && regen.contains("InMemory"), "{regen}");
    let out = job.finish(Duration::from_secs(180));
    // The kill lands after step 3 is seen; on a loaded machine the others may have gone a step
    // or two further by then. Whatever the step, the continuation is from memory.
    let continued = out
        .lines()
        .find_map(|l| l.split("joined generation=2 tier=shrink step=").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no member joined generation 2\n{out}"));
    assert!((3..6).contains(&continued), "continued from step {continued}\n{out}");
    assert!(
        out.contains("plan reroute, 0 steps lost") || out.contains("plan reroute, 1 steps lost"),
        "{out}"
    );
    assert_eq!(digest_of(&out), expected, "rerouted run == uninterrupted run\n{out}");
}
