//! The etcd keyspace: every key ninelives reads or writes, built in one place.
//!
//! ```text
//! <prefix>nodes/<node>/alive                    presence, attached to the node agent's lease
//! <prefix>nodes/<node>/chips/<index>            ChipRecord JSON, written only on change
//! <prefix>jobs/<namespace>/<job>/...            everything of one job (see JobKeys)
//! <prefix>jobs/<namespace>/<job>/writer         the driver allowed to publish, and its epoch
//! ```
//!
//! The default prefix is `/ninelives/`. Values are JSON so SREs can read them with `etcdctl`.
//! Readers must treat every value as untrusted: [`ChipRecord::parse`] returns an error, never
//! panics, on malformed input.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/ninelives/";

/// Key builder rooted at a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyspace {
    prefix: String,
}

impl Default for Keyspace {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Keyspace {
    /// A keyspace under `prefix`; a trailing `/` is added when missing.
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    /// The prefix, ending in `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Prefix of every node key.
    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }

    /// Presence key of a node, attached to its agent's lease.
    pub fn node_alive(&self, node: &str) -> String {
        format!("{}nodes/{node}/alive", self.prefix)
    }

    /// Prefix of a node's chip keys.
    pub fn node_chips(&self, node: &str) -> String {
        format!("{}nodes/{node}/chips/", self.prefix)
    }

    /// State of one chip.
    pub fn chip(&self, node: &str, index: u32) -> String {
        format!("{}nodes/{node}/chips/{index}", self.prefix)
    }

    /// Keys of one job.
    pub fn job(&self, namespace: &str, name: &str) -> JobKeys {
        JobKeys { root: format!("{}jobs/{namespace}/{name}/", self.prefix) }
    }

    /// Splits a key under [`Keyspace::nodes`] into its node name and the rest
    /// (`alive`, `chips/3`), or `None` when the key is elsewhere.
    pub fn parse_node_key<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix("nodes/")?;
        let (node, tail) = rest.split_once('/')?;
        (!node.is_empty() && !tail.is_empty()).then_some((node, tail))
    }
}

/// Keys of one job, all under `<prefix>jobs/<namespace>/<job>/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobKeys {
    root: String,
}

impl JobKeys {
    /// Prefix of every key of the job (deleted as a range when the job is deleted).
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The generation in force: the members' plan, or (as the control loop writes it) the small
    /// commit record naming the plan's group values under [`JobKeys::plan_groups`].
    pub fn placement(&self) -> String {
        format!("{}placement", self.root)
    }

    /// Prefix of the stored plan's group values (see [`crate::generation::PlanRecord`]).
    pub fn plan_groups(&self) -> String {
        format!("{}groups/", self.root)
    }

    /// One group's value of the plan, named by its content (`digest`): a re-plan rewrites only
    /// the groups whose content changed, and two writers of one generation never overwrite each
    /// other's group values.
    pub fn plan_group(&self, group: u32, digest: &str) -> String {
        format!("{}groups/{group:06}/{digest}", self.root)
    }

    /// Prefix of worker membership keys.
    pub fn members(&self) -> String {
        format!("{}members/", self.root)
    }

    /// Membership of one worker rank, attached to the worker's lease.
    pub fn member(&self, rank: u32) -> String {
        format!("{}members/{rank}", self.root)
    }

    /// Prefix of the barrier acknowledgements of one placement generation.
    pub fn acks(&self, generation: u64) -> String {
        format!("{}acks/{generation}/", self.root)
    }

    /// One node's acknowledgement that it applied a placement generation.
    pub fn ack(&self, generation: u64, node: &str) -> String {
        format!("{}acks/{generation}/{node}", self.root)
    }

    /// Control commands from the operator to the agents (reroute, reshard, restore).
    pub fn control(&self) -> String {
        format!("{}control", self.root)
    }

    /// The recovery state machine's persisted state, so a restarted operator resumes it.
    pub fn recovery(&self) -> String {
        format!("{}recovery", self.root)
    }

    /// Prefix of committed-checkpoint records.
    pub fn checkpoints(&self) -> String {
        format!("{}checkpoints/", self.root)
    }

    /// Record of the checkpoint committed at `step` (zero-padded so keys sort by step).
    pub fn checkpoint(&self, step: u64) -> String {
        format!("{}checkpoints/{step:012}", self.root)
    }

    /// Training progress reported by rank 0 (step, loss), read by the operator at a bounded rate.
    pub fn progress(&self) -> String {
        format!("{}progress", self.root)
    }

    /// The job's writer: the driver allowed to publish, with its leadership epoch
    /// ([`WriterRecord`](crate::writer::WriterRecord)); every publication compares it.
    pub fn writer(&self) -> String {
        format!("{}writer", self.root)
    }

    /// Prefix of the members' in-memory peer snapshot records.
    pub fn peers(&self) -> String {
        format!("{}peers/", self.root)
    }

    /// What one member's host memory holds for a peer restore ([`PeerRecord`](crate::recovery::PeerRecord)).
    pub fn peer(&self, rank: u32) -> String {
        format!("{}peers/{rank}", self.root)
    }

    /// Prefix of the members' measured expert load records.
    pub fn loads(&self) -> String {
        format!("{}loads/", self.root)
    }

    /// One member's latest window of token counts per expert
    /// ([`LoadRecord`](crate::recovery::LoadRecord)), overwritten every window.
    pub fn load(&self, rank: u32) -> String {
        format!("{}loads/{rank}", self.root)
    }
}

/// Health of one chip as published in etcd.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ChipState {
    /// Working.
    Healthy,
    /// Working but sub-healthy (slow, correctable-error bursts); still used.
    Degraded,
    /// Not usable.
    Failed,
    /// Flapped too often; isolated until an operator clears it.
    Quarantined,
}

impl ChipState {
    /// Whether experts may be placed on a chip in this state.
    pub fn usable(self) -> bool {
        matches!(self, ChipState::Healthy | ChipState::Degraded)
    }

    /// Lower-case name, as in the JSON value and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ChipState::Healthy => "healthy",
            ChipState::Degraded => "degraded",
            ChipState::Failed => "failed",
            ChipState::Quarantined => "quarantined",
        }
    }
}

/// The value at [`Keyspace::chip`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChipRecord {
    /// Current state.
    pub state: ChipState,
    /// Fault code behind the state (`ok` when healthy).
    pub code: String,
    /// Unix time (seconds, fractional) the state began.
    pub since: f64,
}

/// A value read from etcd that is not what its key promises.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("malformed value at {key}: {reason}")]
pub struct MalformedValue {
    /// The key read.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ChipRecord {
    /// Parses a chip value read from etcd.
    pub fn parse(key: &str, bytes: &[u8]) -> Result<Self, MalformedValue> {
        serde_json::from_slice(bytes)
            .map_err(|e| MalformedValue { key: key.to_string(), reason: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_documented_shape() {
        let ks = Keyspace::new("/nl");
        assert_eq!(ks.node_alive("n1"), "/nl/nodes/n1/alive");
        assert_eq!(ks.chip("n1", 7), "/nl/nodes/n1/chips/7");
        let job = ks.job("default", "tiny");
        assert_eq!(job.member(3), "/nl/jobs/default/tiny/members/3");
        assert_eq!(job.ack(12, "n2"), "/nl/jobs/default/tiny/acks/12/n2");
        assert_eq!(job.checkpoint(50), "/nl/jobs/default/tiny/checkpoints/000000000050");
        assert_eq!(job.plan_group(7, "ab12"), "/nl/jobs/default/tiny/groups/000007/ab12");
        assert!(job.plan_group(7, "ab12").starts_with(&job.plan_groups()));
        assert_eq!(job.writer(), "/nl/jobs/default/tiny/writer");
        assert_eq!(job.load(3), "/nl/jobs/default/tiny/loads/3");
        assert!(job.load(3).starts_with(&job.loads()));
        assert_eq!(ks.parse_node_key("/nl/nodes/n1/chips/7"), Some(("n1", "chips/7")));
        assert_eq!(ks.parse_node_key("/nl/jobs/x"), None);
        assert_eq!(ks.parse_node_key("/other/nodes/n1/alive"), None);
    }

    #[test]
    fn malformed_chip_values_are_errors() {
        let ok = ChipRecord::parse("k", br#"{"state":"failed","code":"ecc-uncorrectable","since":1.5}"#);
        assert_eq!(ok.map(|r| r.state), Ok(ChipState::Failed));
        for bad in [&b"not json"[..], br#"{"state":"melted","code":"x","since":1}"#, b"", b"\xff\xfe"] {
            assert!(ChipRecord::parse("k", bad).is_err());
        }
    }
}
