//! The entry points of a service: [`run`], [`start`] and
//! [`init_telemetry`].

use super::Runtime;
use crate::config::Config;
use crate::error::Result;

/// Runs the service: reads [`Config`] from the environment, serves every
/// registered handler and returns after a graceful drain on SIGTERM or
/// Ctrl-C, or with the error that stopped it (a subscription the broker
/// refused, one that keeps ending), so that the orchestrator restarts the
/// process.
///
/// Without `NATS_URL` it runs on the embedded in-memory transport and says so
/// in its log.
pub async fn run() -> Result<()> {
    start().await?.run_until_signal().await
}

/// What [`run`] does before it waits for a signal: reads the environment,
/// sets up logging (and span export, see [`init_telemetry`]), starts
/// serving, and returns the [`Runtime`] so that `main` can also use its
/// [`client`](Runtime::client).
pub async fn start() -> Result<Runtime> {
    let config = Config::from_env()?;
    init_telemetry(&config.service);
    Runtime::builder().config(config).start().await
}

/// Installs catga's log subscriber (filter from `RUST_LOG`, default
/// `info`) unless the application installed one. With the `otlp` feature
/// and `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) set, it
/// also exports spans to that OpenTelemetry collector over OTLP/HTTP,
/// named after `service` unless `OTEL_SERVICE_NAME` is set. [`run`] and
/// [`start`] call it; call it yourself when you build runtimes with
/// [`Runtime::builder`].
pub fn init_telemetry(service: &str) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let logs = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer().with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
    );
    #[cfg(feature = "otlp")]
    let logs = logs.with(crate::ops::otel::layer(service));
    #[cfg(not(feature = "otlp"))]
    let _ = service;
    let _ = logs.with(filter).try_init();
}
