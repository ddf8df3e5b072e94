//! Placement planner benchmark on the LongCat-2.0 reference job (50,000 chips), Zipf-skewed load.
//!
//! `cargo bench -p ninelives-core --bench placement [-- --zipf <s>] [-- --runs <n>]`
//!
//! Prints one table: the planner (default options, without rebalancing, and deferring lost
//! redundancy) and a simple greedy baseline (incremental re-plan, and rebuild from scratch), for
//! the initial placement and for re-plans after one chip, one node and one rack fail. Times are
//! the median of `runs` runs.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use ninelives_core::manifest::parse_job;
use ninelives_core::placement::{
    ChipId, ExpertId, ExpertLoad, FailedChips, Failure, GroupPlacement, LoadStats, Placement, PlacementShape,
    Redundancy, ReplanOptions, Tier, initial_placement, replan,
};
use ninelives_core::validate::JobShape;

const MANIFEST: &str = include_str!("../../examples/longcat-2.0.yaml");

fn main() {
    let mut zipf = 1.0;
    let mut runs = 7;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--zipf" => zipf = args.next().and_then(|v| v.parse().ok()).unwrap_or(zipf),
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
    let load = ExpertLoad::zipf(&shape, zipf, job.spec.data.seed);
    println!(
        "LongCat-2.0: {} chips, {} groups of {}, {} layers x {} experts + {} redundant/layer, Zipf s={zipf}, median of {runs} runs",
        shape.chips(),
        shape.groups(),
        shape.expert_parallel_size,
        shape.layers,
        shape.routed_experts,
        shape.redundant_experts
    );
    println!();
    println!(
        "| planner | scenario | tier | time (ms) | max/mean load | replicas min | experts moved | lower bound | moved / bound | bytes moved |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|");

    let (initial_ms, initial) = time(runs, || initial_placement(&shape, &load));
    let Ok(initial) = initial else { return eprintln!("initial placement failed: {initial:?}") };
    let stats = LoadStats::measure(&shape, &initial, &FailedChips::none(), &load);
    row("ninelives", "initial", "-", initial_ms, &stats, None);
    let (base_ms, base) = time(runs, || greedy_initial(&shape, &load, &FailedChips::none()));
    let base_stats = LoadStats::measure(&shape, &base, &FailedChips::none(), &load);
    row("greedy", "initial", "-", base_ms, &base_stats, None);

    // Failures in group 1 (nodes 125..250): a chip, a node, and the group's first rack.
    let scenarios = [
        ("1 chip", vec![Failure::Chip(ChipId::new(130, 3))]),
        ("1 node", vec![Failure::Node(130)]),
        ("1 rack", vec![Failure::Rack(5)]),
    ];
    for (name, failures) in scenarios {
        let Ok(failed) = FailedChips::from_failures(&shape, &failures) else {
            return eprintln!("bad failure");
        };
        // The state on the failed chips: what any plan that keeps every replica must move.
        let on_failed: u64 = failed.iter().map(|c| initial.hosted(&shape, c).len() as u64).sum();
        let strict = ReplanOptions { rebalance_threshold: f64::INFINITY, ..ReplanOptions::default() };
        let variants = [
            ("ninelives", ReplanOptions::default()),
            ("ninelives, no rebalance", strict.clone()),
            ("ninelives, defer redundancy", ReplanOptions { redundancy: Redundancy::Defer, ..strict }),
        ];
        for (planner, options) in variants {
            let (ms, out) = time(runs, || replan(&shape, &initial, &failed, &load, &options));
            match out {
                Ok(out) => {
                    let plan = &out.plan;
                    if options.redundancy == Redundancy::Restore && plan.lower_bound_experts != on_failed {
                        eprintln!(
                            "lower bound {} differs from the {on_failed} replicas on the failed chips",
                            plan.lower_bound_experts
                        );
                    }
                    let moved = (plan.experts_moved, plan.lower_bound_experts, plan.bytes_moved);
                    row(planner, name, plan.tier.as_str(), ms, &plan.stats, Some(moved));
                    if let Tier::Infeasible { reason } = &plan.tier {
                        println!("<!-- {name}: {reason} -->");
                    }
                }
                Err(e) => println!("| {planner} | {name} | error: {e} | | | | | | | |"),
            }
        }
        let base_bound: u64 = failed.iter().map(|c| base.hosted(&shape, c).len() as u64).sum();
        let (ms, next) = time(runs, || greedy_replan(&shape, &base, &failed));
        let stats = LoadStats::measure(&shape, &next, &failed, &load);
        let moved = moved_replicas(&base, &next);
        row("greedy", name, "-", ms, &stats, Some((moved, base_bound, moved * shape.expert_state_bytes)));
        let (ms, next) = time(runs, || greedy_initial(&shape, &load, &failed));
        let stats = LoadStats::measure(&shape, &next, &failed, &load);
        let moved = moved_replicas(&base, &next);
        row(
            "greedy, rebuild",
            name,
            "-",
            ms,
            &stats,
            Some((moved, base_bound, moved * shape.expert_state_bytes)),
        );
    }
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let started = Instant::now();
    let mut value = f();
    let mut times = vec![started.elapsed().as_secs_f64() * 1e3];
    for _ in 1..runs {
        let started = Instant::now();
        value = f();
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], value)
}

fn row(planner: &str, scenario: &str, tier: &str, ms: f64, s: &LoadStats, moved: Option<(u64, u64, u64)>) {
    let (moved, bound, ratio, bytes) = match moved {
        Some((m, b, bytes)) => (
            m.to_string(),
            b.to_string(),
            if b == 0 { "-".into() } else { format!("{:.2}", m as f64 / b as f64) },
            format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30)),
        ),
        None => ("-".into(), "-".into(), "-".into(), "-".into()),
    };
    println!(
        "| {planner} | {scenario} | {tier} | {ms:.2} | {:.4} | {} | {moved} | {bound} | {ratio} | {bytes} |",
        s.max_mean_load, s.replicas_min
    );
}

/// Replicas in `next` on a chip that did not hold that expert in `prev` (state that must move).
fn moved_replicas(prev: &Placement, next: &Placement) -> u64 {
    prev.groups
        .iter()
        .zip(&next.groups)
        .flat_map(|(a, b)| a.chips.iter().zip(&b.chips))
        .map(|(old, new)| new.iter().filter(|e| !old.contains(e)).count() as u64)
        .sum()
}

/// The baseline a first implementation would write: give the `redundant` hottest experts of each
/// layer one extra replica, and deal replicas in expert order to the chip holding the fewest
/// replicas (ties: lowest chip), skipping full chips and chips whose failure domain already holds
/// the expert. It balances replica counts, not load.
fn greedy_initial(shape: &PlacementShape, load: &ExpertLoad, failed: &FailedChips) -> Placement {
    let slots = shape.slots_per_chip() as usize;
    let mut groups = Vec::new();
    for g in 0..shape.groups() {
        let size = shape.chips_per_group() as usize;
        let mut chips: Vec<Vec<ExpertId>> = vec![Vec::new(); size];
        let domains = shape.local_domains(g);
        // Min-heap of (replicas held, chip) over healthy chips.
        let mut heap: BinaryHeap<Reverse<(usize, usize)>> =
            (0..size).filter(|&c| !failed.contains(shape.chip_at(g, c))).map(|c| Reverse((0, c))).collect();
        for layer in 0..shape.layers {
            let row = &load.rows()[layer as usize];
            let mut hot: Vec<u32> = (0..shape.routed_experts).collect();
            hot.sort_by(|a, b| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b)));
            hot.truncate(shape.redundant_experts as usize);
            for e in 0..shape.routed_experts {
                let expert = ExpertId::new(layer, e);
                let mut used = Vec::new();
                for _ in 0..if hot.contains(&e) { 2 } else { 1 } {
                    let mut skipped = Vec::new();
                    while let Some(Reverse((n, c))) = heap.pop() {
                        if used.contains(&domains[c]) {
                            skipped.push(Reverse((n, c)));
                            continue;
                        }
                        chips[c].push(expert);
                        used.push(domains[c]);
                        if n + 1 < slots {
                            heap.push(Reverse((n + 1, c)));
                        }
                        break;
                    }
                    heap.extend(skipped);
                }
            }
        }
        groups.push(GroupPlacement { index: g, chips, pending: Vec::new() });
    }
    Placement { generation: 1, groups }
}

/// The baseline's re-plan: each replica on a failed chip goes to the chip with the fewest
/// replicas that can take it (minimal movement, but blind to load).
fn greedy_replan(shape: &PlacementShape, prev: &Placement, failed: &FailedChips) -> Placement {
    let slots = shape.slots_per_chip() as usize;
    let mut next = prev.clone();
    next.generation += 1;
    for group in &mut next.groups {
        let g = group.index;
        let domains = shape.local_domains(g);
        let up: Vec<bool> = (0..group.chips.len()).map(|l| !failed.contains(shape.chip_at(g, l))).collect();
        let lost: Vec<ExpertId> = (0..group.chips.len())
            .filter(|&c| !up[c])
            .flat_map(|c| std::mem::take(&mut group.chips[c]))
            .collect();
        for expert in lost {
            let chips = &mut group.chips;
            let used: Vec<u32> =
                (0..chips.len()).filter(|&c| chips[c].contains(&expert)).map(|c| domains[c]).collect();
            let best = (0..chips.len())
                .filter(|&c| up[c] && chips[c].len() < slots && !used.contains(&domains[c]))
                .min_by_key(|&c| (chips[c].len(), c));
            if let Some(c) = best {
                chips[c].push(expert);
            }
        }
    }
    next
}
