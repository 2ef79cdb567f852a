//! Group commit: store calls of one kind for one shard that come while
//! earlier ones are in flight go to Redis together, as one script call.
//!
//! Measured before (`BENCH_ONLY=inbox`, 16 requesters): an idempotent
//! command made two script calls of its own (claim, then commit), and
//! most of what it cost more than a plain command was not the scripts'
//! work but their round trips: the process spent 23 µs more CPU per
//! request, mostly in the kernel (task switches and wake-ups for each
//! write and reply), and Redis 21 µs per request for 7 commands. Calls
//! that come together now share one write, one reply and one script run.
//!
//! A call never waits for others: the first goes out at once, and calls
//! gather only while [`IN_FLIGHT`] batches of the shard are out, so that
//! a lone call costs what it did and a busy shard sends fewer, larger
//! batches.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// Batches of one shard out at once before calls wait to go together.
const IN_FLIGHT: usize = 2;

/// The most calls in one batch.
const MOST_CALLS: usize = 128;

/// About the most bytes of arguments in one batch (a call larger than
/// this goes alone): one script call holds Redis for as long as it runs.
const MOST_BYTES: usize = 1 << 20;

/// A call waiting to go, with the size of its arguments.
pub(crate) trait Call: Send + 'static {
    /// Bytes of arguments it adds to a batch.
    fn size(&self) -> usize;

    /// Whether its caller stopped waiting (dropped: a drain deadline, a
    /// partition given up); such a call is not sent.
    fn abandoned(&self) -> bool;
}

/// Sends one batch (of one shard) and answers each of its calls.
pub(crate) type SendBatch<C> =
    Arc<dyn Fn(u32, Vec<C>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The calls of one kind, gathered per shard, each shard by a task of its
/// own started on first use.
pub(crate) struct Batcher<C: Call> {
    shards: Vec<Mutex<Option<UnboundedSender<C>>>>,
    send: SendBatch<C>,
}

impl<C: Call> Batcher<C> {
    pub(crate) fn new(shards: u32, send: SendBatch<C>) -> Batcher<C> {
        Batcher {
            shards: (0..shards.max(1)).map(|_| Mutex::new(None)).collect(),
            send,
        }
    }

    /// Queues `call` for `shard`; `send` answers it. A task of a runtime
    /// that has ended (a store kept across runtimes, as in tests) is
    /// started again in the caller's.
    pub(crate) fn submit(&self, shard: u32, call: C) -> crate::error::Result<()> {
        let Some(slot) = self.shards.get(shard as usize) else {
            return Err(crate::error::Error::new(
                crate::error::ErrorKind::Internal,
                format!("store shard {shard} out of range"),
            ));
        };
        let mut slot = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let call = match slot.as_ref() {
            Some(tx) => match tx.send(call) {
                Ok(()) => return Ok(()),
                Err(back) => back.0,
            },
            None => call,
        };
        let (tx, rx) = unbounded_channel();
        let _ = tx.send(call);
        tokio::spawn(run(shard, rx, Arc::clone(&self.send)));
        *slot = Some(tx);
        Ok(())
    }
}

async fn run<C: Call>(shard: u32, mut calls: UnboundedReceiver<C>, send: SendBatch<C>) {
    let mut out = FuturesUnordered::new();
    let mut open = true;
    while open || !out.is_empty() {
        tokio::select! {
            biased;
            Some(()) = out.next(), if !out.is_empty() => {}
            first = calls.recv(), if open && out.len() < IN_FLIGHT => {
                let Some(first) = first else {
                    open = false;
                    continue;
                };
                let mut bytes = first.size();
                let mut batch = vec![first];
                while batch.len() < MOST_CALLS && bytes < MOST_BYTES {
                    match calls.try_recv() {
                        Ok(call) => {
                            bytes += call.size();
                            batch.push(call);
                        }
                        Err(_) => break,
                    }
                }
                batch.retain(|call| !call.abandoned());
                if !batch.is_empty() {
                    out.push(send(shard, batch));
                }
            }
        }
    }
}
