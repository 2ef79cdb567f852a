//! Core NATS transport (async-nats).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use bytes::Bytes;
use futures_util::StreamExt;

use super::{Headers, Incoming, Reply, ReplyTo};
use crate::error::{Error, ErrorKind, Result};

/// A connection to a NATS server or cluster. Cheap to clone.
#[derive(Clone)]
pub struct NatsTransport {
    client: async_nats::Client,
    slow_consumer_events: Arc<AtomicU64>,
}

/// Reconnect back-off: 50 ms doubling up to 2 s, so that a restarted broker
/// is found again within about two seconds.
fn reconnect_delay(attempts: usize) -> Duration {
    let exp = attempts.min(6) as u32;
    Duration::from_millis(50u64 << exp).min(Duration::from_secs(2))
}

impl NatsTransport {
    /// Connects in the background: returns at once, retries forever, and
    /// queues subscriptions until the first connection succeeds.
    pub(crate) async fn connect(
        url: &str,
        name: &str,
        subscription_capacity: usize,
    ) -> Result<NatsTransport> {
        let slow = Arc::new(AtomicU64::new(0));
        let slow_cb = Arc::clone(&slow);
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .subscription_capacity(subscription_capacity.max(1))
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                let slow = Arc::clone(&slow_cb);
                async move {
                    match event {
                        async_nats::Event::SlowConsumer(sid) => {
                            slow.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(sid, "slow consumer: NATS subscription is full, messages dropped");
                        }
                        async_nats::Event::Connected => tracing::info!("connected to NATS"),
                        async_nats::Event::Disconnected => {
                            tracing::warn!("disconnected from NATS, reconnecting")
                        }
                        other => tracing::info!(event = %other, "NATS event"),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!("invalid NATS url {}: {e}", crate::config::redact_url(url)),
                )
                .with_source(e)
            })?;
        Ok(NatsTransport {
            client,
            slow_consumer_events: slow,
        })
    }

    /// The underlying async-nats client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Slow-consumer events reported by the client so far.
    pub fn slow_consumer_events(&self) -> u64 {
        self.slow_consumer_events.load(Ordering::Relaxed)
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    pub(crate) async fn request(
        &self,
        subject: &async_nats::Subject,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Reply> {
        let mut request = async_nats::Request::new().payload(payload).timeout(Some(timeout));
        // Without headers the message goes as a plain PUB, cheaper to write
        // and to parse.
        if !headers.is_empty() {
            request = request.headers(headers);
        }
        match self.client.send_request(subject.clone(), request).await {
            Ok(msg) => Ok(Reply {
                headers: msg.headers,
                payload: msg.payload,
            }),
            Err(e) => Err(match e.kind() {
                RequestErrorKind::NoResponders => super::memory::no_handler(subject),
                RequestErrorKind::TimedOut => Error::new(
                    ErrorKind::Timeout,
                    format!("no reply on subject {subject} within {timeout:?}"),
                ),
                RequestErrorKind::InvalidSubject | RequestErrorKind::MaxPayloadExceeded => {
                    Error::new(ErrorKind::Invalid, format!("request on {subject} rejected: {e}"))
                }
                _ => Error::new(ErrorKind::Transport, format!("request on {subject} failed: {e}")),
            }
            .with_source(e)),
        }
    }

    pub(crate) async fn publish(
        &self,
        subject: &async_nats::Subject,
        headers: Headers,
        payload: Bytes,
    ) -> Result<()> {
        if headers.is_empty() {
            self.client.publish(subject.clone(), payload).await
        } else {
            self.client
                .publish_with_headers(subject.clone(), headers, payload)
                .await
        }
        .map_err(|e| {
            Error::new(ErrorKind::Transport, format!("publish on {subject} failed: {e}")).with_source(e)
        })
    }

    pub(crate) async fn respond(
        &self,
        to: async_nats::Subject,
        headers: Option<Headers>,
        payload: Bytes,
    ) -> Result<()> {
        match headers {
            Some(h) => self.client.publish_with_headers(to, h, payload).await,
            None => self.client.publish(to, payload).await,
        }
        .map_err(|e| Error::new(ErrorKind::Transport, format!("reply failed: {e}")).with_source(e))
    }

    pub(crate) async fn subscribe(
        &self,
        subject: &str,
        queue_group: Option<&str>,
    ) -> Result<NatsSubscription> {
        let sub = match queue_group {
            Some(group) => {
                self.client
                    .queue_subscribe(subject.to_owned(), group.to_owned())
                    .await
            }
            None => self.client.subscribe(subject.to_owned()).await,
        }
        .map_err(|e| {
            Error::new(
                ErrorKind::Transport,
                format!("subscribe to {subject} failed: {e}"),
            )
            .with_source(e)
        })?;
        Ok(NatsSubscription { sub })
    }

    pub(crate) async fn flush(&self) -> Result<()> {
        self.client
            .flush()
            .await
            .map_err(|e| Error::new(ErrorKind::Transport, format!("flush failed: {e}")).with_source(e))
    }
}

/// A NATS subscription.
pub(crate) struct NatsSubscription {
    sub: async_nats::Subscriber,
}

impl NatsSubscription {
    pub(crate) async fn next(&mut self) -> Option<Incoming> {
        let msg = self.sub.next().await?;
        Some(Incoming {
            subject: msg.subject,
            headers: msg.headers,
            payload: msg.payload,
            reply: msg.reply.map(ReplyTo::Nats),
        })
    }

    pub(crate) async fn drain(&mut self) {
        if let Err(e) = self.sub.drain().await {
            tracing::warn!(error = %e, "cannot drain NATS subscription");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_is_bounded() {
        assert_eq!(reconnect_delay(0), Duration::from_millis(50));
        assert_eq!(reconnect_delay(1), Duration::from_millis(100));
        assert_eq!(reconnect_delay(100), Duration::from_secs(2));
    }
}
