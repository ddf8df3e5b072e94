//! `ninelives simulate MANIFEST`: days of the job's life under a seeded fault trace, for each
//! recovery policy, decided by the real brain (`ninelives_core::simulate`). Prints ETTR per
//! policy side by side, where the rest of the time went, and the cost that dominates; `--json`
//! for the full report, `--chart FILE` for an SVG of where the wall time went.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use ninelives_core::TrainingJobSpec;
use ninelives_core::fault_schedule::FaultKind;
use ninelives_core::manifest::parse_job;
use ninelives_core::simulate::{
    Costs, DEFAULT_MIX, FaultModel, GB, LLAMA3_FAULTS_PER_CHIP_SECOND, Policy, PolicyOutcome, Report,
    SaveMode, SimParams, StateSizes, count_kinds, derived_step_s, simulate_policy, trace_for,
};
use ninelives_core::validate::JobShape;
use serde_json::json;

mod chart;

/// `writeln!` that returns the error, so a closed pipe ends the command instead of panicking.
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {
        writeln!($out, $($arg)*)?
    };
}

/// Arguments of `ninelives simulate`. Durations are `<number>[s|m|h|d]` (seconds without a unit).
#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// TrainingJob manifest.
    manifest: PathBuf,
    /// Simulated wall time, in days.
    #[arg(long, default_value_t = 7.0)]
    days: f64,
    /// Mean time between faults of any kind [default: Llama 3's rate (419 interruptions in 54
    /// days on 16,384 GPUs) scaled to the job's chips].
    #[arg(long, value_name = "DURATION")]
    fault_every: Option<String>,
    /// Weights of the fault kinds, e.g. `chip=0.61,flap=0.03,node=0.21,worker=0.15`
    /// [default: Llama 3's causes; see BENCHMARKS.md].
    #[arg(long, value_name = "KIND=WEIGHT,...")]
    mix: Option<String>,
    /// Override one kind's mean interval (repeatable): `node=30m`.
    #[arg(long = "every", value_name = "KIND=DURATION")]
    every: Vec<String>,
    /// A failed chip or lost node is repaired (back as a spare) after this long.
    #[arg(long, value_name = "DURATION", default_value = "12h")]
    repair: String,
    /// Seed of the fault trace [default: the manifest's data.seed].
    #[arg(long)]
    seed: Option<u64>,
    /// Step time [default: 6 x active parameters x global batch x --train-seq-len tokens over
    /// chips x --chip-tflops x --mfu].
    #[arg(long, value_name = "DURATION")]
    step_time: Option<String>,
    /// Tokens per sequence in pre-training, for the derived step time.
    #[arg(long, default_value_t = 4096)]
    train_seq_len: u64,
    /// Dense bf16 TFLOP/s per chip, for the derived step time.
    #[arg(long, default_value_t = 300.0)]
    chip_tflops: f64,
    /// Model FLOP utilisation, for the derived step time.
    #[arg(long, default_value_t = 0.4)]
    mfu: f64,
    /// Chip fault → visible to the brain [default: 1s, the agents' p99 at 6,250 nodes].
    #[arg(long, value_name = "DURATION")]
    detect_chip: Option<String>,
    /// Node loss → visible [default: the manifest's heartbeatTtlSeconds].
    #[arg(long, value_name = "DURATION")]
    detect_node: Option<String>,
    /// Worker crash → visible [default: 0.12s, measured in the demo].
    #[arg(long, value_name = "DURATION")]
    detect_worker: Option<String>,
    /// Decision → generation applied by every member [default: 0.25s, e2e reroute resume].
    #[arg(long, value_name = "DURATION")]
    commit: Option<String>,
    /// Restarted worker until joined [default: 0.5s, demo].
    #[arg(long, value_name = "DURATION")]
    worker_start: Option<String>,
    /// Spare's member started until joined, before loads [default: 0.5s, e2e].
    #[arg(long, value_name = "DURATION")]
    spare_start: Option<String>,
    /// Checkpoint-restart: reschedule and initialise the whole job, before the checkpoint
    /// load [default: 180s, an assumption].
    #[arg(long, value_name = "DURATION")]
    job_restart: Option<String>,
    /// Checkpoint read rate per chip, GB/s [default: 1.45, worker bench].
    #[arg(long)]
    read_gbps: Option<f64>,
    /// Checkpoint write rate per chip, GB/s [default: 2.1, worker bench].
    #[arg(long)]
    write_gbps: Option<f64>,
    /// Device <-> host copy rate per chip, GB/s [default: 2.3, worker bench save pause].
    #[arg(long)]
    snapshot_gbps: Option<f64>,
    /// Network per node for expert state, GB/s [default: 25, an assumption].
    #[arg(long)]
    link_gbps: Option<f64>,
    /// Pause training for the whole checkpoint write (default: only for the host snapshot).
    #[arg(long)]
    blocking_save: bool,
    /// Steps between peer snapshots.
    #[arg(long, default_value_t = 1)]
    peer_interval: u64,
    /// Run only the policies whose name contains this (repeatable).
    #[arg(long = "policy", value_name = "TEXT")]
    policies: Vec<String>,
    /// Print the full report as JSON.
    #[arg(long)]
    json: bool,
    /// Write an SVG chart of where each policy's wall time went.
    #[arg(long, value_name = "FILE")]
    chart: Option<PathBuf>,
}

/// Runs the command; every problem is a message and exit code 1.
pub fn run(args: &SimulateArgs) -> ExitCode {
    match simulate(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ninelives simulate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One policy's outcome and the wall time it took to simulate.
struct Timed {
    outcome: PolicyOutcome,
    wall_s: f64,
}

fn simulate(args: &SimulateArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.manifest)
        .with_context(|| format!("cannot read {}", args.manifest.display()))?;
    let job = parse_job(&text).map_err(|violations| {
        let lines: Vec<String> = violations.iter().map(ToString::to_string).collect();
        anyhow!("{}: invalid TrainingJob:\n  {}", args.manifest.display(), lines.join("\n  "))
    })?;
    let spec = &job.spec;
    let shape = JobShape::resolve(spec)
        .map_err(|v| anyhow!("{}", v.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")))?;
    let params = params(args, spec, &shape)?;
    let policies = select_policies(args, spec, &shape)?;
    let trace = trace_for(spec, &params);
    let mut timed = Vec::new();
    for policy in &policies {
        let started = Instant::now();
        let outcome = simulate_policy(spec, policy, &params, &trace)
            .with_context(|| format!("policy {:?}", policy.name))?;
        timed.push(Timed { outcome, wall_s: started.elapsed().as_secs_f64() });
    }
    let report = Report {
        params: params.clone(),
        sizes: StateSizes::of(&shape),
        faults: count_kinds(&trace),
        outcomes: timed.iter().map(|t| t.outcome.clone()).collect(),
    };
    if let Some(path) = &args.chart {
        let svg = chart::losses(
            &format!("{}: where the wall time goes", job.metadata.name.as_deref().unwrap_or("job")),
            &report,
        );
        std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let timing: Vec<_> = timed
            .iter()
            .map(|t| json!({"policy": t.outcome.policy.name, "wallSeconds": t.wall_s, "decisions": t.outcome.decisions}))
            .collect();
        let value = json!({"manifest": args.manifest, "report": report, "timing": timing});
        say!(out, "{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    print_text(&mut out, args, (&shape, spec.checkpoint.interval_steps), &report, &timed)
}

fn select_policies(args: &SimulateArgs, spec: &TrainingJobSpec, shape: &JobShape) -> Result<Vec<Policy>> {
    let all = Policy::defaults(shape.model.routed_experts, spec.checkpoint.interval_steps);
    if args.policies.is_empty() {
        return Ok(all);
    }
    let chosen: Vec<Policy> =
        all.into_iter().filter(|p| args.policies.iter().any(|f| p.name.contains(f.as_str()))).collect();
    if chosen.is_empty() {
        bail!("no policy matches {:?}", args.policies);
    }
    Ok(chosen)
}

fn params(args: &SimulateArgs, spec: &TrainingJobSpec, shape: &JobShape) -> Result<SimParams> {
    let step_s = match &args.step_time {
        Some(d) => duration(d)?,
        None => derived_step_s(
            shape,
            u64::from(spec.data.global_batch_size),
            args.train_seq_len,
            args.chip_tflops,
            args.mfu,
        ),
    };
    let mut costs = Costs::measured(step_s, f64::from(spec.failure_policy.heartbeat_ttl_seconds));
    let durations = [
        (&args.detect_chip, &mut costs.detect_chip_s),
        (&args.detect_node, &mut costs.detect_node_s),
        (&args.detect_worker, &mut costs.detect_worker_s),
        (&args.commit, &mut costs.commit_s),
        (&args.worker_start, &mut costs.worker_start_s),
        (&args.spare_start, &mut costs.spare_start_s),
        (&args.job_restart, &mut costs.job_restart_s),
    ];
    for (flag, field) in durations {
        if let Some(d) = flag {
            *field = duration(d)?;
        }
    }
    let rates = [
        (args.read_gbps, &mut costs.read_gbps),
        (args.write_gbps, &mut costs.write_gbps),
        (args.snapshot_gbps, &mut costs.snapshot_gbps),
        (args.link_gbps, &mut costs.link_gbps),
    ];
    for (flag, field) in rates {
        if let Some(v) = flag {
            *field = v;
        }
    }
    if args.blocking_save {
        costs.save = SaveMode::Blocking;
    }
    let mix = match &args.mix {
        Some(m) => parse_mix(m)?,
        None => DEFAULT_MIX.to_vec(),
    };
    let every = match &args.fault_every {
        Some(d) => duration(d)?,
        None => 1.0 / (LLAMA3_FAULTS_PER_CHIP_SECOND * shape.chips() as f64),
    };
    let mut faults = FaultModel::every(every, &mix)?;
    for item in &args.every {
        let (kind, d) =
            item.split_once('=').ok_or_else(|| anyhow!("--every {item:?}: expected KIND=DURATION"))?;
        faults.mean_interval_s.insert(fault_kind(kind)?, duration(d)?);
    }
    faults.repair_s = duration(&args.repair)?;
    let params = SimParams {
        horizon_s: args.days * 86_400.0,
        seed: args.seed.unwrap_or(spec.data.seed),
        costs,
        faults,
        peer_interval_steps: args.peer_interval,
        samples: 200,
    };
    params.validate()?;
    Ok(params)
}

/// `90`, `90s`, `5m`, `12h`, `1.5d` → seconds.
fn duration(text: &str) -> Result<f64> {
    let t = text.trim();
    let (number, scale) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1.0),
        Some((i, 'm')) => (&t[..i], 60.0),
        Some((i, 'h')) => (&t[..i], 3600.0),
        Some((i, 'd')) => (&t[..i], 86_400.0),
        _ => (t, 1.0),
    };
    let v: f64 =
        number.parse().map_err(|_| anyhow!("{text:?} is not a duration (e.g. 30s, 5m, 12h, 1.5d)"))?;
    if !v.is_finite() || v < 0.0 {
        bail!("{text:?} is not a duration ≥ 0");
    }
    Ok(v * scale)
}

fn fault_kind(text: &str) -> Result<FaultKind> {
    Ok(match text.trim() {
        "chip" => FaultKind::Chip,
        "flap" => FaultKind::Flap,
        "node" => FaultKind::Node,
        "worker" => FaultKind::Worker,
        other => bail!("unknown fault kind {other:?} (chip, flap, node, worker)"),
    })
}

fn parse_mix(text: &str) -> Result<Vec<(FaultKind, f64)>> {
    text.split(',')
        .map(|item| {
            let (kind, w) =
                item.split_once('=').ok_or_else(|| anyhow!("--mix {item:?}: expected KIND=WEIGHT"))?;
            let w: f64 = w.trim().parse().map_err(|_| anyhow!("--mix {item:?}: weight is not a number"))?;
            Ok((fault_kind(kind)?, w))
        })
        .collect()
}

fn print_text(
    out: &mut impl Write,
    args: &SimulateArgs,
    (shape, interval): (&JobShape, u64),
    report: &Report,
    timed: &[Timed],
) -> Result<()> {
    let p = &report.params;
    let c = &p.costs;
    let s = &report.sizes;
    let total: u64 = report.faults.values().sum();
    let kinds: Vec<String> = report.faults.iter().map(|(k, n)| format!("{k} {n}")).collect();
    say!(
        out,
        "{}: {} nodes x {} chips, {} days of wall time, seed {}",
        args.manifest.display(),
        shape.nodes,
        shape.chips_per_node,
        args.days,
        p.seed
    );
    say!(
        out,
        "faults: {total} ({}), one every {} on average; repaired after {}",
        kinds.join(", "),
        human_s(p.faults.overall_interval_s()),
        human_s(p.faults.repair_s)
    );
    say!(
        out,
        "step {:.2} s; state per chip {:.1} GB (experts {:.1}, dense {:.1}); checkpoint every {} steps ({}), pause {:.1} s; peer snapshot lag {:.1} s",
        c.step_s,
        s.bytes_per_chip() / GB,
        s.expert_bytes_per_chip() / GB,
        s.dense_bytes_per_chip / GB,
        interval,
        match c.save {
            SaveMode::Async => "async",
            SaveMode::Blocking => "blocking",
        },
        pause_s(c, s),
        (s.bytes_per_chip() / (c.snapshot_gbps * GB))
            .max(s.expert_bytes_per_chip() * f64::from(s.chips_per_node) / (c.link_gbps * GB)),
    );
    say!(out, "");
    say!(
        out,
        "{:<56} {:>7} {:>9} {:>6} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}  tiers (count, mean s)",
        "policy",
        "ETTR",
        "steps/h",
        "faults",
        "steps lost",
        "detect %",
        "recover %",
        "lost %",
        "ckpt %",
        "dead %"
    );
    for o in &report.outcomes {
        let pct = |v: f64| 100.0 * v / p.horizon_s;
        let tiers: Vec<String> = o
            .tiers
            .iter()
            .map(|(t, v)| format!("{t} {} ({:.1})", v.count, v.seconds / v.count.max(1) as f64))
            .collect();
        say!(
            out,
            "{:<56} {:>7.4} {:>9.1} {:>6} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}  {}",
            o.policy.name,
            o.ettr,
            o.goodput_steps_per_hour,
            o.interruptions,
            o.steps_lost,
            pct(o.detection_s),
            pct(o.recovery_s()),
            pct(o.lost_work_s),
            pct(o.checkpoint_pause_s),
            pct(o.dead_s),
            tiers.join(", ")
        );
        if let Some(why) = &o.job_failed {
            say!(out, "{:<56} job failed: {why}", "");
        }
    }
    say!(out, "");
    print_verdict(out, report, timed)
}

fn pause_s(c: &Costs, s: &StateSizes) -> f64 {
    let snap = s.bytes_per_chip() / (c.snapshot_gbps * GB);
    match c.save {
        SaveMode::Async => snap,
        SaveMode::Blocking => snap + s.bytes_per_chip() / (c.write_gbps * GB),
    }
}

fn print_verdict(out: &mut impl Write, report: &Report, timed: &[Timed]) -> Result<()> {
    let baseline = report.outcomes.iter().find(|o| o.policy.name == "checkpoint-restart");
    let best = report
        .outcomes
        .iter()
        .filter(|o| o.policy.name.starts_with("ninelives"))
        .max_by(|a, b| a.ettr.total_cmp(&b.ettr));
    if let (Some(base), Some(best)) = (baseline, best) {
        say!(
            out,
            "checkpoint-restart {:.4} vs best ninelives ({}) {:.4}: {:.1}x less time lost",
            base.ettr,
            best.policy.name,
            best.ettr,
            (1.0 - base.ettr) / (1.0 - best.ettr).max(1e-12)
        );
    }
    if let Some(best) = best {
        let h = report.params.horizon_s;
        let losses: Vec<String> =
            best.losses().iter().map(|(what, s)| format!("{what} {:.2}%", 100.0 * s / h)).collect();
        let target = if best.ettr >= 0.97 { "meets" } else { "misses" };
        say!(out, "best ninelives {target} ETTR 0.97; its losses, largest first: {}", losses.join(", "));
    }
    let mut per_call: BTreeMap<&str, f64> = BTreeMap::new();
    for t in timed.iter().filter(|t| t.outcome.decisions > 0) {
        per_call.insert(&t.outcome.policy.name, 1e3 * t.wall_s / t.outcome.decisions as f64);
    }
    let worst = per_call.values().copied().fold(0.0_f64, f64::max);
    let total: f64 = timed.iter().map(|t| t.wall_s).sum();
    say!(
        out,
        "simulated in {total:.1} s of wall time; {} decide calls, at most {worst:.1} ms per call (simulation included)",
        timed.iter().map(|t| t.outcome.decisions).sum::<u64>()
    );
    Ok(())
}

fn human_s(s: f64) -> String {
    if s >= 86_400.0 {
        format!("{:.1}d", s / 86_400.0)
    } else if s >= 3600.0 {
        format!("{:.1}h", s / 3600.0)
    } else if s >= 60.0 {
        format!("{:.1}m", s / 60.0)
    } else {
        format!("{s:.1}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_mixes_parse_and_garbage_is_an_error() {
        let secs: Vec<f64> =
            ["90", "30s", "5m", "12h", "1.5d"].iter().filter_map(|d| duration(d).ok()).collect();
        assert_eq!(secs, [90.0, 30.0, 300.0, 43_200.0, 129_600.0]);
        for bad in ["", "m", "-5m", "five", "NaNs"] {
            assert!(duration(bad).is_err(), "{bad:?}");
        }
        let mix = parse_mix("chip=3,node=1").ok();
        assert_eq!(mix, Some(vec![(FaultKind::Chip, 3.0), (FaultKind::Node, 1.0)]));
        assert!(parse_mix("rack=1").is_err() && parse_mix("chip").is_err());
    }
}
