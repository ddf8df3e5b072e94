//! The training loop: micro-batches → gradients → ordered reduction → AdamW.
//!
//! Exactness argument: a step's data is a pure function of `(seed, step, sample)`; the global
//! batch is split into fixed micro-batches; each micro-batch's gradients are computed
//! independently and then summed **in micro-batch index order** and scaled by `1 / micro_batches`.
//! So which process computes a micro-batch, and in what order they finish, never changes a bit of
//! the result — only the thread count of the CPU kernels could, and [`run_with_threads`] pins it.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Var;
use rayon::prelude::*;

use ninelives_core::job::TrainingSpec;
use ninelives_core::{ModelDims, TrainingJob};

use crate::checkpoint::{
    CheckpointManifest, CheckpointStore, DataCursor, LoadReport, LoadedCheckpoint, RestoreTarget, TensorPart,
    TrainingSnapshot,
};
use crate::data::{Corpus, MicroBatch};
use crate::error::{Result, WorkerError};
use std::collections::BTreeMap;

use crate::experts::insert_expert_grads;
use crate::model::{ExpertId, ExpertSource, HostTensor, LossWeights, MoeTransformer};
use crate::optim::{AdamW, Gradients, Moments, UpdateReport};

/// Everything that fixes the math of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerConfig {
    /// Model dimensions.
    pub dims: ModelDims,
    /// Optimisation settings.
    pub training: TrainingSpec,
    /// Steps the learning-rate schedule spans (the run's last step).
    pub total_steps: u64,
    /// Sequences per step.
    pub global_batch_size: u32,
    /// Sequences per micro-batch.
    pub micro_batch_size: u32,
    /// Seed of initialisation and sampling.
    pub seed: u64,
    /// The fixed router bias that skews expert load (`spec.model.routerSkew`; 0: none).
    pub router_skew: f64,
    /// Expert-parallel members publish their token counts every this many steps
    /// (`spec.parallelism.rebalance.windowSteps`).
    pub load_window_steps: u64,
}

impl TrainerConfig {
    /// The configuration a TrainingJob describes. The embedded worker trains every layer in one
    /// process group: a job asking for pipeline stages is refused with a message saying so (such
    /// a manifest is still valid for planning with `ninelives plan`).
    pub fn from_job(job: &TrainingJob) -> Result<Self> {
        let spec = &job.spec;
        if let Some(stages) = spec.parallelism.pipeline_parallel_size.filter(|&s| s > 1) {
            return Err(WorkerError::InvalidJob(format!(
                "spec.parallelism.pipelineParallelSize is {stages}, but the embedded worker runs a single pipeline stage (every layer in each worker); set it to 1 to train here (the planner, `ninelives plan`, handles {stages} stages)"
            )));
        }
        let dims = ModelDims::resolve(&spec.model).map_err(|missing| {
            WorkerError::InvalidJob(format!("model dimensions not set: {}", missing.join(", ")))
        })?;
        let config = Self {
            dims,
            training: spec.training.clone(),
            total_steps: spec.training.steps,
            global_batch_size: spec.data.global_batch_size,
            micro_batch_size: spec.data.micro_batch_size,
            seed: spec.data.seed,
            router_skew: spec.model.router_skew.unwrap_or(0.0),
            load_window_steps: spec
                .parallelism
                .rebalance
                .as_ref()
                .map_or(ninelives_core::job::DEFAULT_LOAD_WINDOW_STEPS, |r| r.window_steps.max(1)),
        };
        config.check()?;
        Ok(config)
    }

    /// Checks the batch geometry and model can be trained.
    pub fn check(&self) -> Result<()> {
        crate::model::check_dims(&self.dims)?;
        if self.micro_batch_size == 0 || !self.global_batch_size.is_multiple_of(self.micro_batch_size) {
            return Err(WorkerError::InvalidJob(format!(
                "globalBatchSize {} must be a positive multiple of microBatchSize {}",
                self.global_batch_size, self.micro_batch_size
            )));
        }
        if self.total_steps == 0 {
            return Err(WorkerError::InvalidJob("steps must be at least 1".into()));
        }
        Ok(())
    }

    /// Micro-batches per step.
    pub fn micro_batches(&self) -> usize {
        (self.global_batch_size / self.micro_batch_size) as usize
    }

    /// Training tokens per step.
    pub fn tokens_per_step(&self) -> u64 {
        u64::from(self.global_batch_size) * u64::from(self.dims.seq_len)
    }

    fn loss_weights(&self) -> LossWeights {
        LossWeights { aux: self.training.aux_loss_coef, z: self.training.z_loss_coef }
    }
}

/// Gradients and losses of one micro-batch, ready for the ordered reduction.
#[derive(Clone, Debug)]
pub struct MicroBatchResult {
    /// Micro-batch index within the step (the reduction order).
    pub index: usize,
    /// Gradients of this micro-batch's objective, by parameter name.
    pub grads: Gradients,
    /// Mean cross-entropy.
    pub cross_entropy: f32,
    /// Load-balancing loss (summed over layers).
    pub balance_loss: f32,
    /// Router z-loss (summed over layers).
    pub z_loss: f32,
    /// Tokens routed to each routed expert, `[layer][expert]` (measured load; not sent to other
    /// members).
    pub expert_tokens: Vec<Vec<u32>>,
}

/// What one step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// The step just completed (1-based count of updates applied).
    pub step: u64,
    /// Mean cross-entropy over the global batch (nats per byte).
    pub loss: f64,
    /// Mean load-balancing loss.
    pub balance_loss: f64,
    /// Mean router z-loss.
    pub z_loss: f64,
    /// The optimizer update.
    pub update: UpdateReport,
    /// Wall time of the step.
    pub seconds: f64,
    /// Tokens per second.
    pub tokens_per_second: f64,
}

/// A model, its optimizer and its data position.
pub struct Trainer {
    config: TrainerConfig,
    corpus: Arc<Corpus>,
    model: MoeTransformer,
    optimizer: AdamW,
    step: u64,
}

impl Trainer {
    /// A freshly initialised trainer at step 0, holding every expert.
    pub fn new(config: TrainerConfig, corpus: Arc<Corpus>) -> Result<Self> {
        Self::with_experts(config, corpus, None)
    }

    /// A freshly initialised trainer at step 0 holding only `experts` (all when `None`).
    pub fn with_experts(
        config: TrainerConfig,
        corpus: Arc<Corpus>,
        experts: Option<&[ExpertId]>,
    ) -> Result<Self> {
        config.check()?;
        corpus.check_fits(config.dims.seq_len as usize)?;
        let mut model = MoeTransformer::initialize(config.dims, config.seed, experts)?;
        model.set_router_skew(config.router_skew)?;
        let optimizer = AdamW::new(&config.training, config.total_steps, &model);
        Ok(Self { config, corpus, model, optimizer, step: 0 })
    }

    /// A trainer continuing from a loaded checkpoint (which may hold a subset of the experts).
    pub fn from_checkpoint(
        config: TrainerConfig,
        corpus: Arc<Corpus>,
        loaded: LoadedCheckpoint,
    ) -> Result<Self> {
        config.check()?;
        corpus.check_fits(config.dims.seq_len as usize)?;
        let cursor = loaded.manifest.data_cursor;
        check_cursor(&config, &cursor, &loaded.path)?;
        let mut model = MoeTransformer::from_values(config.dims, loaded.params)?;
        model.set_router_skew(config.router_skew)?;
        let mut optimizer = AdamW::new(&config.training, config.total_steps, &model);
        for (name, moments) in loaded.moments {
            optimizer.set_moments(&name, moments)?;
        }
        Ok(Self { config, corpus, model, optimizer, step: cursor.next_step })
    }

    /// A trainer continuing at `step` from parameters and moments held in host memory (a peer
    /// snapshot): the dense parameters and the experts given, nothing read from disk.
    pub fn from_host_state(
        config: TrainerConfig,
        corpus: Arc<Corpus>,
        params: BTreeMap<String, HostTensor>,
        moments: BTreeMap<String, Moments>,
        step: u64,
    ) -> Result<Self> {
        config.check()?;
        corpus.check_fits(config.dims.seq_len as usize)?;
        let mut model = MoeTransformer::from_values(config.dims, params)?;
        model.set_router_skew(config.router_skew)?;
        let mut optimizer = AdamW::new(&config.training, config.total_steps, &model);
        for (name, m) in moments {
            optimizer.set_moments(&name, m)?;
        }
        Ok(Self { config, corpus, model, optimizer, step })
    }

    /// Restores a checkpoint directory into this trainer's existing memory: parameters, Adam
    /// moments and the step. The checkpoint must hold every parameter this trainer holds (the
    /// dense ones and its experts); only those shards are read. Nothing is allocated per tensor,
    /// which makes this the fast restore for a worker that is still running (see
    /// [`CheckpointStore::restore_dir`]). After an error the trainer may hold a mix of states:
    /// restore again (e.g. an older checkpoint) or drop it.
    pub fn restore_dir(&mut self, store: &CheckpointStore, path: &Path) -> Result<LoadReport> {
        let dims = self.config.dims;
        let (manifest, report) = store.restore_dir(path, &dims, &self.live_state())?;
        self.step = manifest.data_cursor.next_step;
        Ok(report)
    }

    /// [`Trainer::restore_dir`] of the newest usable checkpoint, falling back past torn or
    /// corrupt ones as [`CheckpointStore::load_latest`] does; `Ok(None)` (trainer untouched) when
    /// the store holds no committed checkpoint.
    pub fn restore_latest(&mut self, store: &CheckpointStore) -> Result<Option<LoadReport>> {
        let dims = self.config.dims;
        let Some((manifest, report)) = store.restore_latest(&dims, &self.live_state())? else {
            return Ok(None);
        };
        self.step = manifest.data_cursor.next_step;
        Ok(Some(report))
    }

    /// This trainer's parameters and moments as a [`RestoreTarget`].
    fn live_state(&mut self) -> LiveState<'_> {
        LiveState {
            config: &self.config,
            model: &self.model,
            moments: self.optimizer.moments_mut().map(|(name, m)| (name.as_str(), Mutex::new(m))).collect(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// The model.
    pub fn model(&self) -> &MoeTransformer {
        &self.model
    }

    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Micro-batch `index` of the current step.
    pub fn micro_batch(&self, index: usize) -> MicroBatch {
        self.corpus.micro_batch(
            self.config.seed,
            self.step,
            index,
            self.config.micro_batch_size as usize,
            self.config.dims.seq_len as usize,
        )
    }

    /// Forward and backward of one micro-batch; nothing is updated.
    pub fn micro_batch_gradients(&self, batch: &MicroBatch) -> Result<MicroBatchResult> {
        self.micro_batch_gradients_with(batch, None)
    }

    /// [`Trainer::micro_batch_gradients`] with routed experts evaluated by `experts` (expert
    /// parallelism); the result then holds only the dense gradients, the experts' weight
    /// gradients staying with whoever computed them.
    pub fn micro_batch_gradients_with(
        &self,
        batch: &MicroBatch,
        experts: Option<&ExpertSource>,
    ) -> Result<MicroBatchResult> {
        let out = self.model.forward_with(batch, self.config.loss_weights(), experts)?;
        if !out.cross_entropy.is_finite() {
            return Err(WorkerError::Diverged {
                step: self.step,
                what: format!("loss {}", out.cross_entropy),
            });
        }
        let store = out.objective.backward()?;
        let params: Vec<(&String, &Var)> = self.model.params().iter().collect();
        let copied = params
            .par_iter()
            .map(|(name, var)| -> Result<Option<(String, Vec<f32>)>> {
                match store.get(var.as_tensor()) {
                    Some(g) => Ok(Some(((*name).clone(), g.flatten_all()?.to_vec1::<f32>()?))),
                    None => Ok(None),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let mut grads: Gradients = copied.into_iter().flatten().collect();
        if let Some(local) = &out.local_experts {
            insert_expert_grads(&mut grads, local.take_grads()?);
        }
        Ok(MicroBatchResult {
            index: batch.index,
            grads,
            cross_entropy: out.cross_entropy,
            balance_loss: out.balance_loss,
            z_loss: out.z_loss,
            expert_tokens: out.expert_tokens,
        })
    }

    /// The ordered reduction: sums micro-batch gradients in index order and divides by their
    /// count. Results may arrive in any order and from any worker; every index of the step must
    /// be present exactly once.
    pub fn reduce(&self, mut results: Vec<MicroBatchResult>) -> Result<(Gradients, [f64; 3])> {
        results.sort_by_key(|r| r.index);
        let expected = self.config.micro_batches();
        if results.len() != expected || results.iter().enumerate().any(|(i, r)| r.index != i) {
            return Err(WorkerError::InvalidJob(format!(
                "step {} needs micro-batches 0..{expected} exactly once, got {:?}",
                self.step,
                results.iter().map(|r| r.index).collect::<Vec<_>>()
            )));
        }
        let mut losses = [0.0f64; 3];
        for r in &results {
            losses[0] += f64::from(r.cross_entropy);
            losses[1] += f64::from(r.balance_loss);
            losses[2] += f64::from(r.z_loss);
        }
        let scale = 1.0 / expected as f32;
        let names: BTreeSet<&String> = results.iter().flat_map(|r| r.grads.keys()).collect();
        let names: Vec<&String> = names.into_iter().collect();
        // Parameters in parallel; each one's sum runs over micro-batches in index order.
        let sum: Gradients = names
            .par_iter()
            .map(|&name| {
                let mut acc: Option<Vec<f32>> = None;
                for g in results.iter().filter_map(|r| r.grads.get(name)) {
                    match acc.as_mut() {
                        Some(acc) => acc.iter_mut().zip(g).for_each(|(a, x)| *a += x),
                        None => acc = Some(g.clone()),
                    }
                }
                let mut acc = acc.unwrap_or_default();
                acc.iter_mut().for_each(|x| *x *= scale);
                (name.clone(), acc)
            })
            .collect();
        let n = expected as f64;
        Ok((sum, losses.map(|l| l / n)))
    }

    /// Applies reduced gradients as the update of the current step and advances the step.
    pub fn apply(&mut self, grads: &Gradients) -> Result<UpdateReport> {
        let report = self.optimizer.update(&self.model, self.step, grads)?;
        self.step += 1;
        Ok(report)
    }

    /// [`Trainer::apply`] with the global gradient norm computed elsewhere (expert parallelism:
    /// `grads` holds only this worker's parameters).
    pub fn apply_with_norm(&mut self, grads: &Gradients, grad_norm: f64) -> Result<UpdateReport> {
        let report = self.optimizer.update_with_norm(&self.model, self.step, grads, grad_norm)?;
        self.step += 1;
        Ok(report)
    }

    /// Keeps only the routed experts `experts` of those held, dropping the others' parameters
    /// and Adam moments: a generation that only takes experts away from this worker (a reroute
    /// after their other replicas were placed elsewhere) continues from memory. Every expert
    /// in `experts` must be held; dense parameters stay.
    pub fn retain_experts(&mut self, experts: &[ExpertId]) -> Result<()> {
        let held = self.model.held_experts();
        if let Some(missing) = experts.iter().find(|e| !held.contains(e)) {
            return Err(WorkerError::InvalidJob(format!(
                "cannot keep {missing}: this worker does not hold it"
            )));
        }
        self.model.retain_experts(experts);
        self.optimizer.retain_experts(experts);
        Ok(())
    }

    /// Copies parameters and optimizer moments to host memory (no digest), to roll back one
    /// update when a peer failed between two workers' updates.
    pub fn host_state(&self) -> Result<(BTreeMap<String, HostTensor>, BTreeMap<String, Moments>)> {
        Ok((self.model.to_host()?, self.optimizer.moments().clone()))
    }

    /// Restores a [`Trainer::host_state`] copy taken at `step`.
    pub fn restore_host_state(
        &mut self,
        params: BTreeMap<String, HostTensor>,
        moments: BTreeMap<String, Moments>,
        step: u64,
    ) -> Result<()> {
        for (name, value) in params {
            self.model.set_param(&name, value.data)?;
        }
        for (name, m) in moments {
            self.optimizer.set_moments(&name, m)?;
        }
        self.step = step;
        Ok(())
    }

    /// One full step computed locally: every micro-batch, the ordered reduction, the update.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let started = Instant::now();
        let results = (0..self.config.micro_batches())
            .map(|i| self.micro_batch_gradients(&self.micro_batch(i)))
            .collect::<Result<Vec<_>>>()?;
        let (grads, [loss, balance_loss, z_loss]) = self.reduce(results)?;
        let update = self.apply(&grads)?;
        let seconds = started.elapsed().as_secs_f64();
        Ok(StepReport {
            step: self.step,
            loss,
            balance_loss,
            z_loss,
            update,
            seconds,
            tokens_per_second: self.config.tokens_per_step() as f64 / seconds.max(1e-9),
        })
    }

    /// sha256 of every held parameter in name order.
    pub fn params_sha256(&self) -> Result<String> {
        self.model.params_sha256()
    }

    /// Copies the whole training state to host memory for a checkpoint. This is the only part
    /// of a save that training waits for.
    pub fn snapshot(&self) -> Result<TrainingSnapshot> {
        let params = self.model.to_host()?;
        let params_sha256 = crate::model::host_params_sha256(&params);
        let moments = self.optimizer.moments().clone();
        Ok(TrainingSnapshot {
            step: self.step,
            dims: self.config.dims,
            data_cursor: DataCursor {
                seed: self.config.seed,
                next_step: self.step,
                global_batch_size: self.config.global_batch_size,
                micro_batch_size: self.config.micro_batch_size,
            },
            params_sha256,
            params,
            moments,
        })
    }
}

/// Refuses a checkpoint whose data cursor belongs to another job: another seed or batch split
/// would change the math of every following step.
fn check_cursor(config: &TrainerConfig, cursor: &DataCursor, path: &Path) -> Result<()> {
    let incompatible =
        |reason: String| WorkerError::IncompatibleCheckpoint { path: path.to_path_buf(), reason };
    if cursor.seed != config.seed {
        return Err(incompatible(format!("seed {} (the job uses {})", cursor.seed, config.seed)));
    }
    if cursor.global_batch_size != config.global_batch_size
        || cursor.micro_batch_size != config.micro_batch_size
    {
        return Err(incompatible(format!(
            "batch {}/{} (the job uses {}/{}); resuming would change the math",
            cursor.global_batch_size,
            cursor.micro_batch_size,
            config.global_batch_size,
            config.micro_batch_size
        )));
    }
    Ok(())
}

/// A live trainer's memory as a [`RestoreTarget`]: parameters are overwritten through candle
/// (each variable's storage lock), moments through one lock per parameter.
struct LiveState<'a> {
    config: &'a TrainerConfig,
    model: &'a MoeTransformer,
    moments: BTreeMap<&'a str, Mutex<&'a mut Moments>>,
}

impl RestoreTarget for LiveState<'_> {
    fn held(&self) -> BTreeMap<String, usize> {
        self.model.params().iter().map(|(name, var)| (name.clone(), var.elem_count())).collect()
    }

    fn check(&self, manifest: &CheckpointManifest, path: &Path) -> Result<()> {
        check_cursor(self.config, &manifest.data_cursor, path)
    }

    fn overwrite(&self, name: &str, part: TensorPart, offset: usize, bytes: &[u8]) -> Result<()> {
        if part == TensorPart::Value {
            return self.model.overwrite_param(name, offset, bytes);
        }
        let slot = self
            .moments
            .get(name)
            .ok_or_else(|| WorkerError::InvalidJob(format!("no optimizer state for {name}")))?;
        let mut moments =
            slot.lock().map_err(|_| WorkerError::InvalidJob("optimizer state lock poisoned".into()))?;
        let dst = if part == TensorPart::AdamM { &mut moments.m } else { &mut moments.v };
        let len = dst.len() * 4;
        crate::ops::overwrite_bytes(dst, offset, bytes).ok_or_else(|| {
            WorkerError::InvalidJob(format!(
                "optimizer state of {name}: bytes {offset}..+{} of {len}",
                bytes.len()
            ))
        })
    }
}

/// Environment variable that sizes candle's own pool for large elementwise ops (candle 0.11).
pub const CANDLE_THREADS_ENV: &str = "CANDLE_NUM_THREADS";

/// glibc malloc settings of a training process: allocations up to 32 MiB come from the heap,
/// freed memory is kept, and the heap is backed by transparent huge pages (`hugetlb=1`: glibc
/// asks for them with `madvise`, which is what the usual THP mode `madvise` waits for). A step's
/// freed tensors are then reused by the next one instead of being unmapped and faulted in
/// again, and fresh memory (a checkpoint being loaded, a snapshot) faults in 2 MiB at a time.
/// Measured on `small`: half the page faults and ~2 % more tokens/s; checkpoint load 1.60–1.71
/// → 1.97–2.10 GB/s. The cost: a worker keeps its peak heap, which a long-lived training process
/// needs anyway.
pub const MALLOC_TUNABLES: &str = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967295:\
glibc.malloc.top_pad=268435456:glibc.malloc.hugetlb=1";

/// The environment a training process runs with: candle's elementwise pool pinned to the calling
/// thread, and [`MALLOC_TUNABLES`]. Launchers set it up front (then the worker does not
/// re-execute itself); a user's own `GLIBC_TUNABLES` is left alone.
pub fn worker_env() -> Vec<(&'static str, String)> {
    let mut env = vec![(CANDLE_THREADS_ENV, "1".to_string())];
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        env.push(("GLIBC_TUNABLES", MALLOC_TUNABLES.to_string()));
    }
    env
}

/// Makes sure the process runs with [`worker_env`]: if [`CANDLE_THREADS_ENV`] is unset,
/// re-executes the current program (same arguments, same pid) with that environment, and does
/// not return; returns `Ok(())` when it is already set, and the error if the exec failed.
///
/// Why: candle 0.11 runs elementwise ops of ≥ 64 Ki elements on a separate pool of spin-waiting
/// threads, sized once from the environment. Next to the rayon pool that runs `gemm` and the
/// fused ops it oversubscribes the CPU: on the 2-core bench machine 45 % of all cycles went to
/// spinning and `small` trained 2.3x slower. The pool can only be sized through the environment
/// before it starts (as can glibc's malloc, without `unsafe`), and Rust 2024 makes changing one's
/// own environment `unsafe`, so the process re-executes itself instead. Results do not depend on
/// it (elementwise ops are per element; the allocator does not change any value).
pub fn pin_candle_elementwise_pool() -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    if std::env::var_os(CANDLE_THREADS_ENV).is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    Err(std::process::Command::new(exe).args(std::env::args_os().skip(1)).envs(worker_env()).exec())
}

/// Runs `f` with the CPU kernels on exactly `threads` threads (a private rayon pool).
pub fn run_with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| WorkerError::ThreadPool(e.to_string()))?;
    Ok(pool.install(f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ParamOwner, host_params_sha256};

    /// The demo job, shrunk: 2 layers × 4 routed experts, 2 micro-batches per step.
    fn small_config() -> TrainerConfig {
        let job = ninelives_core::manifest::parse_job(include_str!("../../examples/tiny.yaml")).unwrap();
        let mut config = TrainerConfig::from_job(&job).unwrap();
        config.total_steps = 2;
        config.dims.layers = 2;
        config.dims.hidden_size = 32;
        config.dims.heads = 2;
        config.dims.routed_experts = 4;
        config.dims.expert_ffn_size = 16;
        config.dims.seq_len = 16;
        config.global_batch_size = 4;
        config.micro_batch_size = 2;
        config
    }

    #[test]
    fn pipeline_stages_are_refused_with_a_clear_message() {
        let mut job = ninelives_core::manifest::parse_job(include_str!("../../examples/tiny.yaml")).unwrap();
        job.spec.parallelism.pipeline_parallel_size = Some(2);
        let Err(WorkerError::InvalidJob(message)) = TrainerConfig::from_job(&job) else {
            panic!("a two-stage job was accepted");
        };
        assert!(
            message.contains("pipelineParallelSize is 2") && message.contains("single pipeline stage"),
            "{message}"
        );
        job.spec.parallelism.pipeline_parallel_size = Some(1);
        assert!(TrainerConfig::from_job(&job).is_ok());
    }

    #[test]
    fn retaining_experts_drops_the_others_params_and_moments_only() {
        let corpus = Arc::new(Corpus::from_bytes((0..10_000u32).map(|i| (i * 7 % 251) as u8).collect()));
        let mut trainer = run_with_threads(1, || {
            let mut t = Trainer::new(small_config(), corpus).unwrap();
            t.train_step().unwrap(); // non-zero moments
            t
        })
        .unwrap();
        let keep = [ExpertId::new(0, 1), ExpertId::new(1, 0), ExpertId::new(1, 3)];
        let (mut params, mut moments) = trainer.host_state().unwrap();
        params.retain(|name, _| ParamOwner::of(name).kept_with(&keep));
        moments.retain(|name, _| ParamOwner::of(name).kept_with(&keep));
        let dropped = trainer.model().params().len() - params.len();
        assert!(dropped > 0, "5 experts' parameters go");

        trainer.retain_experts(&keep).unwrap();
        assert_eq!(trainer.model().held_experts(), keep);
        assert_eq!(trainer.params_sha256().unwrap(), host_params_sha256(&params), "kept values unchanged");
        let (after_params, after_moments) = trainer.host_state().unwrap();
        assert_eq!(after_params.keys().collect::<Vec<_>>(), params.keys().collect::<Vec<_>>());
        assert_eq!(after_moments, moments, "kept moments unchanged, dropped ones gone");
        assert!(after_moments.keys().all(|n| ParamOwner::of(n).kept_with(&keep)));

        let err = trainer.retain_experts(&[ExpertId::new(0, 0)]).unwrap_err();
        assert!(err.to_string().contains("does not hold"), "{err}");
        assert_eq!(trainer.model().held_experts(), keep, "a refused retain changes nothing");
    }
}
