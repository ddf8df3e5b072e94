//! Issue 23, etcd least privilege from the worker's side: with etcd's authentication on, a
//! worker connects as its job's worker user (`--etcd-user`, password in
//! `NINELIVES_ETCD_PASSWORD`) and trains exactly as without authentication; a wrong password is
//! refused at connect with a clear error, and another job's user cannot register as a member.

#![allow(clippy::unwrap_used)] // test: a panic is the failure report

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, GetOptions};
use ninelives_control::access::{enable_auth, ensure_user};
use ninelives_core::access::worker_user;
use ninelives_core::keyspace::Keyspace;
use ninelives_testkit::EtcdServer;
use ninelives_worker::dist::auth::JobKey;

mod common;
use common::{BIN, SmallJob, digest_of, initial_placement, single};

const ROOT_PASSWORD: &str = "root-secret";

/// Member `rank` of job `default/a` (2 members) authenticating as `user` with `password`.
fn member(manifest: &str, endpoint: &str, rank: u32, user: &str, password: &str, dir: &Path) -> Child {
    let key = dir.join("job.key");
    if !key.exists() {
        JobKey::create_file(&key).unwrap();
    }
    Command::new(BIN)
        .args(["worker", "train", manifest, "--rank", &rank.to_string(), "--threads", "1"])
        .args(["--etcd", endpoint])
        .args(["--etcd-user", user])
        .env("NINELIVES_ETCD_PASSWORD", password)
        .arg("--job-key-file")
        .arg(&key)
        .arg("--checkpoint-dir")
        .arg(dir.join("checkpoints"))
        .args(["--step-timeout-seconds", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits up to `limit` for `child`; `None` (and the child killed) when it is still running.
fn wait(mut child: Child, limit: Duration) -> Option<Output> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn text(out: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn a_worker_trains_as_its_jobs_etcd_user_and_other_identities_are_refused() {
    let etcd = EtcdServer::start().unwrap();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let m = SmallJob { nodes: 2, steps: 20, interval: 10, ..SmallJob::named("a") }.write(dir.path());
    let ks = Keyspace::default();
    let job = ks.job("default", "a");
    let (user_a, user_b) = (worker_user("default", "a"), worker_user("default", "b"));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let root = rt.block_on(async {
        let mut setup = Client::connect([ep.as_str()], None).await.unwrap();
        enable_auth(&mut setup, ROOT_PASSWORD).await.unwrap();
        let options = ConnectOptions::new().with_user("root", ROOT_PASSWORD);
        let mut root = Client::connect([ep.as_str()], Some(options)).await.unwrap();
        ensure_user(&mut root, &user_a, Some("pw-a"), &[&ks.worker_role("default", "a")]).await.unwrap();
        ensure_user(&mut root, &user_b, Some("pw-b"), &[&ks.worker_role("default", "b")]).await.unwrap();
        // What the brain publishes first (as the operator; workers may only read it).
        root.put(job.placement(), initial_placement(2), None).await.unwrap();
        root
    });
    let members = |mut root: Client| {
        rt.block_on(async move {
            let resp = root.get(job.members(), Some(GetOptions::new().with_prefix())).await.unwrap();
            resp.kvs().len()
        })
    };

    // A wrong password: refused at connect, with the reason, long before any step.
    let out = wait(member(&m, &ep, 0, &user_a, "wrong", dir.path()), Duration::from_secs(30))
        .expect("a worker with a wrong password kept running");
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("authentication failed"), "the error names the cause:\n{said}");
    assert!(!said.contains("params_sha256="), "{said}");

    // Job B's user on job A's keys: it can read nothing of A and register nothing.
    let out = wait(member(&m, &ep, 0, &user_b, "pw-b", dir.path()), Duration::from_secs(30))
        .expect("a worker with another job's identity kept running");
    let said = text(&out);
    assert!(!out.status.success() && !said.contains("params_sha256="), "{said}");
    assert!(said.to_lowercase().contains("permission denied"), "the error names the cause:\n{said}");
    assert_eq!(members(root.clone()), 0, "job B's user registered as a member of job A");

    // The right identity trains to the same parameters as an uninterrupted single process.
    let reference = single(&m, &dir.path().join("single"), None);
    let ranks: Vec<Child> = (0..2).map(|rank| member(&m, &ep, rank, &user_a, "pw-a", dir.path())).collect();
    let outs: Vec<Output> = ranks
        .into_iter()
        .map(|c| wait(c, Duration::from_secs(120)).expect("an authenticated worker did not finish"))
        .collect();
    for out in &outs {
        assert!(out.status.success(), "{}", text(out));
    }
    assert_eq!(digest_of(&String::from_utf8_lossy(&outs[0].stdout)), reference);
}
