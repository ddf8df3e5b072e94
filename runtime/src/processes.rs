//! Command lines of the processes a local run starts, and the worker's output format.
//!
//! Everything here builds [`Command`]s or parses text; the [`Supervisor`](crate::Supervisor)
//! runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A node agent on simulated chips: `ninelives agent run --node N --etcd URL --chips-dir DIR
/// --simulate CHIPS --ttl TTL --etcd-prefix PREFIX`.
pub fn agent_command(
    ninelives: &Path,
    node: &str,
    etcd: &str,
    chips_dir: &Path,
    chips: u32,
    ttl_seconds: u32,
    prefix: &str,
) -> Command {
    let mut cmd = Command::new(ninelives);
    cmd.args(["agent", "run", "--node", node, "--etcd", etcd]).arg("--chips-dir").arg(chips_dir).args([
        "--simulate",
        &chips.to_string(),
        "--ttl",
        &ttl_seconds.to_string(),
        "--etcd-prefix",
        prefix,
    ]);
    cmd
}

/// Fault injection into a simulated chip: `ninelives agent inject --chips-dir DIR CHIP FAULT`
/// (`ecc`, `hang`, `recover`, ...; see `ninelives agent inject --help`).
pub fn inject_command(ninelives: &Path, chips_dir: &Path, chip: u32, fault: &str) -> Command {
    let mut cmd = Command::new(ninelives);
    cmd.args(["agent", "inject", "--chips-dir"]).arg(chips_dir).arg(chip.to_string()).arg(fault);
    cmd
}

/// One training worker to start.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberSpec {
    /// Rank in the job (= node index).
    pub rank: u32,
    /// Members in the job.
    pub world_size: u32,
    /// The node it stands for.
    pub node: String,
    /// The TrainingJob manifest.
    pub manifest: PathBuf,
    /// etcd client URLs, comma-separated.
    pub etcd: String,
    /// Shared checkpoint directory.
    pub checkpoint_dir: PathBuf,
    /// Train until this step.
    pub steps: u64,
    /// Commit a checkpoint every this many steps.
    pub checkpoint_every: u64,
    /// Continue from the newest valid checkpoint.
    pub resume: bool,
    /// CPU threads for its kernels.
    pub threads: usize,
    /// Where it serves `/metrics` (none: it serves nothing).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// How workers are started: the seam between the runtime and the worker implementation.
///
/// Output contract (what [`parse_worker_line`] reads): one `step=<n> loss=<x> tokens_per_s=<y>
/// ...` line per completed step and a final `params_sha256=<hex>` on stdout.
pub trait WorkerLaunch {
    /// The command that runs `member`.
    fn command(&self, member: &MemberSpec) -> Command;
    /// Whether one process per member is started (distributed), or one process for the job.
    fn per_member(&self) -> bool;
}

/// The whole job in one process: `ninelives worker train MANIFEST --steps N --checkpoint-dir D
/// --checkpoint-every K [--resume] --threads T` (rank and etcd unused).
#[derive(Clone, Debug)]
pub struct SingleProcessWorker {
    /// The `ninelives` binary.
    pub ninelives: PathBuf,
}

/// One member of an expert-parallel job: the single-process command plus `--rank R --etcd URLS`
/// (the interface of the distributed worker, issue 7).
#[derive(Clone, Debug)]
pub struct DistributedWorker {
    /// The `ninelives` binary.
    pub ninelives: PathBuf,
}

fn train_command(ninelives: &Path, m: &MemberSpec) -> Command {
    let mut cmd = Command::new(ninelives);
    cmd.args(["worker", "train"])
        .arg(&m.manifest)
        .args(["--steps", &m.steps.to_string()])
        .arg("--checkpoint-dir")
        .arg(&m.checkpoint_dir)
        .args(["--checkpoint-every", &m.checkpoint_every.to_string(), "--threads", &m.threads.to_string()]);
    if m.resume {
        cmd.arg("--resume");
    }
    if let Some(addr) = m.metrics_addr {
        cmd.args(["--metrics-addr", &addr.to_string()]);
    }
    cmd
}

impl WorkerLaunch for SingleProcessWorker {
    fn command(&self, member: &MemberSpec) -> Command {
        train_command(&self.ninelives, member)
    }

    fn per_member(&self) -> bool {
        false
    }
}

impl WorkerLaunch for DistributedWorker {
    fn command(&self, member: &MemberSpec) -> Command {
        let mut cmd = train_command(&self.ninelives, member);
        cmd.args(["--rank", &member.rank.to_string(), "--etcd", &member.etcd]);
        cmd
    }

    fn per_member(&self) -> bool {
        true
    }
}

/// One meaningful line of worker output.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkerLine {
    /// A completed step.
    Step {
        /// The step.
        step: u64,
        /// Its loss.
        loss: f64,
        /// Throughput of the step.
        tokens_per_s: f64,
    },
    /// The final parameter digest.
    Digest(String),
}

/// Parses a worker stdout line; other lines (and malformed ones) give `None`.
pub fn parse_worker_line(line: &str) -> Option<WorkerLine> {
    let line = line.trim();
    if let Some(hex) = line.strip_prefix("params_sha256=") {
        let ok = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
        return ok.then(|| WorkerLine::Digest(hex.to_string()));
    }
    let field = |name: &str| line.split_whitespace().find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='));
    let step = field("step")?.parse().ok()?;
    let loss: f64 = field("loss")?.parse().ok()?;
    let tokens_per_s: f64 = field("tokens_per_s")?.parse().ok()?;
    (loss.is_finite() && tokens_per_s.is_finite()).then_some(WorkerLine::Step { step, loss, tokens_per_s })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member() -> MemberSpec {
        MemberSpec {
            rank: 2,
            world_size: 4,
            node: "node-2".into(),
            manifest: "tiny.yaml".into(),
            etcd: "http://127.0.0.1:2379".into(),
            checkpoint_dir: "/tmp/ck".into(),
            steps: 300,
            checkpoint_every: 25,
            resume: true,
            threads: 1,
            metrics_addr: None,
        }
    }

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn worker_commands_match_the_cli() {
        let single = SingleProcessWorker { ninelives: "ninelives".into() };
        assert_eq!(
            args(&single.command(&member())),
            [
                "worker",
                "train",
                "tiny.yaml",
                "--steps",
                "300",
                "--checkpoint-dir",
                "/tmp/ck",
                "--checkpoint-every",
                "25",
                "--threads",
                "1",
                "--resume"
            ]
        );
        let dist = DistributedWorker { ninelives: "ninelives".into() };
        let a = args(&dist.command(&member()));
        assert_eq!(&a[a.len() - 4..], ["--rank", "2", "--etcd", "http://127.0.0.1:2379"]);
        assert!(dist.per_member() && !single.per_member());
    }

    #[test]
    fn agent_and_inject_commands() {
        let a = agent_command(Path::new("nl"), "node-1", "http://e", Path::new("/c"), 8, 3, "/ninelives/");
        assert_eq!(
            args(&a),
            [
                "agent",
                "run",
                "--node",
                "node-1",
                "--etcd",
                "http://e",
                "--chips-dir",
                "/c",
                "--simulate",
                "8",
                "--ttl",
                "3",
                "--etcd-prefix",
                "/ninelives/"
            ]
        );
        assert_eq!(
            args(&inject_command(Path::new("nl"), Path::new("/c"), 3, "ecc")),
            ["agent", "inject", "--chips-dir", "/c", "3", "ecc"]
        );
    }

    #[test]
    fn worker_lines_parse_and_junk_does_not() {
        assert_eq!(
            parse_worker_line(
                "step=26 loss=4.1234 tokens_per_s=9811 lr=3.000e-3 grad_norm=0.512 balance=1.0 z=0.1"
            ),
            Some(WorkerLine::Step { step: 26, loss: 4.1234, tokens_per_s: 9811.0 })
        );
        let hex = "ab".repeat(32);
        assert_eq!(parse_worker_line(&format!("params_sha256={hex}")), Some(WorkerLine::Digest(hex)));
        for junk in [
            "",
            "INFO resumed",
            "step=x loss=1 tokens_per_s=1",
            "step=1 loss=NaN tokens_per_s=1",
            "params_sha256=xyz",
            "steps=1 loss=1 tokens_per_s=1",
        ] {
            assert_eq!(parse_worker_line(junk), None, "{junk}");
        }
    }
}
