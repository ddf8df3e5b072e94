//! The operator under Prometheus: two `ninelives operator` replicas (leader and standby) on the
//! e2e test bed (real etcd and kube-apiserver, pods run as local processes), scraped as a
//! Kubernetes service discovery would label them, while TrainingJobs run to Succeeded or are
//! marked Invalid — and, at the end, the leader is killed so the standby takes over.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ninelives_core::job::JobPhase;
use ninelives_e2e::jobs::job_manifest;
use ninelives_e2e::{Harness, OperatorProcess, wait_for};
use ninelives_testkit::prometheus::{PrometheusServer, ScrapeTarget, unix_now};

use super::{FleetRun, NAMESPACE, Runner};
use crate::repo_root;

/// Scrape job of the operator replicas (the alert rules select `job=~".*ninelives-operator.*"`).
pub const OPERATOR_JOB: &str = "ninelives-operator";
/// The job that runs to Succeeded.
pub const SUCCEEDING_JOB: &str = "tiny";
/// The job the operator marks Invalid (more peer checkpoint copies than other nodes).
pub const INVALID_JOB: &str = "crowded";
/// Identities (and `pod` labels) of the first leader and of the standby.
pub const REPLICAS: [&str; 2] = ["ninelives-operator-a", "ninelives-operator-b"];

/// How the control-plane run goes.
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// Leader Lease duration in seconds (short, so the standby takes over quickly).
    pub lease_seconds: u64,
    /// Training steps of the succeeding job; the stand-in worker runs `steps / 10` seconds.
    pub steps: u64,
    /// Kill the leader at the end and wait for the standby to take the Lease.
    pub fail_over: bool,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self { lease_seconds: 3, steps: 100, fail_over: true }
    }
}

/// A finished control-plane run.
pub struct ControlPlaneRun {
    /// Prometheus with what it scraped, and the run's markers.
    pub fleet: FleetRun,
    /// Unix seconds `(from, to)` during which both replicas were up and scraped.
    pub both_running: (f64, f64),
    /// Holders of the leader Lease in order: the first leader, then (after a failover) the
    /// standby.
    pub leaders: Vec<String>,
    /// Phase of each job at the end, as the apiserver has it.
    pub phases: BTreeMap<String, Option<JobPhase>>,
}

/// How long the jobs get to reach a phase (the apiserver and pods run on a busy 2-core machine).
const PHASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts the test bed with 2 nodes, replica `REPLICAS[0]` (waits until it leads) and the standby
/// `REPLICAS[1]`, and a Prometheus scraping both admin endpoints every second with
/// `dashboards/alerts.yaml` loaded. Creates [`SUCCEEDING_JOB`] (2 workers) and [`INVALID_JOB`],
/// waits for Invalid, Running and Succeeded, then (with `fail_over`) SIGKILLs the leader and
/// waits for the standby to take the Lease. Every wait is bounded; everything is stopped on
/// drop of the result (Prometheus) or before returning (the rest).
pub fn control_plane(
    options: &ControlPlaneOptions,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<ControlPlaneRun> {
    let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let started = Instant::now();
    let harness = tokio.block_on(Harness::start(2)).context("e2e test bed")?;
    progress(&format!("etcd and kube-apiserver ready in {:.0} s", started.elapsed().as_secs_f64()));
    let lease = options.lease_seconds;
    let mut replicas = vec![harness.operator(REPLICAS[0], lease)?];
    tokio
        .block_on(wait_for("the first replica to lead", PHASE_TIMEOUT, || async {
            (harness.lease_holder().await.as_deref() == Some(REPLICAS[0])).then_some(())
        }))
        .with_context(|| replicas[0].log_tail())?;
    replicas.push(harness.operator(REPLICAS[1], lease)?);

    // The labels Prometheus' Kubernetes service discovery gives a pod's target.
    let targets: Vec<ScrapeTarget> = replicas
        .iter()
        .map(|r| {
            ScrapeTarget::new(OPERATOR_JOB, r.admin.to_string())
                .label("namespace", NAMESPACE)
                .label("pod", &r.identity)
        })
        .collect();
    let rules = repo_root().join("dashboards/alerts.yaml");
    let prometheus = PrometheusServer::start(&targets, &[rules]).context("prometheus")?;
    progress(&format!("prometheus at {} scraping {} operator replicas", prometheus.url(), targets.len()));
    let mut runner = Runner {
        binary: ninelives_e2e::tools::ninelives()?,
        prometheus,
        markers: Vec::new(),
        alerts_seen: BTreeMap::new(),
        processes: Vec::new(),
    };
    if let Err(e) = runner.prometheus.wait_targets_up(Duration::from_secs(30)) {
        bail!("{e}\n{}", operator_logs(&replicas));
    }
    let start = unix_now();
    let mut leaders = vec![REPLICAS[0].to_string()];
    // Scrapes of the idle operators first: the leader series before any job exists.
    runner.pause(Duration::from_secs(2));

    let mut invalid = job_manifest(INVALID_JOB, 2, 0, 10);
    invalid["spec"]["checkpoint"]["peerCopies"] = 2.into();
    let jobs = [job_manifest(SUCCEEDING_JOB, 2, 0, options.steps), invalid];
    for manifest in jobs {
        tokio.block_on(harness.create_job(manifest))?;
    }
    runner.mark("jobs created");
    for (job, phase) in [
        (INVALID_JOB, JobPhase::Invalid),
        (SUCCEEDING_JOB, JobPhase::Running),
        (SUCCEEDING_JOB, JobPhase::Succeeded),
    ] {
        tokio
            .block_on(harness.wait_job_phase(job, phase, PHASE_TIMEOUT))
            .with_context(|| operator_logs(&replicas))?;
        runner.mark(format!("{job} {phase:?}"));
        progress(&format!("{job} is {phase:?}"));
    }
    // A few more scrapes of the settled state: rate() windows need two samples.
    runner.pause(Duration::from_secs(4));
    let both_running = (start, unix_now());

    if options.fail_over {
        replicas[0].kill();
        runner.mark(format!("{} killed", REPLICAS[0]));
        progress("leader killed; waiting for the standby to take over");
        let deadline = Instant::now() + Duration::from_secs(lease * 4 + 5);
        while tokio.block_on(harness.lease_holder()).as_deref() != Some(REPLICAS[1]) {
            if Instant::now() >= deadline {
                bail!("{} did not take the Lease\n{}", REPLICAS[1], operator_logs(&replicas));
            }
            runner.pause(Duration::from_millis(250));
        }
        runner.mark(format!("{} leads", REPLICAS[1]));
        leaders.push(REPLICAS[1].to_string());
        // The new leader reconciles every job once and its gauges settle.
        runner.pause(Duration::from_secs(5));
    }

    let mut phases = BTreeMap::new();
    for job in [SUCCEEDING_JOB, INVALID_JOB] {
        phases.insert(job.to_string(), tokio.block_on(harness.job_phase(job)));
    }
    let dir = tempfile::Builder::new().prefix("ninelives-control-plane-").tempdir()?;
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    for replica in &replicas {
        std::fs::write(logs.join(format!("{}.log", replica.identity)), replica.log())?;
    }
    let fleet = runner.finish(start, "control-plane run", progress, Some(logs), None, dir)?;
    // Pod processes and the node runner's task stop inside the runtime that runs them.
    let _runtime = tokio.enter();
    drop(replicas);
    drop(harness);
    Ok(ControlPlaneRun { fleet, both_running, leaders, phases })
}

fn operator_logs(replicas: &[OperatorProcess]) -> String {
    replicas
        .iter()
        .map(|r| format!("--- {} ---\n{}", r.identity, r.log_tail()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Metric names of the operator's registry, as the dashboards select them.
pub fn is_operator_metric(name: &str) -> bool {
    name.starts_with("ninelives_operator_")
}
