//! Stable identifiers for chips and experts.
//!
//! Both are plain coordinates rather than opaque handles: a `ChipId` names the same chip in every
//! placement generation, etcd key and log line, and an `ExpertId` names the same logical expert in
//! every placement and checkpoint, so they can be compared across generations without a lookup.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One accelerator chip: the node's index in the job (0-based, spares excluded) and the chip's
/// index on that node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase")]
pub struct ChipId {
    /// Node index in the job, `0..nodes`.
    pub node: u32,
    /// Chip index on the node, `0..chipsPerNode`.
    pub chip: u32,
}

impl ChipId {
    /// The chip `chip` of node `node`.
    pub const fn new(node: u32, chip: u32) -> Self {
        Self { node, chip }
    }
}

impl fmt::Display for ChipId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.node, self.chip)
    }
}

/// One logical routed expert: its MoE layer and its index among that layer's routed experts.
/// Replicas of an expert share its id.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase")]
pub struct ExpertId {
    /// MoE layer, `0..layers`.
    pub layer: u32,
    /// Routed expert within the layer, `0..routedExperts`.
    pub expert: u32,
}

impl ExpertId {
    /// Expert `expert` of layer `layer`.
    pub const fn new(layer: u32, expert: u32) -> Self {
        Self { layer, expert }
    }
}

impl fmt::Display for ExpertId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "L{}E{}", self.layer, self.expert)
    }
}
