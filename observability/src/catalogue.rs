//! The metrics catalogue, parsed from METRICS.md's tables.

use std::collections::BTreeMap;
use std::path::Path;

use crate::Error;

/// Prometheus metric type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonic counter (`_total`).
    Counter,
    /// Gauge.
    Gauge,
    /// Histogram (series `_bucket`, `_sum`, `_count`).
    Histogram,
}

impl MetricKind {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "counter" => Some(Self::Counter),
            "gauge" => Some(Self::Gauge),
            "histogram" => Some(Self::Histogram),
            _ => None,
        }
    }
}

/// Who exports a catalogued metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Registered by ninelives code today.
    Exported,
    /// Agreed with the recovery brain / demo runtime (issue 8), not registered yet.
    Planned,
    /// Produced by Prometheus or etcd, not by ninelives code.
    External,
}

/// One row of METRICS.md.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricDoc {
    /// Metric name (histograms: the base name).
    pub name: String,
    /// Type.
    pub kind: MetricKind,
    /// Label names, sorted (target labels excluded).
    pub labels: Vec<String>,
    /// Unit as written.
    pub unit: String,
    /// Meaning as written.
    pub meaning: String,
    /// Who exports it.
    pub status: Status,
    /// The `##` heading it is listed under.
    pub section: String,
}

/// Every metric of METRICS.md, by name.
#[derive(Clone, Debug, Default)]
pub struct Catalogue {
    metrics: BTreeMap<String, MetricDoc>,
}

impl Catalogue {
    /// Reads and parses a METRICS.md file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read(path.display().to_string(), e))?;
        Self::parse(&text)
    }

    /// Parses METRICS.md: every table row whose first cell is a backquoted metric name. The
    /// status comes from the section heading: "Planned…" and "External…" sections, else exported.
    pub fn parse(markdown: &str) -> Result<Self, Error> {
        let mut metrics = BTreeMap::new();
        let mut section = String::new();
        for (number, line) in markdown.lines().enumerate() {
            if let Some(heading) = line.strip_prefix("## ") {
                section = heading.trim().to_string();
                continue;
            }
            let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
            let Some(name) =
                cells.first().and_then(|c| c.strip_prefix('`')).and_then(|c| c.strip_suffix('`'))
            else {
                continue;
            };
            let bad = |why: &str| Error::Catalogue { line: number + 1, message: why.to_string() };
            if cells.len() != 5 {
                return Err(bad("a metric row needs 5 cells: name | type | labels | unit | meaning"));
            }
            let kind =
                MetricKind::parse(cells[1]).ok_or_else(|| bad("type must be counter, gauge or histogram"))?;
            let mut labels: Vec<String> = cells[2]
                .split(',')
                .map(|l| l.trim().trim_matches('`').to_string())
                .filter(|l| !l.is_empty() && l != "—" && l != "-")
                .collect();
            labels.sort();
            let status = if section.starts_with("Planned") {
                Status::Planned
            } else if section.starts_with("External") {
                Status::External
            } else {
                Status::Exported
            };
            if status != Status::External && !name.starts_with("ninelives_") {
                return Err(bad("ninelives metrics start with ninelives_"));
            }
            if kind == MetricKind::Counter && !name.ends_with("_total") {
                return Err(bad("counter names end in _total"));
            }
            let doc = MetricDoc {
                name: name.to_string(),
                kind,
                labels,
                unit: cells[3].to_string(),
                meaning: cells[4].to_string(),
                status,
                section: section.clone(),
            };
            if metrics.insert(name.to_string(), doc).is_some() {
                return Err(bad("metric listed twice"));
            }
        }
        if metrics.is_empty() {
            return Err(Error::Catalogue { line: 0, message: "no metric rows found".into() });
        }
        Ok(Self { metrics })
    }

    /// Every catalogued metric.
    pub fn iter(&self) -> impl Iterator<Item = &MetricDoc> {
        self.metrics.values()
    }

    /// The metric a series name belongs to: exact, or a histogram's `_bucket`/`_sum`/`_count`.
    pub fn resolve(&self, series: &str) -> Option<&MetricDoc> {
        if let Some(doc) = self.metrics.get(series) {
            return Some(doc);
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = series.strip_suffix(suffix)?;
            self.metrics.get(base).filter(|d| d.kind == MetricKind::Histogram)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
## Agent
| name | type | labels | unit | meaning |
|---|---|---|---|---|
| `ninelives_a_total` | counter | `code`, `action` | faults | x |
| `ninelives_b_seconds` | histogram | — | seconds | y |
## Planned: brain
| `ninelives_c` | gauge | `trainingjob` | 1 | z |
## External
| `up` | gauge | `job` | 1 | w |
";

    #[test]
    fn parses_rows_with_their_section_status() {
        let c = Catalogue::parse(SAMPLE).unwrap();
        let a = c.resolve("ninelives_a_total").unwrap();
        assert_eq!(a.labels, vec!["action", "code"]);
        assert_eq!(a.status, Status::Exported);
        assert_eq!(c.resolve("ninelives_b_seconds_bucket").unwrap().kind, MetricKind::Histogram);
        assert!(c.resolve("ninelives_a_total_count").is_none(), "only histograms have _count");
        assert_eq!(c.resolve("ninelives_c").unwrap().status, Status::Planned);
        assert_eq!(c.resolve("up").unwrap().status, Status::External);
    }

    #[test]
    fn rejects_bad_names_and_types() {
        assert!(
            Catalogue::parse("| `ninelives_x` | counter | — | 1 | m |").is_err(),
            "counter without _total"
        );
        assert!(Catalogue::parse("| `other_total` | counter | — | 1 | m |").is_err(), "missing prefix");
        assert!(Catalogue::parse("| `ninelives_x` | summary | — | 1 | m |").is_err());
        assert!(Catalogue::parse("| `ninelives_x` | gauge | — | 1 |").is_err());
    }
}
