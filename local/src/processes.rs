//! Command lines of the processes a local run starts, and the worker's output format.
//!
//! Everything here builds [`Command`]s or parses text; the [`Supervisor`](crate::Supervisor)
//! runs them.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes a fresh job key to `path` (replacing an earlier run's): 32 bytes from the kernel's
/// random source as 64 hex digits, readable by the owner only. Members prove they hold it to
/// each other before any frame is accepted (`--job-key-file`; see the worker's `dist::auth`).
pub fn create_job_key(path: &Path) -> std::io::Result<()> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

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
    /// The job's key ([`create_job_key`]).
    pub job_key_file: PathBuf,
    /// Where it serves `/metrics` (none: it serves nothing).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Environment set for the process (the training worker's own, see
    /// [`LocalRunConfig::member_env`](crate::local::LocalRunConfig::member_env)).
    pub env: Vec<(String, String)>,
    /// Address its peer listener binds (`--listen`; none: the worker's default, loopback port 0).
    pub listen: Option<std::net::SocketAddr>,
    /// Host it registers for its peers, with its listener's port (`--advertise`; none: the
    /// listen address).
    pub advertise: Option<String>,
}

impl MemberSpec {
    /// `ninelives worker train MANIFEST --rank R --etcd URLS --steps N --checkpoint-dir D
    /// --checkpoint-every K --threads T --step-timeout-seconds S --job-key-file F
    /// [--metrics-addr A] [--listen L] [--advertise H]`.
    ///
    /// Output contract ([`ninelives_core::member_output::MemberLine`]): a `joined generation=<g> ... step=<s>`
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
            .arg("--job-key-file")
            .arg(&self.job_key_file)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(addr) = self.metrics_addr {
            cmd.args(["--metrics-addr", &addr.to_string()]);
        }
        if let Some(listen) = self.listen {
            cmd.args(["--listen", &listen.to_string()]);
        }
        if let Some(host) = &self.advertise {
            cmd.args(["--advertise", host]);
        }
        cmd
    }
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
            job_key_file: "/tmp/key".into(),
            metrics_addr: Some(([127, 0, 0, 1], 9100).into()),
            env: vec![("CANDLE_NUM_THREADS".into(), "1".into())],
            listen: None,
            advertise: None,
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
                "--job-key-file",
                "/tmp/key",
                "--metrics-addr",
                "127.0.0.1:9100"
            ]
        );
        let env: Vec<_> = cmd.get_envs().collect();
        assert_eq!(env, [(std::ffi::OsStr::new("CANDLE_NUM_THREADS"), Some(std::ffi::OsStr::new("1")))]);
        let routed = MemberSpec {
            listen: Some(([127, 0, 0, 1], 29511).into()),
            advertise: Some("127.0.0.2".into()),
            ..member()
        };
        let tail = args(&routed.command(Path::new("ninelives")));
        assert_eq!(tail[tail.len() - 4..], ["--listen", "127.0.0.1:29511", "--advertise", "127.0.0.2"]);
    }

    #[test]
    fn job_keys_are_fresh_private_and_replace_an_old_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job-key");
        create_job_key(&path).unwrap();
        let first = std::fs::read_to_string(&path).unwrap();
        assert_eq!(first.len(), 64);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        create_job_key(&path).unwrap();
        assert_ne!(std::fs::read_to_string(&path).unwrap(), first);
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
}
