//! The alerting rules file (`dashboards/alerts.yaml`) and `promtool`.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::Error;

/// One alerting rule.
#[derive(Clone, Debug)]
pub struct AlertRule {
    /// Group name.
    pub group: String,
    /// Alert name.
    pub name: String,
    /// PromQL expression.
    pub expr: String,
    /// `for` duration, if any.
    pub for_duration: Option<String>,
    /// `severity` label.
    pub severity: Option<String>,
    /// `runbook_url` annotation.
    pub runbook_url: Option<String>,
}

/// Reads every alerting rule of a Prometheus rules file.
pub fn load(path: &Path) -> Result<Vec<AlertRule>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Read(path.display().to_string(), e))?;
    let doc: Value = serde_saphyr::from_str(&text)
        .map_err(|e| Error::Rules(format!("{}: not YAML: {e}", path.display())))?;
    let mut rules = Vec::new();
    for group in doc["groups"].as_array().into_iter().flatten() {
        let group_name = group["name"].as_str().unwrap_or_default();
        for rule in group["rules"].as_array().into_iter().flatten() {
            let Some(name) = rule["alert"].as_str() else { continue };
            let text = |v: &Value| v.as_str().map(str::to_string);
            rules.push(AlertRule {
                group: group_name.to_string(),
                name: name.to_string(),
                expr: text(&rule["expr"]).ok_or_else(|| Error::Rules(format!("alert {name} has no expr")))?,
                for_duration: text(&rule["for"]),
                severity: text(&rule["labels"]["severity"]),
                runbook_url: text(&rule["annotations"]["runbook_url"]),
            });
        }
    }
    Ok(rules)
}

/// Runs `promtool ARGS` in `dir`, returning its combined output, or an error holding it.
/// A missing `promtool` is an error (scripts/setup installs it with Debian's `prometheus`).
pub fn promtool(dir: &Path, args: &[&str]) -> Result<String, Error> {
    let binary = ninelives_testkit::which("promtool").ok_or_else(|| {
        Error::Tool(
            "`promtool` not found on PATH; install it with scripts/setup (Debian package prometheus)".into(),
        )
    })?;
    let output = Command::new(binary)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| Error::Tool(format!("promtool {}: {e}", args.join(" "))))?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() {
        Ok(text)
    } else {
        Err(Error::Tool(format!("promtool {} failed:\n{text}", args.join(" "))))
    }
}
