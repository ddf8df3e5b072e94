//! Runs the fleet under a real Prometheus ([`ninelives_observability::fleet`]), evaluates every
//! dashboard query, and writes a PNG per panel that returned data, plus an index, to
//! `docs/dashboards/` (or the directory given as the first argument).
//!
//! `cargo run -p ninelives-observability --bin snapshot [OUT_DIR]`

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use ninelives_observability::dashboard::{Dashboard, Origin, legend};
use ninelives_observability::fleet::{self, Evaluation, FleetOptions};
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

    // Panel → its evaluations, in dashboard order.
    let mut panels: Vec<(PanelKey, Vec<&Evaluation>)> = Vec::new();
    for e in &evaluations {
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
    let mut index = String::from(
        "# Dashboard snapshots\n\nPanels of `dashboards/*.json` rendered from a real run: `cargo run -p \
         ninelives-observability --bin snapshot` starts etcd, three node agents on simulated chips, a `tiny` \
         training worker and Prometheus (1 s scrape), injects two ECC errors (node-0), a slow chip and a hang \
         (node-1), stops the worker and resumes it from its checkpoint, and kills node-2's agent. Red lines mark \
         those events. Every panel query ran through Prometheus' HTTP API with the dashboard variables at \
         \"All\"; panels whose metrics no process of this run exports (the operator, the recovery brain) are \
         listed at the end.\n\n",
    );
    let mut empty = Vec::new();
    for ((dashboard, dashboard_title, panel), list) in &panels {
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
            empty.push(format!("{dashboard_title} / {panel}"));
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
    index.push_str("## Panels without data in this run\n\n");
    for p in &empty {
        index.push_str(&format!("- {p}\n"));
    }
    let mut alerts: Vec<String> = run.alerts_seen.iter().map(|(a, s)| format!("{a} ({s})")).collect();
    alerts.sort();
    index.push_str(&format!("\nAlerts seen pending or firing during the run: {}.\n", alerts.join(", ")));
    std::fs::write(out_dir.join("README.md"), index)?;
    let counts: BTreeMap<bool, usize> = evaluations.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e.has_data()).or_default() += 1;
        m
    });
    eprintln!(
        "snapshot: {} queries, {} with data; alerts seen: {alerts:?}",
        evaluations.len(),
        counts.get(&true).copied().unwrap_or(0)
    );
    Ok(())
}

fn panel_unit(json: &serde_json::Value, title: &str) -> Option<String> {
    json["panels"]
        .as_array()?
        .iter()
        .find(|p| p["title"] == title)
        .and_then(|p| p["fieldConfig"]["defaults"]["unit"].as_str())
        .map(str::to_string)
}
