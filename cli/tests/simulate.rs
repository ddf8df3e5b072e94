//! `ninelives simulate` as a user runs it: every policy's ETTR side by side, the same numbers as
//! JSON, a chart, and clear errors for bad flags.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn simulate(args: &[&str]) -> Output {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    Command::new(env!("CARGO_BIN_EXE_ninelives"))
        .current_dir(root)
        .arg("simulate")
        .args(args)
        .output()
        .expect("the ninelives binary runs")
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = simulate(&[args, &["--json"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_policy_gets_an_ettr_and_the_baseline_sits_beside_ninelives() {
    let chart = tempfile::NamedTempFile::new().unwrap();
    let chart_path = chart.path().to_str().unwrap();
    let args =
        ["examples/tiny.yaml", "--fault-every", "2h", "--days", "0.5", "--step-time", "2s", "--seed", "3"];
    let out = simulate(&[&args[..], &["--chart", chart_path]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let v = json(&args);
    let outcomes = v["report"]["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 8, "{v}");
    for o in outcomes {
        let name = o["policy"]["name"].as_str().unwrap();
        let ettr = o["ettr"].as_f64().unwrap();
        assert!(ettr > 0.0 && ettr <= 1.0, "{name}: {ettr}");
        // The text table has the same row, with the same ETTR.
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in {text}"));
        assert!(row.contains(&format!("{ettr:.4}")), "{row} vs {ettr}");
    }
    assert!(text.contains("checkpoint-restart ") && text.contains(" vs best ninelives ("), "{text}");
    let svg = std::fs::read_to_string(chart.path()).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("checkpoint-restart") && svg.contains("ETTR"));
    // Same seed, same trace, same numbers.
    assert_eq!(json(&args)["report"], v["report"]);
}

#[test]
fn the_reference_layout_runs_the_real_brain_and_peer_copies_beat_checkpoint_restart() {
    let v = json(&[
        "examples/longcat-2.0.yaml",
        "--fault-every",
        "5m",
        "--days",
        "0.03",
        "--policy",
        "checkpoint-restart",
        "--policy",
        "ninelives, peer copies, every expert x2",
    ]);
    let outcomes = v["report"]["outcomes"].as_array().unwrap();
    let ettr = |name: &str| {
        let o = outcomes.iter().find(|o| o["policy"]["name"] == name).unwrap();
        (o["ettr"].as_f64().unwrap(), o["decisions"].as_u64().unwrap())
    };
    let (baseline, no_decisions) = ettr("checkpoint-restart");
    let (ninelives, decisions) = ettr("ninelives, peer copies, every expert x2");
    assert_eq!(no_decisions, 0);
    assert!(decisions > 2, "the brain decided every fault: {decisions}");
    assert!(ninelives > baseline, "{ninelives} vs {baseline}");
}

#[test]
fn bad_flags_are_errors_not_panics() {
    for bad in [
        vec!["examples/tiny.yaml", "--fault-every", "soon"],
        vec!["examples/tiny.yaml", "--mix", "rack=1"],
        vec!["examples/tiny.yaml", "--read-gbps", "0"],
        vec!["examples/tiny.yaml", "--policy", "no such policy"],
        vec!["/nonexistent.yaml"],
    ] {
        let out = simulate(&bad);
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("ninelives simulate: "), "{bad:?}");
    }
}
