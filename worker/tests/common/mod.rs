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
