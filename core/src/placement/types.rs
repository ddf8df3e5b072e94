//! The published data: a versioned [`Placement`] and the [`Move`]s that realise it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::error::PlanError;
use super::health::FailedChips;
use super::ids::{ChipId, ExpertId};
use super::shape::PlacementShape;

/// Where a chip gets an expert's state from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    /// The in-memory state of a live replica on this chip (same group, current step).
    Peer(ChipId),
    /// The last committed checkpoint; the job rolls back to it so all state is consistent.
    Checkpoint,
}

/// One replica to load: `expert`'s state onto chip `to`, from `source`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct Move {
    /// The logical expert.
    pub expert: ExpertId,
    /// The chip that will host the new replica (already listed in the placement).
    pub to: ChipId,
    /// Where the state comes from.
    pub source: Source,
}

/// The experts of one expert-parallel group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupPlacement {
    /// Group index, `0..groups`; the group owns nodes `index * nodesPerGroup ..`.
    pub index: u32,
    /// Replicas per chip, node-major: entry `i` is chip `i % chipsPerNode` of node
    /// `index * nodesPerGroup + i / chipsPerNode`. Failed chips host nothing.
    pub chips: Vec<Vec<ExpertId>>,
    /// Loads published by a plan and not yet confirmed done. Their target replicas are listed in
    /// `chips` but hold no state yet: route around them until the load completes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<Move>,
}

/// Which chip hosts which expert replicas, for every group of a job, at one generation.
///
/// Published in etcd by the operator; agents load and drop replicas to match it, workers route
/// tokens by it. A new generation replaces the old one atomically.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Increases by one with every published change.
    pub generation: u64,
    /// One entry per expert-parallel group, in group order.
    pub groups: Vec<GroupPlacement>,
}

impl Placement {
    /// The replicas hosted by a chip (empty for a chip outside the placement).
    pub fn hosted(&self, shape: &PlacementShape, chip: ChipId) -> &[ExpertId] {
        let (group, local) = shape.locate(chip);
        self.groups.get(group as usize).and_then(|g| g.chips.get(local)).map_or(&[], Vec::as_slice)
    }

    /// Chips hosting a replica of `expert` in `group`, in chip order.
    pub fn replicas_of(&self, shape: &PlacementShape, group: u32, expert: ExpertId) -> Vec<ChipId> {
        let Some(g) = self.groups.get(group as usize) else { return Vec::new() };
        g.chips
            .iter()
            .enumerate()
            .filter(|(_, hosted)| hosted.contains(&expert))
            .map(|(local, _)| shape.chip_at(group, local))
            .collect()
    }

    /// Whether any load is still outstanding.
    pub fn has_pending(&self) -> bool {
        self.groups.iter().any(|g| !g.pending.is_empty())
    }

    /// The next generation once every pending load is done: same replicas, nothing pending.
    pub fn settled(&self) -> Placement {
        let mut next = self.clone();
        next.generation += 1;
        next.groups.iter_mut().for_each(|g| g.pending.clear());
        next
    }

    /// Checks the placement belongs to `shape` and keeps the structural invariants: the right
    /// groups and chips, known experts of the group's pipeline stage only, no expert twice on one
    /// chip, every expert with two or more replicas spread over two failure domains (when the
    /// group uses two), chip memory, and pending loads that name hosted replicas. Failed chips
    /// must host nothing.
    /// Placements read from etcd are untrusted; the planner runs this on every group it touches.
    pub fn check(&self, shape: &PlacementShape, failed: &FailedChips) -> Result<(), PlanError> {
        shape.validate()?;
        self.check_layout(shape)?;
        for g in 0..shape.groups() {
            self.check_group(shape, g, failed)?;
        }
        Ok(())
    }

    /// The cheap part of [`Placement::check`]: group and chip counts.
    pub(crate) fn check_layout(&self, shape: &PlacementShape) -> Result<(), PlanError> {
        let bad = |s: String| Err(PlanError::PlacementMismatch(s));
        if self.groups.len() != shape.groups() as usize {
            return bad(format!("{} groups where the job has {}", self.groups.len(), shape.groups()));
        }
        for (i, g) in self.groups.iter().enumerate() {
            if g.index as usize != i {
                return bad(format!("group at position {i} says it is group {}", g.index));
            }
            if g.chips.len() as u64 != shape.chips_per_group() {
                return bad(format!(
                    "group {i} has {} chips, not {}",
                    g.chips.len(),
                    shape.chips_per_group()
                ));
            }
        }
        Ok(())
    }

    /// The full check of one group.
    pub(crate) fn check_group(
        &self,
        shape: &PlacementShape,
        group: u32,
        failed: &FailedChips,
    ) -> Result<(), PlanError> {
        let bad = |s: String| Err(PlanError::PlacementMismatch(s));
        let Some(g) = self.groups.get(group as usize) else {
            return bad(format!("group {group} is missing"));
        };
        let domains = shape.local_domains(group);
        let layers = shape.group_layers(group);
        let slots = shape.slots_per_chip() as usize;
        // Failure domains of each expert's replicas, and domains that host anything at all.
        let mut spread: BTreeMap<ExpertId, (u32, BTreeSet<u32>)> = BTreeMap::new();
        let mut used_domains: BTreeSet<u32> = BTreeSet::new();
        for (local, hosted) in g.chips.iter().enumerate() {
            let chip = shape.chip_at(group, local);
            if hosted.len() > slots {
                return bad(format!(
                    "chip {chip} hosts {} replicas but has memory for {slots}",
                    hosted.len()
                ));
            }
            if !hosted.is_empty() && failed.contains(chip) {
                return bad(format!("failed chip {chip} still hosts replicas"));
            }
            if !hosted.is_empty() {
                used_domains.insert(domains[local]);
            }
            for (k, &e) in hosted.iter().enumerate() {
                if !shape.has_expert(e) {
                    return bad(format!("chip {chip} hosts unknown expert {e}"));
                }
                if !layers.contains(&e.layer) {
                    return bad(format!(
                        "chip {chip} of pipeline stage {} hosts {e} of another stage",
                        shape.stage_of_group(group)
                    ));
                }
                if hosted[..k].contains(&e) {
                    return bad(format!("chip {chip} lists expert {e} twice"));
                }
                let entry = spread.entry(e).or_default();
                entry.0 += 1;
                entry.1.insert(domains[local]);
            }
        }
        // Replicas protect: an expert with two or more replicas spans two failure domains (when
        // the group's replicas sit in two or more), so one domain's loss leaves it a replica.
        let available = used_domains.len().min(2) as u32;
        if let Some((e, _)) = spread.iter().find(|(_, (n, d))| (d.len() as u32) < (*n).min(available)) {
            return bad(format!("expert {e} has every replica in one failure domain"));
        }
        for m in &g.pending {
            if !shape.has_chip(m.to) || shape.locate(m.to).0 != group {
                return bad(format!(
                    "pending load of {} targets chip {} outside group {group}",
                    m.expert, m.to
                ));
            }
            if !self.hosted(shape, m.to).contains(&m.expert) {
                return bad(format!("pending load of {} onto {} is not in the placement", m.expert, m.to));
            }
            if let Source::Peer(p) = m.source
                && (!shape.has_chip(p) || shape.locate(p).0 != group)
            {
                return bad(format!("pending load of {} names peer {p} outside group {group}", m.expert));
            }
        }
        Ok(())
    }
}
