//! Shared fixtures: the demo job and its corpus.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report
#![allow(dead_code)]

use std::sync::Arc;

use ninelives_worker::TrainerConfig;
use ninelives_worker::data::Corpus;

/// The demo manifest every test starts from.
pub const TINY_YAML: &str = include_str!("../../../examples/tiny.yaml");
/// Real text present on every Debian machine.
pub const DEMO_TEXT: &str = "/usr/share/common-licenses";

/// The tiny demo job's configuration, with the schedule spanning `steps`.
pub fn tiny_config(steps: u64) -> TrainerConfig {
    let job = ninelives_core::manifest::parse_job(TINY_YAML).expect("examples/tiny.yaml is valid");
    let mut config = TrainerConfig::from_job(&job).expect("tiny job resolves");
    config.total_steps = steps;
    config
}

/// The demo corpus.
pub fn demo_corpus() -> Arc<Corpus> {
    Arc::new(Corpus::load(&[DEMO_TEXT]).expect("demo text is readable"))
}

/// A small MoE: 2 layers × 4 routed experts, 4 micro-batches per step.
pub fn small_config(steps: u64) -> TrainerConfig {
    let mut config = tiny_config(steps);
    config.dims.layers = 2;
    config.dims.hidden_size = 64;
    config.dims.heads = 2;
    config.dims.routed_experts = 4;
    config.dims.zero_experts = 1;
    config.dims.expert_ffn_size = 64;
    config.dims.seq_len = 32;
    config.global_batch_size = 8;
    config.micro_batch_size = 2;
    config
}
