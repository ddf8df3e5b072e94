//! `ninelives plan` as a script uses it: JSON on stdout, errors on stderr with exit code 1.

use std::process::{Command, Output};

fn plan(args: &[&str]) -> Output {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    Command::new(env!("CARGO_BIN_EXE_ninelives"))
        .current_dir(root)
        .arg("plan")
        .args(args)
        .output()
        .expect("the ninelives binary runs")
}

#[test]
fn json_reports_the_plan_of_a_node_failure() {
    let out = plan(&["examples/tiny.yaml", "--fail", "node:1", "--load", "zipf:1.2", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["tier", "plan_ms", "experts_moved", "bytes_moved", "max_mean_load", "replicas_min"] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert!(["reroute", "reshard"].contains(&v["tier"].as_str().unwrap()), "{v}");
    assert_eq!(v["failed_chips"], 8);
    // Tiny: 4 layers x (8 + 2 redundant) replicas over 32 chips; node 1 held a quarter of them.
    assert!(v["experts_moved"].as_u64().unwrap() >= v["lower_bound_experts"].as_u64().unwrap());
    assert!(v["replicas_min"].as_u64().unwrap() >= 1);
}

#[test]
fn without_rebalance_movement_is_the_lower_bound() {
    for policy in [None, Some("--defer-redundancy")] {
        let mut args =
            vec!["examples/tiny.yaml", "--fail", "chip:2/3", "--fail", "node:0", "--load", "zipf:1.5"];
        args.extend(policy);
        args.extend(["--no-rebalance", "--json"]);
        let out = plan(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["rebalance_moves"], 0, "{v}");
        assert!(v["lower_bound_bytes"].as_u64().unwrap() > 0, "{v}");
        let short = v["dropped"].as_u64().unwrap() + v["evicted"].as_u64().unwrap();
        if short == 0 {
            assert_eq!(v["bytes_moved"], v["lower_bound_bytes"], "{v}");
        }
    }
}

#[test]
fn bad_input_is_a_message_and_exit_code_1() {
    for (args, message) in [
        (&["examples/tiny.yaml", "--fail", "chip:99/0"][..], "outside the topology"),
        (&["examples/tiny.yaml", "--fail", "rack:0"][..], "nodesPerRack"),
        (&["examples/tiny.yaml", "--fail", "disk:3"][..], "expected chip:<node>/<chip>"),
        (&["examples/tiny.yaml", "--load", "zipf:x"][..], "not a number"),
        (&["examples/tiny.yaml", "--load", "/nonexistent/load.json"][..], "cannot read load file"),
        (&["/nonexistent.yaml"][..], "cannot read"),
    ] {
        let out = plan(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn load_files_are_checked_against_the_model() {
    let dir = std::env::temp_dir().join(format!("ninelives-plan-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Tiny has 4 layers of 8 routed experts.
    let good = dir.join("good.json");
    let rows: Vec<Vec<f64>> = (0..4).map(|l| (0..8).map(|e| f64::from(1 + l * e)).collect()).collect();
    std::fs::write(&good, serde_json::to_string(&rows).unwrap()).unwrap();
    let out = plan(&["examples/tiny.yaml", "--load", good.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let short = dir.join("short.json");
    std::fs::write(&short, "[[1, 2, 3]]").unwrap();
    let out = plan(&["examples/tiny.yaml", "--load", short.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("load table has 1 layers"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn step_inflation_comes_first_and_the_placement_file_reproduces_it() {
    use ninelives_core::placement::{ExpertLoad, FailedChips, LoadStats, Placement, PlacementShape};
    let dir = std::env::temp_dir().join(format!("ninelives-plan-out-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("placement.json");
    let args = [
        "examples/tiny.yaml",
        "--fail",
        "chip:1/3",
        "--load",
        "zipf:1.2",
        "--placement-out",
        file.to_str().unwrap(),
    ];
    let out = plan(&[&args[..], &["--json"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reported = v["step_inflation"].as_f64().unwrap();
    assert!(reported >= 1.0, "{v}");
    assert_eq!(v["stage_step_inflation"].as_array().unwrap().len(), 1, "{v}");

    // Anyone can recompute the figures from the file.
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let shape: PlacementShape = serde_json::from_value(saved["shape"].clone()).unwrap();
    let load: ExpertLoad = serde_json::from_value(saved["load"].clone()).unwrap();
    let failed: FailedChips = serde_json::from_value(saved["failed"].clone()).unwrap();
    let initial: Placement = serde_json::from_value(saved["initial"].clone()).unwrap();
    let next: Placement = serde_json::from_value(saved["replanned"].clone()).unwrap();
    assert_eq!(next.generation, initial.generation + 1);
    let stats = LoadStats::measure(&shape, &next, &failed, &load);
    assert!((stats.step_inflation - reported).abs() < 1e-9, "{} vs {reported}", stats.step_inflation);
    let first = LoadStats::measure(&shape, &initial, &FailedChips::none(), &load);
    assert!((first.step_inflation - v["initial_step_inflation"].as_f64().unwrap()).abs() < 1e-9);

    // The text output leads with the objective.
    let out = plan(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("step inflation: initial "), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
