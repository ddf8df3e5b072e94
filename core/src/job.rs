//! The `TrainingJob` custom resource (`ninelives.io/v1alpha1`).
//!
//! Rules that only look at one object node are CEL rules (`x-kubernetes-validations`) in the
//! generated schema, so the apiserver rejects them at admission and `ninelives validate`
//! evaluates the very same expressions client-side. Rules that need the resolved model or cross
//! several sections live in [`crate::validate`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a training job: the model, where it runs, and how failures are handled.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ninelives.io",
    version = "v1alpha1",
    kind = "TrainingJob",
    plural = "trainingjobs",
    shortname = "tj",
    namespaced,
    cel,
    status = "TrainingJobStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Step","type":"integer","jsonPath":".status.step"}"#,
    printcolumn = r#"{"name":"Loss","type":"number","jsonPath":".status.lastLoss"}"#,
    printcolumn = r#"{"name":"Healthy","type":"integer","jsonPath":".status.healthyChips","description":"healthy chips"}"#,
    printcolumn = r#"{"name":"Recoveries","type":"integer","jsonPath":".status.recoveries"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobSpec {
    /// Kueue-compatible suspension: while true the operator keeps no worker pods.
    #[serde(default)]
    pub suspend: bool,
    /// The model to train: a preset, explicit dimensions, or a preset with overrides.
    #[x_kube(validation = Rule::new("self == oldSelf").message("model is immutable once the job exists"))]
    pub model: ModelSpec,
    /// Nodes, chips and failure domains the job runs on.
    pub topology: TopologySpec,
    /// How experts are spread over chips.
    #[serde(default)]
    pub parallelism: ParallelismSpec,
    /// Training data and batch geometry.
    pub data: DataSpec,
    /// Optimisation schedule.
    pub training: TrainingSpec,
    /// Where and how often committed checkpoints are written.
    pub checkpoint: CheckpointSpec,
    /// What recovery may do, and when to give up.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Settings copied onto every worker pod.
    #[serde(default)]
    pub pod: WorkerPodSpec,
}

/// Named model sizes. Explicit fields in [`ModelSpec`] override the preset's values.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelPreset {
    /// ~2 M parameters: tests and the local demo.
    #[serde(rename = "tiny")]
    Tiny,
    /// ~40 M parameters: throughput benchmarks.
    #[serde(rename = "small")]
    Small,
    /// A LongCat-2.0-class model (~1.6 T parameters): for planning at scale, not for CPU training.
    #[serde(rename = "longcat-2.0")]
    LongCat2,
}

/// Model architecture: a decoder-only MoE transformer in the style of LongCat-Flash.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "has(self.preset) || (has(self.layers) && has(self.hiddenSize) && has(self.heads) && has(self.vocabSize) && has(self.routedExperts) && has(self.topK) && has(self.expertFfnSize) && has(self.seqLen))"
).message("set a preset or every dimension (layers, hiddenSize, heads, vocabSize, routedExperts, topK, expertFfnSize, seqLen)"))]
#[x_kube(validation = Rule::new(
    "!has(self.topK) || !has(self.routedExperts) || self.topK <= self.routedExperts + (has(self.zeroExperts) ? self.zeroExperts : 0)"
).message("topK must not exceed routedExperts + zeroExperts"))]
pub struct ModelSpec {
    /// Starting point for the dimensions below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<ModelPreset>,
    /// Transformer blocks; every block has an MoE feed-forward layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("layers must be at least 1"))]
    pub layers: Option<u32>,
    /// Model width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<u32>,
    /// Attention heads; must divide hiddenSize.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("heads must be at least 1"))]
    pub heads: Option<u32>,
    /// Vocabulary size (256 for the byte-level worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<u32>,
    /// Routed (FFN) experts per MoE layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("routedExperts must be at least 1"))]
    pub routed_experts: Option<u32>,
    /// Zero-computation (identity) experts per layer, as in LongCat-Flash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero_experts: Option<u32>,
    /// Experts each token is routed to (among routed + zero-computation experts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("topK must be at least 1"))]
    pub top_k: Option<u32>,
    /// Inner width of each SwiGLU expert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_ffn_size: Option<u32>,
    /// Training sequence length in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_len: Option<u32>,
    /// Block-sparse attention (in the spirit of LongCat Sparse Attention); dense when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse_attention: Option<SparseAttentionSpec>,
    /// A fixed, untrained bias on the router's logits that skews expert load (for demos and
    /// tests of load balancing): routed expert `e` of layer `l` gets `routerSkew * r / (routed -
    /// 1)` with `r = (e + l) mod routed`, so each layer has a different hottest expert. Absent or
    /// 0: no bias. Deterministic, so a skewed run is still bit-identical on any placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 20.0").message("routerSkew must be in [0, 20]"))]
    pub router_skew: Option<f64>,
}

/// Block-sparse causal attention: each query block attends to its own block, the first block and
/// the `topBlocks` highest-scoring earlier blocks.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.blockSize >= 1 && self.topBlocks >= 1").message("blockSize and topBlocks must be at least 1"))]
pub struct SparseAttentionSpec {
    /// Tokens per attention block; must divide seqLen.
    pub block_size: u32,
    /// Earlier blocks each query block may attend to.
    pub top_blocks: u32,
}

/// Nodes, chips and failure domains.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.nodes >= 1").message("nodes must be at least 1").field_path(".nodes"))]
#[x_kube(validation = Rule::new("self.chipsPerNode >= 1 && self.chipsPerNode <= 64").message("chipsPerNode must be between 1 and 64").field_path(".chipsPerNode"))]
#[x_kube(validation = Rule::new("!has(self.nodesPerRack) || self.nodesPerRack >= 1").message("nodesPerRack must be at least 1").field_path(".nodesPerRack"))]
pub struct TopologySpec {
    /// Nodes that train (one worker pod each).
    pub nodes: u32,
    /// Accelerator chips per node.
    pub chips_per_node: u32,
    /// Standby nodes kept ready to replace failed ones.
    #[serde(default)]
    pub spare_nodes: u32,
    /// Memory of one chip, as a Kubernetes quantity (e.g. `64Gi`).
    pub chip_memory: Quantity,
    /// Node label whose value names the node's rack (a failure domain) in a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rack_label: Option<String>,
    /// For planning without a cluster: consecutive nodes per rack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_per_rack: Option<u32>,
}

/// How experts are spread over chips.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.expertParallelSize) || self.expertParallelSize >= 1").message("expertParallelSize must be at least 1").field_path(".expertParallelSize"))]
#[x_kube(validation = Rule::new("!has(self.pipelineParallelSize) || self.pipelineParallelSize >= 1").message("pipelineParallelSize must be at least 1").field_path(".pipelineParallelSize"))]
pub struct ParallelismSpec {
    /// Chips in one expert-parallel group (each group holds every expert once, plus redundant
    /// replicas). Defaults to every chip of the job. Must be whole nodes and divide the chip count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_parallel_size: Option<u32>,
    /// Extra expert replicas per layer (EPLB-style), used for load balance and for re-routing
    /// around failed chips without moving weights.
    #[serde(default)]
    pub redundant_experts: u32,
    /// Pipeline stages: the layers are split into this many stages of consecutive layers, each
    /// trained by its own share of the nodes (a chip hosts experts of its stage's layers only;
    /// expert-parallel groups live within a stage). Defaults to 1. Must divide the layers and
    /// the expert-parallel groups. The embedded CPU worker runs one stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_parallel_size: Option<u32>,
    /// Closed-loop rebalancing from the load the workers measure. Without it, measured load is
    /// still used by every re-plan, but the brain never moves replicas for balance alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<RebalanceSpec>,
}

/// When the brain rebalances a running job: the measured step inflation (Σ over layers of the
/// most loaded chip / Σ of the mean, from the tokens the workers count) must pass `threshold`,
/// and at least `minIntervalSteps` steps must have passed since the previous rebalance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.threshold >= 1.0").message("rebalance.threshold is a step inflation: at least 1.0").field_path(".threshold"))]
#[x_kube(validation = Rule::new("!has(self.minIntervalSteps) || self.minIntervalSteps >= 1").message("rebalance.minIntervalSteps must be at least 1").field_path(".minIntervalSteps"))]
#[x_kube(validation = Rule::new("!has(self.windowSteps) || self.windowSteps >= 1").message("rebalance.windowSteps must be at least 1").field_path(".windowSteps"))]
pub struct RebalanceSpec {
    /// Measured step inflation above which the brain publishes a rebalance generation.
    pub threshold: f64,
    /// Steps between two rebalances (and before the first), so the load table has windows to
    /// smooth and a rebalance is never followed by another before its effect is measured.
    #[serde(default = "default_rebalance_interval")]
    pub min_interval_steps: u64,
    /// Workers publish their token counts every this many steps.
    #[serde(default = "default_load_window")]
    pub window_steps: u64,
}

fn default_rebalance_interval() -> u64 {
    50
}

/// Steps per load window when the spec sets none.
pub const DEFAULT_LOAD_WINDOW_STEPS: u64 = 10;

fn default_load_window() -> u64 {
    DEFAULT_LOAD_WINDOW_STEPS
}

/// Training data and batch geometry. The global batch is fixed; workers only change who computes
/// which micro-batch.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("size(self.datasets) >= 1").message("at least one dataset path is required").field_path(".datasets"))]
#[x_kube(validation = Rule::new("self.microBatchSize >= 1 && self.globalBatchSize >= 1").message("globalBatchSize and microBatchSize must be at least 1"))]
#[x_kube(validation = Rule::new("self.microBatchSize == 0 || self.globalBatchSize % self.microBatchSize == 0").message("globalBatchSize must be a multiple of microBatchSize").field_path(".globalBatchSize"))]
pub struct DataSpec {
    /// Directories (or files) of text to train on.
    pub datasets: Vec<String>,
    /// Sequences per optimizer step, summed over all workers.
    pub global_batch_size: u32,
    /// Sequences per forward/backward pass.
    pub micro_batch_size: u32,
    /// Seed for data sampling and initialisation.
    #[serde(default)]
    pub seed: u64,
}

/// Learning-rate schedule shape.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Linear warmup, then cosine decay to `min`.
    #[default]
    Cosine,
    /// Linear warmup, then linear decay to `min`.
    Linear,
    /// Linear warmup, then constant `peak`.
    Constant,
}

/// Learning rate over time.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.peak > 0.0").message("peak learning rate must be positive").field_path(".peak"))]
#[x_kube(validation = Rule::new("self.min >= 0.0 && self.min <= self.peak").message("min learning rate must be between 0 and peak").field_path(".min"))]
pub struct LearningRateSpec {
    /// Learning rate at the end of warmup.
    pub peak: f64,
    /// Learning rate at the last step.
    #[serde(default)]
    pub min: f64,
    /// Steps of linear warmup from 0 to `peak`.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Decay after warmup.
    #[serde(default)]
    pub schedule: ScheduleKind,
}

/// AdamW hyper-parameters.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.beta1 >= 0.0 && self.beta1 < 1.0 && self.beta2 >= 0.0 && self.beta2 < 1.0").message("beta1 and beta2 must be in [0, 1)"))]
#[x_kube(validation = Rule::new("self.epsilon > 0.0").message("epsilon must be positive").field_path(".epsilon"))]
#[x_kube(validation = Rule::new("self.weightDecay >= 0.0").message("weightDecay must not be negative").field_path(".weightDecay"))]
pub struct AdamWSpec {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator stabiliser.
    pub epsilon: f64,
    /// Decoupled weight decay (not applied to norms and biases).
    pub weight_decay: f64,
}

impl Default for AdamWSpec {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.95, epsilon: 1e-8, weight_decay: 0.1 }
    }
}

/// Optimisation schedule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.steps >= 1").message("steps must be at least 1").field_path(".steps"))]
#[x_kube(validation = Rule::new("self.learningRate.warmupSteps <= self.steps").message("learningRate.warmupSteps must not exceed steps").field_path(".learningRate.warmupSteps"))]
#[x_kube(validation = Rule::new("self.gradClip > 0.0").message("gradClip must be positive").field_path(".gradClip"))]
#[x_kube(validation = Rule::new("self.auxLossCoef >= 0.0 && self.zLossCoef >= 0.0").message("auxLossCoef and zLossCoef must not be negative"))]
pub struct TrainingSpec {
    /// Optimizer steps to run.
    pub steps: u64,
    /// Learning-rate schedule.
    pub learning_rate: LearningRateSpec,
    /// AdamW settings.
    #[serde(default)]
    pub adamw: AdamWSpec,
    /// Global gradient-norm clipping threshold.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    /// Weight of the load-balancing auxiliary loss.
    #[serde(default = "default_aux_loss_coef")]
    pub aux_loss_coef: f64,
    /// Weight of the router z-loss.
    #[serde(default = "default_z_loss_coef")]
    pub z_loss_coef: f64,
}

fn default_grad_clip() -> f64 {
    1.0
}
fn default_aux_loss_coef() -> f64 {
    0.01
}
fn default_z_loss_coef() -> f64 {
    0.001
}

/// A PersistentVolumeClaim holding checkpoints.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("size(self.claimName) >= 1").message("claimName must not be empty").field_path(".claimName"))]
pub struct PvcRef {
    /// Claim name in the job's namespace.
    pub claim_name: String,
    /// Directory inside the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

/// Where and how often checkpoints are committed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.path) != has(self.pvc)").message("set exactly one of path or pvc"))]
#[x_kube(validation = Rule::new("self.intervalSteps >= 1").message("intervalSteps must be at least 1").field_path(".intervalSteps"))]
#[x_kube(validation = Rule::new("self.keepLast >= 1").message("keepLast must be at least 1").field_path(".keepLast"))]
pub struct CheckpointSpec {
    /// A directory (host path, or a path the worker pods already mount).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A PersistentVolumeClaim mounted into every worker pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcRef>,
    /// Commit a checkpoint every this many steps.
    pub interval_steps: u64,
    /// Committed checkpoints to retain.
    #[serde(default = "default_keep_last")]
    pub keep_last: u32,
    /// In-memory copies of each worker's expert state held by peers, so a lost expert can be
    /// restored without rolling back.
    #[serde(default)]
    pub peer_copies: u32,
    /// With peer copies, members refresh them every this many steps (1: every step, so a
    /// failure between steps loses nothing).
    #[serde(default = "default_peer_interval_steps")]
    pub peer_interval_steps: u64,
}

fn default_keep_last() -> u32 {
    3
}

fn default_peer_interval_steps() -> u64 {
    1
}

/// A rung of the recovery ladder, cheapest first.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum RecoveryTier {
    /// Route around failed chips; every lost expert has a live replica; no weights move.
    Reroute,
    /// Re-place lost experts and load their state from a peer or the last checkpoint.
    Reshard,
    /// Roll the whole job back to the last committed checkpoint on the new topology.
    Restore,
    /// Bring in spare nodes, or continue degraded within `minHealthyFraction`.
    Replace,
}

impl RecoveryTier {
    /// Every tier, cheapest first.
    pub const ALL: [RecoveryTier; 4] =
        [RecoveryTier::Reroute, RecoveryTier::Reshard, RecoveryTier::Restore, RecoveryTier::Replace];

    /// Lower-case name as used in the API, metrics and events.
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryTier::Reroute => "reroute",
            RecoveryTier::Reshard => "reshard",
            RecoveryTier::Restore => "restore",
            RecoveryTier::Replace => "replace",
        }
    }
}

/// What recovery may do, and when to give up.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.heartbeatTtlSeconds >= 1 && self.heartbeatTtlSeconds <= 300").message("heartbeatTtlSeconds must be between 1 and 300").field_path(".heartbeatTtlSeconds"))]
#[x_kube(validation = Rule::new("self.minHealthyFraction > 0.0 && self.minHealthyFraction <= 1.0").message("minHealthyFraction must be in (0, 1]").field_path(".minHealthyFraction"))]
#[x_kube(validation = Rule::new("size(self.allowedTiers) >= 1").message("allowedTiers must name at least one tier").field_path(".allowedTiers"))]
#[x_kube(validation = Rule::new("self.recoveryTimeoutSeconds >= 1").message("recoveryTimeoutSeconds must be at least 1").field_path(".recoveryTimeoutSeconds"))]
#[x_kube(validation = Rule::new("!has(self.startTimeoutSeconds) || self.startTimeoutSeconds >= 1").message("startTimeoutSeconds must be at least 1").field_path(".startTimeoutSeconds"))]
pub struct FailurePolicy {
    /// Lease TTL of node and worker presence in etcd; a silent node is declared lost after it.
    pub heartbeat_ttl_seconds: u32,
    /// Recoveries after which the job fails instead of recovering again.
    pub max_recoveries: u32,
    /// Fraction of the job's chips that must stay healthy to continue degraded.
    pub min_healthy_fraction: f64,
    /// Rungs of the recovery ladder the operator may use.
    pub allowed_tiers: Vec<RecoveryTier>,
    /// A recovery not finished within this time is abandoned and escalated to the next tier.
    pub recovery_timeout_seconds: u32,
    /// Members that have not joined the first generation this long after it was published are
    /// recovered like lost workers (restarted, replaced, dropped), so a job never hangs in
    /// `Starting`. Default [`DEFAULT_START_TIMEOUT_SECONDS`]: room for scheduling, image pulls
    /// and loading a checkpoint on a large job.
    #[serde(default = "default_start_timeout")]
    pub start_timeout_seconds: u32,
}

/// The default `failurePolicy.startTimeoutSeconds`.
pub const DEFAULT_START_TIMEOUT_SECONDS: u32 = 600;

fn default_start_timeout() -> u32 {
    DEFAULT_START_TIMEOUT_SECONDS
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self {
            heartbeat_ttl_seconds: 5,
            max_recoveries: 100,
            min_healthy_fraction: 0.75,
            allowed_tiers: RecoveryTier::ALL.to_vec(),
            recovery_timeout_seconds: 300,
            start_timeout_seconds: DEFAULT_START_TIMEOUT_SECONDS,
        }
    }
}

/// Settings copied onto every worker pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPodSpec {
    /// Container image of the worker; the operator's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Compute resources of the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the worker pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the worker pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Priority class of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Scheduler of the worker pods (e.g. `volcano` for gang scheduling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_name: Option<String>,
}

/// Coarse lifecycle phase shown by `kubectl get tj`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobPhase {
    /// Accepted; pods not yet running.
    Pending,
    /// Training.
    Running,
    /// A recovery is in progress.
    Recovering,
    /// `spec.suspend` is true; no pods.
    Suspended,
    /// All steps done.
    Succeeded,
    /// Gave up (policy could not be met, or too many recoveries).
    Failed,
    /// The spec is invalid; waiting for a change.
    Invalid,
}

/// A Kubernetes-style condition.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobCondition {
    /// Condition type, e.g. `Ready`, `Invalid`, `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase machine-readable reason.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// RFC 3339 time of the last status change.
    pub last_transition_time: String,
    /// `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The newest committed checkpoint.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CommittedCheckpoint {
    /// Step the checkpoint holds.
    pub step: u64,
    /// RFC 3339 commit time.
    pub time: String,
    /// Directory of the checkpoint.
    pub location: String,
}

/// One recovery, for the audit trail.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryRecord {
    /// What failed, e.g. `chip node-2/5 ecc-uncorrectable` or `node node-3 lost`.
    pub trigger: String,
    /// The rung of the ladder that recovered it.
    pub tier: RecoveryTier,
    /// Seconds from the fault to its detection; absent when the fault's time is unknown (a
    /// process that vanished without a stamp), never a made-up 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detection_seconds: Option<f64>,
    /// Seconds from detection to training resumed.
    pub recovery_seconds: f64,
    /// Steps of work discarded (0 for reroute).
    pub steps_lost: u64,
    /// Where the resumed state came from: `memory` (no rollback), `peer` (an in-memory peer
    /// snapshot) or `checkpoint` (the disk checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// RFC 3339 time training resumed.
    pub time: String,
}

/// Observed state, written by the operator at a bounded rate (O(1) writes per failure).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobStatus {
    /// Coarse phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    /// Conditions (`Ready`, `Invalid`, `Degraded`, `Recovering`, `Succeeded`, `Failed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<JobCondition>,
    /// Last completed step.
    #[serde(default)]
    pub step: u64,
    /// Training loss at `step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_loss: Option<f64>,
    /// Newest committed checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CommittedCheckpoint>,
    /// Generation of the expert placement in force.
    #[serde(default)]
    pub placement_generation: u64,
    /// Chips currently healthy and in use.
    #[serde(default)]
    pub healthy_chips: u32,
    /// Chips failed or quarantined.
    #[serde(default)]
    pub failed_chips: u32,
    /// Chips on standby nodes.
    #[serde(default)]
    pub spare_chips: u32,
    /// Recoveries so far.
    #[serde(default)]
    pub recoveries: u32,
    /// The most recent recoveries, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_recoveries: Vec<RecoveryRecord>,
    /// Fraction of wall time spent making progress that was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub goodput: Option<f64>,
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The CRD group/version string.
pub const API_VERSION: &str = "ninelives.io/v1alpha1";
/// The CRD kind.
pub const KIND: &str = "TrainingJob";
