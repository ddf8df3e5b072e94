//! `ninelives agent`: the node agent and its shell tools.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use ninelives_agent::etcd::{EtcdConfig, EtcdSource, EtcdTls};
use ninelives_agent::faults::FaultTable;
use ninelives_agent::probe::DirProbe;
use ninelives_agent::simulate::{Fault, inject, request_clear};
use ninelives_agent::{Agent, AgentConfig};
use ninelives_core::keyspace::Keyspace;

#[derive(Subcommand)]
pub enum AgentCommand {
    /// Run the node agent until SIGTERM/SIGINT.
    Run(Box<RunArgs>),
    /// Inject a fault into a simulated chip: ecc, link-down, hang, over-temp, slow, ce-burst,
    /// host-fault, recover, or code=<vendor-code>.
    Inject {
        /// The chips directory of the agent.
        #[arg(long)]
        chips_dir: PathBuf,
        /// Chip index.
        chip: u32,
        /// The fault.
        fault: String,
    },
    /// Lift a chip's quarantine (the agent acts within one poll interval).
    Clear {
        /// The chips directory of the agent.
        #[arg(long)]
        chips_dir: PathBuf,
        /// Chip index.
        chip: u32,
    },
    /// Print the fault table in force (defaults, overridden by FILE).
    Faults {
        /// YAML `code: action` overrides.
        #[arg(long)]
        fault_table: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct RunArgs {
    /// Node name; in Kubernetes, set NODE_NAME from the downward API (spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// etcd client URLs, comma-separated.
    #[arg(long, env = "NINELIVES_ETCD", value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// Chip directory (see ARCHITECTURE.md, "Node agent").
    #[arg(long)]
    chips_dir: PathBuf,
    /// Create N simulated chips in --chips-dir and advance their heartbeats.
    #[arg(long, value_name = "N")]
    simulate: Option<u32>,
    /// etcd key prefix.
    #[arg(long = "etcd-prefix", alias = "prefix", default_value = ninelives_core::keyspace::DEFAULT_PREFIX)]
    prefix: String,
    /// Node lease TTL in seconds (keepalive every TTL/3).
    #[arg(long, default_value_t = 10)]
    ttl: i64,
    /// Admin endpoint (/metrics, /live, /ready).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// YAML `code: action` overrides of the default fault table.
    #[arg(long)]
    fault_table: Option<PathBuf>,
    /// CA bundle (PEM) of the etcd server certificate; use https:// endpoints.
    #[arg(long = "etcd-ca-file", alias = "etcd-ca")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd client-cert auth.
    #[arg(long = "etcd-cert-file", alias = "etcd-cert", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd client-cert auth.
    #[arg(long = "etcd-key-file", alias = "etcd-key", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Report the NinelivesChipsHealthy condition and chip-fault taint on the Node
    /// (on by default inside a cluster).
    #[arg(long)]
    kube: bool,
    /// How often chips are read, in milliseconds.
    #[arg(long, default_value_t = 100)]
    poll_ms: u64,
    /// A heartbeat stalled this long (ms) means the chip hung.
    #[arg(long, default_value_t = 2000)]
    hang_after_ms: u64,
    /// Fault onsets within --flap-window-secs that quarantine a chip.
    #[arg(long, default_value_t = 3)]
    flap_limit: usize,
    /// Window of the flap count, in seconds.
    #[arg(long, default_value_t = 600)]
    flap_window_secs: u64,
}

pub fn run(command: AgentCommand) -> ExitCode {
    match command {
        AgentCommand::Inject { chips_dir, chip, fault } => {
            let fault: Fault = match fault.parse() {
                Ok(f) => f,
                Err(e) => return fail(&e),
            };
            match inject(&chips_dir, chip, &fault) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e.to_string()),
            }
        }
        AgentCommand::Clear { chips_dir, chip } => match request_clear(&chips_dir, chip) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&format!("chip {chip} under {}: {e}", chips_dir.display())),
        },
        AgentCommand::Faults { fault_table } => {
            let table = match fault_table.map_or_else(|| Ok(FaultTable::default()), |p| FaultTable::load(&p))
            {
                Ok(t) => t,
                Err(e) => return fail(&e.to_string()),
            };
            for (code, action) in table.entries() {
                println!("{code}: {}", action.as_str());
            }
            println!("# any other code: isolate-chip (reported as unknown)");
            ExitCode::SUCCESS
        }
        AgentCommand::Run(args) => {
            ninelives_telemetry::init_tracing("info");
            let runtime =
                match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => return fail(&e.to_string()),
                };
            match runtime.block_on(run_agent(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

async fn run_agent(args: RunArgs) -> Result<(), String> {
    let fault_table = match &args.fault_table {
        Some(path) => FaultTable::load(path).map_err(|e| e.to_string())?,
        None => FaultTable::default(),
    };
    let tls = (args.etcd_ca.is_some() || args.etcd_cert.is_some()).then(|| EtcdTls {
        ca: args.etcd_ca.clone(),
        cert: args.etcd_cert.clone(),
        key: args.etcd_key.clone(),
    });
    let source = EtcdSource::Config(EtcdConfig { endpoints: args.etcd.clone(), tls });

    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let kube = if args.kube || in_cluster {
        Some(ninelives_agent::kubernetes::default_client().await.map_err(|e| e.to_string())?)
    } else {
        None
    };

    if args.simulate.is_some() {
        std::fs::create_dir_all(&args.chips_dir).map_err(|e| format!("{}: {e}", args.chips_dir.display()))?;
    }
    let mut config = AgentConfig::new(&args.node, source, Arc::new(DirProbe::new(&args.chips_dir)));
    config.keys = Keyspace::new(&args.prefix);
    config.ttl = args.ttl;
    config.simulate = args.simulate.map(|n| (args.chips_dir.clone(), n));
    config.poll_interval = Duration::from_millis(args.poll_ms.max(10));
    config.policy.hang_after = Duration::from_millis(args.hang_after_ms);
    config.policy.flap_limit = args.flap_limit.max(1);
    config.policy.flap_window = Duration::from_secs(args.flap_window_secs);
    config.fault_table = fault_table;
    config.metrics_addr = args.metrics_addr;
    config.kube = kube;

    let agent = Agent::start(config).await.map_err(|e| e.to_string())?;
    if let Some(addr) = agent.admin_addr() {
        tracing::info!(%addr, "admin endpoint listening");
    }
    wait_for_signal().await.map_err(|e| format!("signal handler: {e}"))?;
    tracing::info!("shutting down: revoking the node lease, then draining");
    agent.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
