//! The OpenTelemetry exporter (the `otlp` feature): spans go to a
//! collector over OTLP/HTTP (protobuf) when the standard variables name
//! one (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
//! plus `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SDK_DISABLED`, read by the
//! OpenTelemetry SDK itself). An `https://` collector is reached over TLS
//! (rustls), trusting the system's roots and the CA of
//! `OTEL_EXPORTER_OTLP_CERTIFICATE`, with the client certificate of
//! `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` and `OTEL_EXPORTER_OTLP_CLIENT_KEY`
//! (each also as `OTEL_EXPORTER_OTLP_TRACES_*`, which wins), as the
//! OpenTelemetry specification names them.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithHttpConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::registry::LookupSpan;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// The `tracing` layer that exports spans over OTLP/HTTP, if the
/// environment names a collector (`OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, and `OTEL_SDK_DISABLED` is not
/// `true`); `service` names the spans unless `OTEL_SERVICE_NAME` does.
/// [`init_telemetry`](crate::init_telemetry) installs it; add it to your
/// own subscriber instead when you install one. One per process: a
/// second call returns `None`.
pub fn layer<S>(service: &str) -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if disabled || !(set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) {
        return None;
    }
    let client = match http_client() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("catga: spans are not exported: {e}");
            return None;
        }
    };
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            // No subscriber is installed yet to log this.
            eprintln!("catga: spans are not exported: the OTLP exporter could not be built: {e}");
            return None;
        }
    };
    let mut resource = Resource::builder();
    if !set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(service.to_owned());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("catga");
    if PROVIDER.set(provider).is_err() {
        return None;
    }
    crate::wire::trace::otel::ON.store(true, std::sync::atomic::Ordering::Relaxed);
    Some(tracing_opentelemetry::layer().with_tracer(tracer))
}

/// The standard variable `OTEL_EXPORTER_OTLP_TRACES_<name>`, or else
/// `OTEL_EXPORTER_OTLP_<name>`, if set.
fn otlp_var(name: &str) -> Option<String> {
    [
        format!("OTEL_EXPORTER_OTLP_TRACES_{name}"),
        format!("OTEL_EXPORTER_OTLP_{name}"),
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok().filter(|v| !v.trim().is_empty()))
}

/// The exporter's HTTP client, with the exporter's time-out
/// (`OTEL_EXPORTER_OTLP_TIMEOUT`, milliseconds, 10 s by default, as the
/// SDK's own client) and, for an `https://` collector, [`tls`].
fn http_client() -> Result<reqwest::blocking::Client, String> {
    let timeout = match otlp_var("TIMEOUT") {
        Some(t) => t
            .trim()
            .parse()
            .map_err(|_| format!("OTEL_EXPORTER_OTLP_TIMEOUT {t} is not a number of milliseconds"))?,
        None => 10_000,
    };
    let mut b = reqwest::blocking::Client::builder().timeout(std::time::Duration::from_millis(timeout));
    let https = otlp_var("ENDPOINT").is_some_and(|e| e.trim_start().starts_with("https://"));
    // reqwest sets TLS up at build time whatever the scheme, from a
    // process-wide crypto provider unless it is given a configuration:
    // it is given one, also for a plain `http://` collector (one that
    // trusts nothing, never used), so that nothing is installed
    // process-wide and a slim image without system roots still exports.
    b = b.tls_backend_preconfigured(if https { tls()? } else { tls_unused()? });
    // reqwest's blocking client runs a runtime of its own and must not be
    // built on a tokio runtime's thread: on a thread of its own, as the
    // SDK builds its default client.
    std::thread::spawn(move || b.build())
        .join()
        .map_err(|_| "the HTTP client could not be built".to_owned())?
        .map_err(|e| format!("the HTTP client could not be built: {e}"))
}

/// rustls on ring, as the rest of the tree.
fn rustls_builder() -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, String> {
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))
}

/// The TLS of a plain `http://` collector's client: never used.
fn tls_unused() -> Result<rustls::ClientConfig, String> {
    Ok(rustls_builder()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

/// TLS for an `https://` collector: rustls with ring (the crypto of the
/// rest of the tree, passed here rather than installed process-wide),
/// the system's roots and the CA of `OTEL_EXPORTER_OTLP_CERTIFICATE`, and
/// the client certificate of `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` and
/// `OTEL_EXPORTER_OTLP_CLIENT_KEY`.
fn tls() -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = |what: &str, path: &str| -> Result<Vec<CertificateDer<'static>>, String> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|e| format!("OTEL_EXPORTER_OTLP_{what} {path}: {e}"))?;
        if certs.is_empty() {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_{what} {path} holds no PEM certificate"
            ));
        }
        Ok(certs)
    };
    let mut roots = rustls::RootCertStore::empty();
    // A slim image may have no system roots: then only the CA file's.
    let (system, _) = roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(ca) = otlp_var("CERTIFICATE") {
        for c in certs("CERTIFICATE", &ca)? {
            roots
                .add(c)
                .map_err(|e| format!("OTEL_EXPORTER_OTLP_CERTIFICATE {ca}: {e}"))?;
        }
    } else if system == 0 {
        return Err(
            "the collector is https:// but this host has no CA certificates: set OTEL_EXPORTER_OTLP_CERTIFICATE"
                .to_owned(),
        );
    }
    let builder = rustls_builder()?.with_root_certificates(roots);
    match (otlp_var("CLIENT_CERTIFICATE"), otlp_var("CLIENT_KEY")) {
        (Some(cert), Some(key)) => {
            let chain = certs("CLIENT_CERTIFICATE", &cert)?;
            let key = PrivateKeyDer::from_pem_file(&key)
                .map_err(|e| format!("OTEL_EXPORTER_OTLP_CLIENT_KEY {key}: {e}"))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                format!("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE {cert} and OTEL_EXPORTER_OTLP_CLIENT_KEY: {e}")
            })
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together: set both or neither"
                .to_owned(),
        ),
    }
}

/// Sends the spans waiting in the exporter's batch.
pub(crate) fn flush() {
    if let Some(p) = PROVIDER.get()
        && let Err(e) = p.force_flush()
    {
        tracing::warn!(error = %e, "spans could not be exported");
    }
}
