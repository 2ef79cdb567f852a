//! What an operator watches: per-handler metrics in Prometheus format and
//! the HTTP endpoint that serves them with liveness and readiness
//! (`CATGA_HTTP_ADDR`).

pub(crate) mod http;
pub(crate) mod metrics;
#[cfg(feature = "otlp")]
pub(crate) mod otel;
