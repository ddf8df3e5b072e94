//! # ninelives-testkit
//!
//! Real dependencies for adapter and e2e tests (etcd; Prometheus in [`prometheus`]), started the way the project's standards demand:
//! on free loopback ports, in temporary directories, and stopped (killed and cleaned up) when the
//! handle is dropped — also when a test panics.
//!
//! ```no_run
//! let etcd = ninelives_testkit::EtcdServer::start().expect("etcd");
//! let endpoint = etcd.endpoint(); // "http://127.0.0.1:<port>"
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

pub mod cluster;
pub mod modules;
pub mod prometheus;

/// Why a dependency could not be started.
#[derive(Debug, Error)]
pub enum TestkitError {
    /// The binary is not installed.
    #[error("`{binary}` not found on PATH; install it with `scripts/setup --e2e` (Debian package {package})")]
    Missing {
        /// Binary name.
        binary: &'static str,
        /// Debian package that provides it.
        package: &'static str,
    },
    /// An I/O error while preparing or starting the process.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The process started but never became healthy.
    #[error("{what} did not become healthy within {seconds} s; its log:\n{log}")]
    Unhealthy {
        /// What was started.
        what: &'static str,
        /// How long we waited.
        seconds: u64,
        /// The tail of its log.
        log: String,
    },
}

pub use cluster::EtcdCluster;
pub use ninelives_telemetry::free_port;

/// Finds `binary` on `PATH`.
pub fn which(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(binary)).find(|p| p.is_file())
}

/// A single-member etcd (Debian's `etcd-server`) on loopback.
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// Extra command-line flags (e.g. `--max-request-bytes` for the scale run).
    extra: Vec<String>,
}

impl EtcdServer {
    /// Starts etcd and waits until `/health` answers.
    pub fn start() -> Result<Self, TestkitError> {
        Self::start_with_args(&[])
    }

    /// Starts etcd with extra flags (kept across [`EtcdServer::restart`]), e.g.
    /// `--max-request-bytes=...` or `--quota-backend-bytes=...` for the scale run.
    pub fn start_with_args(extra: &[&str]) -> Result<Self, TestkitError> {
        let dir = tempfile::Builder::new().prefix("ninelives-etcd-").tempdir()?;
        let extra = extra.iter().map(ToString::to_string).collect();
        let mut server =
            EtcdServer { child: None, dir, client_port: free_port()?, peer_port: free_port()?, extra };
        server.spawn()?;
        Ok(server)
    }

    /// Starts etcd with extra flags made from its plain-text client URL: e.g. a second, TLS
    /// client listener beside it (`--listen-client-urls={url},https://…`, which replaces the
    /// default), while `/health` is still checked over plain text.
    pub fn start_with_client_url_args(extra: impl FnOnce(&str) -> Vec<String>) -> Result<Self, TestkitError> {
        let dir = tempfile::Builder::new().prefix("ninelives-etcd-").tempdir()?;
        let client_port = free_port()?;
        let extra = extra(&format!("http://127.0.0.1:{client_port}"));
        let mut server = EtcdServer { child: None, dir, client_port, peer_port: free_port()?, extra };
        server.spawn()?;
        Ok(server)
    }

    /// Client URL, e.g. `http://127.0.0.1:23791`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The data directory (inside the temp dir).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Stops etcd (SIGKILL) but keeps its data, so [`EtcdServer::restart`] brings the same
    /// cluster back on the same port — for tests of outages.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again after [`EtcdServer::stop`], with the same data and port.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop();
        self.spawn()
    }

    /// The etcd process id while it runs: for tests that pause it (`kill -STOP`) and resume it
    /// (`kill -CONT`), as a stalled disk or a long GC pause would.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server is currently running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn spawn(&mut self) -> Result<(), TestkitError> {
        let binary = which("etcd").ok_or(TestkitError::Missing { binary: "etcd", package: "etcd-server" })?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.dir.path().join("etcd.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let child = Command::new(binary)
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--log-level=warn")
            // Tests write fast; don't let fsync latency of a busy CI disk dominate.
            .arg("--unsafe-no-fsync")
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.client_port).into();
        if wait_healthy(addr, "/health", "\"health\":\"true\"", Duration::from_secs(20)) {
            Ok(())
        } else {
            self.stop();
            Err(TestkitError::Unhealthy { what: "etcd", seconds: 20, log: tail(&log_path) })
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `GET path` on `addr` until the body contains `needle`; false on timeout.
pub fn wait_healthy(addr: SocketAddr, path: &str, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if http_get(addr, path).is_ok_and(|body| body.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A minimal blocking HTTP/1.1 GET, returning the whole response (headers and body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n")?;
    let mut out = String::new();
    stream.read_to_string(&mut out)?;
    Ok(out)
}

pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_starts_stops_and_restarts_with_its_data() {
        let mut etcd = EtcdServer::start().unwrap();
        let addr: SocketAddr = etcd.endpoint().trim_start_matches("http://").parse().unwrap();
        assert!(http_get(addr, "/health").unwrap().contains("true"));
        etcd.stop();
        assert!(http_get(addr, "/health").is_err(), "etcd still answers after stop");
        etcd.restart().unwrap();
        assert!(http_get(addr, "/health").unwrap().contains("true"));
        let dir = etcd.data_dir();
        drop(etcd);
        assert!(!dir.exists(), "temp dir not removed");
    }
}
