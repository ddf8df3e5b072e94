//! `ninelives worker launch`: W expert-parallel members on this machine, driven by the job's
//! control loop — the same [`ControlLoop`] (and so the same brain) as the operator and the demo.
//!
//! Each worker process stands for one node. The launcher holds every node's presence key under
//! its own lease and deletes a node's key (and its member key) the moment its process dies, as
//! an agent's lease would expire: the brain sees a lost node, finds no spare, drops it, and
//! publishes the next generation — in memory when every expert kept a replica, from the newest
//! committed checkpoint otherwise. The launcher starts the members the brain orders started.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use clap::Args;
use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use ninelives_control::{
    ControlError, ControlLoop, EffectError, Effects, EtcdStore, JobIdentity, Progress, unix_now,
};
use ninelives_core::generation::{DistPlan, worker_shape};
use ninelives_core::keyspace::{JobKeys, Keyspace};
use ninelives_core::member_output::MemberLine;
use ninelives_core::recovery::{
    BrainConfig, BrainPhase, CheckpointRecord, CompletedRecovery, OutagePolicy, RecoveryState,
};
use ninelives_worker::{CheckpointStore, TrainerConfig, WorkerError};

use crate::worker::{Failure, parse_job};

/// `ninelives worker launch` flags.
#[derive(Args)]
pub struct LaunchArgs {
    /// TrainingJob manifest (a YAML file).
    manifest: String,
    /// Worker processes (each stands for one node).
    #[arg(long)]
    workers: u32,
    /// etcd client URLs, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// Directory of committed checkpoints (shared by the workers).
    #[arg(long)]
    checkpoint_dir: PathBuf,
    /// Train until this step. Default: spec.training.steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Commit a checkpoint every K steps. Default: spec.checkpoint.intervalSteps.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Continue from the newest valid checkpoint in the checkpoint directory.
    #[arg(long)]
    resume: bool,
    /// CPU threads per worker for the tensor kernels.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Train on this directory of text instead of spec.data.datasets.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Longest a worker waits inside a step for a live peer before abandoning the step.
    #[arg(long, default_value_t = 60)]
    step_timeout_seconds: u64,
}

/// How often a round runs.
const POLL: Duration = Duration::from_millis(50);

/// The namespace of launched jobs (the manifest's, when it names one).
const NAMESPACE: &str = "default";

/// Runs `ninelives worker launch`.
pub fn launch(args: LaunchArgs) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::BadInput(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(Pending::check(args)?.connect())
}

fn etcd_failure(what: &str) -> impl Fn(etcd_client::Error) -> Failure + '_ {
    move |e| Failure::Worker(WorkerError::Rendezvous(format!("etcd {what}: {e}")))
}

/// The worker processes: started on the brain's order, watched until they exit.
struct Workers {
    /// `ninelives worker train ...` for a rank, without the rank.
    template: Vec<std::ffi::OsString>,
    running: BTreeMap<u32, Child>,
    finished: BTreeSet<u32>,
    failed: BTreeSet<u32>,
    tx: Sender<(u32, String)>,
    lines: Receiver<(u32, String)>,
    digest: Option<String>,
}

impl Workers {
    fn spawn(&mut self, rank: u32) -> Result<(), EffectError> {
        if self.running.contains_key(&rank) || self.finished.contains(&rank) || self.failed.contains(&rank) {
            return Ok(());
        }
        let exe = std::env::current_exe().map_err(|e| EffectError::new("start-member", e))?;
        let mut child = Command::new(exe)
            .args(&self.template)
            .args(["--rank", &rank.to_string()])
            // Set up front, so a worker need not re-execute itself for it.
            .envs(ninelives_worker::trainer::worker_env())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| EffectError::new("start-member", e))?;
        println!("worker rank={rank} pid={}", child.id());
        if let Some(out) = child.stdout.take() {
            let tx = self.tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send((rank, line)).is_err() {
                        return;
                    }
                }
            });
        }
        self.running.insert(rank, child);
        Ok(())
    }

    /// Relays the members' lines, keeping the final digest.
    fn drain(&mut self) {
        while let Ok((rank, line)) = self.lines.try_recv() {
            println!("[rank {rank}] {line}");
            if let Some(MemberLine::Digest(d)) = MemberLine::parse(&line) {
                self.digest = Some(d);
            }
        }
    }

    /// Ranks whose process exited with a failure since the last call.
    fn reap(&mut self) -> Result<Vec<u32>, Failure> {
        let mut lost = Vec::new();
        for (&rank, child) in &mut self.running {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => {
                    self.finished.insert(rank);
                }
                Ok(Some(status)) => {
                    println!("worker rank={rank} exited: {status}");
                    self.failed.insert(rank);
                    lost.push(rank);
                }
                Ok(None) => {}
                Err(e) => return Err(Failure::BadInput(format!("worker {rank}: {e}"))),
            }
        }
        self.running.retain(|r, _| !self.finished.contains(r) && !self.failed.contains(r));
        Ok(lost)
    }
}

impl Drop for Workers {
    /// Kills (SIGKILL) and reaps every child still running: no orphans.
    fn drop(&mut self) {
        for child in self.running.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The loop's effects: start members, print generations and recoveries.
struct LaunchEffects {
    table: RecoveryState,
    workers: Workers,
    failure: Option<String>,
}

impl Effects for LaunchEffects {
    async fn node_table(&mut self) -> Result<Option<RecoveryState>, EffectError> {
        Ok(Some(self.table.clone()))
    }

    async fn published(&mut self, plan: &DistPlan) -> Result<(), EffectError> {
        println!(
            "generation={} tier={} members={:?} restore={:?}",
            plan.generation(),
            plan.tier,
            plan.members,
            plan.restore
        );
        Ok(())
    }

    async fn start_member(&mut self, rank: u32, _: &str, _: Option<u64>) -> Result<(), EffectError> {
        self.workers.spawn(rank)
    }

    async fn drop_node(&mut self, index: u32, node: &str) -> Result<(), EffectError> {
        println!("node {node} (rank {index}) dropped; continuing with the others");
        Ok(())
    }

    async fn record_recovery(&mut self, r: &CompletedRecovery) -> Result<(), EffectError> {
        println!(
            "recovered {} by {} (generation {}, plan {}, {} steps lost, source {})",
            r.trigger,
            r.tier.as_str(),
            r.generation,
            r.plan_tier,
            r.steps_lost,
            r.source
        );
        Ok(())
    }

    async fn phase_changed(&mut self, _: &RecoveryState, state: &RecoveryState) -> Result<(), EffectError> {
        if state.phase == BrainPhase::Failed {
            let reason = state.failure.as_ref().map_or_else(|| "unknown".to_string(), ToString::to_string);
            self.failure = Some(reason);
        }
        Ok(())
    }
}

/// A launch in progress.
struct Launch {
    client: Client,
    nodes: Keyspace,
    job_keys: JobKeys,
    node_names: Vec<String>,
    lease: i64,
    keeper: LeaseKeeper,
    responses: LeaseKeepAliveStream,
    ttl: i64,
    control: ControlLoop<EtcdStore>,
    fx: LaunchEffects,
    /// Members not all registered by then: the launch fails.
    register_within: Duration,
}

/// A checked launch, not yet connected.
struct Pending {
    args: LaunchArgs,
    job: ninelives_core::TrainingJob,
    template: Vec<std::ffi::OsString>,
    total_steps: u64,
    /// The members' job key (issue 23): lives, and is removed, with the launch.
    job_key: crate::worker::LaunchKey,
}

impl Pending {
    /// Parses and checks the job; builds the worker command line.
    fn check(args: LaunchArgs) -> Result<Self, Failure> {
        let job = parse_job(&args.manifest)?;
        let mut config = TrainerConfig::from_job(&job)?;
        if let Some(steps) = args.steps {
            config.total_steps = steps;
        }
        config.check()?;
        if args.workers == 0 {
            return Err(Failure::BadInput("--workers must be at least 1".into()));
        }
        let every = args.checkpoint_every.unwrap_or(job.spec.checkpoint.interval_steps).max(1);
        let mut template: Vec<std::ffi::OsString> =
            vec!["worker".into(), "train".into(), args.manifest.clone().into()];
        template.extend(["--etcd".into(), args.etcd.join(",").into(), "--checkpoint-dir".into()]);
        template.push(args.checkpoint_dir.clone().into());
        for (flag, value) in [
            ("--steps", config.total_steps.to_string()),
            ("--checkpoint-every", every.to_string()),
            ("--threads", args.threads.to_string()),
            ("--step-timeout-seconds", args.step_timeout_seconds.to_string()),
        ] {
            template.extend([flag.into(), value.into()]);
        }
        if let Some(d) = &args.dataset {
            template.extend(["--dataset".into(), d.clone().into()]);
        }
        let job_key = crate::worker::LaunchKey::create()?;
        template.extend(["--job-key-file".into(), job_key.path().into()]);
        Ok(Pending { args, job, template, total_steps: config.total_steps, job_key })
    }
}

impl Launch {
    /// Rounds until every worker exited or the job failed.
    async fn run(mut self) -> Result<(), Failure> {
        let started = Instant::now();
        let mut phase = BrainPhase::Starting;
        let mut last_keepalive = Instant::now();
        loop {
            self.fx.workers.drain();
            for rank in self.fx.workers.reap()? {
                self.lose(rank).await?;
            }
            if last_keepalive.elapsed() >= Duration::from_secs((self.ttl / 3).max(1).unsigned_abs()) {
                self.keepalive().await;
                last_keepalive = Instant::now();
            }
            phase = self.step(phase).await;
            if let Some(reason) = &self.fx.failure {
                return Err(Failure::Worker(WorkerError::Rendezvous(format!("the job failed: {reason}"))));
            }
            if phase == BrainPhase::Starting && started.elapsed() > self.register_within {
                return Err(Failure::Worker(WorkerError::Rendezvous(format!(
                    "not every worker registered within {:?}",
                    self.register_within
                ))));
            }
            let w = &self.fx.workers;
            if w.running.is_empty() && !(w.finished.is_empty() && w.failed.is_empty()) {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        // Lines written just before the last exit.
        self.fx.workers.drain();
        self.release().await;
        match self.fx.workers.digest.take() {
            Some(d) if !self.fx.workers.finished.is_empty() => {
                println!("params_sha256={d}");
                Ok(())
            }
            _ => Err(Failure::Worker(WorkerError::Rendezvous("the job ended without a final digest".into()))),
        }
    }

    /// One control-loop round; returns the brain's phase. A failed round (etcd unreachable,
    /// a malformed key) is logged and retried next round.
    async fn step(&mut self, phase: BrainPhase) -> BrainPhase {
        match self.control.step(&mut self.fx, unix_now()).await {
            Ok(Progress::Ran(round)) => round.state.phase,
            Ok(Progress::Finished(state)) => state.phase,
            Ok(Progress::NotStarted | Progress::Fenced | Progress::Frozen(_)) => phase,
            // Another launcher claimed the job: it drives the workers now; this one stops.
            Err(e @ ControlError::Fenced { .. }) => {
                self.fx.failure = Some(e.to_string());
                phase
            }
            Err(e) => {
                tracing::warn!(error = %e, "control round failed; retrying");
                phase
            }
        }
    }

    /// A worker process died: its node is gone (no agent speaks for it but us).
    async fn lose(&mut self, rank: u32) -> Result<(), Failure> {
        let Some(node) = self.node_names.get(rank as usize) else { return Ok(()) };
        let alive = self.nodes.node_alive(node);
        self.client.delete(alive, None).await.map_err(etcd_failure("delete node"))?;
        self.client.delete(self.job_keys.member(rank), None).await.map_err(etcd_failure("delete member"))?;
        Ok(())
    }

    /// Renews the nodes' lease. A failure is logged: etcd may be back before the lease expires.
    async fn keepalive(&mut self) {
        let renewed = match self.keeper.keep_alive().await {
            Ok(()) => self.responses.message().await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = renewed {
            tracing::warn!(error = %e, "node lease keepalive failed");
        }
    }

    /// Revokes the nodes' lease: their presence keys go with it.
    async fn release(&mut self) {
        if let Err(e) = self.client.lease_revoke(self.lease).await {
            tracing::warn!(error = %e, "cannot revoke the nodes' lease; it expires in {} s", self.ttl);
        }
    }
}

impl Pending {
    /// Connects, clears what an earlier run left, registers the nodes, builds the loop and runs.
    async fn connect(self) -> Result<(), Failure> {
        let Pending { args, job, template, total_steps, job_key: _job_key } = self;
        let namespace = job.metadata.namespace.clone().unwrap_or_else(|| NAMESPACE.into());
        let name = job.metadata.name.clone().unwrap_or_else(|| "job".into());
        let keys = Keyspace::default();
        let job_keys = keys.job(&namespace, &name);
        let mut client = Client::connect(&args.etcd, None).await.map_err(etcd_failure("connect"))?;
        let node_names: Vec<String> = (0..args.workers).map(|r| format!("{name}-rank-{r}")).collect();
        let ttl = i64::from(job.spec.failure_policy.heartbeat_ttl_seconds.max(1));
        let lease = client.lease_grant(ttl, None).await.map_err(etcd_failure("lease grant"))?.id();
        let (keeper, responses) =
            client.lease_keep_alive(lease).await.map_err(etcd_failure("lease keepalive"))?;
        // An earlier run's keys would read as this run's generations and checkpoints.
        client
            .delete(job_keys.root(), Some(etcd_client::DeleteOptions::new().with_prefix()))
            .await
            .map_err(etcd_failure("reset"))?;
        if args.resume {
            resume_record(&mut client, &job_keys, &args, &job).await?;
        }
        for node in &node_names {
            let put = PutOptions::new().with_lease(lease);
            client
                .put(keys.node_alive(node), "{}", Some(put))
                .await
                .map_err(etcd_failure("register node"))?;
        }
        let control = control_loop(&job, &args, &keys, &namespace, &name, client.clone(), total_steps)?;
        let (tx, lines) = channel();
        let workers = Workers {
            template,
            running: BTreeMap::new(),
            finished: BTreeSet::new(),
            failed: BTreeSet::new(),
            tx,
            lines,
            digest: None,
        };
        let fx = LaunchEffects {
            table: RecoveryState::new(node_names.clone(), Vec::new()),
            workers,
            failure: None,
        };
        let launch = Launch {
            client,
            nodes: keys,
            job_keys,
            node_names,
            lease,
            keeper,
            responses,
            ttl,
            control,
            fx,
            register_within: Duration::from_secs(args.step_timeout_seconds.max(10)),
        };
        launch.run().await
    }
}

/// The job's loop: the brain of its spec on W one-node members, expert-parallel (a rollback
/// comes from the members' peer snapshots with `checkpoint.peerCopies`, else from disk), with
/// every rung allowed (no spares: a lost worker is
/// dropped, never waited for).
fn control_loop(
    job: &ninelives_core::TrainingJob,
    args: &LaunchArgs,
    keys: &Keyspace,
    namespace: &str,
    name: &str,
    client: Client,
    total_steps: u64,
) -> Result<ControlLoop<EtcdStore>, Failure> {
    let mut brain = BrainConfig::from_spec(&job.spec)
        .map_err(|e| Failure::BadInput(format!("manifest {}: {e}", args.manifest)))?
        .for_expert_parallel();
    brain.shape = worker_shape(&brain.shape, args.workers);
    brain.total_steps = total_steps;
    let identity = JobIdentity {
        keys: keys.clone(),
        namespace: namespace.into(),
        name: name.into(),
        chips_per_node: brain.shape.chips_per_node,
        min_healthy_fraction: job.spec.failure_policy.min_healthy_fraction,
    };
    let store = EtcdStore::new(client, keys.clone(), namespace, name);
    let ttl = f64::from(job.spec.failure_policy.heartbeat_ttl_seconds.max(1));
    Ok(ControlLoop::new(brain, identity, store, None)
        .with_outage_policy(OutagePolicy::for_ttl(ttl))
        .with_writer(launch_writer()))
}

/// This launcher as the job's writer (as the demo driver): its epoch is its start time, so a
/// later launcher of the same job supersedes it, and a paused or stale launcher can never
/// overwrite a generation its successor published.
fn launch_writer() -> ninelives_core::writer::WriterRecord {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let epoch = ninelives_core::writer::epoch_at(since);
    ninelives_core::writer::WriterRecord::new(format!("launch-{}", std::process::id()), epoch)
}

/// With `--resume`: the newest checkpoint that verifies becomes the job's committed checkpoint
/// record, so the brain's first generation restores it.
async fn resume_record(
    client: &mut Client,
    keys: &JobKeys,
    args: &LaunchArgs,
    job: &ninelives_core::TrainingJob,
) -> Result<(), Failure> {
    let store = CheckpointStore::open(&args.checkpoint_dir, job.spec.checkpoint.keep_last.max(1) as usize)?;
    let Some((step, _)) = store.newest_verified()? else { return Ok(()) };
    let record = CheckpointRecord {
        step,
        location: Some(store.step_dir(step).display().to_string()),
        generation: None,
    };
    let value = serde_json::to_string(&record).map_err(|e| Failure::BadInput(e.to_string()))?;
    client.put(keys.checkpoint(step), value, None).await.map_err(etcd_failure("resume record"))?;
    Ok(())
}
