//! The connection's events: connected, disconnected, refused (the
//! credentials, the TLS handshake), and the broker's errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::broadcast;

use super::NatsConnect;
use super::credentials::server_addrs;
use crate::error::{ErrorKind, Result};

/// Reconnect back-off: 100 ms doubling up to 2 s, so that a restarted
/// broker is found again within about two seconds, and a broker that
/// refuses us is asked (and logged about) at most every two seconds.
pub(super) fn reconnect_delay(attempts: usize) -> Duration {
    let exp = attempts.saturating_sub(1).min(5) as u32;
    Duration::from_millis(100u64 << exp).min(Duration::from_secs(2))
}

/// Turns async-nats events into logs, a slow-consumer count, the last
/// reason the connection was refused, and a stream of server errors the
/// runtime checks (a refused subscription shows up only here).
#[derive(Clone)]
pub(super) struct EventSink {
    pub(super) slow: Arc<AtomicU64>,
    pub(super) server_errors: broadcast::Sender<String>,
    pub(super) refused: Arc<tokio::sync::watch::Sender<Option<Refusal>>>,
    pub(super) failed_attempts: Arc<AtomicU64>,
    /// Where the servers listen, and whether TLS is asked for: to tell a
    /// failed TLS handshake from a server that is down (see
    /// [`EventSink::attempt_failed`]).
    pub(super) servers: Arc<Vec<(String, u16)>>,
    pub(super) tls: bool,
}

/// Why the broker refused a connection: no retry will help until the
/// configuration changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
}

impl EventSink {
    pub(super) fn new(
        slow: Arc<AtomicU64>,
        server_errors: broadcast::Sender<String>,
        how: &NatsConnect,
    ) -> Result<EventSink> {
        let (addrs, _) = server_addrs(&how.url)?;
        let sec = &how.security;
        Ok(EventSink {
            slow,
            server_errors,
            refused: Arc::new(tokio::sync::watch::Sender::new(None)),
            failed_attempts: Arc::new(AtomicU64::new(0)),
            tls: sec.tls_ca.is_some()
                || sec.tls_cert.is_some()
                || sec.tls_first
                || addrs.iter().any(|a| a.tls_required()),
            servers: Arc::new(addrs.iter().map(|a| (a.host().to_owned(), a.port())).collect()),
        })
    }

    /// Whether any server accepts TCP connections.
    pub(super) async fn any_server_listens(&self) -> bool {
        for (host, port) in self.servers.iter() {
            let connect = tokio::net::TcpStream::connect((host.as_str(), *port));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), connect).await {
                return true;
            }
        }
        false
    }

    /// One line per failed attempt: what failed and which setting to check.
    ///
    /// async-nats 0.51 reports only the kind of a failed attempt, and a
    /// failed TLS handshake as an "IO error", like a server that is down
    /// (the detail is in its own debug log). With TLS asked for, an IO error
    /// on a server that accepts TCP connections is taken for what it almost
    /// always is: the handshake was refused (untrusted or expired
    /// certificate, missing client certificate).
    pub(super) async fn attempt_failed(&self, what: &str) {
        let attempt = self.failed_attempts.fetch_add(1, Ordering::Relaxed) + 1;
        let handshake = what == "IO error" && self.tls && self.any_server_listens().await;
        let what = if handshake { "TLS error" } else { what };
        let refusal = match what {
            "authorization violation" | "failed signing nonce" => Some(Refusal {
                kind: ErrorKind::Unauthorized,
                message: "the NATS server refused the credentials: check the user and password or \
                          token in NATS_URL, NATS_CREDS, or NATS_NKEY"
                    .to_owned(),
            }),
            "TLS error" => Some(Refusal {
                kind: ErrorKind::Config,
                message: "the TLS handshake with the NATS server failed: check NATS_TLS_CA (the CA of \
                          the server's certificate), that the certificate is valid for this host and \
                          not expired, NATS_TLS_CERT and NATS_TLS_KEY (mutual TLS), and NATS_TLS_FIRST"
                    .to_owned(),
            }),
            _ => None,
        };
        match &refusal {
            Some(r) => tracing::error!(attempt, "{}", r.message),
            None => tracing::warn!(attempt, error = %what, "cannot reach the NATS server; retrying"),
        }
        if refusal.is_some() {
            self.refused.send_replace(refusal);
        }
    }

    pub(super) async fn on(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::SlowConsumer(sid) => {
                self.slow.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    sid,
                    "slow consumer: async-nats dropped messages of a full subscription"
                );
            }
            async_nats::Event::Connected => {
                self.failed_attempts.store(0, Ordering::Relaxed);
                self.refused.send_replace(None);
                tracing::info!("connected to NATS");
            }
            async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS, reconnecting"),
            // Reported again, with a hint, as the failed attempt it ends.
            async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {}
            async_nats::Event::ServerError(e) => {
                let text = e.to_string();
                tracing::error!(error = %text, "NATS server error");
                let _ = self.server_errors.send(text);
            }
            async_nats::Event::ClientError(async_nats::ClientError::Other(what)) => {
                self.attempt_failed(&what).await
            }
            async_nats::Event::ClientError(e) => tracing::warn!(error = %e, "NATS client error"),
            other => tracing::info!(event = %other, "NATS event"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn reconnect_delay_is_bounded() {
        assert_eq!(reconnect_delay(1), Duration::from_millis(100));
        assert_eq!(reconnect_delay(2), Duration::from_millis(200));
        assert_eq!(reconnect_delay(100), Duration::from_secs(2));
    }
}
