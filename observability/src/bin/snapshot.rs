//! Runs the fleet, the demo and the control plane under a real Prometheus
//! ([`ninelives_observability::fleet`]), evaluates every dashboard query, and writes a PNG per
//! panel that returned data (from the fleet run, else from the demo run, else from the
//! control-plane run), plus an index, to `docs/dashboards/` (or the directory given as the first
//! argument).
//!
//! `cargo run -p ninelives-observability --bin snapshot [OUT_DIR]`

use std::path::PathBuf;
use std::process::ExitCode;

use ninelives_observability::dashboard::{Dashboard, Origin, legend};
use ninelives_observability::fleet::{self, ControlPlaneOptions, Evaluation, FleetOptions};
use ninelives_observability::render::{Line, PanelImage, write_png};
use ninelives_observability::repo_root;

/// (dashboard slug, dashboard title, panel title).
type PanelKey = (String, String, String);

/// At most this many lines per image; all-zero lines go first when there are more.
const MAX_LINES: usize = 8;

fn slug(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapshot: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let out_dir =
        std::env::args_os().nth(1).map_or_else(|| repo_root().join("docs/dashboards"), PathBuf::from);
    std::fs::create_dir_all(&out_dir)?;
    let dashboards = Dashboard::load_dir(&repo_root().join("dashboards"))?;
    let run = fleet::run(&FleetOptions::default(), &mut |line| eprintln!("snapshot: {line}"))?;
    let evaluations = fleet::evaluate(&run, &dashboards);
    let mut index = format!(
        "# Dashboard snapshots\n\nPanels of `dashboards/*.json` rendered from three real runs (`cargo run -p \
         ninelives-observability --bin snapshot`), each scraped every second by Prometheus; every panel query \
         ran through Prometheus' HTTP API with the dashboard variables at \"All\". Red lines mark events.\n\n\
         **Fleet run**: etcd, three node agents on simulated chips, a `tiny` training worker; two ECC errors \
         (node-0), a slow chip and a hang (node-1) injected, the worker killed and resumed from its \
         checkpoint, node-2's agent killed.\n\n\
         **Demo run** (panels the fleet run has no data for): the driver of `ninelives demo` with the recovery \
         brain on `tiny` (4 nodes x 8 chips + a spare), {steps} steps, checkpoints every 4; two ECC errors on node 0, \
         a hang on node 1, node 2 lost, a worker crash — the red lines are the faults and the recoveries.\n\n\
         **Control-plane run** (the operator panels): the e2e test bed (etcd, kube-apiserver, pods run as local \
         processes) with two `ninelives operator` replicas, {a} leading and {b} on standby; TrainingJob \
         `{ok}` ({cp_steps} steps of the stand-in worker on 2 nodes) runs to Succeeded and `{bad}` is marked \
         Invalid; then {a} is killed and {b} takes the leader Lease.\n\n",
        steps = fleet::DemoOptions::default().steps,
        a = fleet::REPLICAS[0],
        b = fleet::REPLICAS[1],
        ok = fleet::SUCCEEDING_JOB,
        bad = fleet::INVALID_JOB,
        cp_steps = ControlPlaneOptions::default().steps,
    );
    let mut empty = render(&run, &evaluations, &dashboards, &out_dir, None, &mut index)?;
    let demo = fleet::demo(&fleet::DemoOptions::default(), &mut |line| eprintln!("snapshot: demo: {line}"))?;
    let demo_evaluations = fleet::evaluate(&demo.fleet, &dashboards);
    index.push_str("# From the demo run\n\n");
    empty = render(&demo.fleet, &demo_evaluations, &dashboards, &out_dir, Some(&empty), &mut index)?;
    let cp = fleet::control_plane(&ControlPlaneOptions::default(), &mut |line| {
        eprintln!("snapshot: control plane: {line}");
    })?;
    let cp_evaluations = fleet::evaluate(&cp.fleet, &dashboards);
    index.push_str("# From the control-plane run\n\n");
    empty = render(&cp.fleet, &cp_evaluations, &dashboards, &out_dir, Some(&empty), &mut index)?;
    index.push_str("## Panels without data in any run\n\n");
    for p in &empty {
        index.push_str(&format!("- {p}\n"));
    }
    let mut alerts: Vec<String> = run.alerts_seen.iter().map(|(a, s)| format!("{a} ({s})")).collect();
    alerts.extend(demo.fleet.alerts_seen.iter().map(|(a, s)| format!("{a} ({s}, demo run)")));
    alerts.extend(cp.fleet.alerts_seen.iter().map(|(a, s)| format!("{a} ({s}, control-plane run)")));
    alerts.sort();
    index.push_str(&format!("\nAlerts seen pending or firing during the runs: {}.\n", alerts.join(", ")));
    std::fs::write(out_dir.join("README.md"), index)?;
    for (name, list) in
        [("fleet", &evaluations), ("demo", &demo_evaluations), ("control-plane", &cp_evaluations)]
    {
        let with_data = list.iter().filter(|e| e.has_data()).count();
        eprintln!("snapshot: {name} run: {} queries, {with_data} with data", list.len());
    }
    eprintln!("snapshot: alerts seen: {alerts:?}");
    Ok(())
}

/// Renders every panel of `evaluations` that has data (only those named in `only`, as
/// "dashboard title / panel", when given) and appends it to `index`; returns the panels without
/// data.
fn render(
    run: &fleet::FleetRun,
    evaluations: &[Evaluation],
    dashboards: &[Dashboard],
    out_dir: &std::path::Path,
    only: Option<&[String]>,
    index: &mut String,
) -> anyhow::Result<Vec<String>> {
    // Panel → its evaluations, in dashboard order.
    let mut panels: Vec<(PanelKey, Vec<&Evaluation>)> = Vec::new();
    for e in evaluations {
        let Origin::Panel { title, .. } = &e.query.origin else { continue };
        let title_of =
            |d: &str| dashboards.iter().find(|x| x.slug() == d).map(|x| x.title.clone()).unwrap_or_default();
        let key = (e.dashboard.clone(), title_of(&e.dashboard), title.clone());
        match panels.iter_mut().find(|(k, _)| *k == key) {
            Some((_, list)) => list.push(e),
            None => panels.push((key, vec![e])),
        }
    }
    let markers: Vec<(f64, String)> = run.markers.iter().map(|(t, m)| (t - run.start, m.clone())).collect();
    let mut empty = Vec::new();
    for ((dashboard, dashboard_title, panel), list) in &panels {
        let name = format!("{dashboard_title} / {panel}");
        if only.is_some_and(|o| !o.contains(&name)) {
            continue;
        }
        let mut lines = Vec::new();
        for e in list {
            let Ok(series) = &e.result else { continue };
            for s in series {
                let points: Vec<(f64, f64)> = s.samples.iter().map(|(t, v)| (t - run.start, *v)).collect();
                if points.iter().any(|(_, v)| v.is_finite()) {
                    lines.push(Line { label: legend(&e.query.legend, &s.labels), points });
                }
            }
        }
        if lines.is_empty() {
            empty.push(name);
            continue;
        }
        let mut title = format!("{} / {panel}", dashboard_title.trim_start_matches("ninelives / "));
        if lines.len() > MAX_LINES {
            lines.sort_by_key(|l| l.points.iter().all(|(_, v)| *v == 0.0 || !v.is_finite()));
            title.push_str(&format!(" (first {MAX_LINES} of {} series)", lines.len()));
            lines.truncate(MAX_LINES);
        }
        let unit = dashboards
            .iter()
            .find(|d| &d.slug() == dashboard)
            .and_then(|d| panel_unit(&d.json, panel))
            .unwrap_or_default();
        let file = format!("{dashboard}--{}.png", slug(panel));
        write_png(&PanelImage { title, unit, lines, markers: markers.clone() }, &out_dir.join(&file))?;
        let exprs: Vec<String> =
            list.iter().map(|e| format!("`{}`", e.query.expr.replace('|', "\\|"))).collect();
        index.push_str(&format!(
            "## {dashboard_title} — {panel}\n\n![{panel}]({file})\n\n{}\n\n",
            exprs.join("<br>")
        ));
        eprintln!("snapshot: wrote {file}");
    }
    Ok(empty)
}

fn panel_unit(json: &serde_json::Value, title: &str) -> Option<String> {
    json["panels"]
        .as_array()?
        .iter()
        .find(|p| p["title"] == title)
        .and_then(|p| p["fieldConfig"]["defaults"]["unit"].as_str())
        .map(str::to_string)
}
