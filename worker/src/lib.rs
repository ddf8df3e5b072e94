//! # ninelives-worker
//!
//! The embedded training worker: a LongCat-style MoE transformer trained for real on CPU with
//! candle, with expert-keyed checkpoints and bit-exact resume.
//!
//! - [`params`]: the name-keyed parameter vocabulary shared by every module: [`ExpertId`], who
//!   owns a parameter, its shape and initial value, host values and gradients by name;
//! - [`model`]: the transformer over those parameters;
//! - [`data`]: the byte corpus and sampling as a pure function of `(seed, step, sample)`;
//! - [`experts`]: the routed experts of a layer as one fused op, and the SwiGLU kernels every
//!   expert runs with, wherever it runs;
//! - [`ops`]: fused softmax, RMSNorm and rotary kernels with their own backward;
//! - [`optim`]: AdamW, the learning-rate schedule and global-norm clipping;
//! - [`checkpoint`]: safetensors shards per expert, the manifest, the commit protocol;
//! - [`trainer`]: the training loop tying them together;
//! - [`metrics`]: the Prometheus metrics the worker exports;
//! - [`dist`]: expert-parallel training across worker processes, with rendezvous in etcd.

pub mod data;
pub mod dist;
pub mod error;
pub mod experts;
pub mod model;
pub mod params;
pub mod rng;

pub use error::{Result, WorkerError};
pub use model::{ExpertId, HostTensor, MoeTransformer};
pub mod checkpoint;
pub mod metrics;
pub mod ops;
pub mod optim;
pub mod trainer;

pub use checkpoint::{BackgroundSaver, CheckpointStore, ExpertSelection, LoadedCheckpoint};
pub use trainer::{Trainer, TrainerConfig};
