//! The path of one message, from the transport to the handler and back.
//! Every step is a small function below, called in this order by
//! [`process`]:
//!
//! 1. [`read`]: the headers become the message's identity ([`MessageMeta`]).
//! 2. [`check_version`]: a payload newer than the handler knows is refused.
//! 3. [`check_deadline`]: a request whose sender stopped waiting is not
//!    started (it may already have been retried elsewhere).
//! 4. [`call`]: the handler runs inside its span; a panic is caught.
//! 5. [`conclude`]: a failure becomes the handler's own (a downstream error
//!    is wrapped), 5xx texts are logged under an error id.
//! 6. [`Settler::settle`](crate::transport::Settler::settle): reply, error
//!    reply, or nothing.
//!
//! A step that ends the path early returns the [`Outcome`] to settle with.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use tracing::Instrument;

use super::Served;
use super::Shared;
use crate::client::Context;
use crate::error::{Error, ErrorKind};
use crate::transport::{Delivery, Settle};
use crate::wire::{self, MessageMeta};

/// How a message ended.
pub(crate) enum Outcome {
    /// The handler succeeded with this reply body.
    Done(Bytes),
    /// The message failed.
    Failed(Error),
    /// The sender stopped waiting before the handler started.
    Expired,
}

/// Runs one message down the path (see the module documentation).
pub(crate) async fn process(served: &Served, shared: &Shared, delivery: Delivery) {
    let (incoming, settler) = delivery.split();
    let meta = Arc::new(read(incoming.subject, incoming.headers, incoming.deadline));
    let span = tracing::info_span!(
        "handle",
        handler = served.spec.name(),
        subject = meta.subject(),
        message_id = meta.message_id(),
        correlation_id = meta.correlation_id(),
    );
    async move {
        let outcome = match check_version(served, &meta).and_then(|()| check_deadline(shared, &meta)) {
            Err(early) => early,
            Ok(()) => call(served, shared, &meta, incoming.payload).await,
        };
        let settle = conclude(outcome);
        if let Err(e) = settler.settle(settle).await {
            tracing::warn!(error = %e, "the answer was not sent as is");
        }
    }
    .instrument(span)
    .await
}

/// Step 1: the message's identity, read from its headers on demand.
fn read(
    subject: async_nats::Subject,
    headers: Option<async_nats::HeaderMap>,
    deadline: Option<wire::deadline::Deadline>,
) -> MessageMeta {
    MessageMeta::new(subject, headers, deadline, 1)
}

/// Step 2: refuses a version newer than the handler's message type.
fn check_version(served: &Served, meta: &MessageMeta) -> Result<(), Outcome> {
    let spec = served.spec;
    wire::check_version(meta.headers(), spec.message_type(), spec.version()).map_err(Outcome::Failed)
}

/// Step 3: drops a request whose deadline passed.
fn check_deadline(shared: &Shared, meta: &MessageMeta) -> Result<(), Outcome> {
    match meta.deadline() {
        Some(d) if d.is_past() => {
            shared.count_expired();
            tracing::warn!(
                deadline_unix_ms = d.unix_ms(),
                "request not started: its sender stopped waiting (if this happens for every \
                 request, check that the clocks of the hosts agree)"
            );
            Err(Outcome::Expired)
        }
        _ => Ok(()),
    }
}

/// Step 4: runs the handler; a panic is contained.
async fn call(served: &Served, shared: &Shared, meta: &Arc<MessageMeta>, payload: Bytes) -> Outcome {
    let ctx = Context::new(shared.client.clone(), Arc::clone(meta));
    match AssertUnwindSafe(served.spec.call(ctx, payload))
        .catch_unwind()
        .await
    {
        Ok(Ok(body)) => Outcome::Done(body),
        Ok(Err(e)) => Outcome::Failed(e.into_handler_failure()),
        Err(panic) => Outcome::Failed(Error::new(
            ErrorKind::Panic,
            format!("the handler panicked: {}", panic_message(&panic)),
        )),
    }
}

/// Step 5: logs the outcome and decides the answer. A 5xx failure gets an
/// error id: the log line carries the full text, the reply only the id.
fn conclude(outcome: Outcome) -> Settle {
    match outcome {
        Outcome::Done(body) => {
            tracing::trace!("handled");
            Settle::Reply(body)
        }
        Outcome::Expired => Settle::Drop,
        Outcome::Failed(error) if error.kind().is_public() => {
            tracing::info!(error = %error, "message rejected");
            Settle::Error {
                error,
                error_id: None,
            }
        }
        Outcome::Failed(error) => {
            let error_id = wire::new_message_id();
            if error.kind() == ErrorKind::Panic {
                tracing::error!(error = %error, %error_id, "handler panicked");
            } else {
                tracing::error!(error = %error, %error_id, "handler failed");
            }
            Settle::Error {
                error,
                error_id: Some(error_id),
            }
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
