//! A real Prometheus (Debian's `prometheus` package) on loopback, for tests of metrics,
//! dashboard queries and alert rules.
//!
//! ```no_run
//! use ninelives_testkit::prometheus::{PrometheusServer, ScrapeTarget};
//! let targets = vec![ScrapeTarget::new("ninelives-agent", "127.0.0.1:9102").label("node", "n1")];
//! let prom = PrometheusServer::start(&targets, &[]).expect("prometheus");
//! let up = prom.query("up").expect("query");
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::{TestkitError, free_port, tail, wait_healthy, which};

/// One scrape target: a Prometheus scrape job name, a `host:port`, and static target labels
/// (what a PodMonitor's relabelling would add in a cluster: `node`, `trainingjob`, …).
#[derive(Clone, Debug)]
pub struct ScrapeTarget {
    /// The `job` label Prometheus gives the target's series.
    pub job: String,
    /// `host:port` of the `/metrics` endpoint.
    pub address: String,
    /// Extra labels attached to every series of the target.
    pub labels: BTreeMap<String, String>,
}

impl ScrapeTarget {
    /// A target without extra labels.
    pub fn new(job: impl Into<String>, address: impl Into<String>) -> Self {
        Self { job: job.into(), address: address.into(), labels: BTreeMap::new() }
    }

    /// Adds a static target label.
    #[must_use]
    pub fn label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(name.into(), value.into());
        self
    }
}

/// A failed Prometheus API call.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The HTTP exchange failed.
    #[error("Prometheus request {path}: {source}")]
    Io {
        /// Request path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The answer was not the API's JSON envelope.
    #[error("Prometheus request {path}: unexpected answer: {body}")]
    Malformed {
        /// Request path.
        path: String,
        /// The answer (truncated).
        body: String,
    },
    /// The API answered `status: error` (e.g. a PromQL parse error).
    #[error("Prometheus rejected {what}: {error_type}: {error}")]
    Api {
        /// What was asked.
        what: String,
        /// `errorType` (`bad_data` for a parse error).
        error_type: String,
        /// The error message.
        error: String,
    },
}

/// One series of a query result: its labels and `(unix seconds, value)` samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Labels, including `__name__` when the expression keeps it.
    pub labels: BTreeMap<String, String>,
    /// Samples in time order; an instant query has one.
    pub samples: Vec<(f64, f64)>,
}

/// State of an alerting rule as Prometheus reports it (`/api/v1/rules`).
#[derive(Clone, Debug, PartialEq)]
pub struct AlertState {
    /// Alert name.
    pub name: String,
    /// `inactive`, `pending` or `firing`.
    pub state: String,
    /// Labels of each active alert instance.
    pub active: Vec<BTreeMap<String, String>>,
}

/// A running Prometheus with a fast scrape and evaluation interval, killed on drop.
pub struct PrometheusServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

/// Scrape and rule evaluation interval of the test server.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

impl PrometheusServer {
    /// Writes a configuration scraping `targets` every second and loading `rule_files`
    /// (copied into the temp dir), starts Prometheus and waits until it is ready.
    pub fn start(targets: &[ScrapeTarget], rule_files: &[PathBuf]) -> Result<Self, TestkitError> {
        let binary = which("prometheus")
            .ok_or(TestkitError::Missing { binary: "prometheus", package: "prometheus" })?;
        let dir = tempfile::Builder::new().prefix("ninelives-prometheus-").tempdir()?;
        let mut rules = Vec::new();
        for (i, file) in rule_files.iter().enumerate() {
            let copy = dir.path().join(format!("rules-{i}.yaml"));
            std::fs::copy(file, &copy)?;
            rules.push(copy);
        }
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, config_yaml(targets, &rules))?;
        let port = free_port()?;
        let log_path = dir.path().join("prometheus.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let server = Self { child: Some(child), dir, port };
        let addr = server.addr();
        if wait_healthy(addr, "/-/ready", "Ready", Duration::from_secs(30)) {
            Ok(server)
        } else {
            Err(TestkitError::Unhealthy { what: "prometheus", seconds: 30, log: tail(&log_path) })
        }
    }

    /// Address of the HTTP API.
    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// Base URL, e.g. `http://127.0.0.1:9090` (for people and `promtool`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The temp dir holding config, rules, data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The tail of Prometheus' log (for failure messages).
    pub fn log_tail(&self) -> String {
        tail(&self.dir.path().join("prometheus.log"))
    }

    /// An instant query evaluated now.
    pub fn query(&self, expr: &str) -> Result<Vec<Series>, QueryError> {
        self.query_at(expr, None)
    }

    /// An instant query evaluated at `time` (unix seconds), or now.
    pub fn query_at(&self, expr: &str, time: Option<f64>) -> Result<Vec<Series>, QueryError> {
        let mut path = format!("/api/v1/query?query={}", url_encode(expr));
        if let Some(t) = time {
            path.push_str(&format!("&time={t:.3}"));
        }
        parse_result(expr, &self.api(&path, expr)?)
    }

    /// A range query over `[start, end]` (unix seconds) every `step`.
    pub fn query_range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
        step: Duration,
    ) -> Result<Vec<Series>, QueryError> {
        let path = format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={}",
            url_encode(expr),
            step.as_secs_f64()
        );
        parse_result(expr, &self.api(&path, expr)?)
    }

    /// Names of every metric Prometheus holds (`/api/v1/label/__name__/values`).
    pub fn metric_names(&self) -> Result<Vec<String>, QueryError> {
        let data = self.api("/api/v1/label/__name__/values", "metric names")?;
        Ok(data
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default())
    }

    /// Scrape health of every active target: `(job, address, health)`.
    pub fn targets(&self) -> Result<Vec<(String, String, String)>, QueryError> {
        let data = self.api("/api/v1/targets?state=active", "targets")?;
        let targets = data["activeTargets"].as_array().cloned().unwrap_or_default();
        Ok(targets
            .iter()
            .map(|t| {
                let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
                (s(&t["labels"]["job"]), s(&t["scrapeUrl"]), s(&t["health"]))
            })
            .collect())
    }

    /// Every alerting rule and its state.
    pub fn alerts(&self) -> Result<Vec<AlertState>, QueryError> {
        let data = self.api("/api/v1/rules?type=alert", "rules")?;
        let mut out = Vec::new();
        for group in data["groups"].as_array().cloned().unwrap_or_default() {
            for rule in group["rules"].as_array().cloned().unwrap_or_default() {
                let active = rule["alerts"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|a| labels(&a["labels"]))
                    .collect();
                out.push(AlertState {
                    name: rule["name"].as_str().unwrap_or_default().to_string(),
                    state: rule["state"].as_str().unwrap_or_default().to_string(),
                    active,
                });
            }
        }
        Ok(out)
    }

    /// Polls until every target of the configuration reports `up`, or `timeout`.
    pub fn wait_targets_up(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.targets().map_err(|e| e.to_string())?;
            if !last.is_empty() && last.iter().all(|(_, _, health)| health == "up") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("targets not all up within {timeout:?}: {last:?}"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn api(&self, path: &str, what: &str) -> Result<Value, QueryError> {
        let body = http_get_body(self.addr(), path)
            .map_err(|source| QueryError::Io { path: path.into(), source })?;
        let json: Value = serde_json::from_str(&body).map_err(|_| QueryError::Malformed {
            path: path.into(),
            body: body.chars().take(500).collect(),
        })?;
        match json["status"].as_str() {
            Some("success") => Ok(json["data"].clone()),
            Some("error") => Err(QueryError::Api {
                what: what.into(),
                error_type: json["errorType"].as_str().unwrap_or_default().into(),
                error: json["error"].as_str().unwrap_or_default().into(),
            }),
            _ => Err(QueryError::Malformed { path: path.into(), body: body.chars().take(500).collect() }),
        }
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Current time in unix seconds.
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn config_yaml(targets: &[ScrapeTarget], rules: &[PathBuf]) -> String {
    // JSON is YAML: build the configuration as JSON so names and labels are quoted correctly.
    let mut jobs: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for t in targets {
        jobs.entry(t.job.as_str())
            .or_default()
            .push(serde_json::json!({ "targets": [t.address], "labels": t.labels }));
    }
    let interval = format!("{}s", SCRAPE_INTERVAL.as_secs());
    let scrape: Vec<Value> = jobs
        .into_iter()
        .map(|(job, static_configs)| {
            serde_json::json!({
                "job_name": job,
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "static_configs": static_configs,
            })
        })
        .collect();
    serde_json::json!({
        "global": { "scrape_interval": interval, "evaluation_interval": interval },
        "rule_files": rules.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "scrape_configs": scrape,
    })
    .to_string()
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default()
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "+Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            s => s.parse().ok(),
        },
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
}

fn sample(v: &Value) -> Option<(f64, f64)> {
    Some((number(&v[0])?, number(&v[1])?))
}

fn parse_result(expr: &str, data: &Value) -> Result<Vec<Series>, QueryError> {
    let malformed = || QueryError::Malformed { path: expr.to_string(), body: data.to_string() };
    match data["resultType"].as_str() {
        Some("vector") | Some("matrix") => {
            let mut out = Vec::new();
            for r in data["result"].as_array().ok_or_else(malformed)? {
                let samples = if let Some(values) = r["values"].as_array() {
                    values.iter().filter_map(sample).collect()
                } else {
                    sample(&r["value"]).into_iter().collect()
                };
                out.push(Series { labels: labels(&r["metric"]), samples });
            }
            Ok(out)
        }
        Some("scalar") => Ok(vec![Series {
            labels: BTreeMap::new(),
            samples: sample(&data["result"]).into_iter().collect(),
        }]),
        _ => Err(malformed()),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// GET over HTTP/1.0 (so the server answers without chunked encoding), returning the body of a
/// 2xx or 4xx answer (the Prometheus API reports errors as JSON with 400/422).
fn http_get_body(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP header in answer: {text}")))?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    if status.starts_with('5') {
        return Err(std::io::Error::other(format!("HTTP {status}: {body}")));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encoding_keeps_unreserved_and_escapes_the_rest() {
        assert_eq!(url_encode("rate(x{a=\"b\"}[1m])"), "rate%28x%7Ba%3D%22b%22%7D%5B1m%5D%29");
    }

    #[test]
    fn scrapes_a_target_evaluates_queries_and_reports_parse_errors() {
        let prom = PrometheusServer::start(&[], &[]).unwrap();
        let own = ScrapeTarget::new("self", prom.addr().to_string()).label("node", "n1");
        let config = config_yaml(&[own], &[]);
        assert!(config.contains("\"node\":\"n1\""), "{config}");
        let up = prom.query("vector(1) + 1").unwrap();
        assert_eq!(up[0].samples[0].1, 2.0);
        match prom.query("sum(") {
            Err(QueryError::Api { error_type, .. }) => assert_eq!(error_type, "bad_data"),
            other => panic!("a parse error must be reported, got {other:?}"),
        }
        let now = unix_now();
        let range = prom.query_range("vector(3)", now - 10.0, now, Duration::from_secs(1)).unwrap();
        assert!(range[0].samples.len() >= 10);
    }

    #[test]
    fn scrapes_its_targets_with_their_labels() {
        // Two servers: the second scrapes the first's /metrics.
        let first = PrometheusServer::start(&[], &[]).unwrap();
        let target = ScrapeTarget::new("other", first.addr().to_string()).label("node", "n7");
        let second = PrometheusServer::start(&[target], &[]).unwrap();
        second.wait_targets_up(Duration::from_secs(20)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = second.query("up{job=\"other\", node=\"n7\"}").unwrap();
            if up.first().is_some_and(|s| s.samples.first().is_some_and(|(_, v)| *v == 1.0)) {
                break;
            }
            assert!(Instant::now() < deadline, "no up series: {up:?}\n{}", second.log_tail());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
