//! Which chips are out: failures as reported (a chip, a node, a rack) and the resulting chip set.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::PlanError;
use super::ids::ChipId;
use super::shape::PlacementShape;

/// One reported failure, at the granularity it was detected.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub enum Failure {
    /// One chip (probe error, hang, thermal, ECC).
    Chip(ChipId),
    /// A whole node (its agent's lease expired).
    Node(u32),
    /// A whole rack (power or top-of-rack switch); needs `nodesPerRack`.
    Rack(u32),
}

impl FromStr for Failure {
    type Err = PlanError;

    /// Parses `chip:<node>/<chip>`, `node:<node>` or `rack:<rack>`.
    fn from_str(s: &str) -> Result<Self, PlanError> {
        let bad = || PlanError::BadFailure(s.to_string());
        let (kind, what) = s.split_once(':').ok_or_else(bad)?;
        let num = |t: &str| t.trim().parse::<u32>().map_err(|_| bad());
        match kind.trim() {
            "chip" => {
                let (node, chip) = what.split_once('/').ok_or_else(bad)?;
                Ok(Failure::Chip(ChipId::new(num(node)?, num(chip)?)))
            }
            "node" => Ok(Failure::Node(num(what)?)),
            "rack" => Ok(Failure::Rack(num(what)?)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Chip(c) => write!(f, "chip:{c}"),
            Failure::Node(n) => write!(f, "node:{n}"),
            Failure::Rack(r) => write!(f, "rack:{r}"),
        }
    }
}

/// The set of chips that must not host experts (failed or quarantined), in chip order.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(transparent)]
pub struct FailedChips {
    chips: BTreeSet<ChipId>,
}

impl FailedChips {
    /// No failures.
    pub fn none() -> Self {
        Self::default()
    }

    /// Expands failures to chips, checking that each names something in the topology.
    pub fn from_failures(shape: &PlacementShape, failures: &[Failure]) -> Result<Self, PlanError> {
        shape.validate()?;
        let mut out = Self::default();
        for f in failures {
            out.add(shape, *f)?;
        }
        Ok(out)
    }

    /// Adds one failure (a cascading failure is just another `add` before the next re-plan).
    pub fn add(&mut self, shape: &PlacementShape, failure: Failure) -> Result<(), PlanError> {
        let cpn = shape.chips_per_node;
        let nodes = match failure {
            Failure::Chip(c) => {
                if !shape.has_chip(c) {
                    return Err(PlanError::UnknownChip { chip: c, nodes: shape.nodes, chips_per_node: cpn });
                }
                self.chips.insert(c);
                return Ok(());
            }
            Failure::Node(n) if n < shape.nodes => n..n + 1,
            Failure::Node(node) => return Err(PlanError::UnknownNode { node, nodes: shape.nodes }),
            Failure::Rack(rack) => match shape.nodes_per_rack {
                Some(r) if r > 0 && rack < shape.racks() => rack * r..((rack + 1) * r).min(shape.nodes),
                _ => return Err(PlanError::UnknownRack { rack, racks: shape.racks() }),
            },
        };
        self.chips.extend(nodes.flat_map(|n| (0..cpn).map(move |c| ChipId::new(n, c))));
        Ok(())
    }

    /// A set from chip ids, e.g. read from the chip states in etcd; every id is checked.
    pub fn from_chips(
        shape: &PlacementShape,
        chips: impl IntoIterator<Item = ChipId>,
    ) -> Result<Self, PlanError> {
        let mut out = Self::default();
        for c in chips {
            out.add(shape, Failure::Chip(c))?;
        }
        Ok(out)
    }

    /// Whether a chip is out.
    pub fn contains(&self, c: ChipId) -> bool {
        self.chips.contains(&c)
    }

    /// Failed chips in order.
    pub fn iter(&self) -> impl Iterator<Item = ChipId> + '_ {
        self.chips.iter().copied()
    }

    /// Number of failed chips.
    pub fn len(&self) -> usize {
        self.chips.len()
    }

    /// Whether no chip failed.
    pub fn is_empty(&self) -> bool {
        self.chips.is_empty()
    }

    /// Checks every chip is within the topology (for sets deserialised from untrusted input).
    pub fn validate(&self, shape: &PlacementShape) -> Result<(), PlanError> {
        if self.chips.len() as u64 > shape.chips() {
            return Err(PlanError::TooManyFailures { failed: self.chips.len() as u64, chips: shape.chips() });
        }
        match self.chips.iter().find(|c| !shape.has_chip(**c)) {
            Some(&chip) => {
                Err(PlanError::UnknownChip { chip, nodes: shape.nodes, chips_per_node: shape.chips_per_node })
            }
            None => Ok(()),
        }
    }
}
