//! `ninelives plan MANIFEST [--fail ...] [--load zipf:<s> | --load FILE] [--json]
//! [--placement-out FILE]`
//!
//! Plans the initial expert placement of a job, applies the given failures, and prints the
//! recovery plan the operator would publish, step inflation first (the objective: Σ over layers
//! of the most loaded chip over Σ of the mean, worst group). `--load FILE` reads a JSON array
//! with one array per layer of tokens routed to each routed expert: `[[120.0, 3.5, ...], ...]`.
//! `--placement-out FILE` writes the shape, the load and both placements as JSON.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ninelives_core::manifest::parse_job;
use ninelives_core::placement::{
    ExpertLoad, FailedChips, Failure, LoadStats, PlacementShape, Redundancy, ReplanOptions, Source, Tier,
    initial_placement, replan,
};
use ninelives_core::validate::{JobShape, human_bytes};
use serde_json::json;

/// `writeln!` that returns the error, so a closed pipe ends the command instead of panicking.
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {
        writeln!($out, $($arg)*)?
    };
}

/// Arguments of `ninelives plan`.
pub struct PlanArgs {
    /// The TrainingJob manifest.
    pub manifest: PathBuf,
    /// Failures, as `chip:<node>/<chip>`, `node:<node>` or `rack:<rack>`.
    pub fail: Vec<String>,
    /// `zipf:<s>` or a load file; uniform when absent.
    pub load: Option<String>,
    /// Print one JSON object instead of text.
    pub json: bool,
    /// Re-create only experts left without any replica.
    pub defer_redundancy: bool,
    /// Rebalance every group.
    pub rebalance: bool,
    /// Never rebalance.
    pub no_rebalance: bool,
    /// Where to write the initial and re-planned placements as JSON.
    pub placement_out: Option<PathBuf>,
}

/// Runs the command; every problem is a message and exit code 1.
pub fn run(args: &PlanArgs) -> ExitCode {
    match plan(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ninelives plan: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn plan(args: &PlanArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.manifest)
        .with_context(|| format!("cannot read {}", args.manifest.display()))?;
    let job = parse_job(&text).map_err(|violations| {
        let lines: Vec<String> = violations.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("{}: invalid TrainingJob:\n  {}", args.manifest.display(), lines.join("\n  "))
    })?;
    let job_shape = JobShape::resolve(&job.spec).map_err(|v| {
        anyhow::anyhow!(
            "{}: {}",
            args.manifest.display(),
            v.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
        )
    })?;
    let shape = PlacementShape::from_job(&job_shape, job.spec.failure_policy.min_healthy_fraction);
    let load = match &args.load {
        None => ExpertLoad::uniform(&shape),
        Some(spec) => read_load(spec, &shape, job.spec.data.seed)?,
    };
    let failures = args.fail.iter().map(|f| f.parse::<Failure>()).collect::<Result<Vec<_>, _>>()?;
    let failed = FailedChips::from_failures(&shape, &failures)?;

    let started = Instant::now();
    let initial = initial_placement(&shape, &load)?;
    let initial_ms = started.elapsed().as_secs_f64() * 1e3;
    let options = ReplanOptions {
        redundancy: if args.defer_redundancy { Redundancy::Defer } else { Redundancy::Restore },
        rebalance: args.rebalance,
        rebalance_threshold: if args.no_rebalance {
            f64::INFINITY
        } else {
            ReplanOptions::default().rebalance_threshold
        },
        ..ReplanOptions::default()
    };
    let started = Instant::now();
    let replanned = replan(&shape, &initial, &failed, &load, &options)?;
    let plan_ms = started.elapsed().as_secs_f64() * 1e3;
    let plan = &replanned.plan;
    if let Some(path) = &args.placement_out {
        let value = json!({
            "shape": shape,
            "load": load,
            "initial": initial,
            "replanned": replanned.placement,
            "failed": failed,
        });
        std::fs::write(path, serde_json::to_vec(&value)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let initial_stats = LoadStats::measure(&shape, &initial, &FailedChips::none(), &load);
    let mut out = std::io::stdout().lock();
    let reason = match &plan.tier {
        Tier::Infeasible { reason } => Some(reason.to_string()),
        _ => None,
    };

    if args.json {
        let value = json!({
            "job": job.metadata.name,
            "tier": plan.tier.as_str(),
            "reason": reason,
            "step_inflation": plan.stats.step_inflation,
            "stage_step_inflation": plan.stats.stage_step_inflation,
            "worst_group": plan.stats.worst_group,
            "initial_step_inflation": initial_stats.step_inflation,
            "initial_stage_step_inflation": initial_stats.stage_step_inflation,
            "generation": plan.generation,
            "initial_ms": initial_ms,
            "plan_ms": plan_ms,
            "failed_chips": failed.len(),
            "experts_moved": plan.experts_moved,
            "bytes_moved": plan.bytes_moved,
            "lower_bound_experts": plan.lower_bound_experts,
            "lower_bound_bytes": plan.lower_bound_bytes,
            "checkpoint_loads": plan.checkpoint_loads().count(),
            "rebalance_moves": plan.rebalance_moves,
            "dropped": plan.dropped.len(),
            "evicted": plan.evicted.len(),
            "merged": plan.merged.len(),
            "max_mean_load": plan.stats.max_mean_load,
            "replicas_min": plan.stats.replicas_min,
            "live_replicas_min": plan.stats.live_replicas_min,
            "groups": plan.groups,
            "moves": plan.moves,
        });
        say!(out, "{value}");
        return Ok(());
    }

    let m = &shape;
    say!(
        out,
        "step inflation: initial {:.4}, after the failures {:.4} (worst group {}; per stage worst: {})",
        initial_stats.step_inflation,
        plan.stats.step_inflation,
        plan.stats.worst_group,
        stage_list(&plan.stats.stage_step_inflation)
    );
    say!(
        out,
        "{}: {} pipeline stages x {} expert-parallel groups of {} chips, {} layers x {} routed experts (+{} redundant per layer), {} per replica",
        job.metadata.name.as_deref().unwrap_or("job"),
        m.pipeline_stages,
        m.groups_per_stage(),
        m.expert_parallel_size,
        m.layers,
        m.routed_experts,
        m.redundant_experts,
        human_bytes(m.expert_state_bytes)
    );
    say!(
        out,
        "initial placement: generation {} in {initial_ms:.1} ms, step inflation {:.4}, max/mean chip load {:.4}, replicas per expert >= {}",
        initial.generation,
        initial_stats.step_inflation,
        initial_stats.max_mean_load,
        initial_stats.replicas_min
    );
    let named: Vec<String> = failures.iter().map(ToString::to_string).collect();
    say!(
        out,
        "failures: {} ({} chips)",
        if named.is_empty() { "none".into() } else { named.join(", ") },
        failed.len()
    );
    match &reason {
        Some(r) => say!(out, "plan: infeasible in {plan_ms:.2} ms: {r}"),
        None => say!(out, "plan: {}, generation {} in {plan_ms:.2} ms", plan.tier.as_str(), plan.generation),
    }
    say!(
        out,
        "  moved {} replicas ({}); lower bound {} ({}); {} from checkpoint, {} rebalance moves",
        plan.experts_moved,
        human_bytes(plan.bytes_moved),
        plan.lower_bound_experts,
        human_bytes(plan.lower_bound_bytes),
        plan.checkpoint_loads().count(),
        plan.rebalance_moves
    );
    say!(
        out,
        "  step inflation {:.4}, max/mean chip load {:.4}, replicas per expert >= {} (live >= {}), {} dropped, {} evicted, {} merged",
        plan.stats.step_inflation,
        plan.stats.max_mean_load,
        plan.stats.replicas_min,
        plan.stats.live_replicas_min,
        plan.dropped.len(),
        plan.evicted.len(),
        plan.merged.len()
    );
    const SHOWN: usize = 10;
    for mv in plan.moves.iter().take(SHOWN) {
        let from = match mv.source {
            Source::Peer(c) => format!("peer {c}"),
            Source::Checkpoint => "checkpoint".into(),
        };
        say!(out, "  load {} onto {} from {from}", mv.expert, mv.to);
    }
    if plan.moves.len() > SHOWN {
        say!(out, "  ... and {} more (--json lists all)", plan.moves.len() - SHOWN);
    }
    Ok(())
}

/// Per-stage figures as `1.0123 1.0210 ...` (at most the first 12, then `...`).
fn stage_list(stages: &[f64]) -> String {
    const SHOWN: usize = 12;
    let mut parts: Vec<String> = stages.iter().take(SHOWN).map(|s| format!("{s:.4}")).collect();
    if stages.len() > SHOWN {
        parts.push("...".into());
    }
    parts.join(" ")
}

/// `zipf:<s>` (seeded with the job's data seed) or a JSON load file.
fn read_load(spec: &str, shape: &PlacementShape, seed: u64) -> Result<ExpertLoad> {
    if let Some(s) = spec.strip_prefix("zipf:") {
        let s: f64 = s.parse().with_context(|| format!("--load {spec}: exponent is not a number"))?;
        if !s.is_finite() || s < 0.0 {
            bail!("--load {spec}: the Zipf exponent must be finite and non-negative");
        }
        return Ok(ExpertLoad::zipf(shape, s, seed));
    }
    let path = Path::new(spec);
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read load file {spec}"))?;
    let load: ExpertLoad = serde_json::from_str(&text)
        .with_context(|| format!("{spec}: expected a JSON array of per-layer arrays of expert loads"))?;
    load.validate(shape).with_context(|| spec.to_string())?;
    Ok(load)
}
