//! The persisted recovery record (`jobs/<ns>/<job>/recovery`): everything the brain needs to
//! continue after an operator restart. Nothing the brain decides lives only in memory.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::reasons::JobFailure;
use super::rung::Rung;
use crate::job::RecoveryRecord;
use crate::keyspace::MalformedValue;
use crate::placement::ChipId;

/// Format version of [`RecoveryState`]; a record of another version is refused, not guessed.
pub const STATE_VERSION: u32 = 1;

/// Completed recoveries kept in the record (older ones are only in the event/metric history).
pub const HISTORY_LIMIT: usize = 32;

/// What kind of fault started a recovery (the `trigger` label of the recovery metrics).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TriggerKind {
    /// A chip reported a fault (ECC, link down, thermal, ...).
    Chip,
    /// A chip stopped advancing its heartbeat (`heartbeat-stalled`).
    Hang,
    /// A chip the agent quarantined for flapping (`flapping:<code>`).
    Flap,
    /// A worker process left its membership while its node stayed up.
    Worker,
    /// A node's agent lease expired: every chip of the node is out.
    Node,
}

impl TriggerKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerKind::Chip => "chip",
            TriggerKind::Hang => "hang",
            TriggerKind::Flap => "flap",
            TriggerKind::Worker => "worker",
            TriggerKind::Node => "node",
        }
    }

    /// The kind of a chip fault from the agent's published code.
    pub fn of_chip_code(code: &str) -> Self {
        if code == "heartbeat-stalled" {
            TriggerKind::Hang
        } else if code.starts_with("flapping:") {
            TriggerKind::Flap
        } else {
            TriggerKind::Chip
        }
    }
}

/// Where a recovery's members got the state they resumed from (the `source` of the record,
/// the status, Events, metrics and the demo report).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase", tag = "from")]
pub enum RestoreSource {
    /// No rollback: every member kept its memory (a reroute).
    #[default]
    Memory,
    /// Rolled back to the in-memory peer snapshot of `step` (no disk read).
    Peer {
        /// Snapshot step.
        step: u64,
    },
    /// Rolled back to the committed disk checkpoint of `step` (`0`: the seeded initial state).
    Checkpoint {
        /// Checkpoint step.
        step: u64,
    },
}

impl RestoreSource {
    /// The source of a rollback to `rollback_to` (`None`: no rollback), from peers or disk.
    pub fn of(rollback_to: Option<u64>, from_peers: bool) -> Self {
        match rollback_to {
            None => RestoreSource::Memory,
            Some(step) if from_peers => RestoreSource::Peer { step },
            Some(step) => RestoreSource::Checkpoint { step },
        }
    }

    /// Lower-case name (`memory`, `peer`, `checkpoint`): the metric label and report column.
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreSource::Memory => "memory",
            RestoreSource::Peer { .. } => "peer",
            RestoreSource::Checkpoint { .. } => "checkpoint",
        }
    }

    /// The step rolled back to, if any.
    pub fn step(self) -> Option<u64> {
        match self {
            RestoreSource::Memory => None,
            RestoreSource::Peer { step } | RestoreSource::Checkpoint { step } => Some(step),
        }
    }
}

impl fmt::Display for RestoreSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.step() {
            Some(step) => write!(f, "{}@{step}", self.as_str()),
            None => f.write_str(self.as_str()),
        }
    }
}

/// One fault the brain saw.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Trigger {
    /// What kind.
    pub kind: TriggerKind,
    /// Node index in the job.
    pub node: u32,
    /// Node name at the time.
    pub node_name: String,
    /// The chip, for chip-level faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chip: Option<u32>,
    /// Fault code (`node-lost`, `worker-lost`, or the agent's code).
    pub code: String,
    /// When the fault happened, when known (the chip record's `since`, when plausible: see
    /// [`Trigger::stamp_rejected`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<f64>,
    /// Why the reporter's own stamp of the fault was not taken as [`Trigger::at`]: its clock
    /// cannot be trusted (a node whose clock is skewed would otherwise make the detection time
    /// read an hour, or nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp_rejected: Option<StampRejected>,
}

/// Longest an agent's fault record may plausibly take to reach the brain after its `since`
/// stamp, beyond the brain's previous decision: the agent's chip poll, a write retried under the
/// agent's lease, the brain's own read. A stamp older than that is the reporter's clock, not a
/// slow report.
pub const MAX_REPORT_LAG_SECONDS: f64 = 60.0;

/// Furthest a reporter's fault stamp may lie after the brain's clock before it counts as from the
/// future (clocks agree only so closely): within it, the fault is taken as seen at once.
pub const MAX_CLOCK_LEAD_SECONDS: f64 = 1.0;

/// A reporter's fault stamp the brain refused: outside the interval in which the fault can have
/// happened by the brain's own clock. The fault's time is then unknown (no detection time).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(tag = "reason", rename_all = "camelCase")]
pub enum StampRejected {
    /// Later than the observation that showed the fault (by more than
    /// [`MAX_CLOCK_LEAD_SECONDS`]): the reporter's clock is ahead.
    #[serde(rename_all = "camelCase")]
    FromTheFuture {
        /// The reporter's stamp (its clock, unix seconds).
        stamp: f64,
        /// When the brain saw the fault (its clock).
        seen_at: f64,
    },
    /// Earlier than the brain's previous decision, which did not see the fault, by more than
    /// [`MAX_REPORT_LAG_SECONDS`]: the reporter's clock is behind.
    #[serde(rename_all = "camelCase")]
    TooOld {
        /// The reporter's stamp (its clock, unix seconds).
        stamp: f64,
        /// The earliest plausible time: the previous decision less the report lag.
        earliest: f64,
    },
}

impl StampRejected {
    /// Checks a reporter's stamp `stamp` of a fault the brain sees at `seen_at` and had not seen
    /// at its previous decision `previous` (`None`: no previous decision, no lower bound).
    pub fn check(stamp: f64, seen_at: f64, previous: Option<f64>) -> Result<f64, StampRejected> {
        if !stamp.is_finite() || stamp > seen_at + MAX_CLOCK_LEAD_SECONDS {
            return Err(StampRejected::FromTheFuture { stamp, seen_at });
        }
        if let Some(previous) = previous {
            let earliest = previous.min(seen_at) - MAX_REPORT_LAG_SECONDS;
            if stamp < earliest {
                return Err(StampRejected::TooOld { stamp, earliest });
            }
        }
        Ok(stamp.min(seen_at))
    }
}

impl fmt::Display for StampRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StampRejected::FromTheFuture { stamp, seen_at } => write!(
                f,
                "the reporter's fault stamp is {:.1} s after the brain saw the fault (its clock is ahead)",
                stamp - seen_at
            ),
            StampRejected::TooOld { stamp, earliest } => write!(
                f,
                "the reporter's fault stamp is {:.1} s before the earliest plausible time (its clock is behind)",
                earliest - stamp
            ),
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.chip {
            Some(chip) => write!(f, "{} {}/{chip} {}", self.kind.as_str(), self.node_name, self.code),
            None => write!(f, "{} {} {}", self.kind.as_str(), self.node_name, self.code),
        }
    }
}

/// A chip the brain took out of the placement, and its hysteresis bookkeeping.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Exclusion {
    /// The code it was excluded for.
    pub code: String,
    /// When it was excluded (brain clock).
    pub since: f64,
    /// Since when it has been seen usable without interruption; it rejoins after
    /// `rejoinAfterSeconds` of that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_since: Option<f64>,
    /// Times it failed again after being seen usable while excluded (a flapping chip).
    #[serde(default)]
    pub relapses: u32,
}

/// How one attempt of a recovery ended.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    /// The rung tried.
    pub rung: Rung,
    /// The generation it published.
    pub generation: u64,
    /// When it was published.
    pub at: f64,
    /// Why it was abandoned (`None` for the attempt in progress or the one that succeeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abandoned: Option<String>,
}

/// The recovery in progress.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ActiveRecovery {
    /// Sequence number (1 for the job's first recovery).
    pub id: u32,
    /// Every fault folded into this recovery, in detection order.
    pub triggers: Vec<Trigger>,
    /// The rung of the attempt in progress.
    pub rung: Rung,
    /// The placement generation the attempt published.
    pub generation: u64,
    /// Earliest known fault time among the triggers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_at: Option<f64>,
    /// When the brain first saw a fault of this recovery.
    pub detected_at: f64,
    /// When the attempt in progress gives up and escalates.
    pub deadline: f64,
    /// Last completed step when the fault was detected.
    pub step_at_detection: u64,
    /// The step the job rolls back to, when the attempt rolls back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<u64>,
    /// Whether `rollback_to` is an in-memory peer snapshot rather than a disk checkpoint.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollback_from_peers: bool,
    /// The planner's tier for the published placement (`reroute` or `reshard`).
    pub plan_tier: String,
    /// Expert replicas the attempt loads.
    pub experts_moved: u64,
    /// Ranks (re)started by the attempt, which must rejoin before training resumes.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub restarted: BTreeSet<u32>,
    /// Every attempt so far, the current one last.
    pub attempts: Vec<Attempt>,
}

impl ActiveRecovery {
    /// The trigger that names the recovery: the most severe kind, first seen.
    pub fn primary(&self) -> Option<&Trigger> {
        self.triggers.iter().rev().max_by_key(|t| t.kind)
    }
}

/// A finished recovery: the audit trail and the report's `recoveries[]`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CompletedRecovery {
    /// Sequence number.
    pub id: u32,
    /// Kind of the primary trigger.
    pub kind: TriggerKind,
    /// The primary trigger, e.g. `chip node-2/5 hbm-ecc-uncorrectable`.
    pub trigger: String,
    /// Every fault folded in.
    pub triggers: Vec<Trigger>,
    /// The rung that recovered it.
    pub tier: Rung,
    /// The planner's tier of the final placement.
    pub plan_tier: String,
    /// Earliest known fault time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_at: Option<f64>,
    /// When the brain saw it.
    pub detected_at: f64,
    /// When every node applied the final generation and every member was present.
    pub resumed_at: f64,
    /// Fault → detection, when the fault time is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_s: Option<f64>,
    /// Detection → training resumed.
    pub resume_s: f64,
    /// Completed steps discarded by a rollback (0 without one).
    pub steps_lost: u64,
    /// The step rolled back to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<u64>,
    /// Where the resumed state came from: memory, a peer snapshot or a disk checkpoint.
    #[serde(default)]
    pub source: RestoreSource,
    /// The generation that resumed training.
    pub generation: u64,
    /// Rungs abandoned before this one succeeded.
    pub escalations: u32,
    /// Expert replicas loaded.
    pub experts_moved: u64,
}

impl CompletedRecovery {
    /// The status entry of the `TrainingJob` (`time` is the RFC 3339 resume time).
    pub fn to_status(&self, time: String) -> RecoveryRecord {
        RecoveryRecord {
            trigger: self.trigger.clone(),
            tier: self.tier.api_tier(),
            detection_seconds: self.detect_s,
            recovery_seconds: self.resume_s,
            steps_lost: self.steps_lost,
            source: Some(self.source.as_str().to_string()),
            time,
        }
    }
}

/// Coarse phase of the brain.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BrainPhase {
    /// Initial placement published; waiting for every member.
    Starting,
    /// Training.
    Running,
    /// A recovery is in progress (`active`).
    Recovering,
    /// Every step done.
    Succeeded,
    /// Gave up (`failure` says why).
    Failed,
}

impl BrainPhase {
    /// Whether nothing will change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, BrainPhase::Succeeded | BrainPhase::Failed)
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            BrainPhase::Starting => "starting",
            BrainPhase::Running => "running",
            BrainPhase::Recovering => "recovering",
            BrainPhase::Succeeded => "succeeded",
            BrainPhase::Failed => "failed",
        }
    }
}

/// The persisted state of one job's recovery brain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Phase.
    pub phase: BrainPhase,
    /// The last placement generation the brain published (0 before the first).
    pub generation: u64,
    /// Name of the node at each index (a spare takes over an index on `replace`).
    pub node_names: Vec<String>,
    /// Spare nodes not used yet, in order of use.
    pub spares: Vec<String>,
    /// Node indices dropped by `shrink` (no member, chips out of the placement).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub dropped: BTreeSet<u32>,
    /// Chips out of the placement.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", with = "chip_map")]
    pub excluded: BTreeMap<ChipId, Exclusion>,
    /// The step of the last rebalance decision (published or found without gain; 0: none):
    /// the next waits `minIntervalSteps` from it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rebalanced_at: u64,
    /// The newest rebalance generations published, oldest first (at most [`HISTORY_LIMIT`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rebalances: Vec<super::load::RebalanceRecord>,
    /// Recoveries started so far.
    pub recoveries: u32,
    /// The recovery in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<ActiveRecovery>,
    /// The newest completed recoveries, oldest first (at most [`HISTORY_LIMIT`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<CompletedRecovery>,
    /// Why the job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<JobFailure>,
    /// When the first generation was published (brain clock): the start deadline counts from
    /// it while the job is `Starting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting_since: Option<f64>,
}

/// JSON object keys must be strings: chips are keyed `"<node>/<chip>"`.
mod chip_map {
    use std::collections::BTreeMap;

    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Exclusion;
    use crate::placement::ChipId;

    pub fn serialize<S: Serializer>(map: &BTreeMap<ChipId, Exclusion>, s: S) -> Result<S::Ok, S::Error> {
        let keyed: BTreeMap<String, &Exclusion> = map.iter().map(|(c, e)| (c.to_string(), e)).collect();
        keyed.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<ChipId, Exclusion>, D::Error> {
        let keyed = BTreeMap::<String, Exclusion>::deserialize(d)?;
        keyed
            .into_iter()
            .map(|(k, v)| {
                let parsed =
                    k.split_once('/').and_then(|(n, c)| Some(ChipId::new(n.parse().ok()?, c.parse().ok()?)));
                parsed
                    .map(|c| (c, v))
                    .ok_or_else(|| D::Error::custom(format!("bad chip key {k:?}, expected <node>/<chip>")))
            })
            .collect()
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl RecoveryState {
    /// The state of a job that has not started: nothing published, every node in its place.
    pub fn new(node_names: Vec<String>, spares: Vec<String>) -> Self {
        Self {
            version: STATE_VERSION,
            phase: BrainPhase::Starting,
            generation: 0,
            node_names,
            spares,
            dropped: BTreeSet::new(),
            excluded: BTreeMap::new(),
            rebalanced_at: 0,
            rebalances: Vec::new(),
            recoveries: 0,
            active: None,
            history: Vec::new(),
            failure: None,
            starting_since: None,
        }
    }

    /// Parses the record read from etcd; a record of another version or an inconsistent one is
    /// an error (the caller reports it as a condition and does not act on the job).
    pub fn parse(key: &str, bytes: &[u8]) -> Result<Self, MalformedValue> {
        let bad = |reason: String| MalformedValue { key: key.to_string(), reason };
        let state: RecoveryState = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if state.version != STATE_VERSION {
            return Err(bad(format!("record version {} (this brain reads {STATE_VERSION})", state.version)));
        }
        if state.phase == BrainPhase::Recovering && state.active.is_none() {
            return Err(bad("phase recovering without an active recovery".into()));
        }
        if state.dropped.iter().any(|&n| n as usize >= state.node_names.len()) {
            return Err(bad("a dropped node index is outside the node table".into()));
        }
        Ok(state)
    }

    /// The record as stored (compact JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The generation whose acknowledgements the brain is waiting for, if any.
    pub fn awaiting(&self) -> Option<u64> {
        self.active.as_ref().map(|a| a.generation)
    }

    /// Ranks that should be running: every node index not dropped.
    pub fn expected_ranks(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.node_names.len() as u32).filter(|r| !self.dropped.contains(r))
    }

    /// Names of the nodes of [`RecoveryState::expected_ranks`].
    pub fn expected_nodes(&self) -> impl Iterator<Item = String> + '_ {
        self.expected_ranks().filter_map(|r| self.node_names.get(r as usize).cloned())
    }

    /// Moves the active recovery's deadline `seconds` later: time during which decisions were
    /// frozen (a control-plane outage) does not count against an attempt.
    pub fn postpone(&mut self, seconds: f64) {
        if let Some(active) = self.active.as_mut() {
            active.deadline += seconds;
        }
        if self.phase == BrainPhase::Starting
            && let Some(since) = self.starting_since.as_mut()
        {
            *since += seconds;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_refuses_garbage() {
        let mut s = RecoveryState::new(vec!["a".into(), "b".into()], vec!["s".into()]);
        s.excluded.insert(
            ChipId::new(1, 3),
            Exclusion { code: "x".into(), since: 1.0, healthy_since: None, relapses: 0 },
        );
        let json = s.to_json();
        assert_eq!(RecoveryState::parse("k", json.as_bytes()), Ok(s.clone()));
        let other_version = json.replace("\"version\":1", "\"version\":7");
        assert!(RecoveryState::parse("k", other_version.as_bytes()).is_err());
        let bad_chip = json.replace("\"1/3\"", "\"one/3\"");
        assert!(RecoveryState::parse("k", bad_chip.as_bytes()).is_err());
        for bad in [
            &b""[..],
            b"{}",
            b"null",
            br#"{"version":1,"phase":"recovering","generation":1,"nodeNames":[],"spares":[],"recoveries":0}"#,
        ] {
            assert!(RecoveryState::parse("k", bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn trigger_kinds_of_chip_codes() {
        assert_eq!(TriggerKind::of_chip_code("heartbeat-stalled"), TriggerKind::Hang);
        assert_eq!(TriggerKind::of_chip_code("flapping:hbm-ecc-uncorrectable"), TriggerKind::Flap);
        assert_eq!(TriggerKind::of_chip_code("link-down"), TriggerKind::Chip);
    }
}
