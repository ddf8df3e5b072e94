//! The sizes the planner works with, and the arithmetic of groups, nodes, racks and chips.

use serde::{Deserialize, Serialize};

use super::error::PlanError;
use super::ids::{ChipId, ExpertId};
use crate::validate::JobShape;

/// Most chips a job may have.
pub const MAX_CHIPS: u64 = 1 << 22;
/// Most expert replicas a job's placement may hold.
pub const MAX_REPLICAS: u64 = 1 << 27;
/// Most chips one expert-parallel group may have.
pub const MAX_GROUP_CHIPS: u64 = 1 << 20;
/// Most expert replicas (`layers x (routedExperts + redundantExperts)`) one group may hold.
pub const MAX_GROUP_REPLICAS: u64 = 1 << 24;

/// Everything the planner needs to know about a job, resolved and checked.
///
/// The layers are split into `pipeline_stages` stages of consecutive layers, and the chips into as
/// many stages of consecutive nodes. Each stage's chips are grouped into expert-parallel groups of
/// `expert_parallel_size` chips (whole, consecutive nodes). Each group hosts every routed expert
/// of its stage's layers at least once, plus `redundant_experts` extra replicas per layer, and
/// nothing of other stages; groups are planned independently.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlacementShape {
    /// MoE layers.
    pub layers: u32,
    /// Routed experts per layer.
    pub routed_experts: u32,
    /// Extra replicas per layer and group, beyond one of each expert.
    pub redundant_experts: u32,
    /// Training-state bytes of one expert replica (what moves when a replica moves).
    pub expert_state_bytes: u64,
    /// Training nodes (spares excluded).
    pub nodes: u32,
    /// Chips per node.
    pub chips_per_node: u32,
    /// Memory per chip available to expert state.
    pub chip_memory_bytes: u64,
    /// Chips per expert-parallel group.
    pub expert_parallel_size: u32,
    /// Consecutive nodes per rack, when racks are a failure domain.
    pub nodes_per_rack: Option<u32>,
    /// Fraction of the job's chips that must stay healthy; below it every plan is infeasible.
    pub min_healthy_fraction: f64,
    /// Pipeline stages: consecutive layers, each on its own consecutive share of the nodes.
    #[serde(default = "one_stage")]
    pub pipeline_stages: u32,
}

fn one_stage() -> u32 {
    1
}

impl PlacementShape {
    /// The planner's view of a validated job. `min_healthy_fraction` comes from the spec's
    /// failure policy, which [`JobShape`] does not carry.
    pub fn from_job(job: &JobShape, min_healthy_fraction: f64) -> Self {
        Self {
            layers: job.model.layers,
            routed_experts: job.model.routed_experts,
            redundant_experts: job.redundant_experts,
            expert_state_bytes: job.model.expert_state_bytes(),
            nodes: job.nodes,
            chips_per_node: job.chips_per_node,
            chip_memory_bytes: job.chip_memory_bytes,
            expert_parallel_size: job.expert_parallel_size,
            nodes_per_rack: job.nodes_per_rack,
            min_healthy_fraction,
            pipeline_stages: job.pipeline_stages,
        }
    }

    /// Checks that the sizes are positive and fit together. Every planner entry point calls this
    /// first, so nothing below it divides by zero or indexes out of range.
    pub fn validate(&self) -> Result<(), PlanError> {
        for (what, value) in [
            ("layers", u64::from(self.layers)),
            ("routedExperts", u64::from(self.routed_experts)),
            ("nodes", u64::from(self.nodes)),
            ("chipsPerNode", u64::from(self.chips_per_node)),
            ("expertParallelSize", u64::from(self.expert_parallel_size)),
            ("pipelineParallelSize", u64::from(self.pipeline_stages)),
            ("expertStateBytes", self.expert_state_bytes),
            ("chipMemoryBytes", self.chip_memory_bytes),
        ] {
            if value == 0 {
                return Err(PlanError::Zero { what });
            }
        }
        if self.nodes_per_rack == Some(0) {
            return Err(PlanError::Zero { what: "nodesPerRack" });
        }
        let bad = |s: String| Err(PlanError::InconsistentShape(s));
        if !self.expert_parallel_size.is_multiple_of(self.chips_per_node) {
            return bad(format!(
                "expertParallelSize {} is not a whole number of {}-chip nodes",
                self.expert_parallel_size, self.chips_per_node
            ));
        }
        if !self.chips().is_multiple_of(u64::from(self.expert_parallel_size)) {
            return bad(format!(
                "expertParallelSize {} does not divide the job's {} chips",
                self.expert_parallel_size,
                self.chips()
            ));
        }
        if !self.layers.is_multiple_of(self.pipeline_stages) {
            return bad(format!(
                "pipelineParallelSize {} does not divide the model's {} layers",
                self.pipeline_stages, self.layers
            ));
        }
        if !self.groups().is_multiple_of(self.pipeline_stages) {
            return bad(format!(
                "pipelineParallelSize {} does not divide the job's {} expert-parallel groups",
                self.pipeline_stages,
                self.groups()
            ));
        }
        // Bounds that keep every allocation reasonable.
        let replicas = u64::from(self.layers_per_stage())
            * (u64::from(self.routed_experts) + u64::from(self.redundant_experts));
        if self.chips_per_group() > MAX_GROUP_CHIPS
            || replicas > MAX_GROUP_REPLICAS
            || self.chips() > MAX_CHIPS
            || replicas * u64::from(self.groups()) > MAX_REPLICAS
        {
            return bad(format!(
                "{} chips in groups of {} holding {replicas} expert replicas each exceed the planner's limits ({MAX_CHIPS} chips, {MAX_GROUP_CHIPS} per group, {MAX_GROUP_REPLICAS} replicas per group, {MAX_REPLICAS} in all)",
                self.chips(),
                self.chips_per_group()
            ));
        }
        if !(0.0..=1.0).contains(&self.min_healthy_fraction) {
            return bad(format!("minHealthyFraction {} is not within [0, 1]", self.min_healthy_fraction));
        }
        if self.slots_per_chip() == 0 {
            return bad(format!(
                "one expert replica needs {} bytes but chips have {}",
                self.expert_state_bytes, self.chip_memory_bytes
            ));
        }
        Ok(())
    }

    /// Chips in the job.
    pub fn chips(&self) -> u64 {
        u64::from(self.nodes) * u64::from(self.chips_per_node)
    }

    /// Expert-parallel groups.
    pub fn groups(&self) -> u32 {
        (self.chips() / u64::from(self.expert_parallel_size.max(1))) as u32
    }

    /// Nodes per group.
    pub fn nodes_per_group(&self) -> u32 {
        self.expert_parallel_size / self.chips_per_node.max(1)
    }

    /// Chips per group.
    pub fn chips_per_group(&self) -> u64 {
        u64::from(self.expert_parallel_size)
    }

    /// Logical experts of the whole model (layers x routed experts).
    pub fn experts(&self) -> usize {
        self.layers as usize * self.routed_experts as usize
    }

    /// Layers per pipeline stage.
    pub fn layers_per_stage(&self) -> u32 {
        self.layers / self.pipeline_stages.max(1)
    }

    /// Logical experts one group hosts: its stage's layers x routed experts.
    pub fn experts_per_group(&self) -> usize {
        self.layers_per_stage() as usize * self.routed_experts as usize
    }

    /// Expert-parallel groups per pipeline stage.
    pub fn groups_per_stage(&self) -> u32 {
        self.groups() / self.pipeline_stages.max(1)
    }

    /// The pipeline stage of a group (groups are numbered stage-major).
    pub fn stage_of_group(&self, group: u32) -> u32 {
        group / self.groups_per_stage().max(1)
    }

    /// The layers of a pipeline stage.
    pub fn stage_layers(&self, stage: u32) -> std::ops::Range<u32> {
        let per = self.layers_per_stage();
        stage * per..(stage + 1) * per
    }

    /// The layers whose experts a group hosts.
    pub fn group_layers(&self, group: u32) -> std::ops::Range<u32> {
        self.stage_layers(self.stage_of_group(group))
    }

    /// Dense indices (see [`PlacementShape::expert_index`]) of the experts a group hosts.
    pub fn group_experts(&self, group: u32) -> std::ops::Range<usize> {
        let layers = self.group_layers(group);
        let r = self.routed_experts as usize;
        layers.start as usize * r..layers.end as usize * r
    }

    /// Expert replicas one chip's memory holds.
    pub fn slots_per_chip(&self) -> u32 {
        u32::try_from(self.chip_memory_bytes / self.expert_state_bytes.max(1)).unwrap_or(u32::MAX)
    }

    /// Racks in the job, 0 when racks are not modelled.
    pub fn racks(&self) -> u32 {
        self.nodes_per_rack.map_or(0, |r| self.nodes.div_ceil(r))
    }

    /// The failure domain two replicas of one expert must not share: the rack when racks are
    /// modelled (a rack holds whole nodes, so rack-disjoint implies node-disjoint), else the node.
    pub fn domain_of_node(&self, node: u32) -> u32 {
        match self.nodes_per_rack {
            Some(r) if r > 0 => node / r,
            _ => node,
        }
    }

    /// Dense index of an expert, `layer * routedExperts + expert`.
    pub fn expert_index(&self, e: ExpertId) -> usize {
        e.layer as usize * self.routed_experts as usize + e.expert as usize
    }

    /// The expert with dense index `i`.
    pub fn expert_at(&self, i: usize) -> ExpertId {
        let r = self.routed_experts.max(1) as usize;
        ExpertId::new((i / r) as u32, (i % r) as u32)
    }

    /// Whether an expert id is within the model.
    pub fn has_expert(&self, e: ExpertId) -> bool {
        e.layer < self.layers && e.expert < self.routed_experts
    }

    /// Whether a chip id is within the topology.
    pub fn has_chip(&self, c: ChipId) -> bool {
        c.node < self.nodes && c.chip < self.chips_per_node
    }

    /// The group a chip belongs to and its index within the group (node-major).
    pub fn locate(&self, c: ChipId) -> (u32, usize) {
        let npg = self.nodes_per_group().max(1);
        let group = c.node / npg;
        let local = (c.node % npg) as usize * self.chips_per_node as usize + c.chip as usize;
        (group, local)
    }

    /// The chip at index `local` of group `group`.
    pub fn chip_at(&self, group: u32, local: usize) -> ChipId {
        let cpn = self.chips_per_node.max(1) as usize;
        ChipId::new(group * self.nodes_per_group() + (local / cpn) as u32, (local % cpn) as u32)
    }

    /// For every chip of a group, its failure domain renumbered from 0 within the group.
    pub fn local_domains(&self, group: u32) -> Vec<u32> {
        let first = self.domain_of_node(group * self.nodes_per_group());
        (0..self.chips_per_group() as usize)
            .map(|local| self.domain_of_node(self.chip_at(group, local).node) - first)
            .collect()
    }
}
