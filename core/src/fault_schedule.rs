//! The fault schedule language of `ninelives demo --fault ...`.
//!
//! ```text
//! chip:<node>/<chip>@<step>    the chip reports an uncorrectable HBM ECC error (stays failed)
//! hang:<node>/<chip>@<step>    the chip stops advancing its heartbeat (the agent sees a hang)
//! flap:<node>/<chip>@<step>    the chip flaps: FLAP_ONSETS times, an ECC error for FLAP_HALF_PERIOD_S
//!                              then healthy for FLAP_HALF_PERIOD_S (the agent quarantines it on the
//!                              third onset; the brain has excluded it since the first)
//! node:<node>@<step>           the whole node is lost: its agent and worker are killed (SIGKILL),
//!                              so its lease expires after the heartbeat TTL
//! worker:<node>@<step>         the node's worker process is killed (SIGKILL); the node stays up
//! ```
//! `<node>` is the node index in the job (`0..nodes`), `<chip>` the chip index on the node,
//! `<step>` the training step at (after) which the fault is injected. Pure: parsing, checking
//! against a topology, ordering; the runtime does the injecting.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Onsets of a `flap` fault (the agent's default `--flap-limit`).
pub const FLAP_ONSETS: u32 = 3;
/// Seconds a flapping chip stays failed, then healthy, per onset.
pub const FLAP_HALF_PERIOD_S: f64 = 1.0;

/// What a scheduled fault does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// Uncorrectable ECC error on one chip.
    Chip,
    /// One chip's heartbeat stops.
    Hang,
    /// One chip fails and recovers repeatedly.
    Flap,
    /// A whole node is lost.
    Node,
    /// A node's worker process crashes.
    Worker,
}

impl FaultKind {
    /// The keyword in the schedule language (also the `trigger` metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Chip => "chip",
            FaultKind::Hang => "hang",
            FaultKind::Flap => "flap",
            FaultKind::Node => "node",
            FaultKind::Worker => "worker",
        }
    }

    /// Whether the fault names a chip (`<node>/<chip>`) rather than a node.
    pub fn targets_chip(self) -> bool {
        matches!(self, FaultKind::Chip | FaultKind::Hang | FaultKind::Flap)
    }
}

/// One fault of the schedule.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledFault {
    /// The step after which it is injected.
    pub step: u64,
    /// What happens.
    pub kind: FaultKind,
    /// Node index.
    pub node: u32,
    /// Chip index, for chip faults.
    pub chip: Option<u32>,
}

/// A schedule entry that is not understood or does not fit the job.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ScheduleError {
    /// Not of the form `<kind>:<target>@<step>`.
    #[error(
        "bad fault {input:?}: {reason} (expected chip|hang|flap:<node>/<chip>@<step> or node|worker:<node>@<step>)"
    )]
    Syntax {
        /// The entry as given.
        input: String,
        /// What is wrong.
        reason: String,
    },
    /// Names a node or chip the job does not have, or a step it never reaches.
    #[error("fault {fault}: {reason}")]
    OutOfRange {
        /// The fault, as written.
        fault: String,
        /// What is out of range.
        reason: String,
    },
}

impl FromStr for ScheduledFault {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self, ScheduleError> {
        let bad = |reason: &str| ScheduleError::Syntax { input: s.to_string(), reason: reason.to_string() };
        let (kind, rest) = s.trim().split_once(':').ok_or_else(|| bad("missing ':' after the kind"))?;
        let kind = match kind {
            "chip" => FaultKind::Chip,
            "hang" => FaultKind::Hang,
            "flap" => FaultKind::Flap,
            "node" => FaultKind::Node,
            "worker" => FaultKind::Worker,
            other => return Err(bad(&format!("unknown kind {other:?}"))),
        };
        let (target, step) = rest.split_once('@').ok_or_else(|| bad("missing '@<step>'"))?;
        let step = step.parse::<u64>().map_err(|_| bad(&format!("step {step:?} is not a whole number")))?;
        let index = |t: &str, what: &str| {
            t.parse::<u32>().map_err(|_| bad(&format!("{what} {t:?} is not an index (0, 1, ...)")))
        };
        let (node, chip) = if kind.targets_chip() {
            let (node, chip) = target
                .split_once('/')
                .ok_or_else(|| bad(&format!("{} faults name a chip as <node>/<chip>", kind.as_str())))?;
            (index(node, "node")?, Some(index(chip, "chip")?))
        } else {
            if target.contains('/') {
                return Err(bad(&format!("{} faults name a node, not a chip", kind.as_str())));
            }
            (index(target, "node")?, None)
        };
        Ok(ScheduledFault { step, kind, node, chip })
    }
}

impl fmt::Display for ScheduledFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.chip {
            Some(chip) => write!(f, "{}:{}/{chip}@{}", self.kind.as_str(), self.node, self.step),
            None => write!(f, "{}:{}@{}", self.kind.as_str(), self.node, self.step),
        }
    }
}

/// The faults of a run, in step order (ties in the order given).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(transparent)]
pub struct FaultSchedule {
    faults: Vec<ScheduledFault>,
}

impl FaultSchedule {
    /// No faults (`--no-faults`).
    pub fn none() -> Self {
        Self::default()
    }

    /// Parses `--fault` values; every bad entry is reported, not only the first.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, Vec<ScheduleError>> {
        let (mut faults, mut errors) = (Vec::new(), Vec::new());
        for e in entries {
            match e.as_ref().parse::<ScheduledFault>() {
                Ok(f) => faults.push(f),
                Err(err) => errors.push(err),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        faults.sort_by_key(|f| f.step);
        Ok(Self { faults })
    }

    /// The default demo schedule: a chip ECC error at 20 % of the steps, a whole-node loss at
    /// 45 % and a worker crash at 70 %, on different nodes (needs at least 1 node and 1 step).
    pub fn default_for(nodes: u32, chips_per_node: u32, steps: u64) -> Self {
        let nodes = nodes.max(1);
        let at = |percent: u64| (steps * percent / 100).max(1);
        Self {
            faults: vec![
                ScheduledFault {
                    step: at(20),
                    kind: FaultKind::Chip,
                    node: 1 % nodes,
                    chip: Some(3 % chips_per_node.max(1)),
                },
                ScheduledFault { step: at(45), kind: FaultKind::Node, node: 2 % nodes, chip: None },
                ScheduledFault {
                    step: at(70),
                    kind: FaultKind::Worker,
                    node: (nodes - 1) % nodes,
                    chip: None,
                },
            ],
        }
    }

    /// Checks every fault against the job: node and chip indices exist, the step is reached.
    pub fn validate(&self, nodes: u32, chips_per_node: u32, steps: u64) -> Result<(), Vec<ScheduleError>> {
        let mut errors = Vec::new();
        for f in &self.faults {
            let out = |reason: String| ScheduleError::OutOfRange { fault: f.to_string(), reason };
            if f.node >= nodes {
                errors.push(out(format!("node {} does not exist (the job has nodes 0..{})", f.node, nodes)));
            }
            if let Some(c) = f.chip.filter(|&c| c >= chips_per_node) {
                errors.push(out(format!("chip {c} does not exist (nodes have chips 0..{chips_per_node})")));
            }
            if f.step == 0 || f.step >= steps {
                errors.push(out(format!("step {} is not within the run (1..{steps})", f.step)));
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    /// The faults, in step order.
    pub fn faults(&self) -> &[ScheduledFault] {
        &self.faults
    }

    /// Number of faults.
    pub fn len(&self) -> usize {
        self.faults.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.faults.is_empty()
    }

    /// Faults with index `>= fired` that are due once `step` is complete (the runtime keeps
    /// `fired`, the count already injected).
    pub fn due(&self, fired: usize, step: u64) -> &[ScheduledFault] {
        let rest = self.faults.get(fired..).unwrap_or(&[]);
        let n = rest.iter().take_while(|f| f.step <= step).count();
        &rest[..n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_parses_and_prints_back() {
        for s in ["chip:1/3@60", "hang:0/7@10", "flap:2/0@99", "node:2@135", "worker:3@210"] {
            let f: ScheduledFault = s.parse().expect(s);
            assert_eq!(f.to_string(), s);
        }
        let f: ScheduledFault = "chip:1/3@60".parse().expect("chip");
        assert_eq!(f, ScheduledFault { step: 60, kind: FaultKind::Chip, node: 1, chip: Some(3) });
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        let cases = [
            ("chip1/3@60", "missing ':'"),
            ("disk:1@5", "unknown kind \"disk\""),
            ("chip:1/3", "missing '@<step>'"),
            ("chip:1/3@soon", "step \"soon\" is not a whole number"),
            ("chip:1@60", "name a chip as <node>/<chip>"),
            ("node:1/2@60", "name a node, not a chip"),
            ("node:n1@60", "node \"n1\" is not an index"),
            ("hang:1/-2@60", "chip \"-2\" is not an index"),
            ("", "missing ':'"),
        ];
        for (input, want) in cases {
            let err = input.parse::<ScheduledFault>().expect_err(input).to_string();
            assert!(err.contains(want), "{input}: {err}");
        }
        let errs = FaultSchedule::parse(&["chip:1/3@60", "x", "node:z@1"]).expect_err("two bad");
        assert_eq!(errs.len(), 2);
    }

    #[test]
    fn validation_against_the_job() {
        let s =
            FaultSchedule::parse(&["chip:4/0@10", "chip:0/8@10", "node:0@300", "worker:1@0", "node:3@299"])
                .expect("syntax is fine");
        let errs = s.validate(4, 8, 300).expect_err("four out of range");
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 4, "{text:?}");
        // Reported in step order.
        assert!(text[0].contains("worker:1@0") && text[0].contains("step 0 is not within the run (1..300)"));
        assert!(text[1].contains("node 4 does not exist"));
        assert!(text[2].contains("chip 8 does not exist"));
        assert!(text[3].contains("step 300 is not within the run"));
    }

    #[test]
    fn default_schedule_is_chip_node_worker_on_distinct_nodes() {
        let s = FaultSchedule::default_for(4, 8, 300);
        let kinds: Vec<FaultKind> = s.faults().iter().map(|f| f.kind).collect();
        assert_eq!(kinds, [FaultKind::Chip, FaultKind::Node, FaultKind::Worker]);
        assert_eq!(s.faults().iter().map(|f| f.step).collect::<Vec<_>>(), [60, 135, 210]);
        let nodes: std::collections::BTreeSet<u32> = s.faults().iter().map(|f| f.node).collect();
        assert_eq!(nodes.len(), 3);
        assert_eq!(s.validate(4, 8, 300), Ok(()));
    }

    #[test]
    fn due_faults_fire_in_step_order() {
        let s = FaultSchedule::parse(&["node:2@135", "chip:1/3@60", "worker:3@135"]).expect("ok");
        assert_eq!(s.due(0, 59), &[]);
        assert_eq!(s.due(0, 60).len(), 1);
        assert_eq!(
            s.due(1, 200).iter().map(|f| f.kind).collect::<Vec<_>>(),
            [FaultKind::Node, FaultKind::Worker]
        );
        assert_eq!(s.due(3, 1000), &[]);
        assert_eq!(s.due(9, 1000), &[]);
    }
}
