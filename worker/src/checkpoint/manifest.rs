//! The checkpoint manifest: the one file whose atomic rename commits a checkpoint.

use ninelives_core::ModelDims;
use serde::{Deserialize, Serialize};

use crate::params::ExpertId;

/// Version of the on-disk layout this code writes: 2 checksums shards with XXH3-128.
pub const FORMAT_VERSION: u32 = 2;
/// Versions this code reads: 1 (sha256 per shard) and 2 (XXH3-128 per shard).
pub const READABLE_VERSIONS: [u32; 2] = [1, 2];
/// File name of the manifest inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Name of the keyed RNG scheme (see `crate::rng`), recorded in every manifest; a checkpoint
/// written under another scheme is refused.
pub const RNG_ALGORITHM: &str = "splitmix64-keyed(seed,name|step,sample)";
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
    /// XXH3-128 of the whole file, 32 hex digits (format 2; key `xxh3`).
    #[serde(default, rename = "xxh3", skip_serializing_if = "Option::is_none")]
    pub xxh3_128: Option<String>,
    /// sha256 of the whole file, hex (format 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// File size in bytes.
    pub bytes: u64,
}

impl ShardEntry {
    /// The checksum to verify the file against: XXH3-128 when recorded, else sha256.
    pub fn checksum(&self) -> Option<(ChecksumKind, &str)> {
        match (&self.xxh3_128, &self.sha256) {
            (Some(x), _) => Some((ChecksumKind::Xxh3_128, x)),
            (None, Some(s)) => Some((ChecksumKind::Sha256, s)),
            (None, None) => None,
        }
    }
}

/// How a shard is checksummed.
///
/// Why XXH3-128 since format 2: a checksum here detects torn writes and bit rot, not an
/// attacker (whoever can write the shards can write the manifest too). sha256 cost as much CPU
/// per byte as the disk took to read it and bounded the restore; XXH3 hashes at memory speed,
/// and 128 bits make an undetected random corruption vanishingly unlikely.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChecksumKind {
    /// XXH3, 128-bit (format 2).
    Xxh3_128,
    /// sha256 (format 1).
    Sha256,
}

impl ChecksumKind {
    /// Name in messages.
    pub fn name(self) -> &'static str {
        match self {
            ChecksumKind::Xxh3_128 => "xxh3-128",
            ChecksumKind::Sha256 => "sha256",
        }
    }
}

/// A running checksum of one kind.
pub enum Checksummer {
    /// XXH3-128.
    Xxh3(Box<xxhash_rust::xxh3::Xxh3>),
    /// sha256.
    Sha256(sha2::Sha256),
}

impl Checksummer {
    /// A fresh checksum of `kind`.
    pub fn new(kind: ChecksumKind) -> Self {
        use sha2::Digest;
        match kind {
            ChecksumKind::Xxh3_128 => Checksummer::Xxh3(Box::default()),
            ChecksumKind::Sha256 => Checksummer::Sha256(sha2::Sha256::new()),
        }
    }

    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        use sha2::Digest;
        match self {
            Checksummer::Xxh3(h) => h.update(bytes),
            Checksummer::Sha256(h) => h.update(bytes),
        }
    }

    /// The checksum, lower-case hex (XXH3-128 as its big-endian 32 digits).
    pub fn finish(self) -> String {
        use sha2::Digest;
        match self {
            Checksummer::Xxh3(h) => format!("{:032x}", h.digest128()),
            Checksummer::Sha256(h) => crate::params::hex(&h.finalize()),
        }
    }
}
