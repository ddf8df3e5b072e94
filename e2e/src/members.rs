//! Jobs run by the operator's recovery brain with expert-parallel members
//! ([`crate::WorkerCommand::Members`]): one node agent per fake node on simulated chips (the
//! DaemonSet's pods; the node runner runs no DaemonSets, so the test bed starts them as
//! processes), chip faults injected through them, the members' progress in etcd, and the final
//! parameter digest against an uninterrupted single-process run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use ninelives_core::keyspace::Keyspace;
use ninelives_core::recovery::ProgressRecord;

use crate::cluster::run;
use crate::error::{Error, Result};

/// One `ninelives agent run` per node on simulated chips; killed when dropped.
pub struct Agents {
    agents: Vec<(String, Child)>,
    chips: PathBuf,
}

impl Agents {
    /// Starts an agent for each of `nodes` against etcd at `etcd_url`, with `chips` simulated
    /// chips each, a `ttl_seconds` presence lease, and its chips and log under `dir`.
    pub fn start(
        ninelives: &Path,
        etcd_url: &str,
        nodes: &[String],
        chips: u32,
        ttl_seconds: u32,
        dir: &Path,
    ) -> Result<Self> {
        let mut agents = Agents { agents: Vec::new(), chips: dir.join("chips") };
        for node in nodes {
            let log = std::fs::File::create(dir.join(format!("agent-{node}.log")))?;
            let child = Command::new(ninelives)
                .args(["agent", "run", "--node", node, "--etcd", etcd_url])
                .args(["--simulate", &chips.to_string(), "--ttl", &ttl_seconds.to_string()])
                .arg("--chips-dir")
                .arg(agents.chips_dir(node))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?;
            agents.agents.push((node.clone(), child));
        }
        Ok(agents)
    }

    /// The simulated chips of `node`.
    pub fn chips_dir(&self, node: &str) -> PathBuf {
        self.chips.join(node)
    }

    /// Injects `fault` (`ecc`, `hang`, ... as `ninelives agent inject` takes it) into chip
    /// `chip` of `node`.
    pub fn inject(&self, ninelives: &Path, node: &str, chip: u32, fault: &str) -> Result<()> {
        let mut command = Command::new(ninelives);
        command.args(["agent", "inject", "--chips-dir"]).arg(self.chips_dir(node));
        command.args([chip.to_string().as_str(), fault]);
        run(command, None).map(|_| ())
    }

    /// Kills the agent of `node` (its node is lost).
    pub fn kill(&mut self, node: &str) {
        for (n, child) in &mut self.agents {
            if n == node {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for (_, child) in &mut self.agents {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The step the lead member of `namespace/job` last reported in etcd.
pub async fn progress(etcd: &mut etcd_client::Client, namespace: &str, job: &str) -> Option<u64> {
    let key = Keyspace::default().job(namespace, job).progress();
    let resp = etcd.get(key, None).await.ok()?;
    let kv = resp.kvs().first()?;
    serde_json::from_slice::<ProgressRecord>(kv.value()).ok().map(|p| p.step)
}

/// The `params_sha256=<hex>` pod `namespace/pod` printed last in its container log (the node
/// runner keeps each run of a pod in `pods_dir/<namespace>_<pod>_<uid>/container.log`).
pub fn digest_in(pods_dir: &Path, namespace: &str, pod: &str) -> Option<String> {
    let entries = std::fs::read_dir(pods_dir).ok()?;
    let prefix = format!("{namespace}_{pod}_");
    let mut found = None;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let log = std::fs::read_to_string(entry.path().join("container.log")).unwrap_or_default();
            if let Some(d) = log.lines().find_map(|l| l.strip_prefix("params_sha256=")) {
                found = Some(d.trim().to_string());
            }
        }
    }
    found
}

/// The parameter digest of `manifest` (a TrainingJob file) trained `steps` steps by one
/// uninterrupted `ninelives worker train` process, checkpointing into `dir`.
pub fn reference_digest(ninelives: &Path, manifest: &Path, steps: u64, dir: &Path) -> Result<String> {
    let out = run(reference_command(ninelives, manifest, steps, dir), None)?;
    params_digest(&out)
}

fn reference_command(ninelives: &Path, manifest: &Path, steps: u64, dir: &Path) -> Command {
    let mut command = Command::new(ninelives);
    command.args(["worker", "train"]).arg(manifest);
    command.args(["--steps", &steps.to_string(), "--threads", "1", "--checkpoint-dir"]).arg(dir);
    command
}

fn params_digest(out: &str) -> Result<String> {
    out.lines().find_map(|l| l.strip_prefix("params_sha256=")).map(|d| d.trim().to_string()).ok_or_else(
        || Error::Io(std::io::Error::other(format!("no params_sha256 in the reference run: {out}"))),
    )
}

/// [`reference_digest`] run in the background while the test drives the job (a long job's
/// reference need not add its whole length to the test); killed when dropped.
pub struct ReferenceRun {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl ReferenceRun {
    /// Starts the uninterrupted run of `manifest` for `steps` steps, checkpointing into `dir`
    /// (its output is kept next to it).
    pub fn start(ninelives: &Path, manifest: &Path, steps: u64, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let stdout = dir.with_extension("out");
        let stderr = dir.with_extension("err");
        let child = reference_command(ninelives, manifest, steps, dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout)?)
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()?;
        Ok(Self { child, stdout, stderr })
    }

    /// Its digest, waiting for it at most `timeout` (then it is killed).
    pub async fn digest(mut self, timeout: std::time::Duration) -> Result<String> {
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if start.elapsed() > timeout {
                return Err(Error::Timeout { what: "the reference run".into(), seconds: timeout.as_secs() });
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        let out = std::fs::read_to_string(&self.stdout)?;
        if !status.success() {
            return Err(Error::Command {
                command: "ninelives worker train (reference)".into(),
                status: status.to_string(),
                output: format!("{out}{}", crate::cluster::tail(&self.stderr, 40)),
            });
        }
        params_digest(&out)
    }
}

impl Drop for ReferenceRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
