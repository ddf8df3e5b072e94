//! A private etcd for one local run, as a supervised child process.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::RuntimeError;
use crate::supervisor::{ChildId, Supervisor};

/// How long etcd may take to answer `/health`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running etcd child.
#[derive(Clone, Debug)]
pub struct LocalEtcd {
    /// Its supervisor handle.
    pub id: ChildId,
    /// Client URL, `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// Its data directory.
    pub data_dir: PathBuf,
}

/// Finds `binary` in the directories of a `PATH`-style value.
pub fn locate(binary: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path?).map(|dir| dir.join(binary)).find(|p| p.is_file())
}

/// A loopback TCP port that was free a moment ago, below the ephemeral range (see
/// [`ninelives_telemetry::free_port`]).
pub use ninelives_telemetry::free_port;

impl LocalEtcd {
    /// Starts the `etcd` found on `PATH` with its data under `dir`, on free loopback ports, and
    /// waits until it is healthy.
    pub fn start(supervisor: &mut Supervisor, dir: &Path) -> Result<Self, RuntimeError> {
        Self::start_on_path(supervisor, dir, std::env::var_os("PATH").as_deref())
    }

    /// [`LocalEtcd::start`] with the given `PATH` value; [`RuntimeError::EtcdMissing`] (with the
    /// install hint) when no `etcd` is on it.
    pub fn start_on_path(
        supervisor: &mut Supervisor,
        dir: &Path,
        path: Option<&OsStr>,
    ) -> Result<Self, RuntimeError> {
        let binary = locate("etcd", path).ok_or(RuntimeError::EtcdMissing)?;
        Self::start_binary(supervisor, &binary, dir)
    }

    /// [`LocalEtcd::start`], with etcd's own `/metrics` served on `metrics` too (for Prometheus;
    /// the client port has `/metrics` as well, but it is chosen only at start).
    pub fn start_with_metrics(
        supervisor: &mut Supervisor,
        dir: &Path,
        metrics: std::net::SocketAddr,
    ) -> Result<Self, RuntimeError> {
        let mut members = Self::start_cluster(supervisor, dir, 1, Some(metrics))?;
        members.pop().ok_or(RuntimeError::EtcdMissing)
    }

    /// Starts the given etcd binary (see [`LocalEtcd::start`]).
    pub fn start_binary(
        supervisor: &mut Supervisor,
        binary: &Path,
        dir: &Path,
    ) -> Result<Self, RuntimeError> {
        let mut members = Self::spawn_members(supervisor, binary, dir, 1, None)?;
        members.pop().ok_or(RuntimeError::EtcdMissing)
    }

    /// Starts an etcd cluster of `members` members (at least 1) from the `etcd` on `PATH`, each on
    /// its own loopback ports, and waits until every member is healthy. One member keeps its data
    /// in `<dir>/etcd-data` (as [`LocalEtcd::start`]); several keep theirs in
    /// `<dir>/etcd-data/member-<i>`, named `member-<i>`. `metrics`, when given, is served by the
    /// first member.
    pub fn start_cluster(
        supervisor: &mut Supervisor,
        dir: &Path,
        members: usize,
        metrics: Option<std::net::SocketAddr>,
    ) -> Result<Vec<Self>, RuntimeError> {
        let binary = locate("etcd", std::env::var_os("PATH").as_deref()).ok_or(RuntimeError::EtcdMissing)?;
        Self::spawn_members(supervisor, &binary, dir, members.max(1), metrics)
    }

    fn spawn_members(
        supervisor: &mut Supervisor,
        binary: &Path,
        dir: &Path,
        members: usize,
        metrics: Option<std::net::SocketAddr>,
    ) -> Result<Vec<Self>, RuntimeError> {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io(dir, e))?;
        let single = members == 1;
        let mut plans = Vec::with_capacity(members);
        for i in 0..members {
            let client_port = free_port().map_err(|e| RuntimeError::io(dir, e))?;
            let peer_port = free_port().map_err(|e| RuntimeError::io(dir, e))?;
            let (name, data_dir) = if single {
                ("ninelives".to_owned(), dir.join("etcd-data"))
            } else {
                (format!("member-{i}"), dir.join("etcd-data").join(format!("member-{i}")))
            };
            plans.push((name, data_dir, client_port, format!("http://127.0.0.1:{peer_port}")));
        }
        let initial: Vec<String> = plans.iter().map(|(name, _, _, peer)| format!("{name}={peer}")).collect();
        let mut started = Vec::with_capacity(members);
        for (i, (name, data_dir, client_port, peer)) in plans.into_iter().enumerate() {
            let client = format!("http://127.0.0.1:{client_port}");
            let mut cmd = Command::new(binary);
            cmd.arg(format!("--name={name}"))
                .arg(format!("--data-dir={}", data_dir.display()))
                .arg(format!("--listen-client-urls={client}"))
                .arg(format!("--advertise-client-urls={client}"))
                .arg(format!("--listen-peer-urls={peer}"))
                .arg(format!("--initial-advertise-peer-urls={peer}"))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg("--log-level=warn");
            if let Some(addr) = metrics.filter(|_| i == 0) {
                cmd.arg(format!("--listen-metrics-urls=http://{addr}"));
            }
            let log_name = if single { "etcd".to_owned() } else { format!("etcd-{i}") };
            let id = supervisor.spawn(&log_name, cmd)?;
            started.push((LocalEtcd { id, endpoint: client, data_dir }, client_port));
        }
        // Members start together: a cluster is healthy only once a quorum has elected a leader.
        let mut out = Vec::with_capacity(members);
        for (etcd, port) in started {
            etcd.wait_healthy(supervisor, port)?;
            out.push(etcd);
        }
        Ok(out)
    }

    fn wait_healthy(&self, supervisor: &mut Supervisor, port: u16) -> Result<(), RuntimeError> {
        let started = Instant::now();
        loop {
            if health(port) {
                return Ok(());
            }
            let not_ready = |detail: String| RuntimeError::NotReady {
                what: "etcd".into(),
                seconds: started.elapsed().as_secs_f64(),
                detail,
            };
            if let Some(status) = supervisor.exited(self.id)? {
                return Err(not_ready(format!(
                    "exited ({status}); log:\n{}",
                    supervisor.log_tail(self.id, 20)
                )));
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(not_ready(format!(
                    "no healthy /health; log:\n{}",
                    supervisor.log_tail(self.id, 20)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether etcd on `port` answers `/health` with `"health":"true"`.
fn health(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body.contains("\"health\":\"true\""))
    };
    attempt().unwrap_or(false)
}
