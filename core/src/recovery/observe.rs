//! What the brain sees: node, chip and member states, committed checkpoints, progress and
//! acknowledgements as read from etcd, plus the clock as a value.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::control::Ack;
use crate::keyspace::{ChipRecord, Keyspace, MalformedValue};

/// One node as seen in etcd.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeView {
    /// Whether its `alive` key (under the agent's lease) exists.
    pub alive: bool,
    /// Its chip records by chip index.
    pub chips: BTreeMap<u32, ChipRecord>,
}

/// Training progress reported by rank 0 at `jobs/<ns>/<job>/progress`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProgressRecord {
    /// Last completed step.
    pub step: u64,
    /// Loss at that step.
    #[serde(default)]
    pub loss: Option<f64>,
    /// The generation the writer had joined (absent from writers that predate it); a write of
    /// an older generation than the brain's is stale and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// A committed checkpoint at `jobs/<ns>/<job>/checkpoints/<step>`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRecord {
    /// Step it holds; must equal the key's step.
    pub step: u64,
    /// Where it is.
    #[serde(default)]
    pub location: Option<String>,
    /// The generation the writer had joined (see [`ProgressRecord::generation`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// A worker's acknowledgement of a generation at `jobs/<ns>/<job>/acks/<gen>/<rank>`: the
/// expert-parallel member of `rank` restored the generation's state and stands at `step`.
/// Written by the member itself (it applies generations without an agent), so it is keyed by
/// rank where an agent's [`Ack`] is keyed by node name.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MemberAck {
    /// Updates the member has applied.
    pub step: u64,
    /// The generation acknowledged (must equal the key's; absent from older writers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// What one member's host memory holds for a peer restore, at `jobs/<ns>/<job>/peers/<rank>`
/// (written by the member, latest wins). A step is listed only once it is complete: the member
/// keeps its own snapshot of it and every buddy acknowledged its copy (two-phase), so every
/// member agrees which steps are restorable.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PeerRecord {
    /// The generation whose buddies made the copies.
    pub generation: u64,
    /// Steps of this member's own complete snapshots (dense, its experts, optimizer moments,
    /// data position), ascending.
    pub own: Vec<u64>,
    /// Copies of other members' state held here: rank → steps, ascending.
    #[serde(default)]
    pub holds: BTreeMap<u32, Vec<u64>>,
}

/// Everything one decision looks at.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// The clock, unix seconds (a value, so decisions are reproducible).
    pub now: f64,
    /// Nodes by name (nodes without any key are absent, i.e. not alive).
    pub nodes: BTreeMap<String, NodeView>,
    /// Ranks whose membership key exists.
    pub members: BTreeSet<u32>,
    /// Steps of committed checkpoints.
    pub checkpoints: BTreeSet<u64>,
    /// Last completed step, when reported.
    pub step: Option<u64>,
    /// Acknowledgements by generation, then node name.
    pub acks: BTreeMap<u64, BTreeMap<String, Ack>>,
    /// Ranks whose worker acknowledged each generation itself ([`MemberAck`]).
    pub joined: BTreeMap<u64, BTreeSet<u32>>,
    /// The members' peer snapshot records, by rank.
    pub peers: BTreeMap<u32, PeerRecord>,
    /// The members' latest windows of token counts per expert, by the key's rank (checked and
    /// smoothed by a [`LoadTracker`](super::LoadTracker)).
    pub loads: BTreeMap<u32, super::load::LoadRecord>,
}

impl Observation {
    /// Builds the observation of job `ns/job` from a read of the node prefix and the job prefix
    /// (`(key, value)` pairs). Malformed values are returned beside it and left out of it: a
    /// chip whose record cannot be read counts as unreported, not as healthy-or-failed.
    pub fn from_kvs<'a>(
        keys: &Keyspace,
        namespace: &str,
        job: &str,
        now: f64,
        kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> (Self, Vec<MalformedValue>) {
        let job_root = keys.job(namespace, job).root().to_string();
        let mut obs = Observation { now, ..Default::default() };
        let mut bad = Vec::new();
        let malformed =
            |key: &str, reason: &str| MalformedValue { key: key.to_string(), reason: reason.to_string() };
        for (key, value) in kvs {
            if let Some((node, tail)) = keys.parse_node_key(key) {
                let view = obs.nodes.entry(node.to_string()).or_default();
                if tail == "alive" {
                    view.alive = true;
                } else if let Some(index) = tail.strip_prefix("chips/") {
                    match (index.parse::<u32>(), ChipRecord::parse(key, value)) {
                        (Ok(i), Ok(record)) => {
                            view.chips.insert(i, record);
                        }
                        (Err(_), _) => bad.push(malformed(key, "chip index is not a number")),
                        (_, Err(e)) => bad.push(e),
                    }
                }
                continue;
            }
            let Some(rest) = key.strip_prefix(job_root.as_str()) else { continue };
            if let Some(rank) = rest.strip_prefix("members/") {
                match rank.parse::<u32>() {
                    Ok(r) => {
                        obs.members.insert(r);
                    }
                    Err(_) => bad.push(malformed(key, "rank is not a number")),
                }
            } else if let Some(step) = rest.strip_prefix("checkpoints/") {
                let record: Result<CheckpointRecord, _> = serde_json::from_slice(value);
                match (step.parse::<u64>(), record) {
                    (Ok(s), Ok(r)) if r.step == s => {
                        obs.checkpoints.insert(s);
                    }
                    (Ok(s), Ok(r)) => {
                        bad.push(malformed(key, &format!("record says step {} under key step {s}", r.step)))
                    }
                    (Err(_), _) => bad.push(malformed(key, "checkpoint step is not a number")),
                    (_, Err(e)) => bad.push(malformed(key, &e.to_string())),
                }
            } else if let Some(rank) = rest.strip_prefix("peers/") {
                match (rank.parse::<u32>(), serde_json::from_slice::<PeerRecord>(value)) {
                    (Ok(r), Ok(record)) => {
                        obs.peers.insert(r, record);
                    }
                    (Err(_), _) => bad.push(malformed(key, "rank is not a number")),
                    (_, Err(e)) => bad.push(malformed(key, &e.to_string())),
                }
            } else if let Some(rank) = rest.strip_prefix("loads/") {
                match (rank.parse::<u32>(), serde_json::from_slice(value)) {
                    (Ok(r), Ok(record)) => {
                        obs.loads.insert(r, record);
                    }
                    (Err(_), _) => bad.push(malformed(key, "rank is not a number")),
                    (_, Err(e)) => bad.push(malformed(key, &e.to_string())),
                }
            } else if rest == "progress" {
                match serde_json::from_slice::<ProgressRecord>(value) {
                    Ok(p) => obs.step = Some(p.step),
                    Err(e) => bad.push(malformed(key, &e.to_string())),
                }
            } else if let Some(ack) = rest.strip_prefix("acks/") {
                let Some((generation, node)) = ack.split_once('/') else {
                    bad.push(malformed(key, "expected acks/<generation>/<node>"));
                    continue;
                };
                if let (Ok(g), Ok(rank)) = (generation.parse::<u64>(), node.parse::<u32>())
                    && serde_json::from_slice::<MemberAck>(value).is_ok()
                {
                    obs.joined.entry(g).or_default().insert(rank);
                    continue;
                }
                match (generation.parse::<u64>(), Ack::parse(key, value)) {
                    (Ok(g), Ok(a)) if a.generation == g && a.node == node => {
                        obs.acks.entry(g).or_default().insert(node.to_string(), a);
                    }
                    (Ok(_), Ok(_)) => bad.push(malformed(key, "ack names another generation or node")),
                    (Err(_), _) => bad.push(malformed(key, "generation is not a number")),
                    (_, Err(e)) => bad.push(e),
                }
            }
        }
        (obs, bad)
    }

    /// The newest committed checkpoint at or before `step`.
    pub fn checkpoint_at_or_before(&self, step: u64) -> Option<u64> {
        self.checkpoints.range(..=step).next_back().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyspace::ChipState;
    use crate::recovery::control::AckOutcome;

    #[test]
    fn reads_every_kind_of_key_and_reports_malformed_ones() {
        let ks = Keyspace::new("/nl");
        let kvs: Vec<(&str, &[u8])> = vec![
            ("/nl/nodes/n0/alive", b"{}"),
            ("/nl/nodes/n0/chips/3", br#"{"state":"failed","code":"link-down","since":5.0}"#),
            ("/nl/nodes/n0/chips/4", b"garbage"),
            ("/nl/nodes/n1/chips/0", br#"{"state":"healthy","code":"ok","since":1.0}"#),
            ("/nl/jobs/default/tiny/members/0", b"{}"),
            ("/nl/jobs/default/tiny/members/x", b"{}"),
            ("/nl/jobs/default/tiny/checkpoints/000000000025", br#"{"step":25}"#),
            ("/nl/jobs/default/tiny/checkpoints/000000000050", br#"{"step":49}"#),
            ("/nl/jobs/default/tiny/progress", br#"{"step":61,"loss":2.5}"#),
            ("/nl/jobs/default/tiny/acks/4/n0", br#"{"node":"n0","generation":4,"outcome":"applied"}"#),
            ("/nl/jobs/default/tiny/acks/4/n1", br#"{"node":"n0","generation":4,"outcome":"applied"}"#),
            ("/nl/jobs/default/tiny/acks/4/2", br#"{"step":17}"#),
            ("/nl/jobs/default/tiny/acks/4/3", br#"{"steps":17}"#),
            ("/nl/jobs/default/other/members/1", b"{}"),
        ];
        let (obs, bad) = Observation::from_kvs(&ks, "default", "tiny", 100.0, kvs);
        assert!(obs.nodes["n0"].alive && !obs.nodes["n1"].alive);
        assert_eq!(obs.nodes["n0"].chips[&3].state, ChipState::Failed);
        assert!(!obs.nodes["n0"].chips.contains_key(&4));
        assert_eq!(obs.members, BTreeSet::from([0]));
        assert_eq!(obs.checkpoints, BTreeSet::from([25]));
        assert_eq!(obs.step, Some(61));
        assert_eq!(obs.acks[&4].len(), 1);
        assert_eq!(obs.acks[&4]["n0"].outcome, AckOutcome::Applied);
        assert_eq!(obs.joined[&4], BTreeSet::from([2]));
        let bad_keys: Vec<&str> = bad.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(
            bad_keys,
            [
                "/nl/nodes/n0/chips/4",
                "/nl/jobs/default/tiny/members/x",
                "/nl/jobs/default/tiny/checkpoints/000000000050",
                "/nl/jobs/default/tiny/acks/4/n1",
                "/nl/jobs/default/tiny/acks/4/3"
            ]
        );
        assert_eq!(obs.checkpoint_at_or_before(24), None);
        assert_eq!(obs.checkpoint_at_or_before(60), Some(25));
    }
}
