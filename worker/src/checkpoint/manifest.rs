//! The checkpoint manifest: the one file whose atomic rename commits a checkpoint.

use ninelives_core::ModelDims;
use serde::{Deserialize, Serialize};

use crate::model::ExpertId;

/// Version of the on-disk layout this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// File name of the manifest inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Tensor-name suffix of Adam's first moment in a shard.
pub const ADAM_M_SUFFIX: &str = ".adam_m";
/// Tensor-name suffix of Adam's second moment in a shard.
pub const ADAM_V_SUFFIX: &str = ".adam_v";

/// Everything needed to continue training exactly, and to verify the shards.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointManifest {
    /// Layout version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Optimizer steps completed; training continues with step `step`.
    pub step: u64,
    /// Model dimensions the shards were written for.
    pub model: ModelDims,
    /// Where the data stream continues.
    pub data_cursor: DataCursor,
    /// The random state.
    pub rng: RngState,
    /// Where and what the optimizer state is.
    pub optimizer: OptimizerState,
    /// Every shard, with its checksum.
    pub shards: Vec<ShardEntry>,
    /// sha256 of all parameters in name order (little-endian f32), as printed by the CLI.
    pub params_sha256: String,
}

/// Position in the data stream. Sampling is keyed by `(seed, step, sample)`, so the cursor is
/// the next step plus the batch geometry that fixes which samples a step draws.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DataCursor {
    /// Data seed.
    pub seed: u64,
    /// The next step to draw.
    pub next_step: u64,
    /// Sequences per step.
    pub global_batch_size: u32,
    /// Sequences per micro-batch.
    pub micro_batch_size: u32,
}

/// The random state. Every draw is keyed (see `rng`), so the seed is the whole state; the
/// algorithm is recorded so a future change of generator is detected instead of silently
/// changing the data.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RngState {
    /// Generator and keying scheme.
    pub algorithm: String,
    /// Seed of initialisation and sampling.
    pub seed: u64,
}

/// Where the optimizer state lives.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OptimizerState {
    /// Optimizer (`adamw`).
    pub kind: String,
    /// Updates applied (Adam's bias-correction counter).
    pub updates: u64,
    /// How to find a parameter's moments: in the parameter's own shard, under
    /// `<name>.adam_m` and `<name>.adam_v`, so an expert's whole state moves as one file.
    pub location: String,
}

/// Which parameters a shard holds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum ShardContents {
    /// Every dense parameter (embeddings, attention, norms, routers, head).
    Dense,
    /// One routed expert's parameters.
    Expert {
        /// Layer.
        layer: u32,
        /// Expert within the layer.
        expert: u32,
    },
}

impl ShardContents {
    /// The expert, for expert shards.
    pub fn expert(&self) -> Option<ExpertId> {
        match *self {
            ShardContents::Dense => None,
            ShardContents::Expert { layer, expert } => Some(ExpertId { layer, expert }),
        }
    }

    /// The shard's file name relative to the checkpoint directory.
    pub fn file_name(&self) -> String {
        match *self {
            ShardContents::Dense => "dense.safetensors".into(),
            ShardContents::Expert { layer, expert } => {
                format!("experts/layer-{layer:04}-expert-{expert:05}.safetensors")
            }
        }
    }
}

/// One shard file and its checksum.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ShardEntry {
    /// Path relative to the checkpoint directory.
    pub file: String,
    /// What it holds.
    pub contents: ShardContents,
    /// sha256 of the whole file, hex.
    pub sha256: String,
    /// File size in bytes.
    pub bytes: u64,
}
