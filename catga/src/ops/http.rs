//! The HTTP endpoint of a replica (`CATGA_HTTP_ADDR`): `/health`
//! (liveness), `/ready` (readiness, with the failing checks) and
//! `/metrics` (Prometheus text format).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, ErrorKind, Result};

/// A future the metrics page awaits before it renders (it refreshes the
/// replica-wide gauges).
pub(crate) type Refresh = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A readiness report, as `/ready` shows it.
pub(crate) struct Ready {
    pub ready: bool,
    pub failing: Vec<String>,
    pub warnings: Vec<String>,
    /// `CATGA_REGION`, said in the body.
    pub region: Option<String>,
}

/// What the endpoint asks the runtime.
#[derive(Clone)]
pub(crate) struct Probes {
    /// `Err(why)` once the replica cannot recover and should be restarted.
    pub liveness: Arc<dyn Fn() -> std::result::Result<(), String> + Send + Sync>,
    /// Whether it should get traffic, and if not, why; then what puts a
    /// promise at risk without stopping it.
    pub readiness: Arc<dyn Fn() -> Ready + Send + Sync>,
    /// Brings the gauges up to date before a scrape.
    pub refresh: Arc<dyn Fn() -> Refresh + Send + Sync>,
}

/// Binds `addr` and serves until `stop` turns true. Returns the bound
/// address (`:0` picks a free port).
pub(crate) async fn serve(
    addr: &str,
    probes: Probes,
    mut stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("CATGA_HTTP_ADDR: cannot listen on {addr}: {e}"),
        )
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::new(ErrorKind::Config, format!("CATGA_HTTP_ADDR: {e}")))?;
    let app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(probes);
    let task = tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
            tracing::error!(error = %e, "the HTTP endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "HTTP endpoint: /health /ready /metrics");
    Ok((bound, task))
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn health(State(p): State<Probes>) -> Response {
    match (p.liveness)() {
        Ok(()) => json(StatusCode::OK, serde_json::json!({ "status": "ok" })),
        Err(why) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "status": "failing", "error": why }),
        ),
    }
}

async fn ready(State(p): State<Probes>) -> Response {
    let r = (p.readiness)();
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::json!({ "ready": r.ready, "failing": r.failing });
    if let Some(region) = r.region {
        body["region"] = region.into();
    }
    if !r.warnings.is_empty() {
        body["warnings"] = r.warnings.into();
    }
    json(status, body)
}

async fn metrics(State(p): State<Probes>) -> Response {
    let Some(handle) = super::metrics::handle() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "another metrics recorder is installed in this process\n",
        )
            .into_response();
    };
    (p.refresh)().await;
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}
