//! `ninelives demo`: the whole system on this machine — etcd, an agent per node on simulated
//! chips, an expert-parallel worker member per node and the recovery brain — with faults injected while it trains.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use ninelives_core::fault_schedule::FaultSchedule;
use ninelives_core::member_output::MemberLine;
use ninelives_local::metrics::RecoveryMetrics;
use ninelives_local::report::Report;
use ninelives_local::{
    LocalRunConfig, MemberRouting, MetricsPlan, NAMESPACE, RunOutcome, node_names, run_local,
};
use ninelives_local::{Supervisor, live};
use ninelives_telemetry::{AdminServer, Readiness};
use ninelives_testkit::free_port;
use ninelives_testkit::prometheus::{PrometheusServer, ScrapeTarget};
use tokio::signal::unix::{SignalKind, signal};

/// `ninelives demo` flags.
#[derive(Args)]
pub struct DemoArgs {
    /// The TrainingJob to run.
    #[arg(long, default_value = "examples/tiny.yaml")]
    manifest: PathBuf,
    /// A fault: chip:<node>/<chip>@<step>, hang:<node>/<chip>@<step>, flap:<node>/<chip>@<step>,
    /// node:<node>@<step> or worker:<node>@<step> (repeatable). Default: a chip ECC error, a
    /// whole-node loss and a worker crash.
    #[arg(long = "fault", value_name = "FAULT")]
    faults: Vec<String>,
    /// Inject no faults.
    #[arg(long, conflicts_with = "faults")]
    no_faults: bool,
    /// Steps to train. Default: spec.training.steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Write report.json, loss.svg and throughput.svg into this directory.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Skip the uninterrupted reference run (no parameter comparison).
    #[arg(long)]
    no_reference: bool,
    /// CPU threads shared by the worker members (each gets threads / nodes, at least 1) and used
    /// by the reference run. Default: all available.
    #[arg(long)]
    threads: Option<usize>,
    /// Keep etcd data, chips, checkpoints and logs here instead of a temporary directory.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Start a real Prometheus (Debian `prometheus`) scraping every process of the demo — etcd,
    /// agents, worker, and the demo's own recovery metrics — with the alert rules of
    /// `dashboards/alerts.yaml`, and print its URL. On a terminal it keeps serving after the
    /// run until Ctrl-C, so the dashboards' queries can be tried on the run's data.
    #[arg(long)]
    prometheus: bool,
    /// Members of the demo's etcd cluster, on loopback: 1 (fastest) or more, e.g. 3, which
    /// survives the loss of any one member (the driver, agents and workers get every member's
    /// URL and fail over between them).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=7))]
    etcd_members: u8,
    /// Shift the wall clock of one node's processes (its agent and the worker member on it) by
    /// SECONDS (negative: behind), as NODE=SECONDS, e.g. node-1=-120: a clock-skew test. Uses
    /// libfaketime (Debian `faketime`); etcd and the other nodes keep the real time.
    #[arg(long, value_name = "NODE=SECONDS", value_parser = parse_skew)]
    skew_clock: Option<(String, i64)>,
    /// etcd client URLs (comma-separated) of the worker member on NODE instead of the demo's
    /// etcd, as NODE=URLS: e.g. a proxy a partition test controls (repeatable).
    #[arg(long, hide = true, value_name = "NODE=URLS", value_parser = parse_node_value)]
    member_etcd: Vec<(String, String)>,
    /// Address the worker member on NODE accepts peer connections on, as NODE=IP:PORT
    /// (repeatable; partition tests).
    #[arg(long, hide = true, value_name = "NODE=ADDR", value_parser = parse_node_value)]
    member_listen: Vec<(String, String)>,
    /// Host the worker member on NODE registers for its peers, with its listener's port, as
    /// NODE=HOST: e.g. 127.0.0.2, where a proxy a partition test controls listens (repeatable).
    #[arg(long, hide = true, value_name = "NODE=HOST", value_parser = parse_node_value)]
    member_advertise: Vec<(String, String)>,
}

/// `NODE=VALUE` of the per-node member flags.
fn parse_node_value(text: &str) -> Result<(String, String), String> {
    let (node, value) = text.split_once('=').ok_or("expected NODE=VALUE")?;
    if node.trim().is_empty() || value.trim().is_empty() {
        return Err("NODE and VALUE must not be empty".into());
    }
    Ok((node.trim().to_owned(), value.trim().to_owned()))
}

/// The per-node member routing of `--member-etcd`, `--member-listen` and `--member-advertise`,
/// each naming a node of the job.
fn member_routing(args: &DemoArgs, nodes: &[String]) -> Result<BTreeMap<String, MemberRouting>, String> {
    let mut routing: BTreeMap<String, MemberRouting> = BTreeMap::new();
    let known = |flag: &str, node: &str| {
        if nodes.iter().any(|n| n == node) {
            Ok(())
        } else {
            Err(format!("--{flag}: no node {node:?} (nodes: {})", nodes.join(", ")))
        }
    };
    for (node, urls) in &args.member_etcd {
        known("member-etcd", node)?;
        routing.entry(node.clone()).or_default().etcd = Some(urls.clone());
    }
    for (node, addr) in &args.member_listen {
        known("member-listen", node)?;
        let addr: SocketAddr = addr.parse().map_err(|e| format!("--member-listen {node}={addr}: {e}"))?;
        routing.entry(node.clone()).or_default().listen = Some(addr);
    }
    for (node, host) in &args.member_advertise {
        known("member-advertise", node)?;
        routing.entry(node.clone()).or_default().advertise = Some(host.clone());
    }
    Ok(routing)
}

/// The preloaded library that shifts a process's wall clock (Debian `libfaketime`).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// `NODE=SECONDS` of `--skew-clock`.
fn parse_skew(text: &str) -> Result<(String, i64), String> {
    let (node, seconds) = text.split_once('=').ok_or("expected NODE=SECONDS, e.g. node-1=-120")?;
    let seconds: i64 = seconds.trim().parse().map_err(|e| format!("SECONDS {seconds:?}: {e}"))?;
    if node.trim().is_empty() {
        return Err("NODE is empty".into());
    }
    Ok((node.trim().to_owned(), seconds))
}

/// The environment that runs a process with its wall clock `seconds` off (libfaketime; the
/// monotonic clock, which timeouts use, stays real).
fn skew_env(seconds: i64) -> Result<Vec<(String, String)>, String> {
    if !Path::new(LIBFAKETIME).is_file() {
        return Err(format!("--skew-clock needs {LIBFAKETIME}: apt install faketime"));
    }
    Ok(vec![
        ("LD_PRELOAD".into(), LIBFAKETIME.into()),
        ("FAKETIME".into(), format!("{seconds:+}s")),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ("FAKETIME_DONT_RESET".into(), "1".into()),
    ])
}

/// Runs the demo; exit 0 when the job succeeded (and matched the reference, when run), 1 when it
/// failed or did not match, 2 on bad input, 130 when interrupted.
pub fn run(args: DemoArgs) -> ExitCode {
    match demo(args) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}

fn demo(args: DemoArgs) -> Result<ExitCode, String> {
    let text = std::fs::read_to_string(&args.manifest)
        .map_err(|e| format!("manifest {}: cannot read: {e}", args.manifest.display()))?;
    let job = ninelives_core::manifest::parse_job(&text).map_err(|violations| {
        let lines: Vec<String> = violations.iter().map(|v| format!("  {v}")).collect();
        format!("manifest {} is invalid:\n{}", args.manifest.display(), lines.join("\n"))
    })?;
    let topo = &job.spec.topology;
    let steps = args.steps.unwrap_or(job.spec.training.steps);
    let schedule = if args.no_faults {
        FaultSchedule::none()
    } else if args.faults.is_empty() {
        FaultSchedule::default_for(topo.nodes, topo.chips_per_node, steps)
    } else {
        FaultSchedule::parse(&args.faults).map_err(join)?
    };
    schedule.validate(topo.nodes, topo.chips_per_node, steps).map_err(join)?;
    let mut node_env = BTreeMap::new();
    if let Some((node, seconds)) = &args.skew_clock {
        let (names, spares) = node_names(topo.nodes, topo.spare_nodes);
        if !names.iter().chain(&spares).any(|n| n == node) {
            return Err(format!("--skew-clock: no node {node:?} (nodes: {})", names.join(", ")));
        }
        node_env.insert(node.clone(), skew_env(*seconds)?);
    }
    let member_routing = {
        let (names, spares) = node_names(topo.nodes, topo.spare_nodes);
        member_routing(&args, &names.into_iter().chain(spares).collect::<Vec<_>>())?
    };
    let ninelives = std::env::current_exe().map_err(|e| format!("cannot find the ninelives binary: {e}"))?;
    let temp;
    let work_dir = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new().prefix("ninelives-demo-").tempdir().map_err(|e| e.to_string())?;
            temp.path().to_path_buf()
        }
    };
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    // Ctrl-C and SIGTERM are handled from here on (not only once the run loop polls for them):
    // the children live in their own process groups, so the default action — dying at once —
    // would leave them behind.
    let interrupted = Arc::new(AtomicBool::new(false));
    let stop = {
        let _entered = runtime.enter();
        let mut sigint = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
        let mut sigterm = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let flag = interrupted.clone();
        runtime.spawn(async move {
            tokio::select! {
                _ = sigint.recv() => {}
                _ = sigterm.recv() => {}
            }
            flag.store(true, Ordering::SeqCst);
            let _ = tx.send(true);
        });
        rx
    };
    let observed = if args.prometheus { Some(runtime.block_on(observe(&job))?) } else { None };
    let cfg = LocalRunConfig {
        ninelives: ninelives.clone(),
        manifest: args.manifest.clone(),
        job: job.clone(),
        steps,
        schedule,
        work_dir: work_dir.clone(),
        threads,
        deadline: Duration::from_secs(args.timeout_secs),
        metrics: observed.as_ref().map(|o| o.plan.clone()),
        member_env: ninelives_worker::trainer::worker_env()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        etcd_members: usize::from(args.etcd_members),
        node_env,
        member_routing,
    };
    let terminal = std::io::stdout().is_terminal();
    let mut shown = 0usize;
    let mut on_stop = stop.clone();
    let interrupt = async move {
        let _ = on_stop.wait_for(|stopped| *stopped).await;
    };
    let outcome: RunOutcome = runtime
        .block_on(run_local(&cfg, interrupt, |state| {
            if terminal {
                print!("\x1b[H\x1b[2J{}", live::render(state, 80));
            } else {
                for e in &state.events[shown.min(state.events.len())..] {
                    println!("{e}");
                }
                shown = state.events.len();
            }
            let _ = std::io::stdout().flush();
        }))
        .map_err(|e| e.to_string())?;
    if outcome.interrupted {
        eprintln!("interrupted; every process stopped");
        return Ok(ExitCode::from(130));
    }
    let mut report = outcome.report;
    if outcome.failure.is_none() && !args.no_reference {
        println!("running the uninterrupted reference ({steps} steps) ...");
        let Some(reference) = reference_digest(&cfg, &interrupted)? else {
            eprintln!("interrupted; every process stopped");
            return Ok(ExitCode::from(130));
        };
        report.params_match = Some(report.params_sha256.as_deref() == Some(reference.as_str()));
        // Equal digests mean bit-identical parameters; otherwise the difference is not measured.
        report.max_abs_diff = report.params_match.filter(|m| *m).map(|_| 0.0);
        report.reference_sha256 = Some(reference);
    }
    print_summary(&report, outcome.failure.as_deref());
    if let Some(dir) = &args.report {
        let written = report.write(dir, &outcome.samples).map_err(|e| e.to_string())?;
        for p in written {
            println!("wrote {}", p.display());
        }
    }
    if let Some(o) = &observed {
        println!("prometheus: {} (scraping {} targets)", o.prometheus.url(), o.targets);
        if terminal {
            println!("serving the run's metrics until Ctrl-C");
            let mut on_stop = stop.clone();
            let _ = runtime.block_on(on_stop.wait_for(|stopped| *stopped));
        }
    }
    let ok = outcome.failure.is_none() && report.params_match != Some(false);
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn join<E: ToString>(errors: Vec<E>) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

/// Trains the same job without faults and returns its final digest; `None` when interrupted
/// (the reference process is stopped first).
fn reference_digest(cfg: &LocalRunConfig, interrupted: &AtomicBool) -> Result<Option<String>, String> {
    let dir = cfg.work_dir.join("reference");
    let mut sup = Supervisor::new(dir.join("logs")).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&cfg.ninelives);
    cmd.args(["worker", "train"])
        .arg(&cfg.manifest)
        .args(["--steps", &cfg.steps.to_string(), "--threads", &cfg.threads.to_string()])
        .arg("--checkpoint-dir")
        .arg(dir.join("checkpoints"));
    let (id, stdout) = sup.spawn_piped("reference", cmd).map_err(|e| e.to_string())?;
    // Lines arrive on a thread so the interrupt flag is checked while the reference trains.
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut digest = None;
    loop {
        if interrupted.load(Ordering::SeqCst) {
            sup.shutdown();
            return Ok(None);
        }
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if let Some(MemberLine::Digest(hex)) = MemberLine::parse(&line) {
                    digest = Some(hex);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = sup.terminate(id, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    digest.map(Some).ok_or_else(|| {
        format!("reference run ended ({status:?}) without a digest:\n{}", sup.log_tail(id, 10))
    })
}

fn print_summary(report: &Report, failure: Option<&str>) {
    println!();
    match failure {
        Some(reason) => println!("job FAILED: {reason}"),
        None => println!("job finished: {} steps in {:.1} s", report.steps, report.wall_s),
    }
    println!(
        "{:<14} {:<9} {:>9} {:>9} {:>10} {:<10}",
        "trigger", "tier", "detect s", "resume s", "steps lost", "source"
    );
    for r in &report.recoveries {
        let detect = r.detect_s.map_or("-".to_string(), |d| format!("{d:.2}"));
        println!(
            "{:<14} {:<9} {:>9} {:>9.2} {:>10} {:<10}",
            r.trigger, r.tier, detect, r.resume_s, r.steps_lost, r.source
        );
    }
    println!("goodput {:.3}", report.goodput);
    if let Some(loss) = report.final_loss {
        println!("final loss {loss:.4}");
    }
    match report.params_match {
        Some(true) => println!("final parameters equal the uninterrupted reference run (bit-identical)"),
        Some(false) => println!("final parameters DIFFER from the uninterrupted reference run"),
        None => println!("no reference run"),
    }
}

/// A run under a real Prometheus.
struct Observed {
    plan: MetricsPlan,
    prometheus: PrometheusServer,
    targets: usize,
}

/// Picks the metrics addresses of every process, serves the demo's own recovery metrics, and
/// starts Prometheus scraping all of them (etcd's own `/metrics` included).
async fn observe(job: &ninelives_core::TrainingJob) -> Result<Observed, String> {
    let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let free = || free_port().map(loopback).map_err(|e| format!("no free port: {e}"));
    let topo = &job.spec.topology;
    let name = job.metadata.name.clone().unwrap_or_else(|| "job".into());
    let (nodes, spares) = node_names(topo.nodes, topo.spare_nodes);
    let mut agents = BTreeMap::new();
    let mut targets = Vec::new();
    for node in nodes.iter().chain(&spares) {
        let addr = free()?;
        agents.insert(node.clone(), addr);
        targets.push(
            ScrapeTarget::new("ninelives-agent", addr.to_string())
                .label("namespace", NAMESPACE)
                .label("node", node),
        );
    }
    // One expert-parallel member per training node; a member keeps its rank (and so its
    // metrics address) when the brain moves it to a spare.
    let mut workers = BTreeMap::new();
    for rank in 0..topo.nodes {
        let addr = free()?;
        workers.insert(rank, addr);
        targets.push(
            ScrapeTarget::new("ninelives-worker", addr.to_string())
                .label("tj_namespace", NAMESPACE)
                .label("trainingjob", &name)
                .label("rank", rank.to_string()),
        );
    }
    let recovery = RecoveryMetrics::new().map_err(|e| format!("recovery metrics: {e}"))?;
    let server = AdminServer::bind(loopback(0), recovery.registry.clone(), Readiness::default())
        .await
        .map_err(|e| format!("cannot serve the demo's metrics: {e}"))?;
    let own = server.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(server.serve(std::future::pending()));
    targets.push(ScrapeTarget::new("ninelives-demo", own.to_string()));
    let etcd = free()?;
    targets.push(ScrapeTarget::new("etcd", etcd.to_string()));
    let rules: Vec<PathBuf> = [Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/alerts.yaml")]
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    if rules.is_empty() {
        eprintln!("warning: dashboards/alerts.yaml not found; Prometheus runs without alert rules");
    }
    let prometheus = PrometheusServer::start(&targets, &rules).map_err(|e| e.to_string())?;
    println!("prometheus: {} scraping {} targets", prometheus.url(), targets.len());
    Ok(Observed { plan: MetricsPlan { recovery, agents, workers, etcd }, prometheus, targets: targets.len() })
}
