//! # ninelives-telemetry
//!
//! What every ninelives binary shares for observability:
//! - [`init_tracing`]: structured logs to stderr, filtered by `RUST_LOG`;
//! - [`AdminServer`]: the admin HTTP endpoint with `/metrics` (Prometheus text format from a
//!   [`prometheus::Registry`]), `/live` (the process is up) and `/ready` (it is doing its job).
//!
//! Each binary owns its own registry, so tests can run several components in one process without
//! their metrics colliding.

pub mod recovery;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber: human-readable lines on stderr, or JSON when
/// `NINELIVES_LOG_FORMAT=json`. `default_filter` applies when `RUST_LOG` is unset.
/// Calling it twice is harmless (the second call does nothing).
pub fn init_tracing(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _already_set = if std::env::var("NINELIVES_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Readiness flag shared between a component and its admin endpoint.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the component ready (or not).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Whether the component is ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct AdminState {
    registry: Registry,
    ready: Readiness,
}

/// The admin HTTP endpoint, bound but not yet serving.
pub struct AdminServer {
    listener: TcpListener,
    state: AdminState,
}

impl AdminServer {
    /// Binds `addr` (use port 0 for an ephemeral port; keep it on loopback unless Prometheus
    /// must scrape from elsewhere).
    pub async fn bind(addr: SocketAddr, registry: Registry, ready: Readiness) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self { listener, state: AdminState { registry, ready } })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/live", get(|| async { "ok\n" }))
            .route("/ready", get(ready))
            .with_state(self.state);
        axum::serve(self.listener, app).with_graceful_shutdown(shutdown).await
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(e) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics failed: {e}\n")).into_response()
        }
    }
}

async fn ready(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.ready.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Lowest port [`free_port`] hands out (above the well-known and most registered services).
const FIRST_PORT: u32 = 20_000;

/// Returns a TCP port on 127.0.0.1 that was free a moment ago, for a server started next.
///
/// Chosen below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`, usually from
/// 32768), where the local ports of outgoing connections come from: a port picked by binding to
/// port 0 lies in that range, and a scrape or client connection made before the server binds it
/// could take it ("Address already in use", seen once in the live Prometheus test). Successive
/// calls walk the range from a per-process offset, so one process never hands out a port twice
/// and concurrent processes start far apart. Falls back to a kernel-chosen port when the range
/// below is exhausted.
pub fn free_port() -> std::io::Result<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let below = ephemeral_start().saturating_sub(1);
    if below > FIRST_PORT {
        let span = below - FIRST_PORT;
        let offset = std::process::id().wrapping_mul(7919) % span;
        for _ in 0..span.min(4096) {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let port = FIRST_PORT + (offset + n) % span;
            if let Ok(port) = u16::try_from(port)
                && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// First port of the kernel's ephemeral range (32768 if it cannot be read).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..32).map(|_| free_port().unwrap()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice: {ports:?}");
        for port in ports {
            assert!(u32::from(port) < ephemeral_start(), "{port} is in the ephemeral range");
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_liveness_and_readiness() {
        let registry = Registry::new();
        let steps = prometheus::IntCounter::new("ninelives_test_steps_total", "steps").unwrap();
        registry.register(Box::new(steps.clone())).unwrap();
        steps.inc_by(7);
        let ready = Readiness::default();
        let server =
            AdminServer::bind("127.0.0.1:0".parse().unwrap(), registry, ready.clone()).await.unwrap();
        let addr = server.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));

        assert!(get(addr, "/metrics").await.contains("ninelives_test_steps_total 7"));
        assert!(get(addr, "/live").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 503"));
        ready.set(true);
        assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 200"));

        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
    }
}
