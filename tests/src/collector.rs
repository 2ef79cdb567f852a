//! An OpenTelemetry collector for tests and benchmarks: records the body
//! of every OTLP/HTTP request it is sent, over plain HTTP or TLS.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// A collector: records the body of every POST, answers 200; over TLS
/// when given an acceptor. Returns its endpoint.
pub async fn collector(tls: Option<tokio_rustls::TlsAcceptor>) -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&bodies);
    let scheme = if tls.is_some() { "https" } else { "http" };
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let kept = Arc::clone(&kept);
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    // A refused handshake records nothing.
                    Some(tls) => {
                        if let Ok(stream) = tls.accept(stream).await {
                            record(stream, kept).await;
                        }
                    }
                    None => record(stream, kept).await,
                }
            });
        }
    });
    (format!("{scheme}://{addr}"), bodies)
}

/// Reads HTTP/1.1 requests from `stream`, keeping their bodies.
async fn record<S>(stream: S, kept: Arc<Mutex<Vec<Vec<u8>>>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut stream = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if stream.read_exact(&mut body).await.is_err() {
            return;
        }
        kept.lock().expect("bodies").push(body);
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if stream.get_mut().write_all(ok).await.is_err() {
            return;
        }
    }
}

/// A TLS acceptor with `pki`'s server certificate that asks clients for a
/// certificate of `pki`'s CA.
pub fn mutual_tls(pki: &crate::Pki) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_file_iter(pki.path("server.pem"))
        .expect("server.pem")
        .collect::<std::result::Result<Vec<_>, _>>()
        .expect("certificates");
    let key = PrivateKeyDer::from_pem_file(pki.path("server-key.pem")).expect("server key");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.path("ca.pem")).expect("ca.pem"))
        .expect("CA");
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .expect("client verifier");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .expect("server config");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}
