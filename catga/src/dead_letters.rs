//! Dead letters: durable messages a handler gave up on (non-retryable
//! failure, undecodable payload, or deliveries used up), kept with the
//! original payload and headers, the error, the handler and the delivery
//! count, for an operator to list, look at, replay or purge.
//!
//! ```ignore
//! let dlq = client.dead_letters();
//! for letter in dlq.list(0, 100).await? {
//!     println!("{} {} failed {} times: {}", letter.seq, letter.subject, letter.deliveries, letter.error);
//! }
//! dlq.replay(7).await?; // sends #7 again (a new message id) and removes it
//! ```

use async_nats::Subject;

use crate::client::Client;
use crate::error::{Error, ErrorKind, Result};
pub use crate::transport::DeadLetter;

/// The dead letters of the broker a client talks to: JetStream's
/// `CATGA_DLQ` stream, or the embedded bus's store.
#[derive(Debug)]
pub struct DeadLetters<'a> {
    client: &'a Client,
}

impl Client {
    /// The dead letters.
    pub fn dead_letters(&self) -> DeadLetters<'_> {
        DeadLetters { client: self }
    }
}

impl DeadLetters<'_> {
    /// Dead letters from sequence `from` on, oldest first, at most `limit`.
    pub async fn list(&self, from: u64, limit: usize) -> Result<Vec<DeadLetter>> {
        self.client.transport().dead_letters(from, limit).await
    }

    /// One dead letter; [`ErrorKind::NotFound`] if there is none at `seq`.
    pub async fn get(&self, seq: u64) -> Result<DeadLetter> {
        self.client
            .transport()
            .dead_letter(seq)
            .await?
            .ok_or_else(|| Error::not_found(format!("no dead letter {seq}")))
    }

    /// Sends a dead letter again to its subject, with its original headers
    /// and payload under a new message id, then removes it. To the stream
    /// of its subject (acknowledged) when there is one, so durable handlers
    /// get it again; on core NATS otherwise.
    pub async fn replay(&self, seq: u64) -> Result<()> {
        let letter = self.get(seq).await?;
        let transport = self.client.transport();
        let timeout = self.client.request_timeout();
        let headers = letter.replay_headers();
        match transport
            .publish_durable(&letter.subject, headers.clone(), letter.payload.clone(), timeout)
            .await
        {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NoHandler => {
                transport
                    .publish(
                        &Subject::from(letter.subject.as_str()),
                        headers,
                        letter.payload.clone(),
                        timeout,
                    )
                    .await?;
            }
            Err(e) => return Err(e),
        }
        transport.delete_dead_letter(seq).await?;
        Ok(())
    }

    /// Removes one dead letter; [`ErrorKind::NotFound`] if there is none.
    pub async fn purge(&self, seq: u64) -> Result<()> {
        if self.client.transport().delete_dead_letter(seq).await? {
            Ok(())
        } else {
            Err(Error::not_found(format!("no dead letter {seq}")))
        }
    }

    /// Removes every dead letter; returns how many.
    pub async fn purge_all(&self) -> Result<u64> {
        let mut n = 0;
        loop {
            let batch = self.list(0, 256).await?;
            if batch.is_empty() {
                return Ok(n);
            }
            for letter in batch {
                if self.client.transport().delete_dead_letter(letter.seq).await? {
                    n += 1;
                }
            }
        }
    }
}
