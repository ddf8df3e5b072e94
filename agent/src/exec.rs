//! Local execution of placement generations: the agent's half of the per-generation barrier.
//!
//! For every job with workers on this node the agent watches two keys:
//!
//! - `<prefix>jobs/<ns>/<job>/placement`: JSON with at least `{"generation": N, ...}` (the rest
//!   is the planner's placement, passed through untouched);
//! - `<prefix>jobs/<ns>/<job>/control`: a [`ControlRecord`] with the extra work of generation N
//!   (experts to load on each node, a checkpoint to restore).
//!
//! When the placement's generation exceeds the last one applied, the agent builds the local
//! commands ([`plan_commands`]: restore, then load experts, then reroute), sends them in order to
//! every local worker ([`LocalWorker`]), and writes an [`AckRecord`] at
//! `<prefix>jobs/<ns>/<job>/acks/<N>/<node>` (outcome `applied`, `failed` or `timeout`). The
//! operator waits for the acks of all nodes before resuming training.
//!
//! The operator writes `control` before (or in the same transaction as) `placement`; a control
//! record for a generation newer than the placement waits for its placement. A `timeoutSeconds`
//! that is not a usable number of seconds ([`ControlRecord::apply_timeout`]) is reported as a
//! malformed value and the default deadline applies.
//!
//! The crate ships no transport to the workers: whoever builds the [`JobBinding`]s supplies the
//! [`LocalWorker`] implementations.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use etcd_client::{Client, WatchOptions};
use ninelives_core::keyspace::{JobKeys, Keyspace};
use ninelives_core::recovery::{
    Ack, AckOutcome, ApplyKind, ControlRecord, DEFAULT_APPLY_TIMEOUT, LocalLoad, RestoreSource,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::AgentError;
use crate::etcd::{Backoff, EtcdSource, seed_of};
use crate::events::{AgentEvent, AgentMetrics};
use crate::node::unix_now;

/// The part of a placement value the agent needs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlacementHeader {
    /// The placement generation.
    pub generation: u64,
}

/// A command the agent sends to a local worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum WorkerCommand {
    /// Roll the worker's state back to a step, from a disk checkpoint or an in-memory peer
    /// snapshot.
    Restore {
        /// Generation being applied.
        generation: u64,
        /// The step and where its state comes from.
        source: RestoreSource,
    },
    /// Load experts onto local chips.
    LoadExperts {
        /// Generation being applied.
        generation: u64,
        /// The experts.
        experts: Vec<LocalLoad>,
    },
    /// Switch routing to the placement of `generation` (re-read from etcd by the worker).
    Reroute {
        /// Generation to route by.
        generation: u64,
    },
}

/// The commands for `node` to apply `generation`, in order, and the kind of the generation.
/// A control record of another generation is ignored (only routes change).
pub fn plan_commands(
    node: &str,
    generation: u64,
    control: Option<&ControlRecord>,
) -> (ApplyKind, Vec<WorkerCommand>) {
    let Some(control) = control.filter(|c| c.generation == generation) else {
        return (ApplyKind::Reroute, vec![WorkerCommand::Reroute { generation }]);
    };
    let mut commands = Vec::new();
    let source = control.source();
    if source.step().is_some() {
        commands.push(WorkerCommand::Restore { generation, source });
    }
    if let Some(experts) = control.load_experts.get(node).filter(|e| !e.is_empty()) {
        commands.push(WorkerCommand::LoadExperts { generation, experts: experts.clone() });
    }
    commands.push(WorkerCommand::Reroute { generation });
    (control.kind(), commands)
}

/// A boxed future, for the object-safe [`LocalWorker`].
pub type WorkerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// A training worker process on this node that accepts commands (its transport is the
/// implementor's).
pub trait LocalWorker: Send + Sync {
    /// Where it listens, for logs.
    fn endpoint(&self) -> String;
    /// Applies one command; resolves when the worker has finished it.
    fn apply<'a>(&'a self, command: &'a WorkerCommand) -> WorkerFuture<'a>;
}

/// A job with workers on this node.
#[derive(Clone)]
pub struct JobBinding {
    /// Namespace.
    pub namespace: String,
    /// Job name.
    pub name: String,
    /// The local workers of the job.
    pub workers: Vec<Arc<dyn LocalWorker>>,
}

/// Applies one job's placement generations on this node.
pub struct Executor {
    source: EtcdSource,
    keys: JobKeys,
    node: String,
    job: String,
    workers: Vec<Arc<dyn LocalWorker>>,
    metrics: AgentMetrics,
    applied: u64,
}

impl Executor {
    /// An executor for `binding` on `node`.
    pub fn new(
        source: EtcdSource,
        keys: Keyspace,
        node: &str,
        binding: JobBinding,
        metrics: AgentMetrics,
    ) -> Self {
        Self {
            source,
            keys: keys.job(&binding.namespace, &binding.name),
            node: node.to_string(),
            job: format!("{}/{}", binding.namespace, binding.name),
            workers: binding.workers,
            metrics,
            applied: 0,
        }
    }

    /// Watches and applies until `shutdown`; a generation being applied when shutdown comes is
    /// finished first (the caller bounds that with its drain grace).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(seed_of(&self.job) ^ seed_of(&self.node));
        loop {
            match self.session(&mut shutdown, &mut backoff).await {
                Ok(()) => return,
                Err(e) => {
                    let text = e.to_string();
                    AgentEvent::EtcdError { op: e.metric_label(), error: &text }.emit(&self.metrics);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn read<T: for<'de> Deserialize<'de>>(
        &self,
        client: &mut Client,
        key: &str,
    ) -> Result<(Option<T>, i64), AgentError> {
        let resp =
            client.get(key, None).await.map_err(|source| AgentError::Etcd { op: "get-job", source })?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let value = match resp.kvs().first() {
            None => None,
            Some(kv) => match serde_json::from_slice(kv.value()) {
                Ok(v) => Some(v),
                Err(e) => {
                    AgentEvent::MalformedValue { key, reason: &e.to_string() }.emit(&self.metrics);
                    None
                }
            },
        };
        Ok((value, revision))
    }

    async fn session(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> Result<(), AgentError> {
        let mut client = self.source.client().await?;
        let placement_key = self.keys.placement();
        let control_key = self.keys.control();
        let (_, revision) = self.read::<serde_json::Value>(&mut client, &placement_key).await?;
        let from = WatchOptions::new().with_start_revision(revision.saturating_add(1));
        let mut placement_watch = client
            .watch(placement_key.as_str(), Some(from.clone()))
            .await
            .map_err(|source| AgentError::Etcd { op: "watch-job", source })?;
        let mut control_watch = client
            .watch(control_key.as_str(), Some(from))
            .await
            .map_err(|source| AgentError::Etcd { op: "watch-job", source })?;
        backoff.reset();
        loop {
            self.evaluate(&mut client).await?;
            tokio::select! {
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { return Ok(()); }
                }
                msg = placement_watch.message() => { watch_event(msg)?; }
                msg = control_watch.message() => { watch_event(msg)?; }
            }
        }
    }

    /// Reads placement and control and applies the placement's generation if it is new.
    async fn evaluate(&mut self, client: &mut Client) -> Result<(), AgentError> {
        let (placement, _) = self.read::<PlacementHeader>(client, &self.keys.placement()).await?;
        let Some(placement) = placement else { return Ok(()) };
        let generation = placement.generation;
        if generation <= self.applied {
            return Ok(());
        }
        let ack_key = self.keys.ack(generation, &self.node);
        let done = client
            .get(ack_key.as_str(), None)
            .await
            .map_err(|source| AgentError::Etcd { op: "get-ack", source })?;
        if !done.kvs().is_empty() {
            // Applied by a previous run of this agent.
            self.applied = generation;
            return Ok(());
        }
        let (control, _) = self.read::<ControlRecord>(client, &self.keys.control()).await?;
        let (kind, commands) = plan_commands(&self.node, generation, control.as_ref());
        let limit = match control.as_ref().filter(|c| c.generation == generation) {
            None => DEFAULT_APPLY_TIMEOUT,
            Some(control) => control.apply_timeout().unwrap_or_else(|invalid| {
                let key = self.keys.control();
                AgentEvent::MalformedValue { key: &key, reason: &invalid.to_string() }.emit(&self.metrics);
                DEFAULT_APPLY_TIMEOUT
            }),
        };

        let started = Instant::now();
        let outcome = tokio::time::timeout(limit, self.apply_all(&commands)).await;
        let elapsed = started.elapsed();
        let (outcome, error) = match outcome {
            Ok(Ok(())) => (AckOutcome::Applied, None),
            Ok(Err(e)) => (AckOutcome::Failed, Some(e)),
            Err(_) => (AckOutcome::Timeout, Some(format!("not applied within {:.1} s", limit.as_secs_f64()))),
        };
        AgentEvent::GenerationApplied {
            job: &self.job,
            generation,
            kind,
            outcome,
            elapsed,
            error: error.as_deref(),
        }
        .emit(&self.metrics);
        let ack = Ack {
            node: self.node.clone(),
            generation,
            kind: Some(kind),
            outcome,
            seconds: Some(elapsed.as_secs_f64()),
            error,
            at: Some(unix_now()),
        };
        let value = serde_json::to_string(&ack).unwrap_or_default();
        client
            .put(ack_key, value, None)
            .await
            .map_err(|source| AgentError::Etcd { op: "put-ack", source })?;
        self.applied = generation;
        Ok(())
    }

    async fn apply_all(&self, commands: &[WorkerCommand]) -> Result<(), String> {
        for command in commands {
            for worker in &self.workers {
                worker.apply(command).await.map_err(|e| format!("{}: {e}", worker.endpoint()))?;
            }
        }
        Ok(())
    }
}

fn watch_event(
    msg: Result<Option<etcd_client::WatchResponse>, etcd_client::Error>,
) -> Result<(), AgentError> {
    match msg {
        Ok(Some(resp)) if resp.canceled() => Err(AgentError::EtcdTimeout("watch-job canceled (compacted?)")),
        // Any event (put or delete) triggers a fresh read: the keys are read, not the events.
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(AgentError::EtcdTimeout("watch-job stream closed")),
        Err(source) => Err(AgentError::Etcd { op: "watch-job", source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use ninelives_core::recovery::LoadSource;

    fn load(chip: u32, source: LoadSource) -> LocalLoad {
        LocalLoad { layer: 3, expert: 17, chip, source }
    }

    #[test]
    fn plain_generations_reroute() {
        let (kind, cmds) = plan_commands("n1", 7, None);
        assert_eq!((kind, cmds), (ApplyKind::Reroute, vec![WorkerCommand::Reroute { generation: 7 }]));
        let stale = ControlRecord { generation: 6, restore_step: Some(100), ..Default::default() };
        assert_eq!(
            plan_commands("n1", 7, Some(&stale)).0,
            ApplyKind::Reroute,
            "control of another generation ignored"
        );
    }

    #[test]
    fn reshard_loads_this_nodes_experts_then_reroutes() {
        let control = ControlRecord {
            generation: 8,
            load_experts: BTreeMap::from([
                ("n1".to_string(), vec![load(2, LoadSource::Peer { node: "n5".into(), chip: 1 })]),
                ("n2".to_string(), vec![load(0, LoadSource::Checkpoint { step: 500 })]),
            ]),
            ..Default::default()
        };
        let (kind, cmds) = plan_commands("n1", 8, Some(&control));
        assert_eq!(kind, ApplyKind::Reshard);
        assert_eq!(
            cmds,
            vec![
                WorkerCommand::LoadExperts {
                    generation: 8,
                    experts: vec![load(2, LoadSource::Peer { node: "n5".into(), chip: 1 })]
                },
                WorkerCommand::Reroute { generation: 8 },
            ]
        );
        let (kind, cmds) = plan_commands("n9", 8, Some(&control));
        assert_eq!((kind, cmds.len()), (ApplyKind::Reshard, 1), "uninvolved nodes only reroute");
    }

    #[test]
    fn restore_comes_first() {
        let control = ControlRecord { generation: 9, restore_step: Some(500), ..Default::default() };
        let (kind, cmds) = plan_commands("n1", 9, Some(&control));
        assert_eq!(kind, ApplyKind::Restore);
        let from_disk = RestoreSource::Checkpoint { step: 500 };
        assert_eq!(cmds[0], WorkerCommand::Restore { generation: 9, source: from_disk });
        // A rollback to a peer snapshot says so: the worker must not read the disk.
        let peers = ControlRecord { from_peers: true, ..control };
        let (_, cmds) = plan_commands("n1", 9, Some(&peers));
        assert_eq!(
            cmds[0],
            WorkerCommand::Restore { generation: 9, source: RestoreSource::Peer { step: 500 } }
        );
    }

    #[test]
    fn command_json_is_stable() {
        let cmd = WorkerCommand::LoadExperts {
            generation: 8,
            experts: vec![load(2, LoadSource::Peer { node: "n5".into(), chip: 1 })],
        };
        assert_eq!(
            serde_json::to_string(&cmd).unwrap(),
            r#"{"op":"loadExperts","generation":8,"experts":[{"layer":3,"expert":17,"chip":2,"source":{"kind":"peer","node":"n5","chip":1}}]}"#
        );
        let restore = WorkerCommand::Restore { generation: 9, source: RestoreSource::Peer { step: 500 } };
        assert_eq!(
            serde_json::to_string(&restore).unwrap(),
            r#"{"op":"restore","generation":9,"source":{"from":"peer","step":500}}"#
        );
    }
}
