//! The simulator's inputs: what things cost, how often what fails, which policies to compare,
//! and the per-chip state sizes derived from the job.

use std::collections::BTreeMap;

use serde::Serialize;

use super::SimError;
use crate::fault_schedule::FaultKind;
use crate::job::TrainingJobSpec;
use crate::model::STATE_BYTES_PER_PARAM;
use crate::validate::JobShape;

/// Bytes per gigabyte (rates are in GB/s, decimal, as the benchmarks report them).
pub const GB: f64 = 1e9;

/// Interruptions per GPU-second in Meta's Llama 3 405B pre-training: 419 unexpected interruptions
/// in a 54-day window on 16,384 GPUs ("The Llama 3 Herd of Models", 2024, section 3.3.4).
pub const LLAMA3_FAULTS_PER_CHIP_SECOND: f64 = 419.0 / (54.0 * 86_400.0 * 16_384.0);

/// How a disk checkpoint is taken.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SaveMode {
    /// Training pauses only for the device→host snapshot; the write to storage runs in the
    /// background and the checkpoint commits when it is done.
    Async,
    /// Training pauses for the snapshot and the write.
    Blocking,
}

/// What each part of a failure and of normal operation costs, in seconds and GB/s.
///
/// Defaults ([`Costs::measured`]) come from this project's own measurements (BENCHMARKS.md);
/// where the project has none the default is a stated assumption. Every field is a CLI flag.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Costs {
    /// One training step.
    pub step_s: f64,
    /// Chip fault → visible to the brain (agent probe poll + etcd write + watch).
    pub detect_chip_s: f64,
    /// Node loss → visible (the agent's lease TTL).
    pub detect_node_s: f64,
    /// Worker crash → visible (membership gone).
    pub detect_worker_s: f64,
    /// Decision → generation committed and read by every member (a reroute's whole resume).
    pub commit_s: f64,
    /// A worker process restarted on a live node until it has joined.
    pub worker_start_s: f64,
    /// A spare node's member started until it has joined (state loads come on top).
    pub spare_start_s: f64,
    /// Checkpoint-restart only: every pod rescheduled, containers started, collectives set up
    /// (the checkpoint load comes on top).
    pub job_restart_s: f64,
    /// Checkpoint read rate per chip (storage → device, verified).
    pub read_gbps: f64,
    /// Checkpoint write rate per chip (host → storage, durable).
    pub write_gbps: f64,
    /// Device ↔ host-memory copy rate per chip (snapshot for a save, peer snapshot, restore from
    /// host memory).
    pub snapshot_gbps: f64,
    /// Network bandwidth per node for expert state from live replicas or peer copies.
    pub link_gbps: f64,
    /// How disk checkpoints are written.
    pub save: SaveMode,
}

impl Costs {
    /// The defaults, for a job whose heartbeat TTL is `heartbeat_ttl_s` and steps take `step_s`.
    /// Each number's source is in BENCHMARKS.md ("Goodput simulator").
    pub fn measured(step_s: f64, heartbeat_ttl_s: f64) -> Self {
        Self {
            step_s,
            // Agents at 6,250 nodes: fault → visible in etcd p99 1.0 s (probe poll 1 s).
            detect_chip_s: 1.0,
            // A node is declared lost when its lease expires: the TTL (e2e measured 2.97 s at 3 s).
            detect_node_s: heartbeat_ttl_s,
            // Demo: worker SIGKILLed → brain 0.11–0.12 s.
            detect_worker_s: 0.12,
            // Kubernetes e2e: reroute resume (brain → every member joined) 0.21 s.
            commit_s: 0.25,
            // Demo: restore resume 0.42 s with the worker restarted (tiny's load is milliseconds).
            worker_start_s: 0.5,
            // Kubernetes e2e: replace resume 0.41 s after detection; rounded up.
            spare_start_s: 0.5,
            // Not measured here (assumption): rescheduling and initialising every pod of the job.
            job_restart_s: 180.0,
            // Worker bench: in-place restore 1.28–2.63 GB/s, median of runs ≈ 1.45 GB/s.
            read_gbps: 1.45,
            // Worker bench: save 2.09–2.21 GB/s.
            write_gbps: 2.1,
            // Worker bench: pause for a save (host snapshot) 0.13–0.27 s for 457 MB ≈ 2.3 GB/s.
            snapshot_gbps: 2.3,
            // Not measured here (assumption): one 200 Gb/s NIC per node.
            link_gbps: 25.0,
            save: SaveMode::Async,
        }
    }

    /// Checks that every cost is finite, non-negative, and every rate and the step positive.
    pub fn validate(&self) -> Result<(), SimError> {
        let durations = [
            ("detectChip", self.detect_chip_s),
            ("detectNode", self.detect_node_s),
            ("detectWorker", self.detect_worker_s),
            ("commit", self.commit_s),
            ("workerStart", self.worker_start_s),
            ("spareStart", self.spare_start_s),
            ("jobRestart", self.job_restart_s),
        ];
        for (what, v) in durations {
            if !v.is_finite() || v < 0.0 {
                return Err(SimError::Params(format!("{what} must be a finite duration ≥ 0, not {v}")));
            }
        }
        let positive = [
            ("step", self.step_s),
            ("read", self.read_gbps),
            ("write", self.write_gbps),
            ("snapshot", self.snapshot_gbps),
            ("link", self.link_gbps),
        ];
        for (what, v) in positive {
            if !v.is_finite() || v <= 0.0 {
                return Err(SimError::Params(format!("{what} must be finite and > 0, not {v}")));
            }
        }
        Ok(())
    }
}

/// The step time of a job from its arithmetic: `6 × active parameters × tokens per step /
/// (chips × chip FLOP/s × MFU)`, tokens per step = global batch × `train_seq_len`.
pub fn derived_step_s(
    job: &JobShape,
    global_batch: u64,
    train_seq_len: u64,
    chip_tflops: f64,
    mfu: f64,
) -> f64 {
    let tokens = global_batch as f64 * train_seq_len as f64;
    let flops = 6.0 * job.model.active_params() as f64 * tokens;
    flops / (job.chips() as f64 * chip_tflops * 1e12 * mfu)
}

/// How often each kind of fault happens, and how long until broken hardware is back.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FaultModel {
    /// Mean seconds between faults of each kind (independent Poisson processes); a kind absent
    /// never happens.
    pub mean_interval_s: BTreeMap<FaultKind, f64>,
    /// A failed chip or lost node is repaired after this long (the node rejoins the spare pool,
    /// the chip reports healthy).
    pub repair_s: f64,
    /// Onsets of a flapping chip (it then stays quarantined until repaired).
    pub flap_onsets: u32,
    /// Seconds a flapping chip stays failed, then healthy, per onset.
    pub flap_half_period_s: f64,
}

/// The default mix of fault kinds: Llama 3's 419 unexpected interruptions, by cause (GPU, HBM,
/// SRAM, system processor, SDC, thermal → chip; host, NIC, SSD, PSU, chassis, CPU, memory,
/// network switch and cable → node; software bugs, dependencies, NCCL watchdog → worker), with
/// one chip fault in 20 assumed to flap (the study does not report flaps).
pub const DEFAULT_MIX: [(FaultKind, f64); 4] = [
    (FaultKind::Chip, 268.0 * 0.95),
    (FaultKind::Flap, 268.0 * 0.05),
    (FaultKind::Node, 88.0),
    (FaultKind::Worker, 63.0),
];

impl FaultModel {
    /// Faults every `mean_interval_s` on average, split by `mix` (weights, normalised).
    pub fn every(mean_interval_s: f64, mix: &[(FaultKind, f64)]) -> Result<Self, SimError> {
        if !mean_interval_s.is_finite() || mean_interval_s <= 0.0 {
            return Err(SimError::Params(format!("fault interval must be > 0 s, not {mean_interval_s}")));
        }
        let total: f64 = mix.iter().map(|(_, w)| w).sum();
        if !total.is_finite() || total <= 0.0 || mix.iter().any(|(_, w)| !w.is_finite() || *w < 0.0) {
            return Err(SimError::Params("fault mix weights must be ≥ 0 with a positive sum".into()));
        }
        let mean_interval_s = mix
            .iter()
            .filter(|(_, w)| *w > 0.0)
            .map(|&(kind, w)| (kind, mean_interval_s * total / w))
            .collect();
        Ok(Self { mean_interval_s, repair_s: 12.0 * 3600.0, flap_onsets: 3, flap_half_period_s: 30.0 })
    }

    /// Mean seconds between faults of any kind.
    pub fn overall_interval_s(&self) -> f64 {
        1.0 / self.mean_interval_s.values().map(|m| 1.0 / m).sum::<f64>()
    }

    /// Checks the intervals and the repair time.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.mean_interval_s.values().any(|m| !m.is_finite() || *m <= 0.0) {
            return Err(SimError::Params("every fault interval must be finite and > 0".into()));
        }
        if !self.repair_s.is_finite() || self.repair_s <= 0.0 || !self.flap_half_period_s.is_finite() {
            return Err(SimError::Params("repair time must be > 0 and the flap period finite".into()));
        }
        if self.mean_interval_s.contains_key(&FaultKind::Hang) {
            return Err(SimError::Params("hangs are not modelled; count them as chip faults".into()));
        }
        Ok(())
    }
}

/// How a policy recovers.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Recovery {
    /// Every failure restarts the whole job from the last committed disk checkpoint (a
    /// restart-on-failure job controller).
    CheckpointRestart,
    /// ninelives' brain (`recovery::decide`).
    Ninelives {
        /// In-memory copies of each member's state on a buddy node (issue 21's design): a
        /// rollback goes to the newest complete snapshot instead of the disk checkpoint while
        /// the buddy survives. Without them the brain runs `for_expert_parallel()`.
        peer_copies: bool,
    },
}

/// One policy of the comparison: a recovery strategy and the job settings it changes.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// Name in the table.
    pub name: String,
    /// How it recovers.
    pub recovery: Recovery,
    /// `parallelism.redundantExperts` override (`None`: the manifest's).
    pub redundant_experts: Option<u32>,
    /// `checkpoint.intervalSteps` override (`None`: the manifest's).
    pub interval_steps: Option<u64>,
}

impl Policy {
    /// A policy with the manifest's redundancy and checkpoint interval.
    pub fn new(name: &str, recovery: Recovery) -> Self {
        Self { name: name.to_string(), recovery, redundant_experts: None, interval_steps: None }
    }

    /// The policies `ninelives simulate` compares by default: the checkpoint-restart baseline
    /// and ninelives without and with peer copies at the manifest's settings, then variants
    /// with every expert replicated twice (`redundant` = the routed experts) and with a 4×
    /// shorter (without peer copies) or 4× longer (with them) checkpoint interval.
    pub fn defaults(routed_experts: u32, interval: u64) -> Vec<Policy> {
        let restart = Recovery::CheckpointRestart;
        let no_peer = Recovery::Ninelives { peer_copies: false };
        let peer = Recovery::Ninelives { peer_copies: true };
        let (short, long) = ((interval / 4).max(1), interval.saturating_mul(4));
        let variant = |name: &str, recovery, redundant: Option<u32>, iv: Option<u64>| Policy {
            name: name.to_string(),
            recovery,
            redundant_experts: redundant,
            interval_steps: iv,
        };
        let x2 = Some(routed_experts);
        vec![
            Policy::new("checkpoint-restart", restart),
            variant(&format!("checkpoint-restart, interval {short}"), restart, None, Some(short)),
            Policy::new("ninelives, no peer copies", no_peer),
            variant(&format!("ninelives, no peer copies, interval {short}"), no_peer, None, Some(short)),
            variant("ninelives, no peer copies, every expert x2", no_peer, x2, None),
            Policy::new("ninelives, peer copies", peer),
            variant("ninelives, peer copies, every expert x2", peer, x2, None),
            variant(
                &format!("ninelives, peer copies, every expert x2, interval {long}"),
                peer,
                x2,
                Some(long),
            ),
        ]
    }
}

/// Per-chip state sizes of a job, what saves and restores move.
#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StateSizes {
    /// Training state of one expert replica.
    pub expert_bytes: f64,
    /// Expert replicas per chip (uniform placement).
    pub replicas_per_chip: f64,
    /// Dense training state per chip: every chip of a stage holds the stage's dense parameters
    /// in bf16 with gradients (4 bytes each) plus its share of the fp32 master and moments
    /// (12 bytes) sharded over the stage's data-parallel groups.
    pub dense_bytes_per_chip: f64,
    /// Chips per node.
    pub chips_per_node: u32,
}

impl StateSizes {
    /// The sizes of `job`.
    pub fn of(job: &JobShape) -> Self {
        let groups = job.expert_parallel_groups().max(1) as f64;
        let stages = f64::from(job.pipeline_stages.max(1));
        let groups_per_stage = (groups / stages).max(1.0);
        let replicas = f64::from(job.layers_per_stage())
            * (f64::from(job.model.routed_experts) + f64::from(job.redundant_experts));
        let dense_per_stage = job.model.dense_params() as f64 / stages;
        let sharded = (STATE_BYTES_PER_PARAM - 4) as f64 / groups_per_stage;
        Self {
            expert_bytes: job.model.expert_state_bytes() as f64,
            replicas_per_chip: replicas / f64::from(job.expert_parallel_size.max(1)),
            dense_bytes_per_chip: dense_per_stage * (4.0 + sharded),
            chips_per_node: job.chips_per_node,
        }
    }

    /// Expert state per chip.
    pub fn expert_bytes_per_chip(&self) -> f64 {
        self.expert_bytes * self.replicas_per_chip
    }

    /// All training state per chip (what a disk checkpoint holds per chip).
    pub fn bytes_per_chip(&self) -> f64 {
        self.expert_bytes_per_chip() + self.dense_bytes_per_chip
    }
}

/// Everything one simulation run needs besides the job and the policies.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SimParams {
    /// Simulated wall time.
    pub horizon_s: f64,
    /// Seed of the fault trace.
    pub seed: u64,
    /// Costs.
    pub costs: Costs,
    /// Faults.
    pub faults: FaultModel,
    /// Steps between peer snapshots (issue 21's `peerIntervalSteps`).
    pub peer_interval_steps: u64,
    /// Points of the progress curve per policy (for the chart).
    pub samples: u32,
}

impl SimParams {
    /// Checks every parameter.
    pub fn validate(&self) -> Result<(), SimError> {
        if !self.horizon_s.is_finite() || self.horizon_s <= 0.0 {
            return Err(SimError::Params(format!("horizon must be > 0 s, not {}", self.horizon_s)));
        }
        if self.peer_interval_steps == 0 {
            return Err(SimError::Params("peer interval must be at least 1 step".into()));
        }
        self.costs.validate()?;
        self.faults.validate()
    }
}

/// The job settings a policy runs with.
pub fn policy_spec(spec: &TrainingJobSpec, policy: &Policy) -> TrainingJobSpec {
    let mut spec = spec.clone();
    if let Some(r) = policy.redundant_experts {
        spec.parallelism.redundant_experts = r;
    }
    if let Some(i) = policy.interval_steps {
        spec.checkpoint.interval_steps = i;
    }
    spec
}
