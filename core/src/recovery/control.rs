//! The wire format between the brain and the node agents: the `control` record published with
//! each placement generation, and the per-node acknowledgements.
//!
//! The JSON is exactly the one the agent's local-execution protocol reads and writes
//! (`agent/src/exec.rs`, ARCHITECTURE.md "Local execution protocol"); the tests below pin it.
//!
//! Mapping from the planner's types: a [`Move`] `{expert, to: ChipId{node, chip}, source}`
//! becomes a [`LocalLoad`] `{layer, expert, chip}` in the list of the node *named* by the job's
//! node table at index `to.node`; [`Source::Peer`]`(ChipId)` becomes
//! [`LoadSource::Peer`]`{node: <name>, chip}` and [`Source::Checkpoint`] becomes
//! [`LoadSource::Checkpoint`]`{step}` with the checkpoint step the job rolls back to. Node indices
//! stay in the planner (stable across generations); names go on the wire (what agents know).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::keyspace::MalformedValue;
use crate::placement::{Move, Source};

/// Where an expert's state comes from when it is loaded onto a local chip.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum LoadSource {
    /// A live replica on a peer (in-memory copy).
    Peer {
        /// The peer's node name.
        node: String,
        /// The chip on that node holding the replica.
        chip: u32,
    },
    /// A committed checkpoint.
    Checkpoint {
        /// Its step.
        step: u64,
    },
}

/// One expert to load onto a local chip of the node whose list holds it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LocalLoad {
    /// MoE layer.
    pub layer: u32,
    /// Expert index within the layer.
    pub expert: u32,
    /// Local chip that receives it.
    pub chip: u32,
    /// Where its state comes from.
    pub source: LoadSource,
}

/// The brain's extra instructions for one placement generation (`jobs/<ns>/<job>/control`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ControlRecord {
    /// The generation these instructions belong to.
    pub generation: u64,
    /// Roll the whole job back to this step first (`0` = the seeded initial state): the disk
    /// checkpoint of the step, or the in-memory peer snapshot with `from_peers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_step: Option<u64>,
    /// `restore_step` is an in-memory peer snapshot (no disk read), not a disk checkpoint.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_peers: bool,
    /// Experts to load, by node name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub load_experts: BTreeMap<String, Vec<LocalLoad>>,
    /// Deadline for applying the generation on a node ([`DEFAULT_APPLY_TIMEOUT`] when absent).
    /// Untrusted when read back: use [`ControlRecord::apply_timeout`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<f64>,
    /// A rebalance of a running job: no rollback and no disk read; every expert a node gains is
    /// copied from a live holder at the step the members agree on (`load_experts` are all
    /// `peer` loads).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rebalance: bool,
}

/// How long a node may take to apply a generation when the control record does not say.
pub const DEFAULT_APPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// A `timeoutSeconds` that is not a usable number of seconds.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("timeoutSeconds {seconds}: {why}")]
pub struct InvalidTimeout {
    /// The value read.
    pub seconds: f64,
    /// Why it cannot be a deadline.
    pub why: String,
}

/// What applying a generation asks of a node, in the order it is done: a rollback, expert
/// loads, or only new routes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ApplyKind {
    /// Only new routes.
    Reroute,
    /// Experts are loaded somewhere in the job.
    Reshard,
    /// The job rolls back first.
    Restore,
}

impl ApplyKind {
    /// Lower-case name (the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyKind::Reroute => "reroute",
            ApplyKind::Reshard => "reshard",
            ApplyKind::Restore => "restore",
        }
    }
}

impl ControlRecord {
    /// The control record for `generation` realising the planner's `moves`.
    ///
    /// `node_names[i]` is the name of node index `i`; `checkpoint_step` is the step a
    /// [`Source::Checkpoint`] load reads. Moves naming a node outside the table are skipped
    /// (the planner only produces moves inside the topology the table was built for).
    pub fn from_moves<'m>(
        generation: u64,
        moves: impl IntoIterator<Item = &'m Move>,
        node_names: &[String],
        checkpoint_step: u64,
        restore_step: Option<u64>,
        timeout_seconds: f64,
    ) -> Self {
        let mut load_experts: BTreeMap<String, Vec<LocalLoad>> = BTreeMap::new();
        for m in moves {
            let Some(to) = node_names.get(m.to.node as usize) else { continue };
            let source = match m.source {
                Source::Peer(p) => match node_names.get(p.node as usize) {
                    Some(node) => LoadSource::Peer { node: node.clone(), chip: p.chip },
                    None => continue,
                },
                Source::Checkpoint => LoadSource::Checkpoint { step: checkpoint_step },
            };
            load_experts.entry(to.clone()).or_default().push(LocalLoad {
                layer: m.expert.layer,
                expert: m.expert.expert,
                chip: m.to.chip,
                source,
            });
        }
        Self {
            generation,
            restore_step,
            from_peers: false,
            load_experts,
            timeout_seconds: Some(timeout_seconds),
            rebalance: false,
        }
    }

    /// Where this generation's members restore from.
    pub fn source(&self) -> super::state::RestoreSource {
        super::state::RestoreSource::of(self.restore_step, self.from_peers)
    }

    /// Experts to load, over all nodes.
    pub fn loads(&self) -> usize {
        self.load_experts.values().map(Vec::len).sum()
    }

    /// What applying this generation asks of the nodes.
    pub fn kind(&self) -> ApplyKind {
        match (self.restore_step, self.load_experts.is_empty()) {
            (Some(_), _) => ApplyKind::Restore,
            (None, false) => ApplyKind::Reshard,
            (None, true) => ApplyKind::Reroute,
        }
    }

    /// The deadline for applying this generation: `timeoutSeconds`, or
    /// [`DEFAULT_APPLY_TIMEOUT`] when absent.
    ///
    /// The value comes from etcd: zero, negative, NaN, infinite and values too large for a
    /// [`Duration`] are an error naming the value, never a panic.
    pub fn apply_timeout(&self) -> Result<Duration, InvalidTimeout> {
        let Some(seconds) = self.timeout_seconds else { return Ok(DEFAULT_APPLY_TIMEOUT) };
        match Duration::try_from_secs_f64(seconds) {
            Ok(limit) if !limit.is_zero() => Ok(limit),
            Ok(_) => Err(InvalidTimeout { seconds, why: "not a positive number of seconds".into() }),
            Err(e) => Err(InvalidTimeout { seconds, why: e.to_string() }),
        }
    }
}

/// How a node's application of a generation ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AckOutcome {
    /// Every local worker applied it.
    Applied,
    /// A local worker refused or failed.
    Failed,
    /// Not applied within the control record's deadline.
    Timeout,
}

impl AckOutcome {
    /// Lower-case name (the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            AckOutcome::Applied => "applied",
            AckOutcome::Failed => "failed",
            AckOutcome::Timeout => "timeout",
        }
    }
}

/// A node's acknowledgement at `jobs/<ns>/<job>/acks/<generation>/<node>`, written by its agent.
/// The brain needs the node, generation and outcome; the rest is for people and dashboards.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    /// The node.
    pub node: String,
    /// The generation.
    pub generation: u64,
    /// What was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ApplyKind>,
    /// The outcome.
    pub outcome: AckOutcome,
    /// Time taken on the node, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Why it was not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Unix time of the acknowledgement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<f64>,
}

impl Ack {
    /// Parses an acknowledgement read from etcd.
    pub fn parse(key: &str, bytes: &[u8]) -> Result<Self, MalformedValue> {
        serde_json::from_slice(bytes)
            .map_err(|e| MalformedValue { key: key.to_string(), reason: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{ChipId, ExpertId};

    #[test]
    fn control_json_is_the_agent_protocol() {
        let names: Vec<String> = ["n0", "n1", "n2"].iter().map(|s| s.to_string()).collect();
        let moves = [
            Move {
                expert: ExpertId::new(3, 17),
                to: ChipId::new(1, 2),
                source: Source::Peer(ChipId::new(2, 1)),
            },
            Move { expert: ExpertId::new(0, 4), to: ChipId::new(0, 0), source: Source::Checkpoint },
        ];
        let c = ControlRecord::from_moves(8, &moves, &names, 500, Some(500), 30.0);
        let json = serde_json::to_string(&c).unwrap_or_default();
        assert_eq!(
            json,
            r#"{"generation":8,"restoreStep":500,"loadExperts":{"n0":[{"layer":0,"expert":4,"chip":0,"source":{"kind":"checkpoint","step":500}}],"n1":[{"layer":3,"expert":17,"chip":2,"source":{"kind":"peer","node":"n2","chip":1}}]},"timeoutSeconds":30.0}"#
        );
        assert_eq!(c.loads(), 2);
    }

    #[test]
    fn agent_acks_parse_and_garbage_is_an_error() {
        let ack = Ack::parse(
            "k",
            br#"{"node":"n1","generation":4,"kind":"reroute","outcome":"applied","seconds":0.01,"at":1.0}"#,
        );
        assert_eq!(ack.map(|a| (a.generation, a.outcome)), Ok((4, AckOutcome::Applied)));
        for bad in [&b"{}"[..], br#"{"node":"n","generation":1,"outcome":"maybe"}"#, b"\xff"] {
            assert!(Ack::parse("k", bad).is_err());
        }
    }

    #[test]
    fn untrusted_timeouts_are_errors_not_panics() {
        let with = |seconds: f64| ControlRecord { timeout_seconds: Some(seconds), ..Default::default() };
        assert_eq!(ControlRecord::default().apply_timeout(), Ok(DEFAULT_APPLY_TIMEOUT));
        assert_eq!(with(30.0).apply_timeout(), Ok(Duration::from_secs(30)));
        assert_eq!(with(0.25).apply_timeout(), Ok(Duration::from_millis(250)));
        for bad in [1e20, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, 1e-12] {
            let error = with(bad).apply_timeout().map(|_| ()).map_err(|e| e.to_string());
            assert!(
                error.as_ref().is_err_and(|e| e.starts_with(&format!("timeoutSeconds {bad}: "))),
                "{bad}: {error:?}"
            );
        }
        // The way such a value arrives: a control record in etcd that otherwise parses.
        let control: Result<ControlRecord, _> =
            serde_json::from_str(r#"{"generation":3,"restoreStep":100,"timeoutSeconds":1e20}"#);
        let control = control.unwrap_or_default();
        assert_eq!(control.restore_step, Some(100), "the rest of the record still applies");
        assert!(control.apply_timeout().is_err());
    }

    #[test]
    fn the_kind_follows_the_work() {
        let mut c = ControlRecord { generation: 2, ..Default::default() };
        assert_eq!(c.kind(), ApplyKind::Reroute);
        c.load_experts.insert("n1".into(), vec![]);
        assert_eq!(c.kind(), ApplyKind::Reshard);
        c.restore_step = Some(10);
        assert_eq!(c.kind(), ApplyKind::Restore);
    }

    #[test]
    fn a_full_agent_ack_round_trips() {
        let ack = Ack {
            node: "n1".into(),
            generation: 4,
            kind: Some(ApplyKind::Reshard),
            outcome: AckOutcome::Timeout,
            seconds: Some(1.5),
            error: Some("slow".into()),
            at: Some(2.0),
        };
        let json = serde_json::to_vec(&ack).unwrap_or_default();
        assert_eq!(Ack::parse("k", &json), Ok(ack));
    }
}
