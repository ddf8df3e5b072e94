//! Placement planner benchmark on the LongCat-2.0 reference job (50,000 chips), against DeepSeek's
//! EPLB algorithm at equal memory.
//!
//! `cargo bench -p ninelives-core --bench placement [-- --zipf <s>[,<s>...]] [-- --runs <n>]`
//!
//! For each Zipf exponent (default 1.0 and 1.2) prints one table: the initial placement and the
//! re-plans after one chip, one node and one rack fail, for ninelives (default options, and
//! without rebalancing) and for EPLB (recomputed on the group's healthy chips). Columns: step
//! inflation (Σ over layers of the most loaded chip / Σ of the mean chip, worst group of the
//! job; what sets the step time), replicas per chip, planner time (median of `runs`), replicas
//! moved and the lower bound (the replicas on the failed chips).

use std::collections::BTreeSet;
use std::time::Instant;

use ninelives_core::manifest::parse_job;
use ninelives_core::placement::{
    ChipId, ExpertLoad, FailedChips, Failure, LoadStats, Placement, PlacementShape, ReplanOptions, Tier,
    initial_placement, replan,
};
use ninelives_core::validate::JobShape;

const MANIFEST: &str = include_str!("../../examples/longcat-2.0.yaml");

fn main() {
    let mut exponents = vec![1.0, 1.2];
    let mut runs = 5;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--zipf" => {
                if let Some(v) = args.next() {
                    exponents = v.split(',').filter_map(|s| s.parse().ok()).collect();
                }
            }
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(runs),
            _ => {} // cargo passes --bench
        }
    }
    let job = match parse_job(MANIFEST) {
        Ok(job) => job,
        Err(v) => return eprintln!("examples/longcat-2.0.yaml is invalid: {v:?}"),
    };
    let shape = match JobShape::resolve(&job.spec) {
        Ok(s) => PlacementShape::from_job(&s, job.spec.failure_policy.min_healthy_fraction),
        Err(v) => return eprintln!("examples/longcat-2.0.yaml is invalid: {v:?}"),
    };
    for s in exponents {
        let load = ExpertLoad::zipf(&shape, s, job.spec.data.seed);
        table(&shape, &load, s, runs);
    }
}

/// One table for one load.
fn table(shape: &PlacementShape, load: &ExpertLoad, zipf: f64, runs: usize) {
    let cpg = shape.chips_per_group() as usize;
    let per_layer = shape.routed_experts as usize + shape.redundant_experts as usize;
    println!(
        "LongCat-2.0: {} chips, {} pipeline stages x {} groups of {} chips, {} layers x {} experts + {} redundant/layer, Zipf s={zipf}, median of {runs} runs",
        shape.chips(),
        shape.pipeline_stages,
        shape.groups_per_stage(),
        cpg,
        shape.layers,
        shape.routed_experts,
        shape.redundant_experts
    );
    println!();
    println!(
        "| planner | scenario | tier | step inflation | replicas/chip (max, mean) | time, ms: median (min) | replicas moved | lower bound | rebalance moves |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|");

    let (ms, initial) = time(runs, || initial_placement(shape, load));
    let initial = match initial {
        Ok(p) => p,
        Err(e) => return eprintln!("initial placement failed: {e}"),
    };
    let stats = LoadStats::measure(shape, &initial, &FailedChips::none(), load);
    let (max, mean) = per_chip(&initial, &FailedChips::none(), shape);
    println!(
        "| ninelives | initial | - | {:.4} | {max}, {mean:.1} | {ms} | - | - | - |",
        stats.step_inflation
    );

    // EPLB at equal memory: the same replicas per layer, one stage's table per call (all groups
    // of a stage see the same load).
    let (ms, eplb) = time(runs, || {
        (0..shape.pipeline_stages).map(|st| eplb_stage(shape, load, st, per_layer, cpg)).collect::<Vec<_>>()
    });
    let eplb_worst = eplb.iter().map(|p| p.inflation).fold(1.0, f64::max);
    let eplb_per_chip =
        eplb[0].chips.iter().map(|layers| layers.iter().map(Vec::len).sum::<usize>()).max().unwrap_or(0);
    println!(
        "| EPLB | initial | - | {eplb_worst:.4} | {eplb_per_chip}, {eplb_per_chip}.0 | {ms} | - | - | - |"
    );

    // Failures in group 5 (nodes 125..150, pipeline stage 0): a chip, a node, and a rack.
    let group = 5;
    let first_node = group * shape.nodes_per_group();
    let rack = shape.domain_of_node(first_node + 5);
    let scenarios = [
        ("1 chip", Failure::Chip(ChipId::new(first_node + 5, 3))),
        ("1 node", Failure::Node(first_node + 5)),
        ("1 rack", Failure::Rack(rack)),
    ];
    for (name, failure) in scenarios {
        let Ok(failed) = FailedChips::from_failures(shape, &[failure]) else {
            return eprintln!("bad failure {failure}");
        };
        let strict = ReplanOptions { rebalance_threshold: f64::INFINITY, ..ReplanOptions::default() };
        let tight = ReplanOptions { rebalance_target: 1.02, ..ReplanOptions::default() };
        let variants = [
            ("ninelives", ReplanOptions::default()),
            ("ninelives, target 1.02", tight),
            ("ninelives, no rebalance", strict),
        ];
        for (planner, options) in variants {
            let (ms, out) = time(runs, || replan(shape, &initial, &failed, load, &options));
            match out {
                Ok(out) => {
                    let p = &out.plan;
                    let (max, mean) =
                        out.placement.as_ref().map_or((0, 0.0), |next| per_chip(next, &failed, shape));
                    println!(
                        "| {planner} | {name} | {} | {:.4} | {max}, {mean:.1} | {ms} | {} | {} | {} |",
                        p.tier.as_str(),
                        p.stats.step_inflation,
                        p.experts_moved,
                        p.lower_bound_experts,
                        p.rebalance_moves
                    );
                    if let Tier::Infeasible { reason } = &p.tier {
                        println!("<!-- {name}: {reason} -->");
                    }
                }
                Err(e) => println!("| {planner} | {name} | error: {e} | | | | | | |"),
            }
        }
        // EPLB recomputed on the group's healthy chips, same replicas per chip.
        let healthy: Vec<usize> = (0..cpg).filter(|&c| !failed.contains(shape.chip_at(group, c))).collect();
        let stage = shape.stage_of_group(group) as usize;
        let replicas = per_layer * healthy.len() / cpg;
        let (ms, next) = time(runs, || eplb_stage(shape, load, stage as u32, replicas, healthy.len()));
        let before = &eplb[stage];
        let lower: usize =
            (0..cpg).filter(|c| !healthy.contains(c)).map(|c| distinct(&before.chips[c])).sum();
        let moved: usize =
            healthy.iter().enumerate().map(|(k, &c)| new_replicas(&before.chips[c], &next.chips[k])).sum();
        // The other groups keep their placement; the job's step is set by the worst group.
        let job_worst = eplb_worst.max(next.inflation);
        println!(
            "| EPLB, recomputed | {name} | - | {job_worst:.4} | {eplb_per_chip}, {eplb_per_chip}.0 | {ms} | {moved} | {lower} | - |"
        );
    }
    println!();
}

/// Wall-clock time of `f`: "median (min)" over `runs` calls, and its last value. The minimum is
/// the better estimate on a machine other builds share.
fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Millis, T) {
    let started = Instant::now();
    let mut value = f();
    let mut times = vec![started.elapsed().as_secs_f64() * 1e3];
    for _ in 1..runs {
        let started = Instant::now();
        value = f();
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    (Millis { median: times[times.len() / 2], min: times[0] }, value)
}

/// A timing: median and minimum in milliseconds.
struct Millis {
    median: f64,
    min: f64,
}

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} ({:.1})", self.median, self.min)
    }
}

/// Most replicas on one healthy chip, and the mean over healthy chips.
fn per_chip(p: &Placement, failed: &FailedChips, shape: &PlacementShape) -> (usize, f64) {
    let (mut max, mut sum, mut n) = (0, 0usize, 0usize);
    for g in &p.groups {
        for (local, hosted) in g.chips.iter().enumerate() {
            if failed.contains(shape.chip_at(g.index, local)) {
                continue;
            }
            max = max.max(hosted.len());
            sum += hosted.len();
            n += 1;
        }
    }
    (max, sum as f64 / n.max(1) as f64)
}

/// EPLB's output for one group: per chip, per layer of the stage, the logical experts of its
/// physical replicas (an expert may appear twice: EPLB does not keep replicas apart).
struct EplbPlacement {
    chips: Vec<Vec<Vec<usize>>>,
    inflation: f64,
}

/// Distinct (layer, expert) pairs on a chip.
fn distinct(chip: &[Vec<usize>]) -> usize {
    chip.iter().map(|layer| layer.iter().collect::<BTreeSet<_>>().len()).sum()
}

/// Distinct replicas on `after` that `before` did not hold (state that must move).
fn new_replicas(before: &[Vec<usize>], after: &[Vec<usize>]) -> usize {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            let had: BTreeSet<_> = b.iter().collect();
            a.iter().collect::<BTreeSet<_>>().difference(&had).count()
        })
        .sum()
}

/// EPLB (DeepSeek, `eplb.py`, from its published description) for the layers of one pipeline
/// stage on `gpus` chips of 8-chip nodes, with `replicas` physical experts per layer.
/// Hierarchical when the experts split into one expert group per node (pack groups to nodes,
/// replicate the heaviest within each node, pack replicas to the node's chips); otherwise the
/// global policy EPLB falls back to (replicate the heaviest over all chips, pack to chips).
fn eplb_stage(
    shape: &PlacementShape,
    load: &ExpertLoad,
    stage: u32,
    replicas: usize,
    gpus: usize,
) -> EplbPlacement {
    let layers = shape.stage_layers(stage);
    let cpn = shape.chips_per_node as usize;
    let nodes = gpus / cpn.max(1);
    let routed = shape.routed_experts as usize;
    let per_gpu = replicas / gpus.max(1);
    let replicas = per_gpu * gpus; // EPLB needs a whole number of replicas per chip
    let mut chips = vec![vec![Vec::new(); layers.len()]; gpus];
    let (mut sum_max, mut sum_mean) = (0.0, 0.0);
    for (l, layer) in layers.enumerate() {
        let w = &load.rows()[layer as usize];
        let hierarchical = nodes > 1 && gpus.is_multiple_of(cpn) && routed.is_multiple_of(nodes);
        let assignment = if hierarchical {
            eplb_hierarchical(w, replicas, nodes, gpus)
        } else {
            eplb_global(w, replicas, gpus)
        };
        let mut gpu_load = vec![0.0; gpus];
        let mut count = vec![0u32; routed];
        for experts in &assignment {
            for &e in experts {
                count[e] += 1;
            }
        }
        for (g, experts) in assignment.into_iter().enumerate() {
            gpu_load[g] = experts.iter().map(|&e| w[e] / f64::from(count[e].max(1))).sum();
            chips[g][l] = experts;
        }
        sum_max += gpu_load.iter().copied().fold(0.0, f64::max);
        sum_mean += gpu_load.iter().sum::<f64>() / gpus.max(1) as f64;
    }
    EplbPlacement { chips, inflation: if sum_mean > 0.0 { sum_max / sum_mean } else { 1.0 } }
}

/// Global policy: replicate the heaviest experts to `replicas`, then balanced packing onto
/// `gpus` chips with `replicas / gpus` replicas each. Returns the experts on each chip.
fn eplb_global(w: &[f64], replicas: usize, gpus: usize) -> Vec<Vec<usize>> {
    let counts = replicate(w, replicas);
    let items: Vec<(f64, usize)> = counts
        .iter()
        .enumerate()
        .flat_map(|(e, &c)| std::iter::repeat_n((w[e] / f64::from(c), e), c as usize))
        .collect();
    let packs = balanced_packing(&items.iter().map(|x| x.0).collect::<Vec<_>>(), gpus);
    let mut out = vec![Vec::new(); gpus];
    for (k, p) in packs.into_iter().enumerate() {
        out[p].push(items[k].1);
    }
    out
}

/// Hierarchical policy: expert groups (one per node, consecutive experts) packed to nodes by
/// weight, replicas of the heaviest experts within each node, balanced packing to its chips.
fn eplb_hierarchical(w: &[f64], replicas: usize, nodes: usize, gpus: usize) -> Vec<Vec<usize>> {
    let per_group = w.len() / nodes;
    let group_weight: Vec<f64> =
        (0..nodes).map(|g| w[g * per_group..(g + 1) * per_group].iter().sum()).collect();
    let node_of_group = balanced_packing(&group_weight, nodes);
    let gpus_per_node = gpus / nodes;
    let mut out = vec![Vec::new(); gpus];
    for node in 0..nodes {
        let experts: Vec<usize> = (0..nodes)
            .filter(|&g| node_of_group[g] == node)
            .flat_map(|g| g * per_group..(g + 1) * per_group)
            .collect();
        let local: Vec<f64> = experts.iter().map(|&e| w[e]).collect();
        for (k, chip) in eplb_global(&local, replicas / nodes, gpus_per_node).into_iter().enumerate() {
            out[node * gpus_per_node + k] = chip.into_iter().map(|i| experts[i]).collect();
        }
    }
    out
}

/// EPLB's `replicate_experts`: every expert once, each extra replica to the expert with the
/// highest load per replica.
fn replicate(w: &[f64], replicas: usize) -> Vec<u32> {
    let mut counts = vec![1u32; w.len()];
    for _ in w.len()..replicas {
        let best = (0..w.len()).max_by(|&a, &b| {
            (w[a] / f64::from(counts[a])).total_cmp(&(w[b] / f64::from(counts[b]))).then(b.cmp(&a))
        });
        if let Some(e) = best {
            counts[e] += 1;
        }
    }
    counts
}

/// EPLB's `balanced_packing`: items heaviest first, each to the lightest pack that still has
/// room, every pack taking exactly `items / packs`. Returns each item's pack.
fn balanced_packing(weights: &[f64], packs: usize) -> Vec<usize> {
    let per_pack = weights.len() / packs.max(1);
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let mut load = vec![0.0f64; packs];
    let mut count = vec![0usize; packs];
    let mut out = vec![0; weights.len()];
    for i in order {
        let p = (0..packs)
            .filter(|&p| count[p] < per_pack)
            .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))
            .unwrap_or(0);
        out[i] = p;
        load[p] += weights[i];
        count[p] += 1;
    }
    out
}
