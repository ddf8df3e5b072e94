//! Expert-keyed checkpoints with an atomic commit protocol.
//!
//! Layout of one checkpoint, `DIR/step-0000000025/`:
//! ```text
//! dense.safetensors                         every dense parameter + its Adam moments
//! experts/layer-0000-expert-00003.safetensors   one routed expert + its Adam moments
//! manifest.json                             step, data cursor, RNG, optimizer, checksum per shard
//! ```
//! Tensors are keyed by parameter name (`layers.0.experts.3.w_gate`, `...w_gate.adam_m`), never by
//! rank, so a checkpoint written under one expert placement loads into any other: a worker reads
//! the dense shard and only the expert shards it is told to own ([`ExpertSelection`]).
//!
//! Commit protocol: every file is written under a temporary name, fsync'd and renamed, and its
//! directory fsync'd; the manifest goes last. A checkpoint exists only once `manifest.json` is in
//! place, so a crash at any point leaves either the previous checkpoints or a complete new one.
//! Loading verifies every shard's checksum (XXH3-128 since format 2, sha256 in format 1, which
//! still loads); a torn or corrupt checkpoint is logged and the previous committed one is used.

//! Modules, by topic: `manifest` (the commit file and its format), `store` (the directory of
//! checkpoints: layout, listing, retention, verification), `write` (writing and committing one),
//! `restore` (reading one back, into fresh memory or a live trainer), `reader` (the verified
//! streaming shard reader both use), `background` (the saver thread).

mod background;
mod manifest;
mod reader;
mod restore;
mod store;
mod write;

// Shards hold the tensors' in-memory bytes as they are: safetensors is little-endian.
#[cfg(not(target_endian = "little"))]
compile_error!("checkpoint I/O writes f32 tensors as native bytes and needs a little-endian host");

pub use background::{BackgroundSaver, SaveOutcome};
pub use manifest::{
    ADAM_M_SUFFIX, ADAM_V_SUFFIX, CheckpointManifest, ChecksumKind, Checksummer, DataCursor, FORMAT_VERSION,
    MANIFEST_FILE, OptimizerState, READABLE_VERSIONS, RngState, ShardContents, ShardEntry,
};
pub use restore::{ExpertSelection, LoadReport, LoadedCheckpoint, RestoreTarget, TensorPart};
pub use store::CheckpointStore;
pub use write::{SaveReport, TrainingSnapshot};
