//! `ninelives worker train`: run a TrainingJob's training in this process (or, with `--rank`
//! and `--etcd`, one member of an expert-parallel job). `ninelives worker launch` (W members on
//! this machine under the job's control loop) is in [`crate::launch`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ninelives_core::member_output::{MemberLine, StepLine};
use ninelives_worker::checkpoint::{SaveOutcome, SaveReport};
use ninelives_worker::data::Corpus;
use ninelives_worker::dist::auth::{JobAuth, JobKey};
use ninelives_worker::dist::link::Security;
use ninelives_worker::dist::member::{DEFAULT_RECONNECT_ATTEMPTS, MemberEvent, MemberOptions, run_member};
use ninelives_worker::dist::rendezvous::{Etcd, EtcdCredentials, EtcdTlsFiles};
use ninelives_worker::metrics::WorkerMetrics;
use ninelives_worker::trainer::run_with_threads;
use ninelives_worker::{
    BackgroundSaver, CheckpointStore, ExpertSelection, Trainer, TrainerConfig, WorkerError,
};

/// `ninelives worker train` flags. The manifest's values are the defaults; flags override.
#[derive(Args)]
pub struct TrainArgs {
    /// TrainingJob manifest: a YAML file, or `env:NAME` to read it from environment variable NAME.
    manifest: String,
    /// Train until this step (also the length of the learning-rate schedule). Default: spec.training.steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Directory of committed checkpoints. Default: spec.checkpoint.path.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Commit a checkpoint every K steps. Default: spec.checkpoint.intervalSteps.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Committed checkpoints to keep. Default: spec.checkpoint.keepLast.
    #[arg(long)]
    keep_last: Option<u32>,
    /// Continue from the newest valid checkpoint in the checkpoint directory (if there is one).
    #[arg(long)]
    resume: bool,
    /// CPU threads for the tensor kernels. Default: all available.
    #[arg(long)]
    threads: Option<usize>,
    /// Serve /metrics, /live and /ready on this address (worker pods: set by the operator).
    #[arg(long, env = "NINELIVES_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Train on this directory of text instead of spec.data.datasets.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// This worker's rank in an expert-parallel job (needs `--etcd`).
    #[arg(long, requires = "etcd")]
    rank: Option<u32>,
    /// etcd client URLs of the expert-parallel job's rendezvous, comma-separated (needs `--rank`).
    #[arg(long, value_delimiter = ',', requires = "rank")]
    etcd: Vec<String>,
    /// Address to accept peer connections on (expert-parallel jobs).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Host (IP or name) peers reach this worker at, with the listener's actual port
    /// (expert-parallel jobs; e.g. `--listen 0.0.0.0:29500 --advertise $POD_IP`).
    /// Default: the listen address.
    #[arg(long, requires = "rank")]
    advertise: Option<String>,
    /// Longest a step waits for a live peer before it is abandoned (expert-parallel jobs).
    #[arg(long, default_value_t = 60)]
    step_timeout_seconds: u64,
    /// Attempts at re-establishing a broken link to a live peer within a generation (a reset
    /// connection) before the step is abandoned and the failure escalates to a recovery.
    #[arg(long, default_value_t = DEFAULT_RECONNECT_ATTEMPTS)]
    reconnect_attempts: u32,
    /// TTL of the member's registration lease (expert-parallel jobs). Default: the longer of the
    /// job's heartbeat TTL and the step timeout, so a pause the peers ride out is not a loss.
    #[arg(long, requires = "rank")]
    membership_ttl_seconds: Option<u64>,
    /// The job's secret (a file of at least 32 bytes; worker pods: the job's Secret, mounted):
    /// peers prove they hold it before any frame is accepted (expert-parallel jobs; required).
    #[arg(long, env = "NINELIVES_JOB_KEY_FILE", requires = "rank")]
    job_key_file: Option<PathBuf>,
    /// The job's secret itself, from the environment only (worker pods: the operator sets it
    /// from the job's `<job>-transport-key` Secret); `--job-key-file` wins when both are set.
    #[arg(skip = std::env::var("NINELIVES_JOB_KEY").ok().filter(|k| !k.is_empty()))]
    job_key_env: Option<String>,
    /// Prefix of the etcd keyspace (worker pods: the operator's `--etcd-prefix`).
    #[arg(long, env = "NINELIVES_ETCD_PREFIX", default_value = ninelives_core::keyspace::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// CA bundle (PEM) of etcd's serving certificate; enables TLS (use https:// endpoints).
    #[arg(long, env = "NINELIVES_ETCD_CA_FILE")]
    etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd client-certificate authentication.
    #[arg(long, env = "NINELIVES_ETCD_CERT_FILE", requires = "etcd_key_file")]
    etcd_cert_file: Option<PathBuf>,
    /// Key (PEM) of the etcd client certificate.
    #[arg(long, env = "NINELIVES_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    etcd_key_file: Option<PathBuf>,
    /// etcd user (etcd with authentication on: the job's worker user); its password is read
    /// from `NINELIVES_ETCD_PASSWORD` only, never from a flag (flags show in `ps`).
    #[arg(long, env = "NINELIVES_ETCD_USER", requires = "rank")]
    etcd_user: Option<String>,
    #[arg(skip = std::env::var("NINELIVES_ETCD_PASSWORD").ok())]
    etcd_password: Option<String>,
}

/// `ninelives worker train`.
pub fn train_command(args: TrainArgs) -> ExitCode {
    run(|| pin_candle_pool().and_then(|()| train(args)))
}

/// The identity a job's members bind into their handshakes: the manifest's UID (a cluster's
/// TrainingJob), else `namespace/name`.
fn job_identity(job: &ninelives_core::TrainingJob) -> String {
    match &job.metadata.uid {
        Some(uid) => uid.clone(),
        None => format!(
            "{}/{}",
            job.metadata.namespace.as_deref().unwrap_or("default"),
            job.metadata.name.as_deref().unwrap_or("job")
        ),
    }
}

/// A fresh job key in a private temporary directory (removed when dropped): what
/// `ninelives worker launch` gives its members with `--job-key-file`.
pub(crate) struct LaunchKey {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl LaunchKey {
    /// Creates the key file.
    pub(crate) fn create() -> Result<Self, Failure> {
        let dir = tempfile::Builder::new()
            .prefix("ninelives-job-key")
            .tempdir()
            .map_err(|e| Failure::BadInput(format!("cannot create the job key directory: {e}")))?;
        let path = dir.path().join("job-key");
        JobKey::create_file(&path).map_err(|e| Failure::BadInput(e.to_string()))?;
        Ok(Self { _dir: dir, path })
    }

    /// The key file.
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// Runs a worker subcommand and maps its outcome to an exit code.
pub fn run(command: impl FnOnce() -> Result<(), Failure>) -> ExitCode {
    ninelives_telemetry::init_tracing("info");
    match command() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::BadInput(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Worker(err)) => {
            eprintln!("error: {err}");
            ExitCode::from(match err {
                WorkerError::InvalidJob(_)
                | WorkerError::Dataset { .. }
                | WorkerError::DatasetTooSmall { .. } => 2,
                WorkerError::CorruptCheckpoint { .. }
                | WorkerError::NoUsableCheckpoint { .. }
                | WorkerError::IncompatibleCheckpoint { .. }
                | WorkerError::CheckpointIo { .. }
                | WorkerError::CheckpointWriter(_) => 3,
                _ => 1,
            })
        }
    }
}

/// Why a worker command failed: bad input (exit 2) or the worker's own error.
pub(crate) enum Failure {
    BadInput(String),
    Worker(WorkerError),
}

impl From<WorkerError> for Failure {
    fn from(e: WorkerError) -> Self {
        Failure::Worker(e)
    }
}

fn read_manifest(source: &str) -> Result<String, Failure> {
    match source.strip_prefix("env:") {
        Some(var) => std::env::var(var)
            .map_err(|e| Failure::BadInput(format!("manifest environment variable {var}: {e}"))),
        None => std::fs::read_to_string(source)
            .map_err(|e| Failure::BadInput(format!("manifest {source}: cannot read: {e}"))),
    }
}

/// Re-executes with candle's elementwise pool pinned to one thread (2.3x faster training on a
/// 2-core machine; see `ninelives_worker::trainer::pin_candle_elementwise_pool`).
/// If that fails, training goes on (slower) after a warning.
fn pin_candle_pool() -> Result<(), Failure> {
    if let Err(e) = ninelives_worker::trainer::pin_candle_elementwise_pool() {
        tracing::warn!("cannot re-execute with candle's elementwise pool pinned ({e}); training continues");
    }
    Ok(())
}

pub(crate) fn parse_job(source: &str) -> Result<ninelives_core::TrainingJob, Failure> {
    let text = read_manifest(source)?;
    ninelives_core::manifest::parse_job(&text).map_err(|violations| {
        let lines: Vec<String> = violations.iter().map(|v| format!("  {v}")).collect();
        Failure::BadInput(format!("manifest {source} is invalid:\n{}", lines.join("\n")))
    })
}

/// The etcd keys of a job: `jobs/<namespace>/<name>/` under `prefix`.
fn job_keys(job: &ninelives_core::TrainingJob, prefix: &str) -> ninelives_core::keyspace::JobKeys {
    let namespace = job.metadata.namespace.as_deref().unwrap_or("default");
    let name = job.metadata.name.as_deref().unwrap_or("job");
    ninelives_core::keyspace::Keyspace::new(prefix).job(namespace, name)
}

fn train(args: TrainArgs) -> Result<(), Failure> {
    let job = parse_job(&args.manifest)?;
    let mut config = TrainerConfig::from_job(&job)?;
    if let Some(steps) = args.steps {
        config.total_steps = steps;
    }
    config.check()?;
    let spec = &job.spec.checkpoint;
    let checkpoint_dir =
        args.checkpoint_dir.or_else(|| spec.path.as_ref().map(PathBuf::from)).ok_or_else(|| {
            Failure::BadInput("no --checkpoint-dir and the manifest has no checkpoint.path".into())
        })?;
    let every = args.checkpoint_every.unwrap_or(spec.interval_steps).max(1);
    let keep_last = args.keep_last.unwrap_or(spec.keep_last).max(1) as usize;
    let datasets: Vec<PathBuf> = match args.dataset {
        Some(d) => vec![d],
        None => job.spec.data.datasets.iter().map(PathBuf::from).collect(),
    };
    let corpus = Arc::new(Corpus::load(&datasets)?);
    tracing::info!(files = corpus.files(), bytes = corpus.len(), "dataset loaded");
    let metrics = WorkerMetrics::new()?;
    let _admin = match args.metrics_addr {
        Some(addr) => Some(start_admin(addr, metrics.clone())?),
        None => None,
    };
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let store = CheckpointStore::open(&checkpoint_dir, keep_last)?;
    if let Some(rank) = args.rank {
        let tls = EtcdTlsFiles {
            ca: args.etcd_ca_file.clone(),
            cert: args.etcd_cert_file.clone(),
            key: args.etcd_key_file.clone(),
        };
        let credentials = match (&args.etcd_user, &args.etcd_password) {
            (Some(user), Some(password)) => {
                Some(EtcdCredentials { user: user.clone(), password: password.clone() })
            }
            (None, _) => None,
            (Some(user), None) => {
                return Err(Failure::BadInput(format!(
                    "--etcd-user {user} needs its password in NINELIVES_ETCD_PASSWORD"
                )));
            }
        };
        let keys = job_keys(&job, &args.etcd_prefix);
        let etcd = Arc::new(Etcd::connect_as(&args.etcd, keys, &tls, credentials.as_ref())?);
        let options = MemberOptions {
            rank,
            listen: args.listen,
            advertise: args.advertise,
            // The membership lease lasts as long as the step timeout: peers already wait that
            // long for a slow member, so a pause shorter than it (GC, SIGSTOP, a stalled host)
            // must not read as a lost worker and cost a restore. An exit is seen sooner: the
            // driver deletes the key of a member that exits, and peers' sockets reset at once.
            ttl_seconds: i64::try_from(args.membership_ttl_seconds.unwrap_or_else(|| {
                u64::from(job.spec.failure_policy.heartbeat_ttl_seconds).max(args.step_timeout_seconds)
            }))
            .unwrap_or(i64::MAX)
            .max(1),
            step_timeout: Duration::from_secs(args.step_timeout_seconds.max(1)),
            join_timeout: Duration::from_secs(args.step_timeout_seconds.max(1) * 2),
            checkpoint_every: every,
            reconnect_attempts: args.reconnect_attempts,
            security: {
                let key = match (args.job_key_file.as_deref(), args.job_key_env.as_deref()) {
                    (Some(path), _) => JobKey::from_file(path),
                    (None, Some(text)) => JobKey::from_bytes(text.as_bytes()),
                    (None, None) => {
                        return Err(Failure::BadInput(
                            "an expert-parallel member needs --job-key-file (or NINELIVES_JOB_KEY_FILE, \
                             or the key in NINELIVES_JOB_KEY)"
                                .into(),
                        ));
                    }
                };
                let key = key.map_err(|e| Failure::BadInput(e.to_string()))?;
                Security::Authenticated(JobAuth::new(job_identity(&job), key))
            },
        };
        let digest = run_with_threads(threads, || {
            run_member(config, corpus, store, etcd, &options, |event| member_event(&event, &metrics))
        })??;
        if let Some(digest) = digest {
            println!("{}", MemberLine::Digest(digest));
        }
        return Ok(());
    }
    run_with_threads(threads, || train_loop(config, corpus, store, every, args.resume, &metrics))??;
    Ok(())
}

/// One stdout line per member event (the launcher relays them), in the member line protocol.
fn member_event(event: &MemberEvent<'_>, metrics: &WorkerMetrics) {
    let line = match event {
        MemberEvent::Joined { generation, tier, step, members, experts } => MemberLine::Joined {
            generation: *generation,
            tier: *tier,
            step: *step,
            members: members.to_vec(),
            experts: *experts,
        },
        MemberEvent::Step(r) => {
            metrics.step.set(i64::try_from(r.step).unwrap_or(i64::MAX));
            metrics.loss.set(r.loss);
            metrics.tokens_per_second.set(r.tokens_per_second);
            metrics.step_seconds.observe(r.seconds);
            MemberLine::Step(StepLine {
                step: r.step,
                loss: r.loss,
                tokens_per_s: r.tokens_per_second,
                lr: r.lr,
                grad_norm: r.grad_norm,
                balance: r.balance_loss,
                z: r.z_loss,
            })
        }
        MemberEvent::Traffic { expert_bytes, collective_bytes, expert_payload_bytes } => {
            MemberLine::Traffic {
                expert_bytes: *expert_bytes,
                collective_bytes: *collective_bytes,
                payload_bytes: *expert_payload_bytes,
            }
        }
        MemberEvent::Aborted { generation, reason } => {
            MemberLine::Aborted { generation: *generation, reason: (*reason).to_string() }
        }
        MemberEvent::Committed(done) => {
            committed(done, metrics);
            MemberLine::Committed { step: done.step }
        }
        MemberEvent::SaveFailed { step, error } => save_failed(*step, error, metrics),
        MemberEvent::Reconnects { restored, failed, .. } => {
            // Logged by the member (tracing) as they happen; no line of the launcher's protocol.
            metrics.link_reconnects_total.with_label_values(&["restored"]).inc_by(*restored);
            metrics.link_reconnects_total.with_label_values(&["failed"]).inc_by(*failed);
            return;
        }
        // Logged by the member (tracing); no line of the launcher's protocol.
        MemberEvent::PeerSnapshot { .. } => return,
    };
    println!("{line}");
}

fn train_loop(
    config: TrainerConfig,
    corpus: Arc<Corpus>,
    store: CheckpointStore,
    every: u64,
    resume: bool,
    metrics: &WorkerMetrics,
) -> Result<(), Failure> {
    let total = config.total_steps;
    let mut trainer = if resume {
        match store.load_latest(&config.dims, &ExpertSelection::All)? {
            Some(loaded) => {
                tracing::info!(
                    step = loaded.manifest.step,
                    path = %loaded.path.display(),
                    bytes = loaded.report.bytes,
                    seconds = loaded.report.seconds,
                    "resumed from checkpoint"
                );
                metrics.checkpoint_load_seconds.observe(loaded.report.seconds);
                metrics.checkpoint_bytes_total.with_label_values(&["load"]).inc_by(loaded.report.bytes);
                Trainer::from_checkpoint(config, corpus, loaded)?
            }
            None => {
                tracing::info!(dir = %store.dir().display(), "no checkpoint to resume from; starting at step 0");
                Trainer::new(config, corpus)?
            }
        }
    } else {
        Trainer::new(config, corpus)?
    };
    let mut saver = BackgroundSaver::new(store);
    let mut last_saved = trainer.step();
    while trainer.step() < total {
        let report = trainer.train_step()?;
        let line = StepLine {
            step: report.step,
            loss: report.loss,
            tokens_per_s: report.tokens_per_second,
            lr: report.update.lr,
            grad_norm: report.update.grad_norm,
            balance: report.balance_loss,
            z: report.z_loss,
        };
        println!("{}", MemberLine::Step(line));
        metrics.step.set(i64::try_from(report.step).unwrap_or(i64::MAX));
        metrics.loss.set(report.loss);
        metrics.tokens_per_second.set(report.tokens_per_second);
        metrics.step_seconds.observe(report.seconds);
        if report.step % every == 0 {
            let snapshot = trainer.snapshot()?;
            settle(saver.submit(snapshot)?, metrics);
            last_saved = report.step;
        } else {
            settle(saver.poll(), metrics);
        }
    }
    // Always end on a committed checkpoint of the last step: a failed save of it is retried.
    let mut attempts = 0;
    let mut save_last = last_saved != trainer.step();
    loop {
        if save_last {
            settle(saver.submit(trainer.snapshot()?)?, metrics);
        }
        match saver.wait() {
            Some(SaveOutcome::Failed { step, error }) if step == trainer.step() => {
                println!("{}", save_failed(step, &error, metrics));
                attempts += 1;
                if attempts >= FINAL_SAVE_ATTEMPTS {
                    return Err(Failure::Worker(error));
                }
                std::thread::sleep(Duration::from_secs(1));
                save_last = true;
            }
            outcome => {
                settle(outcome, metrics);
                break;
            }
        }
    }
    println!("{}", MemberLine::Digest(trainer.params_sha256()?));
    Ok(())
}

/// Attempts at the checkpoint a job ends on (space may come back on a full disk).
const FINAL_SAVE_ATTEMPTS: u32 = 5;

/// Reports how a background save ended; a failed one is counted and training goes on.
fn settle(outcome: Option<SaveOutcome>, metrics: &WorkerMetrics) {
    match outcome {
        None => {}
        Some(SaveOutcome::Committed(done)) => committed(&done, metrics),
        Some(SaveOutcome::Failed { step, error }) => println!("{}", save_failed(step, &error, metrics)),
    }
}

/// Counts and logs a failed save (cleaned up by the store; training continues); returns its line.
fn save_failed(step: u64, error: &WorkerError, metrics: &WorkerMetrics) -> MemberLine {
    metrics.checkpoint_save_failures_total.with_label_values(&[error.label()]).inc();
    tracing::error!(step, "checkpoint save failed; training continues: {error}");
    MemberLine::SaveFailed { step, reason: error.to_string() }
}

fn committed(report: &SaveReport, metrics: &WorkerMetrics) {
    metrics.checkpoint_save_seconds.observe(report.seconds);
    metrics.checkpoint_bytes_total.with_label_values(&["save"]).inc_by(report.bytes);
    tracing::info!(
        step = report.step,
        path = %report.path.display(),
        bytes = report.bytes,
        seconds = report.seconds,
        removed = report.removed.len(),
        "checkpoint committed"
    );
}

/// Serves the metrics on a background thread with its own small runtime; dropped with the process.
fn start_admin(addr: SocketAddr, metrics: WorkerMetrics) -> Result<std::thread::JoinHandle<()>, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::BadInput(format!("metrics runtime: {e}")))?;
    let ready = ninelives_telemetry::Readiness::default();
    ready.set(true);
    let server = runtime
        .block_on(ninelives_telemetry::AdminServer::bind(addr, metrics.registry.clone(), ready))
        .map_err(|e| Failure::BadInput(format!("--metrics-addr {addr}: {e}")))?;
    tracing::info!(addr = %server.local_addr().map_or(addr, |a| a), "serving /metrics");
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            if let Err(e) = runtime.block_on(server.serve(std::future::pending())) {
                tracing::warn!("metrics endpoint stopped: {e}");
            }
        })
        .map_err(|e| Failure::BadInput(format!("metrics thread: {e}")))
}
