//! Dead letters: durable messages a handler gave up on (non-retryable
//! failure, undecodable payload, deliveries used up) and outbox events the
//! broker can never take, kept with the payload and headers, the error,
//! the handler and the delivery count, for an operator to list, look at,
//! replay or purge.
//!
//! ```no_run
//! # async fn example(runtime: &catga::Runtime) -> catga::Result<()> {
//! let dlq = runtime.dead_letters();        // this service's letters, checked against the store
//! for letter in dlq.list(0, 100).await? {
//!     println!("{} {} failed {} times: {}", letter.seq, letter.subject, letter.deliveries, letter.error);
//! }
//! dlq.replay(7).await?; // sends #7 again (a new message id) and removes it
//! # Ok(())
//! # }
//! ```
//!
//! - Each service has its own letters (one stream per service,
//!   `catga.dead.<service>.>`): purging them leaves other services'.
//! - The replica that writes a letter records its digest in the store
//!   under the letter's id. Read through a runtime, each letter says
//!   whether it is one catga wrote, unchanged ([`DeadLetter::authentic`]);
//!   anyone allowed to publish on the dead-letter subjects could publish a
//!   letter, so [`replay`](DeadLetters::replay) sends only authentic,
//!   whole letters, to a subject one of the service's durable handlers (or
//!   its outbox, or its keyed sagas) takes. [`replay_forced`](DeadLetters::replay_forced)
//!   skips those checks, for an operator who looked at the letter.
//! - The error text of a 5xx failure is not kept (it may hold internals, as
//!   in error replies): the letter names the kind and the error id under
//!   which the replica logged the full text.

use crate::client::Client;
use crate::error::{Error, ErrorKind, Result};
use crate::store::Store;
pub use crate::transport::DeadLetter;

/// The dead letters of one service. Cheap to clone.
#[derive(Clone)]
pub struct DeadLetters {
    client: Client,
    service: String,
    /// The store the letters' records are in, when read through a runtime.
    store: Option<Store>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("service", &self.service)
            .field("checked", &self.store.is_some())
            .finish()
    }
}

impl Client {
    /// The dead letters of this client's service (a runtime's client: its
    /// service; [`Client::connect_with`]: `CATGA_SERVICE`). Read without
    /// the store, letters are not checked ([`DeadLetter::authentic`] is
    /// `None`) and are replayed only with
    /// [`replay_forced`](DeadLetters::replay_forced); use
    /// [`Runtime::dead_letters`](crate::Runtime::dead_letters) to check
    /// them.
    pub fn dead_letters(&self) -> DeadLetters {
        self.dead_letters_of(self.service())
    }

    /// The dead letters of `service`, read without the store (see
    /// [`dead_letters`](Self::dead_letters)).
    pub fn dead_letters_of(&self, service: &str) -> DeadLetters {
        DeadLetters {
            client: self.clone(),
            service: service.to_owned(),
            store: None,
        }
    }
}

impl DeadLetters {
    /// `config.service`'s dead letters, for an operator's tool: connects
    /// to the broker in `config` and, with `REDIS_URL`, to the store the
    /// replicas write letter records to (checked letters; nothing runs in
    /// the background, unlike a runtime).
    pub async fn connect(config: &crate::Config) -> Result<DeadLetters> {
        let client = Client::connect_with(config).await?;
        let store = match crate::store::RedisConnect::from_config(config) {
            Some(redis) => {
                Some(crate::store::RedisStore::connect(&redis, &config.service, config.store_shards)?.into())
            }
            None => None,
        };
        Ok(DeadLetters {
            client,
            service: config.service.clone(),
            store,
        })
    }

    pub(crate) fn checked(client: Client, service: String, store: Store) -> DeadLetters {
        DeadLetters {
            client,
            service,
            store: Some(store),
        }
    }

    /// The service whose letters these are.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Dead letters from sequence `from` on, oldest first, at most `limit`.
    pub async fn list(&self, from: u64, limit: usize) -> Result<Vec<DeadLetter>> {
        let mut letters = self
            .client
            .transport()
            .dead_letters(&self.service, from, limit)
            .await?;
        self.check(&mut letters).await?;
        Ok(letters)
    }

    /// One dead letter; [`ErrorKind::NotFound`] if there is none at `seq`.
    pub async fn get(&self, seq: u64) -> Result<DeadLetter> {
        let letter = self
            .client
            .transport()
            .dead_letter(&self.service, seq)
            .await?
            .ok_or_else(|| Error::not_found(format!("no dead letter {seq}")))?;
        let mut one = vec![letter];
        self.check(&mut one).await?;
        Ok(one.remove(0))
    }

    /// Marks each letter authentic or not, when the store is at hand.
    async fn check(&self, letters: &mut [DeadLetter]) -> Result<()> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let ids: Vec<String> = letters
            .iter()
            .map(|l| l.letter_id.clone().unwrap_or_default())
            .collect();
        let recorded = store.letter_digests(&ids).await?;
        for (letter, record) in letters.iter_mut().zip(recorded) {
            let authentic = letter.letter_id.is_some() && record.is_some_and(|d| d == letter.digest());
            letter.authentic = Some(authentic);
        }
        Ok(())
    }

    /// Sends a dead letter again to its subject's stream, with its
    /// original headers and payload under a new message id, then removes
    /// it. Refused ([`ErrorKind::Unauthorized`] or
    /// [`ErrorKind::Invalid`]) for a letter that is not authentic (or not
    /// checked), was cut to fit, or names a subject none of the service's
    /// durable handlers, keyed sagas or outbox events use; see
    /// [`replay_forced`](Self::replay_forced).
    pub async fn replay(&self, seq: u64) -> Result<()> {
        self.replay_checked(seq, false).await
    }

    /// [`replay`](Self::replay) without its checks, for a letter an
    /// operator looked at.
    pub async fn replay_forced(&self, seq: u64) -> Result<()> {
        self.replay_checked(seq, true).await
    }

    async fn replay_checked(&self, seq: u64, forced: bool) -> Result<()> {
        let letter = self.get(seq).await?;
        if !forced {
            self.may_replay(&letter)?;
        }
        let transport = self.client.transport();
        transport
            .publish_durable(
                &letter.subject,
                letter.replay_headers(),
                letter.payload.clone(),
                self.client.request_timeout(),
            )
            .await?;
        transport.delete_dead_letter(&self.service, seq).await?;
        // Used up: a copy of it published again is not authentic.
        if let (Some(store), Some(id)) = (&self.store, &letter.letter_id) {
            store.forget_letter(id).await?;
        }
        Ok(())
    }

    fn may_replay(&self, letter: &DeadLetter) -> Result<()> {
        let seq = letter.seq;
        match letter.authentic {
            Some(true) => {}
            Some(false) => {
                return Err(Error::new(
                    ErrorKind::Unauthorized,
                    format!(
                        "dead letter {seq} is not one catga wrote, or it changed since (the store has no \
                         matching record): look at it, and use replay_forced if it is right"
                    ),
                ));
            }
            None => {
                return Err(Error::new(
                    ErrorKind::Unauthorized,
                    format!(
                        "dead letter {seq} was read without the store, so it is not known to be one catga \
                         wrote: read it through Runtime::dead_letters, or use replay_forced"
                    ),
                ));
            }
        }
        if let Some(size) = letter.truncated {
            return Err(Error::invalid(format!(
                "dead letter {seq} keeps only the first {} of its {size} bytes: replay_forced sends what \
                 is kept",
                letter.payload.len()
            )));
        }
        let saga_prefix = format!("catga.saga.{}.", crate::transport::subject_token(&self.service));
        let taken = letter.handler == "outbox"
            || letter.subject.starts_with(&saga_prefix)
            || crate::registry::handlers()
                .iter()
                .any(|h| h.durable().is_some() && h.subject() == letter.subject);
        if !taken {
            return Err(Error::invalid(format!(
                "dead letter {seq} names subject {}, which no durable handler of this service takes: \
                 replay_forced sends it anyway",
                letter.subject
            )));
        }
        Ok(())
    }

    /// Removes one dead letter; [`ErrorKind::NotFound`] if there is none.
    pub async fn purge(&self, seq: u64) -> Result<()> {
        if self
            .client
            .transport()
            .delete_dead_letter(&self.service, seq)
            .await?
        {
            Ok(())
        } else {
            Err(Error::not_found(format!("no dead letter {seq}")))
        }
    }

    /// Removes every dead letter of this service (one purge of its
    /// stream); returns how many.
    pub async fn purge_all(&self) -> Result<u64> {
        self.client.transport().purge_dead_letters(&self.service).await
    }
}
