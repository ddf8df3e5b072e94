//! What the brain sees: node, chip and member states, committed checkpoints, progress and
//! acknowledgements as read from etcd, plus the clock as a value.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

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
    /// an older generation than the one in force, by a writer that is not a member of it, is
    /// stale and ignored ([`StaleReason::OlderGeneration`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The writer's rank (its generation's leader; absent from writers that predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
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

/// The generation in force, against which member writes are judged
/// ([`Observation::from_kvs_in_force`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InForce {
    /// Its number.
    pub generation: u64,
    /// Its member ranks.
    pub members: BTreeSet<u32>,
    /// The step it rolled the job back to (a checkpoint or a peer snapshot), if it did.
    pub rollback_to: Option<u64>,
}

/// Why a member write was left out of an observation: it was written (or replayed late from a
/// member's buffer) by a member that had not joined the generation in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StaleReason {
    /// Progress of an older generation, from a writer that is not a member of the one in force
    /// (or does not say who it is): a superseded leader's step says nothing about the job now.
    OlderGeneration {
        /// The generation the write carries.
        written: u64,
        /// The generation in force.
        current: u64,
    },
    /// A checkpoint recorded in an older generation at a step past the one the generation in
    /// force rolled back to: committed on the abandoned timeline, after the rollback was decided.
    AbandonedTimeline {
        /// The generation the record carries.
        written: u64,
        /// The generation in force.
        current: u64,
        /// The step the generation in force rolled back to.
        rollback_to: u64,
    },
    /// A member acknowledgement whose value names another generation than its key.
    AckOfAnotherGeneration {
        /// The generation of the key.
        key: u64,
        /// The generation in the value.
        written: u64,
    },
    /// A member acknowledgement of the generation in force by a rank that is not one of its
    /// members.
    NotAMember {
        /// The rank that wrote it.
        rank: u32,
        /// The generation in force.
        generation: u64,
    },
}

impl std::fmt::Display for StaleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StaleReason::OlderGeneration { written, current } => {
                write!(f, "written in generation {written} by a non-member of generation {current}")
            }
            StaleReason::AbandonedTimeline { written, current, rollback_to } => write!(
                f,
                "recorded in generation {written} past step {rollback_to}, which generation {current} rolled back to"
            ),
            StaleReason::AckOfAnotherGeneration { key, written } => {
                write!(f, "acknowledges generation {written} under generation {key}'s key")
            }
            StaleReason::NotAMember { rank, generation } => {
                write!(f, "rank {rank} is not a member of generation {generation}")
            }
        }
    }
}

/// A member write the observation ignored, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleWrite {
    /// The key.
    pub key: String,
    /// Why it was ignored.
    pub reason: StaleReason,
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
    /// Member writes left out because they are stale (see [`InForce`]).
    pub stale: Vec<StaleWrite>,
    /// When the brain last decided (the `now` of the observation it decided on before this one;
    /// rounds frozen by an outage do not count), on the same clock as `now`; `None` before the
    /// first decision of this driver. A fault first seen now became visible after it, which
    /// bounds how old a reporter's stamp of it can plausibly be ([`super::StampRejected`]).
    pub previous_decision: Option<f64>,
}

impl Observation {
    /// Builds the observation of job `ns/job` from a read of the node prefix and the job prefix
    /// (`(key, value)` pairs). Malformed values are returned beside it and left out of it: a
    /// chip whose record cannot be read counts as unreported, not as healthy-or-failed. Member
    /// writes are not judged against a generation (see [`Observation::from_kvs_in_force`]).
    pub fn from_kvs<'a>(
        keys: &Keyspace,
        namespace: &str,
        job: &str,
        now: f64,
        kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> (Self, Vec<MalformedValue>) {
        Self::from_kvs_in_force(keys, namespace, job, now, None, kvs)
    }

    /// [`Observation::from_kvs`], with the members' writes judged against the generation in
    /// force: a stale one (written by a member that had not joined it, or replayed late from a
    /// member's buffer) is left out and listed in [`Observation::stale`] with its reason.
    /// Acknowledgements of older generations are kept (the brain only counts those of the
    /// generation it waits for; garbage collection deletes the rest).
    pub fn from_kvs_in_force<'a>(
        keys: &Keyspace,
        namespace: &str,
        job: &str,
        now: f64,
        in_force: Option<&InForce>,
        kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> (Self, Vec<MalformedValue>) {
        let mut live = LiveObservation::new(keys, namespace, job);
        live.set_in_force(in_force.cloned());
        for (key, value) in kvs {
            live.put(key, value);
        }
        live.stamp(now, None);
        let LiveObservation { observation, malformed, .. } = live;
        (Arc::unwrap_or_clone(observation), malformed)
    }

    /// The newest committed checkpoint at or before `step`.
    pub fn checkpoint_at_or_before(&self, step: u64) -> Option<u64> {
        self.checkpoints.range(..=step).next_back().copied()
    }
}

/// What one key contributes to an observation, parsed once (see [`LiveObservation`]).
#[derive(Clone, Debug)]
enum Fact {
    /// A key under a node's prefix: the node exists, whatever the key.
    Node {
        node: String,
        part: NodePart,
    },
    Member(u32),
    Checkpoint(u64, CheckpointRecord),
    Peer(u32, PeerRecord),
    Load(u32, super::load::LoadRecord),
    Progress(ProgressRecord),
    MemberAck {
        generation: u64,
        rank: u32,
        ack: MemberAck,
    },
    AgentAck {
        generation: u64,
        node: String,
        ack: Ack,
    },
    /// Unreadable: reported, left out.
    Malformed(MalformedValue),
    /// A key the observation does not read (the brain's record, the plan, another job's keys).
    Ignored,
}

/// What a node key says about its node.
#[derive(Clone, Debug)]
enum NodePart {
    Alive,
    Chip(u32, ChipRecord),
    Unreadable(MalformedValue),
    Other,
}

/// `text` as a number, only in the spelling `spell` gives that number (so that one number has
/// one key, and replacing or deleting a key changes exactly what that key said).
fn canonical<T: std::str::FromStr + Copy>(text: &str, spell: impl Fn(T) -> String) -> Option<T> {
    text.parse::<T>().ok().filter(|n| spell(*n) == text)
}

impl Fact {
    /// What `key` holding `value` says (`job_root`: the job's key prefix).
    fn parse(keys: &Keyspace, job_root: &str, key: &str, value: &[u8]) -> Fact {
        let malformed = |reason: &str| MalformedValue { key: key.to_string(), reason: reason.to_string() };
        let plain = |n: u64| n.to_string();
        let rank_of = |text: &str| canonical::<u32>(text, |n| n.to_string());
        if let Some((node, tail)) = keys.parse_node_key(key) {
            let part = if tail == "alive" {
                NodePart::Alive
            } else if let Some(index) = tail.strip_prefix("chips/") {
                match (rank_of(index), ChipRecord::parse(key, value)) {
                    (Some(i), Ok(record)) => NodePart::Chip(i, record),
                    (None, _) => {
                        NodePart::Unreadable(malformed("chip index is not a number in its plain spelling"))
                    }
                    (_, Err(e)) => NodePart::Unreadable(e),
                }
            } else {
                NodePart::Other
            };
            return Fact::Node { node: node.to_string(), part };
        }
        let Some(rest) = key.strip_prefix(job_root) else { return Fact::Ignored };
        if let Some(rank) = rest.strip_prefix("members/") {
            match rank_of(rank) {
                Some(r) => Fact::Member(r),
                None => Fact::Malformed(malformed("rank is not a number in its plain spelling")),
            }
        } else if let Some(step) = rest.strip_prefix("checkpoints/") {
            let record: Result<CheckpointRecord, _> = serde_json::from_slice(value);
            match (canonical::<u64>(step, |s| format!("{s:012}")), record) {
                (Some(s), Ok(r)) if r.step == s => Fact::Checkpoint(s, r),
                (Some(s), Ok(r)) => {
                    Fact::Malformed(malformed(&format!("record says step {} under key step {s}", r.step)))
                }
                (None, _) => Fact::Malformed(malformed("checkpoint step is not a 12-digit number")),
                (_, Err(e)) => Fact::Malformed(malformed(&e.to_string())),
            }
        } else if let Some(rank) = rest.strip_prefix("peers/") {
            match (rank_of(rank), serde_json::from_slice::<PeerRecord>(value)) {
                (Some(r), Ok(record)) => Fact::Peer(r, record),
                (None, _) => Fact::Malformed(malformed("rank is not a number in its plain spelling")),
                (_, Err(e)) => Fact::Malformed(malformed(&e.to_string())),
            }
        } else if let Some(rank) = rest.strip_prefix("loads/") {
            match (rank_of(rank), serde_json::from_slice(value)) {
                (Some(r), Ok(record)) => Fact::Load(r, record),
                (None, _) => Fact::Malformed(malformed("rank is not a number in its plain spelling")),
                (_, Err(e)) => Fact::Malformed(malformed(&e.to_string())),
            }
        } else if rest == "progress" {
            match serde_json::from_slice::<ProgressRecord>(value) {
                Ok(p) => Fact::Progress(p),
                Err(e) => Fact::Malformed(malformed(&e.to_string())),
            }
        } else if let Some(ack) = rest.strip_prefix("acks/") {
            let Some((generation, node)) = ack.split_once('/') else {
                return Fact::Malformed(malformed("expected acks/<generation>/<node>"));
            };
            let generation = canonical::<u64>(generation, plain);
            if let (Some(g), Some(rank)) = (generation, rank_of(node))
                && let Ok(ack) = serde_json::from_slice::<MemberAck>(value)
            {
                return Fact::MemberAck { generation: g, rank, ack };
            }
            match (generation, Ack::parse(key, value)) {
                (Some(g), Ok(a)) if a.generation == g && a.node == node => {
                    Fact::AgentAck { generation: g, node: node.to_string(), ack: a }
                }
                (Some(_), Ok(_)) => Fact::Malformed(malformed("ack names another generation or node")),
                (None, _) => Fact::Malformed(malformed("generation is not a number in its plain spelling")),
                (_, Err(e)) => Fact::Malformed(e),
            }
        } else {
            Fact::Ignored
        }
    }
}

/// An [`Observation`] kept current key by key: each put or delete costs O(log keys), so a
/// control loop fed by a watch pays for what changed, not for the cluster
/// ([`Observation::from_kvs_in_force`] is the same thing built from a whole read). Member
/// writes are judged against the generation in force; a new one re-judges every key (no
/// parsing: each key's value is parsed once, when it is put).
#[derive(Clone, Debug)]
pub struct LiveObservation {
    keys: Keyspace,
    job_root: String,
    in_force: Option<InForce>,
    /// What each key said, by key.
    facts: BTreeMap<String, Fact>,
    /// Keys held per node: a node with none is absent from the observation.
    node_keys: BTreeMap<String, usize>,
    /// Shared with the rounds that hand it out; copied on write only while one still holds it.
    observation: Arc<Observation>,
    malformed: Vec<MalformedValue>,
}

impl LiveObservation {
    /// An empty observation of job `namespace/job` under `keys`, no generation in force.
    pub fn new(keys: &Keyspace, namespace: &str, job: &str) -> Self {
        Self {
            keys: keys.clone(),
            job_root: keys.job(namespace, job).root().to_string(),
            in_force: None,
            facts: BTreeMap::new(),
            node_keys: BTreeMap::new(),
            observation: Arc::default(),
            malformed: Vec::new(),
        }
    }

    /// Forgets every key (a full read follows).
    pub fn clear(&mut self) {
        let (now, previous_decision) = (self.observation.now, self.observation.previous_decision);
        self.facts.clear();
        self.node_keys.clear();
        self.malformed.clear();
        self.observation = Arc::new(Observation { now, previous_decision, ..Default::default() });
    }

    /// `key` now holds `value`.
    pub fn put(&mut self, key: &str, value: &[u8]) {
        self.delete(key);
        let fact = Fact::parse(&self.keys, &self.job_root, key, value);
        if matches!(fact, Fact::Ignored) {
            return;
        }
        self.add(key, &fact);
        self.facts.insert(key.to_string(), fact);
    }

    /// `key` was deleted.
    pub fn delete(&mut self, key: &str) {
        if let Some(fact) = self.facts.remove(key) {
            self.remove(key, &fact);
        }
    }

    /// Judges member writes against `in_force` from now on (every key again if it changed).
    pub fn set_in_force(&mut self, in_force: Option<InForce>) {
        if in_force == self.in_force {
            return;
        }
        self.in_force = in_force;
        let facts = std::mem::take(&mut self.facts);
        self.clear();
        for (key, fact) in &facts {
            self.add(key, fact);
        }
        self.facts = facts;
    }

    /// Sets the clock and the time of the previous decision ([`Observation::previous_decision`]).
    pub fn stamp(&mut self, now: f64, previous_decision: Option<f64>) {
        let o = Arc::make_mut(&mut self.observation);
        o.now = now;
        o.previous_decision = previous_decision;
    }

    /// The observation as of the last change.
    pub fn observation(&self) -> &Observation {
        &self.observation
    }

    /// The observation, shared (a round hands it out without copying it).
    pub fn shared(&self) -> Arc<Observation> {
        Arc::clone(&self.observation)
    }

    /// The values left out because they cannot be read, in the order they were put.
    pub fn malformed(&self) -> &[MalformedValue] {
        &self.malformed
    }

    fn add(&mut self, key: &str, fact: &Fact) {
        let in_force = self.in_force.as_ref();
        let o = Arc::make_mut(&mut self.observation);
        let stale = |o: &mut Observation, reason| o.stale.push(StaleWrite { key: key.to_string(), reason });
        match fact {
            Fact::Node { node, part } => {
                *self.node_keys.entry(node.clone()).or_default() += 1;
                let view = o.nodes.entry(node.clone()).or_default();
                match part {
                    NodePart::Alive => view.alive = true,
                    NodePart::Chip(i, record) => {
                        view.chips.insert(*i, record.clone());
                    }
                    NodePart::Unreadable(m) => self.malformed.push(m.clone()),
                    NodePart::Other => {}
                }
            }
            Fact::Member(r) => {
                o.members.insert(*r);
            }
            Fact::Checkpoint(s, r) => match checkpoint_staleness(in_force, r) {
                Some(reason) => stale(o, reason),
                None => {
                    o.checkpoints.insert(*s);
                }
            },
            Fact::Peer(r, record) => {
                o.peers.insert(*r, record.clone());
            }
            Fact::Load(r, record) => {
                o.loads.insert(*r, record.clone());
            }
            Fact::Progress(p) => match progress_staleness(in_force, p) {
                Some(reason) => stale(o, reason),
                None => o.step = Some(p.step),
            },
            Fact::MemberAck { generation, rank, ack } => {
                match ack_staleness(in_force, *generation, *rank, ack) {
                    Some(reason) => stale(o, reason),
                    None => {
                        o.joined.entry(*generation).or_default().insert(*rank);
                    }
                }
            }
            Fact::AgentAck { generation, node, ack } => {
                o.acks.entry(*generation).or_default().insert(node.clone(), ack.clone());
            }
            Fact::Malformed(m) => self.malformed.push(m.clone()),
            Fact::Ignored => {}
        }
    }

    /// Undoes [`add`](Self::add) of `fact` at `key` (judged against the same generation: a new
    /// one re-adds every key).
    fn remove(&mut self, key: &str, fact: &Fact) {
        let in_force = self.in_force.as_ref();
        let o = Arc::make_mut(&mut self.observation);
        let unstale = |o: &mut Observation| o.stale.retain(|s| s.key != key);
        let malformed = &mut self.malformed;
        let mut unmalformed = || malformed.retain(|m| m.key != key);
        match fact {
            Fact::Node { node, part } => {
                if let Some(view) = o.nodes.get_mut(node) {
                    match part {
                        NodePart::Alive => view.alive = false,
                        NodePart::Chip(i, _) => {
                            view.chips.remove(i);
                        }
                        NodePart::Unreadable(_) => unmalformed(),
                        NodePart::Other => {}
                    }
                }
                let left = self.node_keys.get_mut(node).map(|n| {
                    *n = n.saturating_sub(1);
                    *n
                });
                if left == Some(0) {
                    self.node_keys.remove(node);
                    o.nodes.remove(node);
                }
            }
            Fact::Member(r) => {
                o.members.remove(r);
            }
            Fact::Checkpoint(s, r) => match checkpoint_staleness(in_force, r) {
                Some(_) => unstale(o),
                None => {
                    o.checkpoints.remove(s);
                }
            },
            Fact::Peer(r, _) => {
                o.peers.remove(r);
            }
            Fact::Load(r, _) => {
                o.loads.remove(r);
            }
            Fact::Progress(p) => match progress_staleness(in_force, p) {
                Some(_) => unstale(o),
                None => o.step = None,
            },
            Fact::MemberAck { generation, rank, ack } => {
                match ack_staleness(in_force, *generation, *rank, ack) {
                    Some(_) => unstale(o),
                    None => {
                        if let Some(ranks) = o.joined.get_mut(generation) {
                            ranks.remove(rank);
                            if ranks.is_empty() {
                                o.joined.remove(generation);
                            }
                        }
                    }
                }
            }
            Fact::AgentAck { generation, node, .. } => {
                if let Some(acks) = o.acks.get_mut(generation) {
                    acks.remove(node);
                    if acks.is_empty() {
                        o.acks.remove(generation);
                    }
                }
            }
            Fact::Malformed(_) => unmalformed(),
            Fact::Ignored => {}
        }
    }
}

/// Progress of an older generation counts only from a member of the one in force (it has not
/// joined it yet, and its step is the job's); anyone else's is a superseded leader's.
fn progress_staleness(in_force: Option<&InForce>, p: &ProgressRecord) -> Option<StaleReason> {
    let (in_force, written) = (in_force?, p.generation?);
    let member = p.rank.is_some_and(|r| in_force.members.contains(&r));
    (written < in_force.generation && !member)
        .then_some(StaleReason::OlderGeneration { written, current: in_force.generation })
}

/// A checkpoint record is a fact whoever wrote it (a leader dropped since still committed it),
/// except one an older generation recorded past the step the generation in force rolled back
/// to: the rollback was decided without it, so it was committed after, on the abandoned
/// timeline, and may lack the shards of members that had already left.
fn checkpoint_staleness(in_force: Option<&InForce>, r: &CheckpointRecord) -> Option<StaleReason> {
    let (in_force, written) = (in_force?, r.generation?);
    let rollback_to = in_force.rollback_to?;
    (written < in_force.generation && r.step > rollback_to).then_some(StaleReason::AbandonedTimeline {
        written,
        current: in_force.generation,
        rollback_to,
    })
}

/// A member acknowledgement must name its key's generation; one of the generation in force must
/// come from one of its members.
fn ack_staleness(in_force: Option<&InForce>, key: u64, rank: u32, ack: &MemberAck) -> Option<StaleReason> {
    if let Some(written) = ack.generation.filter(|&g| g != key) {
        return Some(StaleReason::AckOfAnotherGeneration { key, written });
    }
    let in_force = in_force?;
    (key == in_force.generation && !in_force.members.contains(&rank))
        .then_some(StaleReason::NotAMember { rank, generation: in_force.generation })
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

    /// Generation 5 is in force (members 0 and 1, rolled back to step 20); rank 2 left in it.
    #[test]
    fn stale_member_writes_are_left_out_with_their_reason() {
        let ks = Keyspace::new("/nl");
        let in_force = InForce { generation: 5, members: BTreeSet::from([0, 1]), rollback_to: Some(20) };
        let read = |kvs: Vec<(&'static str, &'static [u8])>| {
            let (obs, bad) =
                Observation::from_kvs_in_force(&ks, "default", "tiny", 1.0, Some(&in_force), kvs);
            assert!(bad.is_empty(), "{bad:?}");
            obs
        };
        let stale = |obs: &Observation| obs.stale.iter().map(|s| s.reason.clone()).collect::<Vec<_>>();
        let p = "/nl/jobs/default/tiny/progress";
        // Rank 2's leader of generation 4 replays a step: ignored. Rank 0 (a member of 5 that
        // has not joined it yet), the current generation, or a writer that predates generations:
        // counted.
        let obs = read(vec![(p, br#"{"step":90,"generation":4,"rank":2}"#)]);
        assert_eq!(
            (obs.step, stale(&obs)),
            (None, vec![StaleReason::OlderGeneration { written: 4, current: 5 }])
        );
        let obs = read(vec![(p, br#"{"step":90,"generation":4}"#)]);
        assert_eq!(obs.step, None, "a writer that does not say who it is cannot be a member");
        for ok in [
            &br#"{"step":30,"generation":4,"rank":0}"#[..],
            br#"{"step":30,"generation":5,"rank":3}"#,
            br#"{"step":30}"#,
        ] {
            let obs = read(vec![(p, ok)]);
            assert_eq!((obs.step, obs.stale.len()), (Some(30), 0), "{}", String::from_utf8_lossy(ok));
        }
        // Checkpoints: one past the rollback from an older generation is the abandoned
        // timeline's; older ones (whoever wrote them) and the current generation's count.
        let obs = read(vec![
            ("/nl/jobs/default/tiny/checkpoints/000000000010", br#"{"step":10,"generation":1}"#),
            ("/nl/jobs/default/tiny/checkpoints/000000000020", br#"{"step":20,"generation":4}"#),
            ("/nl/jobs/default/tiny/checkpoints/000000000030", br#"{"step":30,"generation":4}"#),
            ("/nl/jobs/default/tiny/checkpoints/000000000040", br#"{"step":40,"generation":5}"#),
        ]);
        assert_eq!(obs.checkpoints, BTreeSet::from([10, 20, 40]));
        assert_eq!(stale(&obs), [StaleReason::AbandonedTimeline { written: 4, current: 5, rollback_to: 20 }]);
        assert_eq!(obs.stale[0].key, "/nl/jobs/default/tiny/checkpoints/000000000030");
        // Acks: rank 2 acknowledging generation 5 is no member of it; a value naming another
        // generation than its key is refused; older generations' acks stay (history).
        let obs = read(vec![
            ("/nl/jobs/default/tiny/acks/4/2", br#"{"step":17,"generation":4}"#),
            ("/nl/jobs/default/tiny/acks/5/0", br#"{"step":20,"generation":5}"#),
            ("/nl/jobs/default/tiny/acks/5/1", br#"{"step":20,"generation":4}"#),
            ("/nl/jobs/default/tiny/acks/5/2", br#"{"step":20,"generation":5}"#),
        ]);
        assert_eq!(obs.joined, BTreeMap::from([(4, BTreeSet::from([2])), (5, BTreeSet::from([0]))]));
        assert_eq!(
            stale(&obs),
            [
                StaleReason::AckOfAnotherGeneration { key: 5, written: 4 },
                StaleReason::NotAMember { rank: 2, generation: 5 }
            ]
        );
        // Without a generation in force nothing is judged but the ack's own consistency.
        let (obs, _) = Observation::from_kvs(
            &ks,
            "default",
            "tiny",
            1.0,
            vec![(p, &br#"{"step":90,"generation":4,"rank":2}"#[..])],
        );
        assert_eq!(obs.step, Some(90));
    }

    /// A key universe with every kind of key, well-formed and not, for [`LiveObservation`]'s
    /// property: any sequence of puts, deletes and generations in force leaves it equal to the
    /// observation built from scratch from the keys that remain.
    fn universe() -> Vec<(&'static str, Vec<&'static [u8]>)> {
        let chip_ok: &[u8] = br#"{"state":"healthy","code":"ok","since":1.0}"#;
        let chip_failed: &[u8] = br#"{"state":"failed","code":"ecc","since":2.0}"#;
        vec![
            ("/nl/nodes/n0/alive", vec![b"{}"]),
            ("/nl/nodes/n0/chips/0", vec![chip_ok, chip_failed, b"garbage"]),
            ("/nl/nodes/n0/chips/1", vec![chip_ok]),
            ("/nl/nodes/n0/chips/01", vec![chip_failed]),
            ("/nl/nodes/n0/other", vec![b"x"]),
            ("/nl/nodes/n1/alive", vec![b"{}"]),
            ("/nl/nodes/n1/chips/x", vec![chip_ok]),
            ("/nl/jobs/default/tiny/members/0", vec![b"{}"]),
            ("/nl/jobs/default/tiny/members/2", vec![b"{}"]),
            ("/nl/jobs/default/tiny/members/02", vec![b"{}"]),
            (
                "/nl/jobs/default/tiny/checkpoints/000000000010",
                vec![br#"{"step":10,"generation":1}"#, br#"{"step":11}"#],
            ),
            (
                "/nl/jobs/default/tiny/checkpoints/000000000030",
                vec![br#"{"step":30,"generation":4}"#, br#"{"step":30,"generation":5}"#],
            ),
            ("/nl/jobs/default/tiny/checkpoints/30", vec![br#"{"step":30}"#]),
            (
                "/nl/jobs/default/tiny/progress",
                vec![br#"{"step":90,"generation":4,"rank":2}"#, br#"{"step":91}"#, b"{"],
            ),
            (
                "/nl/jobs/default/tiny/acks/5/0",
                vec![br#"{"step":20,"generation":5}"#, br#"{"step":20,"generation":4}"#],
            ),
            ("/nl/jobs/default/tiny/acks/5/2", vec![br#"{"step":20}"#]),
            ("/nl/jobs/default/tiny/acks/05/1", vec![br#"{"step":20}"#]),
            (
                "/nl/jobs/default/tiny/acks/5/n0",
                vec![
                    br#"{"node":"n0","generation":5,"outcome":"applied"}"#,
                    br#"{"node":"n1","generation":5,"outcome":"applied"}"#,
                ],
            ),
            ("/nl/jobs/default/tiny/acks/x", vec![b"{}"]),
            ("/nl/jobs/default/tiny/peers/1", vec![br#"{"generation":5,"own":[10]}"#, b"[]"]),
            ("/nl/jobs/default/tiny/loads/1", vec![b"nope"]),
            ("/nl/jobs/default/tiny/recovery", vec![b"{}"]),
            ("/nl/jobs/default/other/members/1", vec![b"{}"]),
        ]
    }

    fn sorted(mut obs: Observation, mut bad: Vec<MalformedValue>) -> (Observation, Vec<MalformedValue>) {
        obs.stale.sort_by(|a, b| a.key.cmp(&b.key));
        bad.sort_by(|a, b| a.key.cmp(&b.key));
        (obs, bad)
    }

    proptest::proptest! {
        #[test]
        fn a_live_observation_equals_one_built_from_the_keys_that_remain(
            ops in proptest::collection::vec((0usize..24, 0usize..3, 0u8..8), 1..60)
        ) {
            let ks = Keyspace::new("/nl");
            let universe = universe();
            let in_force_of = |g: u8| match g {
                0 => None,
                1 => Some(InForce { generation: 5, members: BTreeSet::from([0, 1]), rollback_to: Some(20) }),
                _ => Some(InForce { generation: 6, members: BTreeSet::from([2]), rollback_to: None }),
            };
            let mut live = LiveObservation::new(&ks, "default", "tiny");
            let mut held: BTreeMap<&str, &[u8]> = BTreeMap::new();
            let mut in_force = None;
            for (k, v, op) in ops {
                let (key, values) = &universe[k % universe.len()];
                match op {
                    0 | 1 => {
                        live.delete(key);
                        held.remove(key);
                    }
                    2 => {
                        in_force = in_force_of(v as u8);
                        live.set_in_force(in_force.clone());
                    }
                    _ => {
                        let value = values[v % values.len()];
                        live.put(key, value);
                        held.insert(key, value);
                    }
                }
                live.stamp(7.0, Some(6.0));
                let (mut fresh, bad) =
                    Observation::from_kvs_in_force(&ks, "default", "tiny", 7.0, in_force.as_ref(), held.clone());
                fresh.previous_decision = Some(6.0);
                let want = sorted(fresh, bad);
                let got = sorted(live.observation().clone(), live.malformed().to_vec());
                proptest::prop_assert_eq!(got, want);
            }
        }
    }
}
