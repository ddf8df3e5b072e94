//! The worker's Prometheus metrics.

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

use crate::error::Result;

/// Every metric the worker exports, registered in one registry.
#[derive(Clone)]
pub struct WorkerMetrics {
    /// The registry (serve it with `ninelives_telemetry::AdminServer`).
    pub registry: Registry,
    /// Optimizer steps completed.
    pub step: IntGauge,
    /// Cross-entropy of the last step.
    pub loss: Gauge,
    /// Training tokens per second over the last step.
    pub tokens_per_second: Gauge,
    /// Wall time per step.
    pub step_seconds: Histogram,
    /// Wall time of a checkpoint save (background, from snapshot to commit).
    pub checkpoint_save_seconds: Histogram,
    /// Wall time of a checkpoint load (read, verify, decode).
    pub checkpoint_load_seconds: Histogram,
    /// Checkpoint bytes written (`op="save"`) and read (`op="load"`).
    pub checkpoint_bytes_total: IntCounterVec,
    /// Checkpoint saves that failed (training went on), by the error's label
    /// (`checkpoint_io` for a full disk or an I/O error).
    pub checkpoint_save_failures_total: IntCounterVec,
    /// Links to live peers that broke within a generation, by `outcome`: `restored` (re-
    /// established; the step went on) or `failed` (the reconnect budget ran out; the step was
    /// abandoned and the failure escalated).
    pub link_reconnects_total: IntCounterVec,
}

impl WorkerMetrics {
    /// Creates the metrics in a fresh registry.
    pub fn new() -> Result<Self> {
        let registry = Registry::new();
        let step = IntGauge::new("ninelives_worker_step", "Optimizer steps completed")?;
        let loss = Gauge::new("ninelives_worker_loss", "Cross-entropy (nats/byte) of the last step")?;
        let tokens_per_second = Gauge::new(
            "ninelives_worker_tokens_per_second",
            "Training tokens per second over the last step",
        )?;
        let step_seconds = Histogram::with_opts(
            HistogramOpts::new("ninelives_worker_step_seconds", "Wall time of one optimizer step")
                .buckets(prometheus::exponential_buckets(0.01, 2.0, 14)?),
        )?;
        let checkpoint_save_seconds = Histogram::with_opts(
            HistogramOpts::new("ninelives_checkpoint_save_seconds", "Wall time of a checkpoint save")
                .buckets(prometheus::exponential_buckets(0.005, 2.0, 14)?),
        )?;
        let checkpoint_load_seconds = Histogram::with_opts(
            HistogramOpts::new("ninelives_checkpoint_load_seconds", "Wall time of a checkpoint load")
                .buckets(prometheus::exponential_buckets(0.005, 2.0, 14)?),
        )?;
        let checkpoint_bytes_total = IntCounterVec::new(
            Opts::new("ninelives_checkpoint_bytes_total", "Checkpoint bytes written or read"),
            &["op"],
        )?;
        let checkpoint_save_failures_total = IntCounterVec::new(
            Opts::new(
                "ninelives_checkpoint_save_failures_total",
                "Checkpoint saves that failed (disk full, I/O error); training continued",
            ),
            &["reason"],
        )?;
        let link_reconnects_total = IntCounterVec::new(
            Opts::new(
                "ninelives_worker_link_reconnects_total",
                "Peer links that broke within a generation: re-established, or given up",
            ),
            &["outcome"],
        )?;
        // Series exist from the start at 0, so `rate()` over them reads 0 in a healthy run.
        for reason in ["checkpoint_io", "checkpoint_writer"] {
            checkpoint_save_failures_total.with_label_values(&[reason]);
        }
        for outcome in ["restored", "failed"] {
            link_reconnects_total.with_label_values(&[outcome]);
        }
        registry.register(Box::new(step.clone()))?;
        registry.register(Box::new(loss.clone()))?;
        registry.register(Box::new(tokens_per_second.clone()))?;
        registry.register(Box::new(step_seconds.clone()))?;
        registry.register(Box::new(checkpoint_save_seconds.clone()))?;
        registry.register(Box::new(checkpoint_load_seconds.clone()))?;
        registry.register(Box::new(checkpoint_bytes_total.clone()))?;
        registry.register(Box::new(checkpoint_save_failures_total.clone()))?;
        registry.register(Box::new(link_reconnects_total.clone()))?;
        Ok(Self {
            registry,
            step,
            loss,
            tokens_per_second,
            step_seconds,
            checkpoint_save_seconds,
            checkpoint_load_seconds,
            checkpoint_bytes_total,
            checkpoint_save_failures_total,
            link_reconnects_total,
        })
    }
}
