//! A 3-member etcd cluster on loopback, for tests of member loss and failover.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{TestkitError, free_port, tail, wait_healthy, which};

/// Three etcd members (Debian's `etcd-server`) forming one cluster, each on its own loopback
/// ports and data dir; killed on drop.
pub struct EtcdCluster {
    members: Vec<Option<Child>>,
    clients: Vec<String>,
    peers: Vec<String>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Members in the cluster.
    pub const SIZE: usize = 3;

    /// Starts the three members and waits until each answers `/health`.
    pub fn start() -> Result<Self, TestkitError> {
        let dir = tempfile::Builder::new().prefix("ninelives-etcd3-").tempdir()?;
        let mut clients = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..Self::SIZE {
            clients.push(format!("http://127.0.0.1:{}", free_port()?));
            peers.push(format!("http://127.0.0.1:{}", free_port()?));
        }
        let mut cluster = Self { members: (0..Self::SIZE).map(|_| None).collect(), clients, peers, dir };
        for i in 0..Self::SIZE {
            cluster.spawn(i, "new")?;
        }
        for i in 0..Self::SIZE {
            cluster.wait(i)?;
        }
        Ok(cluster)
    }

    /// The client URLs, one per member.
    pub fn endpoints(&self) -> &[String] {
        &self.clients
    }

    /// The process id of member `i` while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members.get(i)?.as_ref().map(Child::id)
    }

    /// Kills member `i` (SIGKILL), keeping its data.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members.get_mut(i).and_then(Option::take) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again with its data, rejoining the cluster.
    pub fn restart(&mut self, i: usize) -> Result<(), TestkitError> {
        self.kill(i);
        self.spawn(i, "existing")?;
        self.wait(i)
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<(), TestkitError> {
        let binary = which("etcd").ok_or(TestkitError::Missing { binary: "etcd", package: "etcd-server" })?;
        let initial: Vec<String> = self.peers.iter().enumerate().map(|(j, p)| format!("e{j}={p}")).collect();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log(i))?;
        let child = Command::new(binary)
            .arg(format!("--name=e{i}"))
            .arg(format!("--data-dir={}", self.dir.path().join(format!("e{i}")).display()))
            .arg(format!("--listen-client-urls={}", self.clients[i]))
            .arg(format!("--advertise-client-urls={}", self.clients[i]))
            .arg(format!("--listen-peer-urls={}", self.peers[i]))
            .arg(format!("--initial-advertise-peer-urls={}", self.peers[i]))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg(format!("--initial-cluster-state={state}"))
            .arg("--log-level=warn")
            .arg("--unsafe-no-fsync")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.members[i] = Some(child);
        Ok(())
    }

    fn wait(&mut self, i: usize) -> Result<(), TestkitError> {
        let addr: SocketAddr = self.clients[i].trim_start_matches("http://").parse().map_err(|_| {
            TestkitError::Unhealthy { what: "etcd member", seconds: 0, log: self.clients[i].clone() }
        })?;
        if wait_healthy(addr, "/health", "\"health\":\"true\"", Duration::from_secs(30)) {
            Ok(())
        } else {
            Err(TestkitError::Unhealthy { what: "etcd member", seconds: 30, log: tail(&self.log(i)) })
        }
    }

    fn log(&self, i: usize) -> std::path::PathBuf {
        Path::new(self.dir.path()).join(format!("e{i}.log"))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
