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

mod manifest;
mod reader;
mod store;

pub use manifest::{
    ADAM_M_SUFFIX, ADAM_V_SUFFIX, CheckpointManifest, ChecksumKind, Checksummer, DataCursor, FORMAT_VERSION,
    MANIFEST_FILE, OptimizerState, READABLE_VERSIONS, RngState, ShardContents, ShardEntry,
};
pub use store::{
    BackgroundSaver, CheckpointStore, ExpertSelection, LoadReport, LoadedCheckpoint, RestoreTarget,
    SaveReport, TensorPart, TrainingSnapshot,
};
