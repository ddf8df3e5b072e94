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

/// One member of the job's expert-parallel worker: the process that trains for one node.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberSpec {
    /// Rank in the job (= node index).
    pub rank: u32,
    /// The TrainingJob manifest.
    pub manifest: PathBuf,
    /// etcd client URLs, comma-separated (the rendezvous: plans, members, acks).
    pub etcd: String,
    /// Shared checkpoint directory.
    pub checkpoint_dir: PathBuf,
    /// Train until this step.
    pub steps: u64,
    /// Commit a checkpoint every this many steps.
    pub checkpoint_every: u64,
    /// CPU threads for its kernels.
    pub threads: usize,
    /// Longest a step waits for a live peer before it is abandoned.
    pub step_timeout_seconds: u64,
    /// Where it serves `/metrics` (none: it serves nothing).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl MemberSpec {
    /// `ninelives worker train MANIFEST --rank R --etcd URLS --steps N --checkpoint-dir D
    /// --checkpoint-every K --threads T --step-timeout-seconds S [--metrics-addr A]`.
    ///
    /// Output contract (what [`parse_worker_line`] reads): a `joined generation=<g> ... step=<s>`
    /// line per generation joined, one `step=<n> loss=<x> tokens_per_s=<y> ...` line per
    /// completed step, and a final `params_sha256=<hex>` on the generation's leader.
    pub fn command(&self, ninelives: &Path) -> Command {
        let mut cmd = Command::new(ninelives);
        cmd.args(["worker", "train"])
            .arg(&self.manifest)
            .args(["--rank", &self.rank.to_string(), "--etcd", &self.etcd])
            .args(["--steps", &self.steps.to_string()])
            .arg("--checkpoint-dir")
            .arg(&self.checkpoint_dir)
            .args(["--checkpoint-every", &self.checkpoint_every.to_string()])
            .args(["--threads", &self.threads.to_string()])
            .args(["--step-timeout-seconds", &self.step_timeout_seconds.to_string()])
            // Set up front, so the worker need not re-execute itself for it.
            .envs(ninelives_worker::trainer::worker_env());
        if let Some(addr) = self.metrics_addr {
            cmd.args(["--metrics-addr", &addr.to_string()]);
        }
        cmd
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
    /// A generation was joined; training continues from `step`.
    Joined {
        /// The generation.
        generation: u64,
        /// The step every member continues from.
        step: u64,
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
    if line.starts_with("joined ") {
        let generation = field("generation")?.parse().ok()?;
        return Some(WorkerLine::Joined { generation, step: field("step")?.parse().ok()? });
    }
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
            manifest: "tiny.yaml".into(),
            etcd: "http://127.0.0.1:2379".into(),
            checkpoint_dir: "/tmp/ck".into(),
            steps: 300,
            checkpoint_every: 25,
            threads: 1,
            step_timeout_seconds: 30,
            metrics_addr: Some(([127, 0, 0, 1], 9100).into()),
        }
    }

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn member_command_matches_the_cli() {
        let cmd = member().command(Path::new("ninelives"));
        assert_eq!(
            args(&cmd),
            [
                "worker",
                "train",
                "tiny.yaml",
                "--rank",
                "2",
                "--etcd",
                "http://127.0.0.1:2379",
                "--steps",
                "300",
                "--checkpoint-dir",
                "/tmp/ck",
                "--checkpoint-every",
                "25",
                "--threads",
                "1",
                "--step-timeout-seconds",
                "30",
                "--metrics-addr",
                "127.0.0.1:9100"
            ]
        );
        let pinned = cmd.get_envs().any(|(k, v)| {
            k == ninelives_worker::trainer::CANDLE_THREADS_ENV && v == Some(std::ffi::OsStr::new("1"))
        });
        assert!(pinned, "candle's elementwise pool is pinned for every member");
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
        assert_eq!(
            parse_worker_line("joined generation=3 tier=restore step=25 members=[0, 1, 2, 3] experts=40"),
            Some(WorkerLine::Joined { generation: 3, step: 25 })
        );
        for junk in [
            "",
            "INFO resumed",
            "step=x loss=1 tokens_per_s=1",
            "step=1 loss=NaN tokens_per_s=1",
            "params_sha256=xyz",
            "steps=1 loss=1 tokens_per_s=1",
            "joined generation=x step=1",
            "joined generation=2",
        ] {
            assert_eq!(parse_worker_line(junk), None, "{junk}");
        }
    }
}
