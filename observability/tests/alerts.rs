//! The alerting rules: `promtool check rules`, `promtool test rules` with synthetic series (a
//! firing and a quiet case per alert), and a runbook section for each.
//!
//! promtool is required: scripts/setup installs it (Debian `prometheus`); these tests fail, not
//! skip, without it.

use std::collections::BTreeMap;

use ninelives_observability::{repo_root, rules};
use serde_json::Value;

fn dir() -> std::path::PathBuf {
    repo_root().join("dashboards")
}

#[test]
fn promtool_check_rules_accepts_the_rules_file() {
    let out = rules::promtool(&dir(), &["check", "rules", "alerts.yaml"]).unwrap_or_else(|e| panic!("{e}"));
    let count = rules::load(&dir().join("alerts.yaml")).expect("alerts.yaml").len();
    assert!(out.contains(&format!("SUCCESS: {count} rules found")), "{out}");
}

#[test]
fn promtool_unit_tests_pass_and_cover_every_alert_firing_and_quiet() {
    let out =
        rules::promtool(&dir(), &["test", "rules", "alerts.test.yaml"]).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("SUCCESS"), "{out}");

    let text = std::fs::read_to_string(dir().join("alerts.test.yaml")).expect("alerts.test.yaml");
    let tests: Value = serde_saphyr::from_str(&text).expect("alerts.test.yaml is YAML");
    // alert → (cases that expect it to fire, cases that expect silence)
    let mut cases: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for test in tests["tests"].as_array().expect("tests") {
        for case in test["alert_rule_test"].as_array().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            let fires = case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
            let entry = cases.entry(name).or_default();
            if fires { entry.0 += 1 } else { entry.1 += 1 }
        }
    }
    for rule in rules::load(&dir().join("alerts.yaml")).expect("alerts.yaml") {
        let (firing, quiet) = cases.get(&rule.name).copied().unwrap_or_default();
        assert!(firing > 0, "{}: no unit test where it fires", rule.name);
        assert!(quiet > 0, "{}: no unit test where it must not fire", rule.name);
    }
}

#[test]
fn promtool_unit_tests_fail_when_an_expectation_is_wrong() {
    // The harness can fail: the same tests with one expected label changed must not pass.
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(dir().join("alerts.yaml"), tmp.path().join("alerts.yaml")).expect("copy rules");
    let text = std::fs::read_to_string(dir().join("alerts.test.yaml")).expect("alerts.test.yaml");
    let broken = text.replacen("trainingjob: stuck", "trainingjob: quick", 1);
    assert_ne!(broken, text);
    std::fs::write(tmp.path().join("alerts.test.yaml"), broken).expect("write");
    let err = rules::promtool(tmp.path(), &["test", "rules", "alerts.test.yaml"]).expect_err("must fail");
    assert!(err.to_string().contains("NinelivesRecoveryTooSlow"), "{err}");
}

#[test]
fn every_alert_names_the_spec_list_and_links_a_runbook() {
    let runbooks = std::fs::read_to_string(repo_root().join("docs/runbooks.md")).expect("docs/runbooks.md");
    let alerts = rules::load(&dir().join("alerts.yaml")).expect("alerts.yaml");
    let names: Vec<&str> = alerts.iter().map(|a| a.name.as_str()).collect();
    for wanted in [
        "NinelivesChipFaultRateHigh",
        "NinelivesNodeLost",
        "NinelivesTrainingJobDegraded",
        "NinelivesRecoveryTooSlow",
        "NinelivesCheckpointStale",
        "NinelivesOperatorNoLeader",
        "NinelivesReconcileErrors",
    ] {
        assert!(names.contains(&wanted), "{wanted} missing from alerts.yaml");
    }
    for alert in &alerts {
        let url = alert.runbook_url.as_deref().unwrap_or_else(|| panic!("{}: no runbook_url", alert.name));
        let (_, anchor) =
            url.split_once("docs/runbooks.md#").unwrap_or_else(|| panic!("{}: {url}", alert.name));
        assert!(
            runbooks.contains(&format!("<a id=\"{anchor}\"></a>")),
            "{}: no runbook anchor {anchor}",
            alert.name
        );
        let heading = format!("## {} (", alert.name);
        let section =
            runbooks.split(&heading).nth(1).unwrap_or_else(|| panic!("{}: no runbook section", alert.name));
        let body = section.split("\n## ").next().unwrap_or_default();
        for part in ["**Means:**", "**Check:**", "**Act:**"] {
            assert!(body.contains(part), "{}: runbook lacks {part}", alert.name);
        }
        let severity = alert.severity.as_deref().unwrap_or_else(|| panic!("{}: no severity", alert.name));
        assert!(matches!(severity, "warning" | "critical"), "{}: severity {severity}", alert.name);
        assert!(section.starts_with(severity), "{}: runbook heading says another severity", alert.name);
        assert!(
            alert.for_duration.is_some(),
            "{}: no `for` (alerts must not flap on one sample)",
            alert.name
        );
    }
}
