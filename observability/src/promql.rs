//! Just enough PromQL lexing to list the metric names an expression selects, and Grafana's
//! variable substitution. Whether an expression *parses* is Prometheus' call: the tests send
//! every expression to a real Prometheus' `/api/v1/query`.

use std::collections::{BTreeMap, BTreeSet};

/// Functions and aggregation operators are followed by `(`; these words are not.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
];

/// Keywords followed by a parenthesised label list (not an expression).
const LABEL_LIST: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// Aggregation operators (may be followed by `by`/`without` before their parenthesis).
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The metric names `expr` selects, e.g. `{"ninelives_agent_faults_total"}` for
/// `sum by (code) (rate(ninelives_agent_faults_total{node=~"a"}[5m]))`. Label names, function
/// names, keywords, strings and durations are not metric names. A selector written as
/// `{__name__="x"}` is reported as `x`.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let next_non_space = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '#' {
            // A comment runs to the end of the line.
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '{' {
            let end = skip_until(&chars, i, '}');
            let inner: String = chars[i + 1..end.saturating_sub(1).max(i + 1)].iter().collect();
            if let Some(name) = name_matcher(&inner) {
                names.insert(name);
            }
            i = end;
        } else if c == '[' {
            i = skip_until(&chars, i, ']');
        } else if c == '$' {
            // A Grafana variable left in place: $name or ${name}.
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = skip_until(&chars, i, '}');
            } else {
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '_')
            {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            let after = next_non_space(i);
            if LABEL_LIST.contains(&lower.as_str()) {
                if chars.get(after) == Some(&'(') {
                    i = skip_until(&chars, after, ')');
                }
            } else if KEYWORDS.contains(&lower.as_str()) {
                // operator or modifier
            } else if chars.get(after) == Some(&'(') {
                // function call or aggregation
            } else if AGGREGATIONS.contains(&lower.as_str()) && {
                let j = after;
                let rest: String = chars[j..].iter().take(8).collect::<String>().to_ascii_lowercase();
                rest.starts_with("by") || rest.starts_with("without")
            } {
                // `sum by (x) (...)`
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Position just after the string literal starting at `start`.
fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        if chars[i] == '\\' && quote != '`' {
            i += 2;
            continue;
        }
        if chars[i] == quote {
            return i + 1;
        }
        i += 1;
    }
    chars.len()
}

/// Position just after the `close` that ends the bracket opened at `start` (strings skipped).
fn skip_until(chars: &[char], start: usize, close: char) -> usize {
    let open = chars[start];
    let mut depth = 0usize;
    let mut i = start;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(chars, i);
            continue;
        }
        if c == open {
            depth += 1;
        } else if c == close {
            depth = depth.saturating_sub(1);
            if depth == 0 {
                return i + 1;
            }
        }
        i += 1;
    }
    chars.len()
}

/// `__name__="x"` inside a selector's braces.
fn name_matcher(inner: &str) -> Option<String> {
    let rest = inner.split("__name__").nth(1)?.trim_start();
    let rest = rest.strip_prefix('=')?.trim_start();
    let quote = rest.chars().next()?;
    if quote != '"' && quote != '\'' {
        return None;
    }
    let body = &rest[1..];
    Some(body[..body.find(quote)?].to_string())
}

/// Grafana's built-in interval variables, as the tests substitute them.
#[derive(Clone, Debug)]
pub struct Intervals {
    /// `$__rate_interval` (Grafana: max(4 × scrape interval, step + scrape interval)).
    pub rate_interval: String,
    /// `$__interval` (the step).
    pub interval: String,
    /// `$__range` (the dashboard's time range).
    pub range: String,
}

/// Replaces Grafana variables in `expr`: the interval variables by `intervals`, any other
/// `$name`/`${name}` by `values[name]`, else by `.*` (the dashboards' "All" value).
pub fn substitute(expr: &str, intervals: &Intervals, values: &BTreeMap<String, String>) -> String {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::with_capacity(expr.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '$' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let (name, next) = if chars.get(i + 1) == Some(&'{') {
            let end = skip_until(&chars, i + 1, '}');
            let inner: String = chars[i + 2..end.saturating_sub(1)].iter().collect();
            // ${var:format}: the format is irrelevant for a regex "All".
            (inner.split(':').next().unwrap_or_default().to_string(), end)
        } else {
            let mut j = i + 1;
            while j < chars.len() && is_ident(chars[j]) {
                j += 1;
            }
            (chars[i + 1..j].iter().collect::<String>(), j)
        };
        let value = match name.as_str() {
            "__rate_interval" => intervals.rate_interval.clone(),
            "__interval" => intervals.interval.clone(),
            "__range" => intervals.range.clone(),
            other => values.get(other).cloned().unwrap_or_else(|| ".*".to_string()),
        };
        out.push_str(&value);
        i = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<String> {
        metric_names(expr).into_iter().collect()
    }

    #[test]
    fn finds_metric_names_and_nothing_else() {
        assert_eq!(
            names(
                r#"histogram_quantile(0.99, sum by (le, tier) (rate(ninelives_recovery_resume_seconds_bucket{tier=~"re.*"}[5m])))"#
            ),
            vec!["ninelives_recovery_resume_seconds_bucket"]
        );
        assert_eq!(
            names(
                r#"count_values("unusable", sum by (node) (ninelives_agent_chip_state{state=~"failed|quarantined"})) or vector(0)"#
            ),
            vec!["ninelives_agent_chip_state"]
        );
        assert_eq!(
            names(
                "sum without (instance) (a) / on (namespace) group_left (pod) b > bool 3 unless c offset 5m"
            ),
            vec!["a", "b", "c"]
        );
        assert_eq!(names("time() - max(x:recorded) > 1e3"), vec!["x:recorded"]);
        assert_eq!(names("a\n# and it has been b\n> 0"), vec!["a"]);
        assert_eq!(names(r#"{__name__="up", job="x"} == 0"#), vec!["up"]);
        assert_eq!(names("sum by (node) (up{node=~\"$node\"})"), vec!["up"]);
    }

    #[test]
    fn substitutes_grafana_variables() {
        let iv = Intervals { rate_interval: "10s".into(), interval: "2s".into(), range: "5m".into() };
        let values = BTreeMap::from([("node".to_string(), "n1|n2".to_string())]);
        assert_eq!(
            substitute(
                r#"rate(x{node=~"$node", ns=~"${namespace}"}[$__rate_interval]) + y[$__range]"#,
                &iv,
                &values
            ),
            r#"rate(x{node=~"n1|n2", ns=~".*"}[10s]) + y[5m]"#
        );
    }
}
