//! # ninelives-operator
//!
//! The Kubernetes operator for `TrainingJob` (`ninelives operator`). One leader-elected replica
//! reconciles every job into one worker Pod per node (plus spares) and a headless Service,
//! reports a summarised status with Kubernetes-style conditions and Events, honours `suspend`,
//! and cleans up pods, service and the job's etcd keys on deletion.
//!
//! Layout, pure first:
//! - [`resources`]: desired Pods and Service built from a job (no client);
//! - [`lifecycle`]: the reconcile decision — create, delete, status, events (no client);
//! - [`backoff`], [`metrics`]: per-object backoff and Prometheus metrics;
//! - [`controller`]: the kube-runtime controller doing the I/O around [`lifecycle::plan`];
//! - [`leader`]: Lease-based leader election; [`etcd`]: cleanup of a job's etcd keys.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use ninelives_telemetry::{AdminServer, Readiness};
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

pub mod admission;
pub mod backoff;
pub mod controller;
pub mod driver;
pub mod error;
pub mod etcd;
pub mod etcd_auth;
#[cfg(test)]
mod fixtures;
pub use resources::gang;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod resources;

pub use error::{Error, Result};

/// Command-line flags of `ninelives operator`.
#[derive(clap::Args, Clone, Debug)]
pub struct OperatorArgs {
    /// etcd client URLs, comma-separated (the coordination store; job keys are deleted there).
    #[arg(long = "etcd", env = "NINELIVES_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// CA bundle of etcd's serving certificate (enables TLS).
    #[arg(long, env = "NINELIVES_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate for etcd mutual TLS.
    #[arg(long, env = "NINELIVES_ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<PathBuf>,
    /// Key of the etcd client certificate.
    #[arg(long, env = "NINELIVES_ETCD_KEY_FILE")]
    pub etcd_key_file: Option<PathBuf>,
    /// Prefix of the etcd keyspace.
    #[arg(long, default_value = ninelives_core::keyspace::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// Admin endpoint (/metrics, /live, /ready).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub metrics_addr: SocketAddr,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub leader_election_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "ninelives-operator")]
    pub leader_election_lease: String,
    /// Seconds a leader's Lease stays valid without renewal; a standby takes over after it.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// This replica's identity in the Lease and in Events (default: pod name, else host-pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Image of worker pods whose job names none.
    #[arg(long, default_value = "ghcr.io/ninelives/ninelives:latest")]
    pub worker_image: String,
    /// Worker container command; repeat for several words (default: `ninelives`).
    #[arg(long = "worker-command")]
    pub worker_command: Vec<String>,
    /// Worker container argument; repeat for each. `{steps}` and `{checkpointDir}` are replaced
    /// per job (default: `worker train env:NINELIVES_JOB --steps {steps} --checkpoint-dir {checkpointDir}`).
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    pub worker_args: Vec<String>,
    /// Who handles failed workers: `brain` (the recovery brain drives expert-parallel members
    /// through etcd) or `restart-pods` (a failed pod is replaced and counted; for workers that
    /// do not speak the rendezvous protocol).
    #[arg(long, default_value = "brain", value_parser = ["brain", "restart-pods"])]
    pub recovery: String,
    /// Secret in each job's namespace with the etcd CA (`ca.crt`) and a client certificate
    /// (`tls.crt`, `tls.key`) for the worker pods; mounted read-only. Unset: plain-text etcd.
    #[arg(long)]
    pub worker_etcd_tls_secret: Option<String>,
    /// etcd's authentication is on: give every job an etcd user limited to its member keys
    /// (password in the Secret `<job>-etcd-credentials`, handed to its pods) and every Node an
    /// agent user limited to `nodes/<node>/` (authenticated by its client certificate's CN).
    #[arg(long)]
    pub etcd_auth: bool,
    /// The operator's own etcd user (it needs etcd's `root` role to manage users); the password
    /// comes from `NINELIVES_ETCD_PASSWORD` only (flags show in `ps`). Unset: the client
    /// certificate's CN is the user, or no authentication.
    #[arg(long, env = "NINELIVES_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// Port of the worker pods' /metrics (declared as container port `metrics`); 0 serves none.
    #[arg(long, default_value_t = resources::DEFAULT_WORKER_METRICS_PORT)]
    pub worker_metrics_port: u16,
    /// Give every job a NetworkPolicy: worker port only from the same job's pods, metrics port
    /// only from `--worker-metrics-namespace`.
    #[arg(long)]
    pub worker_network_policy: bool,
    /// Namespace allowed to scrape worker metrics under `--worker-network-policy`.
    #[arg(long)]
    pub worker_metrics_namespace: Option<String>,
    /// `schedulerName` that gets a Volcano PodGroup.
    #[arg(long, default_value = gang::VOLCANO_SCHEDULER)]
    pub volcano_scheduler_name: String,
    /// `schedulerName` that gets a scheduler-plugins coscheduling PodGroup.
    #[arg(long, default_value = gang::COSCHEDULING_SCHEDULER)]
    pub coscheduling_scheduler_name: String,
    /// Restrict the toleration keys jobs may request to this list (comma-separated; `*` stands
    /// for a keyless toleration of every taint). Unset: any.
    #[arg(long, value_delimiter = ',')]
    pub allowed_toleration_keys: Option<Vec<String>>,
    /// Restrict the priority classes jobs may request to this list (comma-separated). Unset: any.
    #[arg(long, value_delimiter = ',')]
    pub allowed_priority_classes: Option<Vec<String>>,
    /// `checkpoint.path` is a filesystem every node shares, so multi-node jobs may use a path
    /// instead of a ReadWriteMany PVC.
    #[arg(long)]
    pub shared_checkpoint_paths: bool,
    /// Seconds to let reconciles in flight finish after SIGTERM.
    #[arg(long, default_value_t = 20)]
    pub shutdown_grace_seconds: u64,
}

impl OperatorArgs {
    /// How worker pods are built under these flags.
    pub fn template(&self) -> resources::WorkerTemplate {
        let recovery = match self.recovery.as_str() {
            "restart-pods" => resources::Recovery::RestartPods,
            _ => resources::Recovery::Brain,
        };
        let default = resources::WorkerTemplate::new(recovery);
        resources::WorkerTemplate {
            image: self.worker_image.clone(),
            command: if self.worker_command.is_empty() {
                default.command
            } else {
                self.worker_command.clone()
            },
            args: if self.worker_args.is_empty() { default.args } else { self.worker_args.clone() },
            etcd_endpoints: self.etcd.clone(),
            etcd_prefix: self.etcd_prefix.clone(),
            etcd_tls_secret: self.worker_etcd_tls_secret.clone().filter(|s| !s.is_empty()),
            etcd_auth: self.etcd_auth,
            metrics_port: (self.worker_metrics_port != 0).then_some(self.worker_metrics_port),
            network_policy: self.worker_network_policy.then(|| resources::WorkerNetworkPolicy {
                metrics_namespace: self.worker_metrics_namespace.clone().filter(|s| !s.is_empty()),
            }),
            gang: gang::GangSchedulers {
                volcano: self.volcano_scheduler_name.clone(),
                coscheduling: self.coscheduling_scheduler_name.clone(),
            },
            ..default
        }
    }

    /// What the operator refuses under these flags.
    pub fn admission(&self) -> admission::Admission {
        admission::Admission {
            allow_list: admission::SchedulingAllowList {
                toleration_keys: self.allowed_toleration_keys.clone(),
                priority_classes: self.allowed_priority_classes.clone(),
            },
            shared_checkpoint_paths: self.shared_checkpoint_paths,
        }
    }

    fn etcd_config(&self) -> etcd::EtcdConfig {
        etcd::EtcdConfig {
            endpoints: self.etcd.clone(),
            ca_file: self.etcd_ca_file.clone(),
            cert_file: self.etcd_cert_file.clone(),
            key_file: self.etcd_key_file.clone(),
            prefix: self.etcd_prefix.clone(),
            credentials: self.etcd_user.clone().filter(|u| !u.is_empty()).map(|user| etcd::Credentials {
                user,
                password: std::env::var("NINELIVES_ETCD_PASSWORD").unwrap_or_default(),
            }),
        }
    }

    fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        })
    }
}

/// Entry point of `ninelives operator`: runs until SIGTERM/SIGINT; maps errors to exit codes.
pub fn main(args: OperatorArgs) -> ExitCode {
    ninelives_telemetry::init_tracing("info,kube=warn,tower=warn,hyper=warn");
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "starting the async runtime");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, kind = e.label(), "operator stopped");
            ExitCode::FAILURE
        }
    }
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn termination() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    Ok(())
}

/// Runs the operator: admin endpoint, leader election, and the controller while leading.
pub async fn run(args: OperatorArgs) -> Result<()> {
    let metrics = Arc::new(metrics::Metrics::new()?);
    // The brain's families beside the operator's own, on the same /metrics.
    let recovery = ninelives_telemetry::recovery::RecoveryMetrics::with_registry(metrics.registry.clone())?;
    let ready = Readiness::default();
    let admin = AdminServer::bind(args.metrics_addr, metrics.registry.clone(), ready.clone()).await?;
    info!(addr = %admin.local_addr()?, "admin endpoint");
    let (stop_admin, admin_stopped) = oneshot::channel::<()>();
    let admin_task = tokio::spawn(admin.serve(async move {
        let _ = admin_stopped.await;
    }));

    let (shutdown_tx, shutdown) = watch::channel(false);
    let signals = tokio::spawn(async move {
        if let Err(e) = termination().await {
            warn!(error = %e, "signal handlers");
        }
        let _ = shutdown_tx.send(true);
    });

    let result = lead_while_elected(&args, metrics, recovery, &ready, shutdown).await;
    ready.set(false);
    signals.abort();
    let _ = stop_admin.send(());
    let _ = admin_task.await;
    result
}

async fn sleep_or_shutdown(period: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(period) => false,
        _ = shutdown.wait_for(|stop| *stop) => true,
    }
}

async fn lead_while_elected(
    args: &OperatorArgs,
    metrics: Arc<metrics::Metrics>,
    recovery: ninelives_telemetry::recovery::RecoveryMetrics,
    ready: &Readiness,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let client = Client::try_default().await.map_err(Error::Client)?;
    let identity = args.identity();
    let duration = Duration::from_secs(args.lease_duration_seconds.max(1));
    // client-go's proportions: retry every ~1/7 of the lease (2 s of 15 s), give up renewing
    // after 2/3 of it, so a lost leader stops before anyone else may start.
    let retry = (duration / 7).max(Duration::from_millis(200));
    let renew_deadline = duration * 2 / 3;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &args.leader_election_namespace);
    let mut elector = leader::LeaderElector::new(leases, &args.leader_election_lease, &identity, duration);

    info!(identity = %identity, lease = %args.leader_election_lease, "waiting for leadership");
    let leadership = leader::Leadership::default();
    loop {
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(renew_deadline, elector.try_acquire_or_renew()).await {
            Ok(Ok(true)) => match elector.epoch() {
                Some(epoch) => {
                    let valid_until = started + renew_deadline;
                    leadership.begin(leader::Term { identity: identity.clone(), epoch, valid_until });
                    break;
                }
                None => warn!("the Lease has no creation time; no epoch to fence writes with"),
            },
            Ok(Ok(false)) => ready.set(true),
            Ok(Err(e)) => {
                ready.set(false);
                warn!(error = %e, "leader election");
            }
            Err(_) => warn!(seconds = renew_deadline.as_secs(), "leader election did not answer in time"),
        }
        if sleep_or_shutdown(retry, &mut shutdown).await {
            return Ok(());
        }
    }
    ready.set(true);
    metrics.set_leader(true);
    info!(identity = %identity, epoch = ?elector.epoch(), "acquired leadership; reconciling");

    let ctx = Arc::new(controller::Context::new(
        client,
        args.template(),
        args.admission(),
        args.etcd_config(),
        metrics.clone(),
        recovery,
        &identity,
        leadership.clone(),
    ));
    // The agents' etcd users follow the Nodes while this replica leads.
    let agent_identities = args.etcd_auth.then(|| {
        tokio::spawn(etcd_auth::run_agent_identities(
            ctx.client.clone(),
            ctx.etcd.clone(),
            etcd_auth::AGENT_SYNC_PERIOD,
        ))
    });
    let (stop_controller, controller_stopped) = oneshot::channel::<()>();
    let drivers = ctx.clone();
    let mut controller = tokio::spawn(controller::run(ctx, async move {
        let _ = controller_stopped.await;
    }));

    let mut controller_failed = false;
    let stop = async {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => {}
            _ = &mut controller => controller_failed = true,
        }
    };
    let end = leader::hold_term(&leadership, &mut elector, retry, renew_deadline, stop).await;
    // The drivers stop first, at once: the term may be over (a standby may take the Lease once
    // it expires), and the controller's grace period below is longer than what is left of it.
    drivers.drivers.stop_all();
    if let Some(task) = &agent_identities {
        task.abort();
    }
    let outcome = match end {
        leader::TermEnd::Stopped if controller_failed => Err(Error::ControllerStopped),
        leader::TermEnd::Stopped => Ok(()),
        leader::TermEnd::Lost | leader::TermEnd::MissedDeadline => {
            warn!(?end, "leadership lost; the recovery drivers were stopped");
            Err(Error::LostLease)
        }
    };

    let _ = stop_controller.send(());
    let grace = Duration::from_secs(args.shutdown_grace_seconds);
    // (A controller that stopped by itself has nothing left to wait for.)
    if !controller_failed && tokio::time::timeout(grace, &mut controller).await.is_err() {
        warn!("reconciles still running after the grace period; stopping them");
        controller.abort();
    }
    // A replica that is not leading must not drive any job (a reconcile in the grace period
    // cannot start one: the term is over).
    drivers.drivers.stop_all();
    metrics.set_leader(false);
    if outcome.is_ok() {
        // Hand over at once instead of making the standby wait out the lease.
        if let Err(e) = elector.release().await {
            warn!(error = %e, "releasing the lease");
        }
        info!("released leadership");
    }
    outcome
}
