//! Cross-field validation of a [`TrainingJobSpec`], and the resolved [`JobShape`] the rest of the
//! system plans with.
//!
//! CEL rules in the schema cover what one object node can check alone; everything here needs the
//! resolved model or several sections at once. The operator runs this before it creates anything
//! and the `ninelives validate` command runs it after the CEL rules.

use std::fmt;

use serde::Serialize;

use crate::job::TrainingJobSpec;
use crate::model::ModelDims;
use crate::quantity::parse_bytes;

/// One problem with a manifest: where it is and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Field path from the object root, e.g. `spec.topology.chipsPerNode`.
    pub path: String,
    /// What is wrong, precise enough to fix it.
    pub message: String,
}

impl Violation {
    /// A violation at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A spec with everything resolved: the numbers the planner, worker and operator work with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct JobShape {
    /// Model dimensions.
    pub model: ModelDims,
    /// Training nodes.
    pub nodes: u32,
    /// Chips per node.
    pub chips_per_node: u32,
    /// Standby nodes.
    pub spare_nodes: u32,
    /// Bytes of memory per chip.
    pub chip_memory_bytes: u64,
    /// Chips per expert-parallel group.
    pub expert_parallel_size: u32,
    /// Redundant expert replicas per layer.
    pub redundant_experts: u32,
    /// Consecutive nodes per rack, when racks are modelled.
    pub nodes_per_rack: Option<u32>,
    /// Pipeline stages (consecutive layers each); 1 without pipeline parallelism.
    pub pipeline_stages: u32,
}

impl JobShape {
    /// Chips that train (spares excluded).
    pub fn chips(&self) -> u64 {
        u64::from(self.nodes) * u64::from(self.chips_per_node)
    }

    /// Expert-parallel groups.
    pub fn expert_parallel_groups(&self) -> u64 {
        self.chips() / u64::from(self.expert_parallel_size.max(1))
    }

    /// Nodes in one expert-parallel group.
    pub fn nodes_per_group(&self) -> u32 {
        self.expert_parallel_size / self.chips_per_node.max(1)
    }

    /// Layers of one pipeline stage.
    pub fn layers_per_stage(&self) -> u32 {
        self.model.layers / self.pipeline_stages.max(1)
    }

    /// Expert replicas (routed + redundant, over its stage's layers) one expert-parallel group
    /// hosts.
    pub fn replicas_per_group(&self) -> u64 {
        // Saturating: the counts come from a manifest (a saturated value fails every check).
        u64::from(self.layers_per_stage())
            .saturating_mul(u64::from(self.model.routed_experts) + u64::from(self.redundant_experts))
    }

    /// Resolves and checks a spec; every problem found is returned, not just the first.
    pub fn resolve(spec: &TrainingJobSpec) -> Result<JobShape, Vec<Violation>> {
        let mut out = Vec::new();
        let model = match ModelDims::resolve(&spec.model) {
            Ok(dims) => Some(dims),
            Err(missing) => {
                out.push(Violation::new(
                    "spec.model",
                    format!("no preset, and these dimensions are missing: {}", missing.join(", ")),
                ));
                None
            }
        };
        if let Some(m) = &model {
            check_model(m, &mut out);
        }

        let topo = &spec.topology;
        let chip_memory_bytes = match parse_bytes(&topo.chip_memory.0) {
            Ok(0) => {
                out.push(Violation::new("spec.topology.chipMemory", "chipMemory must be positive"));
                None
            }
            Ok(b) => Some(b),
            Err(e) => {
                out.push(Violation::new("spec.topology.chipMemory", e.to_string()));
                None
            }
        };
        if topo.nodes == 0 || topo.chips_per_node == 0 {
            // CEL reports these; nothing below can be computed without them.
            return Err(out);
        }
        let chips = u64::from(topo.nodes) * u64::from(topo.chips_per_node);
        let ep = spec.parallelism.expert_parallel_size.unwrap_or(u32::try_from(chips).unwrap_or(u32::MAX));
        let ep_path = "spec.parallelism.expertParallelSize";
        let mut ep_ok = ep >= 1;
        if ep_ok && u64::from(ep) > chips {
            out.push(Violation::new(
                ep_path,
                format!("expertParallelSize {ep} exceeds the job's {chips} chips"),
            ));
            ep_ok = false;
        } else if ep_ok && !chips.is_multiple_of(u64::from(ep)) {
            out.push(Violation::new(
                ep_path,
                format!(
                    "expertParallelSize {ep} does not divide the job's {chips} chips ({} nodes x {})",
                    topo.nodes, topo.chips_per_node
                ),
            ));
            ep_ok = false;
        } else if ep_ok && !ep.is_multiple_of(topo.chips_per_node) {
            out.push(Violation::new(
                ep_path,
                format!(
                    "expertParallelSize {ep} must be a whole number of nodes ({} chips each)",
                    topo.chips_per_node
                ),
            ));
            ep_ok = false;
        }

        let stages = spec.parallelism.pipeline_parallel_size.unwrap_or(1);
        let pp_path = "spec.parallelism.pipelineParallelSize";
        let mut pp_ok = stages >= 1;
        if !pp_ok {
            out.push(Violation::new(pp_path, "pipelineParallelSize must be at least 1"));
        }
        if let Some(m) = &model
            && pp_ok
            && m.layers > 0
            && !m.layers.is_multiple_of(stages)
        {
            out.push(Violation::new(
                pp_path,
                format!("pipelineParallelSize {stages} does not divide the model's {} layers", m.layers),
            ));
            pp_ok = false;
        }
        if ep_ok && pp_ok && !(chips / u64::from(ep)).is_multiple_of(u64::from(stages)) {
            out.push(Violation::new(
                pp_path,
                format!(
                    "pipelineParallelSize {stages} does not divide the job's {} expert-parallel groups ({chips} chips / expertParallelSize {ep}): every stage needs whole groups",
                    chips / u64::from(ep)
                ),
            ));
            pp_ok = false;
        }

        if spec.checkpoint.peer_copies >= topo.nodes {
            out.push(Violation::new(
                "spec.checkpoint.peerCopies",
                format!(
                    "peerCopies {} must be fewer than the {} nodes that could hold them",
                    spec.checkpoint.peer_copies, topo.nodes
                ),
            ));
        }
        if spec.checkpoint.peer_interval_steps == 0 {
            out.push(Violation::new(
                "spec.checkpoint.peerIntervalSteps",
                "peerIntervalSteps must be at least 1 (snapshot every step or every few)".to_string(),
            ));
        }
        if let Some(rebalance) = &spec.parallelism.rebalance {
            let path = "spec.parallelism.rebalance";
            if !rebalance.threshold.is_finite() || rebalance.threshold < 1.0 {
                out.push(Violation::new(
                    format!("{path}.threshold"),
                    format!(
                        "threshold {} is a step inflation (most loaded chip / mean, summed over layers): a finite number of at least 1.0",
                        rebalance.threshold
                    ),
                ));
            }
            if rebalance.min_interval_steps == 0 {
                out.push(Violation::new(
                    format!("{path}.minIntervalSteps"),
                    "minIntervalSteps must be at least 1",
                ));
            }
            if rebalance.window_steps == 0 {
                out.push(Violation::new(format!("{path}.windowSteps"), "windowSteps must be at least 1"));
            }
        }
        if let Some(skew) = spec.model.router_skew
            && !(skew.is_finite() && (0.0..=20.0).contains(&skew))
        {
            out.push(Violation::new(
                "spec.model.routerSkew",
                format!("routerSkew {skew} must be in [0, 20]"),
            ));
        }
        let mut seen = Vec::new();
        for (i, tier) in spec.failure_policy.allowed_tiers.iter().enumerate() {
            if seen.contains(tier) {
                out.push(Violation::new(
                    format!("spec.failurePolicy.allowedTiers[{i}]"),
                    format!("tier {} is listed twice", tier.as_str()),
                ));
            }
            seen.push(*tier);
        }
        for (i, ds) in spec.data.datasets.iter().enumerate() {
            if ds.trim().is_empty() {
                out.push(Violation::new(
                    format!("spec.data.datasets[{i}]"),
                    "dataset path must not be empty",
                ));
            }
        }
        if let Some(image) = &spec.pod.image
            && image.trim().is_empty()
        {
            out.push(Violation::new("spec.pod.image", "image must not be empty when set"));
        }

        let (Some(model), Some(chip_memory_bytes), true) = (model, chip_memory_bytes, ep_ok && pp_ok) else {
            return Err(out);
        };
        let shape = JobShape {
            model,
            nodes: topo.nodes,
            chips_per_node: topo.chips_per_node,
            spare_nodes: topo.spare_nodes,
            chip_memory_bytes,
            expert_parallel_size: ep,
            redundant_experts: spec.parallelism.redundant_experts,
            nodes_per_rack: topo.nodes_per_rack,
            pipeline_stages: stages,
        };
        shape.check_capacity(spec.failure_policy.min_healthy_fraction, &mut out);
        if out.is_empty() { Ok(shape) } else { Err(out) }
    }

    /// Replica limits and chip memory per pipeline stage, at full health and at
    /// `minHealthyFraction`.
    fn check_capacity(&self, min_healthy_fraction: f64, out: &mut Vec<Violation>) {
        let m = &self.model;
        let group_chips = u64::from(self.expert_parallel_size);
        let routed = u64::from(m.routed_experts);
        let redundant = u64::from(self.redundant_experts);
        // Replicas of one expert on one chip merge, so a layer holds at most routed x chips
        // distinct replicas.
        if routed + redundant > routed * group_chips {
            out.push(Violation::new(
                "spec.parallelism.redundantExperts",
                format!(
                    "{redundant} redundant experts per layer need more replicas of some expert than the {group_chips} chips of an expert-parallel group can hold apart (at most {})",
                    routed * group_chips.saturating_sub(1)
                ),
            ));
        }
        let ep = u64::from(self.expert_parallel_size);
        let per_chip = self.replicas_per_group().div_ceil(ep);
        let need = per_chip.saturating_mul(m.expert_state_bytes());
        if need > self.chip_memory_bytes {
            out.push(Violation::new(
                "spec.topology.chipMemory",
                format!(
                    "expert state needs {} per chip ({per_chip} expert replicas of a stage's {} layers x {}) but chips have {}",
                    human_bytes(need),
                    self.layers_per_stage(),
                    human_bytes(m.expert_state_bytes()),
                    human_bytes(self.chip_memory_bytes)
                ),
            ));
            return;
        }
        // Degraded operation must still hold one replica of every routed expert.
        let healthy = (ep as f64 * min_healthy_fraction).floor() as u64;
        let path = "spec.failurePolicy.minHealthyFraction";
        if healthy == 0 {
            out.push(Violation::new(
                path,
                format!("minHealthyFraction {min_healthy_fraction} leaves no healthy chip in an expert-parallel group of {ep}"),
            ));
            return;
        }
        let degraded_per_chip = (u64::from(self.layers_per_stage()) * routed).div_ceil(healthy);
        let degraded_need = degraded_per_chip.saturating_mul(m.expert_state_bytes());
        if degraded_need > self.chip_memory_bytes {
            out.push(Violation::new(
                path,
                format!(
                    "at minHealthyFraction {min_healthy_fraction} an expert-parallel group keeps {healthy} chips, which need {} each for the routed experts but have {}",
                    human_bytes(degraded_need),
                    human_bytes(self.chip_memory_bytes)
                ),
            ));
        }
    }
}

/// Checks of the resolved model that no single CEL rule can see (presets fill the gaps).
fn check_model(m: &ModelDims, out: &mut Vec<Violation>) {
    let p = |f: &str| format!("spec.model.{f}");
    for (field, value) in [
        ("layers", m.layers),
        ("hiddenSize", m.hidden_size),
        ("heads", m.heads),
        ("routedExperts", m.routed_experts),
        ("topK", m.top_k),
        ("expertFfnSize", m.expert_ffn_size),
        ("seqLen", m.seq_len),
    ] {
        if value == 0 {
            out.push(Violation::new(p(field), format!("{field} must be at least 1")));
        }
    }
    if m.vocab_size < 2 {
        out.push(Violation::new(p("vocabSize"), "vocabSize must be at least 2"));
    }
    if m.heads > 0 && !m.hidden_size.is_multiple_of(m.heads) {
        out.push(Violation::new(
            p("hiddenSize"),
            format!("hiddenSize {} is not divisible by heads {}", m.hidden_size, m.heads),
        ));
    }
    // Widened: two counts from a manifest may overflow a u32 together.
    let choices = u64::from(m.routed_experts) + u64::from(m.zero_experts);
    if u64::from(m.top_k) > choices {
        out.push(Violation::new(
            p("topK"),
            format!("topK {} exceeds the {choices} experts a token can choose from ({} routed + {} zero-computation)", m.top_k, m.routed_experts, m.zero_experts),
        ));
    }
    if let Some(sa) = m.sparse_attention
        && sa.block_size > 0
        && !m.seq_len.is_multiple_of(sa.block_size)
    {
        out.push(Violation::new(
            p("sparseAttention.blockSize"),
            format!("blockSize {} does not divide seqLen {}", sa.block_size, m.seq_len),
        ));
    }
}

/// Checks a TrainingJob name: it prefixes pod names and hostnames, so it must be a DNS-1123
/// label short enough to leave room for the pod suffix.
pub fn validate_name(name: &str) -> Option<Violation> {
    const MAX: usize = 52;
    let ok_chars = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let ok_ends = name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty() {
        Some(Violation::new("metadata.name", "name is required"))
    } else if !ok_chars || !ok_ends {
        Some(Violation::new(
            "metadata.name",
            format!(
                "name {name:?} must consist of lower-case letters, digits and '-', and start and end with a letter or digit"
            ),
        ))
    } else if name.len() > MAX {
        Some(Violation::new(
            "metadata.name",
            format!("name is {} characters; at most {MAX} leave room for worker pod names", name.len()),
        ))
    } else {
        None
    }
}

/// Every cross-field problem of a spec (empty when valid).
pub fn validate_spec(spec: &TrainingJobSpec) -> Vec<Violation> {
    JobShape::resolve(spec).err().unwrap_or_default()
}

/// Formats a byte count with a binary unit, e.g. `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}
