//! Real ninelives processes under a real Prometheus: etcd, node agents on simulated chips with
//! injected faults, a training worker that is stopped and resumed from its checkpoint — and every
//! dashboard query evaluated against what Prometheus scraped from them.
//!
//! Three runs: [`run`], a hand-driven fleet (faults injected directly into agents, the worker
//! killed and resumed by the harness) that exercises the agent and worker panels; [`demo`], the
//! driver of `ninelives demo` with the recovery brain, whose own metrics feed the recovery and
//! job panels; and [`control_plane`], two operator replicas on the e2e test bed (etcd and
//! kube-apiserver) reconciling TrainingJobs, whose metrics feed the operator panels.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ninelives_local::committed_checkpoints;
use ninelives_testkit::prometheus::{PrometheusServer, ScrapeTarget, Series, unix_now};
use ninelives_testkit::{EtcdServer, free_port};

use crate::dashboard::{Dashboard, Query};
use crate::promql::{self, Intervals};
use crate::repo_root;

mod control_plane;
pub use control_plane::{
    ControlPlaneOptions, ControlPlaneRun, INVALID_JOB, OPERATOR_JOB, REPLICAS, SUCCEEDING_JOB, control_plane,
    is_operator_metric,
};

/// Labels the harness gives the worker's series (a PodMonitor's relabelling in a cluster).
pub const JOB_NAMESPACE: &str = "default";
/// TrainingJob name of the worker.
pub const JOB_NAME: &str = "tiny";
/// Kubernetes-namespace label of the agents' series.
pub const NAMESPACE: &str = "ninelives-system";

/// How long the run is, in work.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// Node agents, 8 simulated chips each (at least 2: one is killed to lose a node).
    pub agents: usize,
    /// Steps the resumed worker trains past its newest checkpoint. (The first worker trains
    /// open-ended and is killed once the faults are injected, so its scrape target is up for
    /// the whole fault sequence however fast this machine trains.)
    pub resumed_steps: u64,
    /// Checkpoint interval in steps.
    pub checkpoint_every: u64,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self { agents: 3, resumed_steps: 12, checkpoint_every: 4 }
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &str, command: &mut Command, dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name: name.to_string(), child, log })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("--- {} ---\n{}", self.name, lines[lines.len().saturating_sub(20)..].join("\n"))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A finished fleet run: Prometheus still up with everything it scraped.
pub struct FleetRun {
    /// The Prometheus that scraped the run (kept running for queries).
    pub prometheus: PrometheusServer,
    /// Unix seconds when the processes started.
    pub start: f64,
    /// Unix seconds when the run ended.
    pub end: f64,
    /// What happened when: `(unix seconds, text)` — faults, restarts, the node loss.
    pub markers: Vec<(f64, String)>,
    /// The most severe state each alert reached during the run (`pending` or `firing`).
    pub alerts_seen: BTreeMap<String, String>,
    /// Metric names Prometheus holds from the run.
    pub exported: BTreeSet<String>,
    processes: Vec<Process>,
    /// Logs of processes a supervisor ran (the demo's `logs/`).
    log_dir: Option<PathBuf>,
    _etcd: Option<EtcdServer>,
    _dir: tempfile::TempDir,
}

impl FleetRun {
    /// The logs' tails of every process (for failure messages).
    pub fn logs(&self) -> String {
        let mut out: Vec<String> = self.processes.iter().map(Process::log_tail).collect();
        if let Some(dir) = &self.log_dir {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
                .unwrap_or_default();
            files.sort();
            for file in files {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                out.push(format!("--- {name} ---\n{}", lines[lines.len().saturating_sub(20)..].join("\n")));
            }
        }
        out.push(format!("--- prometheus ---\n{}", self.prometheus.log_tail()));
        out.join("\n")
    }
}

/// The `ninelives` binary: `$NINELIVES_BIN`, else built once with `cargo build -p ninelives`
/// (the e2e test bed's build, shared).
pub fn ninelives_binary() -> anyhow::Result<PathBuf> {
    Ok(ninelives_e2e::tools::ninelives()?)
}

struct Runner {
    binary: PathBuf,
    prometheus: PrometheusServer,
    markers: Vec<(f64, String)>,
    alerts_seen: BTreeMap<String, String>,
    processes: Vec<Process>,
}

impl Runner {
    fn mark(&mut self, text: impl Into<String>) {
        self.markers.push((unix_now(), text.into()));
    }

    /// Records alert states; call often.
    fn observe_alerts(&mut self) {
        if let Ok(alerts) = self.prometheus.alerts() {
            for alert in alerts {
                if alert.state == "pending" || alert.state == "firing" {
                    let seen = self.alerts_seen.entry(alert.name).or_default();
                    if seen.as_str() != "firing" {
                        *seen = alert.state;
                    }
                }
            }
        }
    }

    /// Sleeps `duration` while watching the alerts.
    fn pause(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            self.observe_alerts();
            std::thread::sleep(
                Duration::from_millis(250).min(until.saturating_duration_since(Instant::now())),
            );
        }
    }

    fn inject(&mut self, chips_dir: &Path, chip: u32, fault: &str, what: &str) -> anyhow::Result<()> {
        let output = Command::new(&self.binary)
            .args(["agent", "inject", "--chips-dir"])
            .arg(chips_dir)
            .arg(chip.to_string())
            .arg(fault)
            .output()
            .context("ninelives agent inject")?;
        if !output.status.success() {
            bail!("inject {fault} into chip {chip}: {}", String::from_utf8_lossy(&output.stderr));
        }
        self.mark(what);
        Ok(())
    }

    /// Waits (bounded) for process `index` to exit successfully.
    fn wait_exit(&mut self, index: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.processes[index].child.try_wait()?;
            if let Some(status) = status {
                if status.success() {
                    return Ok(());
                }
                bail!(
                    "{} exited with {status}\n{}",
                    self.processes[index].name,
                    self.processes[index].log_tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} still running after {timeout:?}\n{}",
                    self.processes[index].name,
                    self.processes[index].log_tail()
                );
            }
            self.pause(Duration::from_millis(500));
        }
    }

    /// Two more scrapes, then everything Prometheus holds from `start` on, as a [`FleetRun`].
    fn finish(
        mut self,
        start: f64,
        what: &str,
        progress: &mut dyn FnMut(&str),
        log_dir: Option<PathBuf>,
        etcd: Option<EtcdServer>,
        dir: tempfile::TempDir,
    ) -> anyhow::Result<FleetRun> {
        self.pause(Duration::from_secs(3));
        let end = unix_now();
        let exported = self.prometheus.metric_names().context("metric names")?.into_iter().collect();
        progress(&format!("{what} took {:.0} s", end - start));
        Ok(FleetRun {
            prometheus: self.prometheus,
            start,
            end,
            markers: self.markers,
            alerts_seen: self.alerts_seen,
            exported,
            processes: self.processes,
            log_dir,
            _etcd: etcd,
            _dir: dir,
        })
    }

    /// Waits (bounded) until `alert` is pending or firing.
    fn wait_alert(&mut self, alert: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.alerts_seen.contains_key(alert) {
            if Instant::now() >= deadline {
                bail!(
                    "alert {alert} not pending or firing within {timeout:?}: {:?}",
                    self.prometheus.alerts()
                );
            }
            self.pause(Duration::from_millis(500));
        }
        Ok(())
    }
}

/// Starts etcd, `options.agents` node agents (8 simulated chips each) and a `tiny` training
/// worker, all scraped every second by a Prometheus loaded with `dashboards/alerts.yaml`; injects
/// chip faults (two ECC errors on one node, a degrading slow chip and a hang on another), stops
/// the worker and resumes it from its checkpoint, then SIGKILLs the last node's agent and waits
/// for `NinelivesNodeLost` to go pending. Every wait is bounded; children are killed on drop.
pub fn run(options: &FleetOptions, progress: &mut dyn FnMut(&str)) -> anyhow::Result<FleetRun> {
    if options.agents < 2 {
        bail!("a fleet run needs at least 2 agents");
    }
    let binary = ninelives_binary()?;
    let dir = tempfile::Builder::new().prefix("ninelives-fleet-").tempdir()?;
    let etcd = EtcdServer::start().context("etcd")?;
    let etcd_port = etcd.endpoint().rsplit(':').next().unwrap_or_default().to_string();

    let agent_ports: Vec<u16> = (0..options.agents).map(|_| free_port()).collect::<Result<_, _>>()?;
    let worker_port = free_port()?;
    let mut targets: Vec<ScrapeTarget> = agent_ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            ScrapeTarget::new("ninelives-agent", format!("127.0.0.1:{port}"))
                .label("namespace", NAMESPACE)
                .label("node", format!("node-{i}"))
        })
        .collect();
    targets.push(
        ScrapeTarget::new("ninelives-worker", format!("127.0.0.1:{worker_port}"))
            .label("tj_namespace", JOB_NAMESPACE)
            .label("trainingjob", JOB_NAME)
            .label("node", "node-0"),
    );
    targets.push(ScrapeTarget::new("etcd", format!("127.0.0.1:{etcd_port}")));
    let rules = repo_root().join("dashboards/alerts.yaml");
    let prometheus = PrometheusServer::start(&targets, &[rules]).context("prometheus")?;
    progress(&format!("prometheus at {} scraping {} targets", prometheus.url(), targets.len()));

    let start = unix_now();
    let mut runner = Runner {
        binary,
        prometheus,
        markers: Vec::new(),
        alerts_seen: BTreeMap::new(),
        processes: Vec::new(),
    };
    let chips_dir = |i: usize| dir.path().join(format!("node-{i}"));
    for (i, port) in agent_ports.iter().enumerate() {
        let mut command = Command::new(&runner.binary);
        command
            .args(["agent", "run", "--node", &format!("node-{i}"), "--etcd", &etcd.endpoint(), "--chips-dir"])
            .arg(chips_dir(i))
            .args(["--simulate", "8", "--ttl", "3", "--metrics-addr", &format!("127.0.0.1:{port}")]);
        runner.processes.push(Process::spawn(&format!("agent-{i}"), &mut command, dir.path())?);
    }
    let manifest = repo_root().join("examples/tiny.yaml");
    let checkpoints = dir.path().join("checkpoints");
    let binary = runner.binary.clone();
    let worker = |steps: u64, resume: bool| {
        let mut command = Command::new(&binary);
        command
            .args(["worker", "train"])
            .arg(&manifest)
            .args(["--steps", &steps.to_string(), "--checkpoint-dir"])
            .arg(&checkpoints)
            .args(["--checkpoint-every", &options.checkpoint_every.to_string()])
            .args(["--threads", "1", "--metrics-addr", &format!("127.0.0.1:{worker_port}")]);
        if resume {
            command.arg("--resume");
        }
        command
    };
    let mut first = worker(OPEN_ENDED_STEPS, false);
    runner.processes.push(Process::spawn("worker", &mut first, dir.path())?);
    let worker_index = runner.processes.len() - 1;
    runner.mark("training starts");

    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = runner.prometheus.wait_targets_up(Duration::from_secs(1)) {
        if Instant::now() >= deadline {
            bail!("{e}\n{}", runner.processes.iter().map(Process::log_tail).collect::<Vec<_>>().join("\n"));
        }
    }
    progress("every target is up; injecting faults");
    runner.pause(Duration::from_secs(4));
    let last = options.agents - 1;
    runner.inject(&chips_dir(0), 3, "ecc", "ECC node-0/3")?;
    runner.pause(Duration::from_secs(4));
    runner.inject(&chips_dir(0), 5, "ecc", "ECC node-0/5")?;
    runner.pause(Duration::from_secs(3));
    runner.inject(&chips_dir(1), 2, "slow", "slow node-1/2")?;
    runner.pause(Duration::from_secs(3));
    runner.inject(&chips_dir(1), 6, "hang", "hang node-1/6")?;
    progress("faults injected; the worker crashes");
    runner.processes[worker_index].kill();
    runner.mark("worker killed");
    runner.pause(Duration::from_secs(3));
    let newest = committed_checkpoints(&checkpoints).last().copied().unwrap_or(0);
    let mut resumed = worker(newest + options.resumed_steps, true);
    runner.processes[worker_index] = Process::spawn("worker-resumed", &mut resumed, dir.path())?;
    runner.mark("worker resumes");
    runner.pause(Duration::from_secs(6));
    runner.processes[last].kill();
    runner.mark(format!("node-{last} lost"));
    progress("agent killed; waiting for NinelivesNodeLost");
    runner.wait_alert("NinelivesNodeLost", Duration::from_secs(30))?;
    runner.wait_exit(worker_index, Duration::from_secs(300))?;
    runner.mark("training done");
    runner.finish(start, "run", progress, None, Some(etcd), dir)
}

/// How long the demo run is.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Training steps.
    pub steps: u64,
    /// Checkpoint interval (the manifest's `intervalSteps` is replaced by it).
    pub checkpoint_every: u64,
    /// Faults, in `ninelives demo --fault` syntax.
    pub faults: Vec<String>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            steps: 60,
            checkpoint_every: 4,
            // Two ECC errors on one node, a hang on another, a node loss, a worker crash.
            faults: ["chip:0/3@4", "chip:0/5@8", "hang:1/6@14", "node:2@20", "worker:3@28"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// What a demo run produced besides the Prometheus data.
pub struct DemoRun {
    /// The Prometheus data and markers (faults and recoveries).
    pub fleet: FleetRun,
    /// The run's report.
    pub report: ninelives_local::report::Report,
    /// Why the job failed, if it did.
    pub failure: Option<String>,
}

/// Runs the driver of `ninelives demo` (etcd, an agent per node and spare on simulated chips,
/// an expert-parallel worker member per node, the recovery brain) on `examples/tiny.yaml` with `options.faults`, every process
/// and the driver's own recovery metrics scraped every second by a Prometheus loaded with
/// `dashboards/alerts.yaml`. Alerts are watched while it runs. Bounded: 15 minutes at most.
pub fn demo(options: &DemoOptions, progress: &mut dyn FnMut(&str)) -> anyhow::Result<DemoRun> {
    use ninelives_core::fault_schedule::FaultSchedule;
    use ninelives_local::metrics::RecoveryMetrics;
    use ninelives_local::{LocalRunConfig, MetricsPlan, NAMESPACE as JOB_NS, node_names, run_local};
    use ninelives_telemetry::{AdminServer, Readiness};
    use std::net::SocketAddr;

    let binary = ninelives_binary()?;
    let dir = tempfile::Builder::new().prefix("ninelives-demo-run-").tempdir()?;
    let text =
        std::fs::read_to_string(repo_root().join("examples/tiny.yaml")).context("examples/tiny.yaml")?;
    let text = text.replace("intervalSteps: 25", &format!("intervalSteps: {}", options.checkpoint_every));
    let manifest = dir.path().join("tiny.yaml");
    std::fs::write(&manifest, &text)?;
    let job = ninelives_core::manifest::parse_job(&text).map_err(|v| anyhow::anyhow!("{v:?}"))?;
    let name = job.metadata.name.clone().unwrap_or_default();
    let schedule = FaultSchedule::parse(&options.faults).map_err(|e| anyhow::anyhow!("{e:?}"))?;

    let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let topo = &job.spec.topology;
    let (nodes, spares) = node_names(topo.nodes, topo.spare_nodes);
    let mut agents = BTreeMap::new();
    let mut targets = Vec::new();
    for node in nodes.iter().chain(&spares) {
        let addr = loopback(free_port()?);
        agents.insert(node.clone(), addr);
        targets.push(
            ScrapeTarget::new("ninelives-agent", addr.to_string())
                .label("namespace", NAMESPACE)
                .label("node", node),
        );
    }
    // One expert-parallel member per training node, scraped by rank (a member moved to a spare
    // binds its address again).
    let mut workers = BTreeMap::new();
    for rank in 0..topo.nodes {
        let addr = loopback(free_port()?);
        workers.insert(rank, addr);
        targets.push(
            ScrapeTarget::new("ninelives-worker", addr.to_string())
                .label("tj_namespace", JOB_NS)
                .label("trainingjob", &name)
                .label("rank", rank.to_string()),
        );
    }
    let etcd = loopback(free_port()?);
    targets.push(ScrapeTarget::new("etcd", etcd.to_string()));

    let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let recovery = RecoveryMetrics::new()?;
    let server =
        tokio.block_on(AdminServer::bind(loopback(0), recovery.registry.clone(), Readiness::default()))?;
    targets.push(ScrapeTarget::new("ninelives-demo", server.local_addr()?.to_string()));
    tokio.spawn(server.serve(std::future::pending()));

    let rules = repo_root().join("dashboards/alerts.yaml");
    let prometheus = PrometheusServer::start(&targets, &[rules]).context("prometheus")?;
    progress(&format!("prometheus at {} scraping {} targets", prometheus.url(), targets.len()));
    let mut runner = Runner {
        binary: binary.clone(),
        prometheus,
        markers: Vec::new(),
        alerts_seen: BTreeMap::new(),
        processes: Vec::new(),
    };
    let work = dir.path().join("work");
    let cfg = LocalRunConfig {
        ninelives: binary,
        manifest,
        job,
        steps: options.steps,
        schedule,
        work_dir: work.clone(),
        threads: 1,
        deadline: Duration::from_secs(900),
        metrics: Some(MetricsPlan { recovery, agents, workers, etcd }),
        // Members set their own environment up (one re-exec each).
        member_env: Vec::new(),
        etcd_members: 1,
        node_env: BTreeMap::new(),
        member_routing: BTreeMap::new(),
    };
    let start = unix_now();
    let mut shown = 0usize;
    let mut last_alert_check = Instant::now();
    let outcome = tokio
        .block_on(run_local(&cfg, std::future::pending(), |state| {
            for event in &state.events[shown.min(state.events.len())..] {
                progress(event.trim());
                // Markers on the charts: faults and recoveries.
                if event.contains("inject ") || event.contains("recovered ") {
                    runner.markers.push((unix_now(), event.trim().to_string()));
                }
            }
            shown = state.events.len();
            if last_alert_check.elapsed() >= Duration::from_millis(500) {
                runner.observe_alerts();
                last_alert_check = Instant::now();
            }
        }))
        .context("demo run")?;
    // Every process is stopped by now: agents read as down in the last scrapes.
    let fleet = runner.finish(start, "demo run", progress, Some(work.join("logs")), None, dir)?;
    Ok(DemoRun { fleet, report: outcome.report, failure: outcome.failure })
}

/// One dashboard query evaluated over a run.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// Dashboard slug (`fleet-health`).
    pub dashboard: String,
    /// The query as written.
    pub query: Query,
    /// The expression sent to Prometheus (variables substituted).
    pub sent: String,
    /// Metric names the expression selects.
    pub names: BTreeSet<String>,
    /// Whether the run exported every one of them.
    pub exported: bool,
    /// The range query's result, or Prometheus' error.
    pub result: Result<Vec<Series>, String>,
}

impl Evaluation {
    /// Whether the result holds at least one finite sample.
    pub fn has_data(&self) -> bool {
        self.result
            .as_ref()
            .is_ok_and(|series| series.iter().any(|s| s.samples.iter().any(|(_, v)| v.is_finite())))
    }
}

/// `--steps` of the first worker: more than it can train before it is killed.
const OPEN_ENDED_STEPS: u64 = 1_000_000;

/// Step of the range queries over a run.
pub const STEP: Duration = Duration::from_secs(1);

/// The Grafana interval variables for a run: `$__rate_interval` = 4 scrape intervals + step.
pub fn intervals(run: &FleetRun) -> Intervals {
    let range = (run.end - run.start).ceil().max(1.0);
    Intervals {
        rate_interval: "5s".into(),
        interval: format!("{}s", STEP.as_secs()),
        range: format!("{range:.0}s"),
    }
}

/// Evaluates every query of `dashboards` as a range query over the run (variables at "All").
pub fn evaluate(run: &FleetRun, dashboards: &[Dashboard]) -> Vec<Evaluation> {
    let intervals = intervals(run);
    let values = BTreeMap::new();
    let mut out = Vec::new();
    for dashboard in dashboards {
        for query in &dashboard.queries {
            let sent = promql::substitute(&query.expr, &intervals, &values);
            let names = promql::metric_names(&sent);
            let exported = !names.is_empty() && names.iter().all(|n| run.exported.contains(n));
            let result =
                run.prometheus.query_range(&sent, run.start, run.end, STEP).map_err(|e| e.to_string());
            out.push(Evaluation {
                dashboard: dashboard.slug(),
                query: query.clone(),
                sent,
                names,
                exported,
                result,
            });
        }
    }
    out
}
