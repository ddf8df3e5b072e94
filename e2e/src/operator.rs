//! The operator under test, run as a local process (the built `ninelives` binary).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ninelives_testkit::{free_port, wait_healthy};

use crate::cluster::{ControlPlane, tail};
use crate::error::{Error, Result};
use crate::tools;

/// How the operator's worker pods are started.
#[derive(Clone, Debug)]
pub enum WorkerCommand {
    /// The operator's default: the real training worker, `ninelives worker train env:NINELIVES_JOB ...`.
    Real,
    /// A short stand-in for lifecycle scenarios: it validates the TrainingJob
    /// it received in `NINELIVES_JOB` with `ninelives validate`, then "trains" for
    /// `spec.training.steps / 10` seconds.
    StandIn,
    /// The operator's recovery brain with expert-parallel members (`--recovery=brain`): every
    /// pod is one member of the job, on loopback (all pods of the test bed share this host),
    /// one tensor thread each.
    Members,
}

impl WorkerCommand {
    /// The real worker when the `ninelives` binary has a `worker train` subcommand.
    pub fn detect(ninelives: &Path) -> Self {
        let has_worker = Command::new(ninelives)
            .args(["worker", "train", "--help"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if has_worker { WorkerCommand::Real } else { WorkerCommand::StandIn }
    }

    fn flags(&self) -> Vec<String> {
        match self {
            WorkerCommand::Real => vec!["--recovery=restart-pods".into()],
            WorkerCommand::StandIn => {
                let script = r#"printf '%s' "$NINELIVES_JOB" > job.json && ninelives validate job.json && test -n "$NINELIVES_NODE" && sleep $(( {steps} / 10 ))"#;
                [
                    "--recovery=restart-pods",
                    "--worker-command=sh",
                    "--worker-arg=-c",
                    &format!("--worker-arg={script}"),
                ]
                .map(String::from)
                .to_vec()
            }
            WorkerCommand::Members => {
                let args = [
                    "worker",
                    "train",
                    "env:NINELIVES_JOB",
                    "--steps",
                    "{steps}",
                    "--checkpoint-dir",
                    "{checkpointDir}",
                    "--rank",
                    "$(NINELIVES_RANK)",
                    "--etcd",
                    "$(NINELIVES_ETCD_ENDPOINTS)",
                    "--listen",
                    "127.0.0.1:0",
                    "--threads",
                    "1",
                    "--step-timeout-seconds",
                    "30",
                ];
                let mut flags = vec!["--recovery=brain".to_string()];
                flags.extend(args.iter().map(|a| format!("--worker-arg={a}")));
                flags
            }
        }
    }
}

/// One `ninelives operator` replica; killed (SIGKILL) when dropped.
pub struct OperatorProcess {
    child: Option<Child>,
    /// Its identity in the leader Lease.
    pub identity: String,
    /// Its admin endpoint.
    pub admin: SocketAddr,
    log: PathBuf,
}

impl OperatorProcess {
    /// Starts replica `identity` against `plane` as the admin, with its Lease in `default`.
    pub fn start(
        plane: &ControlPlane,
        identity: &str,
        worker: &WorkerCommand,
        lease_seconds: u64,
    ) -> Result<Self> {
        Self::start_as(plane, plane.kubeconfig(), "default", identity, worker, lease_seconds)
    }

    /// Starts replica `identity` with the credentials in `kubeconfig` and its Lease in
    /// `lease_namespace`; a short lease keeps failover tests quick.
    pub fn start_as(
        plane: &ControlPlane,
        kubeconfig: &Path,
        lease_namespace: &str,
        identity: &str,
        worker: &WorkerCommand,
        lease_seconds: u64,
    ) -> Result<Self> {
        Self::start_with(plane, kubeconfig, lease_namespace, identity, worker, lease_seconds, &[])
    }

    /// [`OperatorProcess::start_as`] with `extra` operator flags.
    pub fn start_with(
        plane: &ControlPlane,
        kubeconfig: &Path,
        lease_namespace: &str,
        identity: &str,
        worker: &WorkerCommand,
        lease_seconds: u64,
        extra: &[&str],
    ) -> Result<Self> {
        let bin = tools::ninelives()?;
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let log = plane.dir().join(format!("operator-{identity}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .arg("operator")
            .arg(format!("--etcd={}", plane.etcd.endpoint()))
            .arg(format!("--metrics-addr={admin}"))
            .arg(format!("--leader-election-namespace={lease_namespace}"))
            .arg(format!("--lease-duration-seconds={lease_seconds}"))
            .arg(format!("--identity={identity}"))
            .arg("--worker-image=local-process")
            // Every pod of the test bed is a process of this host: checkpoint paths are one
            // filesystem, and a fixed metrics port would collide between pods.
            .arg("--shared-checkpoint-paths")
            .arg("--worker-metrics-port=0")
            .args(worker.flags())
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()?;
        let process = OperatorProcess { child: Some(child), identity: identity.into(), admin, log };
        if !wait_healthy(admin, "/live", "ok", Duration::from_secs(30)) {
            return Err(Error::Unhealthy {
                what: format!("operator {identity}"),
                seconds: 30,
                log: process.log_tail(),
            });
        }
        Ok(process)
    }

    /// The metrics text.
    pub fn metrics(&self) -> String {
        ninelives_testkit::http_get(self.admin, "/metrics").unwrap_or_default()
    }

    /// Its whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (a `kill -s` name: `STOP`, `CONT`, ...) to its process.
    fn signal(&self, signal: &str) -> Result<()> {
        let Some(pid) = self.pid() else {
            return Err(Error::Io(std::io::Error::other(format!(
                "operator {} is not running",
                self.identity
            ))));
        };
        let mut command = Command::new("kill");
        command.args(["-s", signal, &pid.to_string()]);
        crate::cluster::run(command, None).map(|_| ())
    }

    /// Freezes it (SIGSTOP), as a stop-the-world pause, a frozen VM or a throttled cgroup would:
    /// it keeps its sockets and state and carries on where it was when resumed.
    pub fn pause(&self) -> Result<()> {
        self.signal("STOP")
    }

    /// Resumes it after [`OperatorProcess::pause`] (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal("CONT")
    }

    /// Its exit code once it has exited by itself (`Some(None)`: killed by a signal); `None`
    /// while it runs.
    pub fn exited(&mut self) -> Result<Option<Option<i32>>> {
        let Some(child) = self.child.as_mut() else { return Ok(None) };
        Ok(child.try_wait()?.map(|status| status.code()))
    }

    /// Kills it without warning (SIGKILL), as a node failure would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it gracefully (SIGTERM) and returns its exit code.
    pub fn terminate(&mut self) -> Result<Option<i32>> {
        let Some(mut child) = self.child.take() else { return Ok(None) };
        let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
        if !status.success() {
            let _ = child.kill();
        }
        for _ in 0..300 {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(Error::Timeout { what: "the operator to exit after SIGTERM".into(), seconds: 30 })
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
