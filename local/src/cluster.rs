//! The run's processes: one agent per node and spare, one member per rank, under a supervisor.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use ninelives_core::keyspace::Keyspace;

use crate::error::RuntimeError;
use crate::processes::{MemberSpec, agent_command, inject_command};
use crate::supervisor::{ChildId, Supervisor};

/// How long agents get to show their presence in etcd.
const AGENTS_READY: Duration = Duration::from_secs(30);

/// A running member process and its stdout.
pub(crate) struct Member {
    pub id: ChildId,
    pub lines: mpsc::Receiver<String>,
    /// The newest generation it said it joined (0: none yet).
    pub generation: u64,
}

/// An agent: its process and its simulated chips.
pub(crate) struct Agent {
    pub id: ChildId,
    pub chips_dir: PathBuf,
}

/// Every process of the run.
pub(crate) struct Cluster {
    pub sup: Supervisor,
    /// Agents by node name.
    pub agents: BTreeMap<String, Agent>,
    /// Running members by rank.
    pub members: BTreeMap<u32, Member>,
    /// Ranks whose member exited successfully (the job's end).
    pub done: BTreeSet<u32>,
    /// Nodes this run killed: nothing is started on them again.
    pub dead_nodes: BTreeSet<String>,
}

/// How one agent is started.
pub(crate) struct AgentPlan<'a> {
    pub ninelives: &'a Path,
    pub etcd: &'a str,
    pub chips_per_node: u32,
    pub ttl_seconds: u32,
    pub keys: &'a Keyspace,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Extra environment of this agent ([`LocalRunConfig::node_env`](crate::LocalRunConfig::node_env)).
    pub env: &'a [(String, String)],
}

impl Cluster {
    pub fn new(sup: Supervisor) -> Self {
        Self {
            sup,
            agents: BTreeMap::new(),
            members: BTreeMap::new(),
            done: BTreeSet::new(),
            dead_nodes: BTreeSet::new(),
        }
    }

    /// Starts the agent of `node`, its chips under `chips_dir`.
    pub fn start_agent(
        &mut self,
        node: &str,
        chips_dir: PathBuf,
        plan: &AgentPlan<'_>,
    ) -> Result<(), RuntimeError> {
        let mut cmd = agent_command(
            plan.ninelives,
            node,
            plan.etcd,
            &chips_dir,
            plan.chips_per_node,
            plan.ttl_seconds,
            plan.keys.prefix(),
        );
        if let Some(addr) = plan.metrics_addr {
            cmd.args(["--metrics-addr", &addr.to_string()]);
        }
        cmd.envs(plan.env.iter().map(|(k, v)| (k, v)));
        let id = self.sup.spawn(&format!("agent-{node}"), cmd)?;
        self.agents.insert(node.to_string(), Agent { id, chips_dir });
        Ok(())
    }

    /// Waits until every agent's presence key is in etcd; an agent that exits fails the run.
    pub async fn wait_for_agents(
        &mut self,
        client: &mut Client,
        keys: &Keyspace,
    ) -> Result<(), RuntimeError> {
        let started = Instant::now();
        let names: BTreeSet<String> = self.agents.keys().cloned().collect();
        loop {
            let resp = client
                .get(keys.nodes(), Some(GetOptions::new().with_prefix().with_keys_only()))
                .await
                .map_err(|e| RuntimeError::Etcd { what: "read nodes".into(), detail: e.to_string() })?;
            let alive: BTreeSet<String> = resp
                .kvs()
                .iter()
                .filter_map(|kv| {
                    let (node, tail) = keys.parse_node_key(kv.key_str().ok()?)?;
                    (tail == "alive").then(|| node.to_string())
                })
                .collect();
            if names.is_subset(&alive) {
                return Ok(());
            }
            for (node, agent) in &self.agents {
                if let Some(status) = self.sup.exited(agent.id)? {
                    return Err(RuntimeError::NotReady {
                        what: format!("agent {node}"),
                        seconds: started.elapsed().as_secs_f64(),
                        detail: format!("exited ({status}); log:\n{}", self.sup.log_tail(agent.id, 20)),
                    });
                }
            }
            if started.elapsed() > AGENTS_READY {
                let missing: Vec<&String> = names.difference(&alive).collect();
                return Err(RuntimeError::NotReady {
                    what: "agents".into(),
                    seconds: started.elapsed().as_secs_f64(),
                    detail: format!("no presence in etcd from {missing:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Injects `fault` (`ecc`, `hang`, `recover`) into chip `chip` of `node`; nothing when the
    /// node's agent is gone.
    pub fn inject(
        &mut self,
        ninelives: &Path,
        node: &str,
        chip: u32,
        fault: &str,
    ) -> Result<(), RuntimeError> {
        let Some(agent) = self.agents.get(node) else { return Ok(()) };
        if self.sup.exited(agent.id)?.is_some() {
            return Ok(()); // the node is gone; nothing to inject into
        }
        let out = inject_command(ninelives, &agent.chips_dir, chip, fault).output().map_err(|source| {
            RuntimeError::Spawn {
                what: "agent inject".into(),
                program: ninelives.display().to_string(),
                source,
            }
        })?;
        if !out.status.success() {
            return Err(RuntimeError::NotReady {
                what: format!("inject {fault} into {node}/{chip}"),
                seconds: 0.0,
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Kills the whole node: its agent and the member on it (`rank`).
    pub fn kill_node(&mut self, node: &str, rank: u32) -> Result<(), RuntimeError> {
        if let Some(agent) = self.agents.get(node) {
            self.sup.kill(agent.id)?;
        }
        self.kill_member(rank)?;
        self.dead_nodes.insert(node.to_string());
        Ok(())
    }

    /// Kills the member of `rank` (SIGKILL: its memory is really lost).
    pub fn kill_member(&mut self, rank: u32) -> Result<(), RuntimeError> {
        match self.members.get(&rank) {
            Some(m) => self.sup.kill(m.id),
            None => Ok(()),
        }
    }

    /// Starts a member process; its stdout lines arrive on [`Member::lines`].
    pub fn start_member(&mut self, ninelives: &Path, spec: &MemberSpec) -> Result<(), RuntimeError> {
        let name = format!("worker-{}", spec.rank);
        let (id, stdout) = self.sup.spawn_piped(&name, spec.command(ninelives))?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("{name}-stdout"))
            .spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| RuntimeError::io("worker stdout thread", e))?;
        self.members.insert(spec.rank, Member { id, lines: rx, generation: 0 });
        Ok(())
    }
}
