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
    /// Deadline for applying the generation on a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<f64>,
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

/// A node's acknowledgement at `jobs/<ns>/<job>/acks/<generation>/<node>` (the fields the brain
/// needs; the agent writes more, which are ignored).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    /// The node.
    pub node: String,
    /// The generation.
    pub generation: u64,
    /// The outcome.
    pub outcome: AckOutcome,
    /// Why it was not applied.
    #[serde(default)]
    pub error: Option<String>,
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
}
