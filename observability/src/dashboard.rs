//! The Grafana dashboards of `dashboards/`, read as JSON: their panels, queries, variables and
//! annotations.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::Error;

/// Where a PromQL expression sits in a dashboard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A panel target.
    Panel {
        /// Panel title.
        title: String,
        /// Panel type (`timeseries`, `stat`, `heatmap`, `state-timeline`, `bargauge`).
        kind: String,
        /// Target `refId`.
        ref_id: String,
    },
    /// An annotation query.
    Annotation {
        /// Annotation name.
        name: String,
    },
}

/// One PromQL expression of a dashboard.
#[derive(Clone, Debug)]
pub struct Query {
    /// Where it is.
    pub origin: Origin,
    /// The expression, with Grafana variables unsubstituted.
    pub expr: String,
    /// The legend format (`{{label}}` placeholders).
    pub legend: String,
}

impl Query {
    /// `Panel title / A`, for messages.
    pub fn describe(&self) -> String {
        match &self.origin {
            Origin::Panel { title, ref_id, .. } => format!("{title} / {ref_id}"),
            Origin::Annotation { name } => format!("annotation {name}"),
        }
    }
}

/// A template variable.
#[derive(Clone, Debug)]
pub struct Variable {
    /// Name (`$name` in queries).
    pub name: String,
    /// Type (`datasource`, `query`, …).
    pub kind: String,
    /// For query variables, the Grafana query (`label_values(metric{…}, label)`).
    pub query: Option<String>,
}

/// A parsed dashboard.
#[derive(Clone, Debug)]
pub struct Dashboard {
    /// File it came from.
    pub path: PathBuf,
    /// The whole JSON.
    pub json: Value,
    /// Title.
    pub title: String,
    /// Every PromQL expression (panels in order, then annotations).
    pub queries: Vec<Query>,
    /// Template variables.
    pub variables: Vec<Variable>,
}

impl Dashboard {
    /// Reads one dashboard file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read(path.display().to_string(), e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Dashboard(format!("{}: not JSON: {e}", path.display())))?;
        let title = json["title"].as_str().unwrap_or_default().to_string();
        let mut queries = Vec::new();
        collect_panels(&json["panels"], &mut queries);
        for annotation in json["annotations"]["list"].as_array().into_iter().flatten() {
            if let Some(expr) = annotation["expr"].as_str() {
                queries.push(Query {
                    origin: Origin::Annotation {
                        name: annotation["name"].as_str().unwrap_or_default().into(),
                    },
                    expr: expr.to_string(),
                    legend: annotation["titleFormat"].as_str().unwrap_or_default().into(),
                });
            }
        }
        let variables = json["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| Variable {
                name: v["name"].as_str().unwrap_or_default().into(),
                kind: v["type"].as_str().unwrap_or_default().into(),
                query: v["query"]["query"].as_str().or_else(|| v["query"].as_str()).map(str::to_string),
            })
            .collect();
        Ok(Self { path: path.to_path_buf(), json, title, queries, variables })
    }

    /// Every `*.json` of `dir`, sorted by file name.
    pub fn load_dir(dir: &Path) -> Result<Vec<Self>, Error> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::Read(dir.display().to_string(), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        paths.iter().map(|p| Self::load(p)).collect()
    }

    /// The file stem (`fleet-health`).
    pub fn slug(&self) -> String {
        self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

fn collect_panels(panels: &Value, out: &mut Vec<Query>) {
    for panel in panels.as_array().into_iter().flatten() {
        // Collapsed rows keep their panels inside.
        collect_panels(&panel["panels"], out);
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push(Query {
                    origin: Origin::Panel {
                        title: panel["title"].as_str().unwrap_or_default().into(),
                        kind: panel["type"].as_str().unwrap_or_default().into(),
                        ref_id: target["refId"].as_str().unwrap_or_default().into(),
                    },
                    expr: expr.to_string(),
                    legend: target["legendFormat"].as_str().unwrap_or_default().into(),
                });
            }
        }
    }
}

/// The metric selector of a Grafana `label_values(selector, label)` variable query, and the
/// label. `None` for other forms.
pub fn label_values(query: &str) -> Option<(String, String)> {
    let inner = query.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim().to_string(), label.trim().to_string()))
}

/// Expands a Grafana legend format (`{{code}} → {{action}}`) with a series' labels.
pub fn legend(format: &str, labels: &std::collections::BTreeMap<String, String>) -> String {
    if format.is_empty() || format == "__auto" {
        let inner: Vec<String> = labels
            .iter()
            .filter(|(k, _)| k.as_str() != "__name__")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        return if inner.is_empty() { "value".into() } else { inner.join(", ") };
    }
    let mut out = String::new();
    let mut rest = format;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                let key = after[..end].trim();
                out.push_str(labels.get(key).map_or("", String::as_str));
                rest = &after[end + 2..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn label_values_queries_split_into_selector_and_label() {
        assert_eq!(
            label_values(
                r#"label_values(ninelives_worker_step{tj_namespace=~"$tj_namespace"}, trainingjob)"#
            ),
            Some((r#"ninelives_worker_step{tj_namespace=~"$tj_namespace"}"#.into(), "trainingjob".into()))
        );
        assert_eq!(label_values("query_result(up)"), None);
    }

    #[test]
    fn legends_expand_labels() {
        let labels =
            BTreeMap::from([("code".to_string(), "ecc".to_string()), ("action".into(), "isolate".into())]);
        assert_eq!(legend("{{code}} → {{action}}", &labels), "ecc → isolate");
        assert_eq!(legend("p99 {{ missing }}", &labels), "p99");
        assert_eq!(legend("__auto", &labels), "action=isolate, code=ecc");
    }
}
