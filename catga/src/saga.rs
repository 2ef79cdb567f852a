//! Sagas: journaled steps with compensations (see [`Saga`]).

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures_util::FutureExt;

use crate::client::Context;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Command;
use crate::wire::codec::Decode;

/// Journal fields.
const STATUS: &str = "status";
const ERROR: &str = "error";
/// `s:<step>`: the step's answer.
const DONE: &str = "s:";
/// `c:<nnnn>:<step>`: the step's compensation (subject, newline, payload).
const COMPENSATION: &str = "c:";
/// `u:<step>`: the step's compensation was sent (or not needed).
const UNDONE: &str = "u:";

/// The journaled compensations, in the order their steps were taken:
/// (step, subject and payload).
fn compensations(journal: &BTreeMap<String, Bytes>) -> impl Iterator<Item = (&str, &Bytes)> {
    journal
        .range(COMPENSATION.to_owned()..)
        .take_while(|(k, _)| k.starts_with(COMPENSATION))
        .map(|(k, v)| (k.splitn(3, ':').nth(2).unwrap_or_default(), v))
}

/// Where a saga stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SagaStatus {
    /// Steps are being taken.
    Running,
    /// A step failed for good; compensations are being sent.
    Compensating,
    /// Every step was taken.
    Completed,
    /// A step failed for good and every compensation was sent.
    Compensated,
    /// A compensation failed for good: an operator must look (the error
    /// is in the journal and the log).
    Failed,
}

impl SagaStatus {
    /// Its name in the journal: `running`, `compensating`, `completed`,
    /// `compensated` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Failed => "failed",
        }
    }

    fn parse(s: &[u8]) -> SagaStatus {
        match s {
            b"compensating" => SagaStatus::Compensating,
            b"completed" => SagaStatus::Completed,
            b"compensated" => SagaStatus::Compensated,
            b"failed" => SagaStatus::Failed,
            _ => SagaStatus::Running,
        }
    }
}

/// A saga as its journal tells it (see `Runtime::sagas`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaInfo {
    /// The saga's id (its trigger's message id).
    pub id: String,
    /// Where it stands.
    pub status: SagaStatus,
    /// Its steps: those with a compensation in the order they were taken,
    /// then the others.
    pub steps: Vec<SagaStepInfo>,
    /// Why it was compensated, or failed.
    pub error: Option<String>,
}

/// One step of a [`SagaInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaStepInfo {
    /// Its name.
    pub name: String,
    /// Its command was answered.
    pub done: bool,
    /// Its compensation: `None` without one; `Some("pending")`, `"sent"`,
    /// or `"not run"` (the step itself failed, so nothing to undo).
    pub compensation: Option<String>,
}

impl SagaInfo {
    /// Reads a journal.
    pub(crate) fn from_journal(id: String, journal: &BTreeMap<String, Bytes>) -> SagaInfo {
        let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
        let mut steps: Vec<SagaStepInfo> = compensations(journal)
            .map(|(name, _)| SagaStepInfo {
                name: name.to_owned(),
                done: journal.contains_key(&format!("{DONE}{name}")),
                compensation: Some(
                    journal
                        .get(&format!("{UNDONE}{name}"))
                        .map_or_else(|| "pending".to_owned(), text),
                ),
            })
            .collect();
        for (field, _) in journal.range(DONE.to_owned()..) {
            let Some(name) = field.strip_prefix(DONE) else {
                break;
            };
            if !steps.iter().any(|s| s.name == name) {
                steps.push(SagaStepInfo {
                    name: name.to_owned(),
                    done: true,
                    compensation: None,
                });
            }
        }
        SagaInfo {
            status: journal
                .get(STATUS)
                .map_or(SagaStatus::Running, |s| SagaStatus::parse(s)),
            error: journal.get(ERROR).map(text),
            id,
            steps,
        }
    }
}

/// How a saga ended (see [`Context::saga`]).
#[derive(Debug)]
pub enum SagaOutcome<T> {
    /// Every step was taken; the saga function's value.
    Completed(T),
    /// A step failed for good (`cause`) and the completed steps were
    /// compensated: a business outcome (a declined payment), not a
    /// failure of the handler.
    Compensated {
        /// Why.
        cause: Error,
    },
    /// It had ended before (the trigger came again): nothing was done.
    Ended(SagaStatus),
}

/// Sagas: a plain async function whose steps are journaled in the store
/// before it goes on, so that it survives the replica that runs it.
///
/// ```ignore
/// #[event(durable = "fulfil", leader)]
/// async fn fulfil(ctx: &Context, e: OrderPlaced) -> Result<()> {
///     ctx.saga(|saga| async move {
///         let hold = saga.step("reserve", Reserve { .. }).compensate(Release { .. }).await?;
///         saga.step("charge", Charge { .. }).compensate(Refund { .. }).await?;
///         saga.step("ship", Ship { .. }).await?;
///         Ok(())
///     })
///     .await?;
///     Ok(())
/// }
/// ```
///
/// - A saga is identified by the message that triggers it (its id), so a
///   redelivered trigger (a durable event: its replica died, or the saga
///   failed retryably) resumes the same saga.
/// - A step sends an idempotent command under the id `saga id/step name`.
///   Its compensation is journaled before the command is sent, its answer
///   after: a resumed saga gets the journaled answer without sending again,
///   and a step whose answer was lost is sent again under the same id and
///   gets the first answer (the command's inbox).
/// - A step that fails for good (a non-retryable error) ends the saga: the
///   compensations of the steps before it are sent, newest first, each once
///   (journaled too), and the saga is `compensated`. A retryable failure
///   fails the handler, so the trigger comes back and the saga resumes.
///   A panic in the saga's code compensates as well.
/// - Every journal write of a `leader` handler carries its lease's fencing
///   token: a replica that lost the lease cannot move a saga on.
#[derive(Clone)]
pub struct Saga {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Context,
    id: String,
    journal: Mutex<BTreeMap<String, Bytes>>,
}

impl std::fmt::Debug for Saga {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saga").field("id", &self.inner.id).finish()
    }
}

impl Context {
    /// Runs `saga` as the saga of the message being handled (see
    /// [`Saga`]): from the top, with the steps the
    /// journal holds answered from it. An error is retryable (the trigger
    /// comes back and the saga resumes) or means a compensation failed for
    /// good (the saga is `Failed`).
    pub async fn saga<F, Fut, T>(&self, saga: F) -> Result<SagaOutcome<T>>
    where
        F: FnOnce(Saga) -> Fut,
        Fut: Future<Output = Result<T>> + Send,
    {
        // A retryable failure of a step (a command's replica that was
        // busy, a stale save there) must stay retryable: the saga resumes
        // when its trigger comes back. Passed on as is, it would count as
        // this handler's own failure of a nested send (500, not
        // retryable), and the trigger would be dead-lettered.
        self.run_saga(saga).await.map_err(|e| {
            if e.is_retryable() && e.is_remote() {
                Error::new(
                    e.kind(),
                    format!("a saga step will be tried again: {}", e.message()),
                )
            } else {
                e
            }
        })
    }

    async fn run_saga<F, Fut, T>(&self, saga: F) -> Result<SagaOutcome<T>>
    where
        F: FnOnce(Saga) -> Fut,
        Fut: Future<Output = Result<T>> + Send,
    {
        let id = self.message_id().to_owned();
        let journal = self.work().store.saga_load(&id).await?;
        let s = Saga {
            inner: Arc::new(Inner {
                ctx: self.clone(),
                id,
                journal: Mutex::new(journal),
            }),
        };
        match s.status() {
            status @ (SagaStatus::Completed | SagaStatus::Compensated) => {
                return Ok(SagaOutcome::Ended(status));
            }
            SagaStatus::Failed => return Err(s.failed()),
            SagaStatus::Compensating => {
                s.compensate().await?;
                return Ok(SagaOutcome::Compensated { cause: s.cause() });
            }
            SagaStatus::Running => {}
        }
        let ran = std::panic::AssertUnwindSafe(saga(s.clone())).catch_unwind().await;
        let failure = match ran {
            Ok(Ok(value)) => {
                s.write(STATUS, SagaStatus::Completed.as_str().as_bytes()).await?;
                return Ok(SagaOutcome::Completed(value));
            }
            Ok(Err(e)) => e,
            Err(panic) => {
                let text = crate::error::panic_message(&panic);
                tracing::error!(saga = %s.id(), panic = %text, "the saga panicked: compensating");
                Error::new(ErrorKind::Panic, format!("the saga panicked: {text}"))
            }
        };
        match s.status() {
            // A step failed for good and compensated already.
            SagaStatus::Compensated => Ok(SagaOutcome::Compensated { cause: failure }),
            SagaStatus::Failed => Err(s.failed()),
            // Resumed later: the trigger comes back.
            SagaStatus::Running | SagaStatus::Compensating if failure.is_retryable() => Err(failure),
            // Failed for good in the saga's own code (or a panic).
            _ => {
                s.abort(None, &failure).await?;
                Ok(SagaOutcome::Compensated { cause: failure })
            }
        }
    }
}

impl Saga {
    /// The saga's id: the id of the message that triggered it.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Where it stands.
    pub fn status(&self) -> SagaStatus {
        self.get(STATUS)
            .map_or(SagaStatus::Running, |s| SagaStatus::parse(&s))
    }

    /// A step: sends `cmd` (an idempotent command) once for this saga, or
    /// answers from the journal if it was sent before. Add its
    /// compensation with [`Step::compensate`], then `.await` it.
    pub fn step<C: Command>(&self, name: &'static str, cmd: C) -> Step<C> {
        Step {
            saga: self.clone(),
            name,
            cmd,
            compensation: None,
        }
    }

    fn get(&self, field: &str) -> Option<Bytes> {
        self.inner
            .journal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(field)
            .cloned()
    }

    /// Journals `field`, fenced by the leader lease the handler runs under.
    async fn write(&self, field: &str, value: &[u8]) -> Result<()> {
        let work = self.inner.ctx.work();
        if !work
            .store
            .saga_write(&self.inner.id, field, value, work.fence)
            .await?
        {
            return Err(crate::state::fenced());
        }
        self.inner
            .journal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(field.to_owned(), Bytes::copy_from_slice(value));
        Ok(())
    }

    /// Ends the saga after `failed` (a step, or its own code when
    /// `None`) failed for good with `cause`: compensates the steps before.
    async fn abort(&self, failed: Option<&str>, cause: &Error) -> Result<()> {
        if let Some(step) = failed {
            // Its command failed for good: it took no effect.
            self.write(&format!("{UNDONE}{step}"), b"not run").await?;
        }
        self.write(ERROR, cause.to_string().as_bytes()).await?;
        self.write(STATUS, SagaStatus::Compensating.as_str().as_bytes())
            .await?;
        self.compensate().await
    }

    /// Why it was compensated, as journaled.
    fn cause(&self) -> Error {
        let text = self.get(ERROR).map(|e| String::from_utf8_lossy(&e).into_owned());
        Error::new(
            ErrorKind::Conflict,
            text.unwrap_or_else(|| "compensated".to_owned()),
        )
    }

    fn failed(&self) -> Error {
        let text = self
            .get(ERROR)
            .map(|e| String::from_utf8_lossy(&e).into_owned())
            .unwrap_or_default();
        Error::new(
            ErrorKind::Internal,
            format!("saga {} failed and needs an operator: {text}", self.id()),
        )
    }

    /// Sends the compensations not sent yet, newest first, then marks the
    /// saga compensated. A retryable error leaves it compensating (to be
    /// resumed); one that is not leaves it `Failed`.
    async fn compensate(&self) -> Result<()> {
        let pending: Vec<(String, Bytes)> = {
            let journal = self.inner.journal.lock().unwrap_or_else(PoisonError::into_inner);
            compensations(&journal)
                .map(|(step, v)| (step.to_owned(), v.clone()))
                .collect()
        };
        for (step, value) in pending.into_iter().rev() {
            if self.get(&format!("{UNDONE}{step}")).is_some() {
                continue;
            }
            let Some(split) = value.iter().position(|b| *b == b'\n') else {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!("saga {}: unreadable compensation of {step}", self.id()),
                ));
            };
            let subject = String::from_utf8_lossy(&value[..split]).into_owned();
            let payload = value.slice(split + 1..);
            let id = format!("{}/{step}/undo", self.id());
            match self
                .inner
                .ctx
                .client()
                .request_with_id(&subject, payload, &id)
                .await
            {
                Ok(_) => self.write(&format!("{UNDONE}{step}"), b"sent").await?,
                Err(e) if e.is_retryable() => return Err(e),
                Err(e) => {
                    tracing::error!(saga = %self.id(), step, error = %e, "a compensation failed for good: the saga needs an operator");
                    self.write(ERROR, e.to_string().as_bytes()).await?;
                    self.write(STATUS, SagaStatus::Failed.as_str().as_bytes()).await?;
                    return Err(self.failed());
                }
            }
        }
        self.write(STATUS, SagaStatus::Compensated.as_str().as_bytes())
            .await
    }
}

/// A step of a saga; `.await` it (see [`Saga::step`]).
#[must_use = "a step does nothing until it is awaited"]
pub struct Step<C: Command> {
    saga: Saga,
    name: &'static str,
    cmd: C,
    compensation: Option<Result<(&'static str, Bytes)>>,
}

impl<C: Command> Step<C> {
    /// What undoes this step if a later one fails for good: an idempotent
    /// command, sent once.
    pub fn compensate<K: Command>(mut self, undo: K) -> Self {
        self.compensation = Some(undo.encode().map(|payload| (K::SUBJECT, payload)));
        self
    }

    async fn run(self) -> Result<C::Reply> {
        let Step {
            saga,
            name,
            cmd,
            compensation,
        } = self;
        if !C::IDEMPOTENT {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "saga step `{name}`: `{}` must be an idempotent command (`#[command(idempotent)]`), \
                     so that a resumed saga never applies it twice",
                    C::NAME
                ),
            ));
        }
        if let Some(answer) = saga.get(&format!("{DONE}{name}")) {
            return decode::<C::Reply>(name, &answer);
        }
        if saga.status() != SagaStatus::Running {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "saga {} is {}: step {name} is not taken",
                    saga.id(),
                    saga.status().as_str()
                ),
            ));
        }
        if let Some(compensation) = compensation {
            let (subject, payload) = compensation?;
            let (known, count) = {
                let journal = saga.inner.journal.lock().unwrap_or_else(PoisonError::into_inner);
                let known = compensations(&journal).any(|(step, _)| step == name);
                (known, compensations(&journal).count())
            };
            if !known {
                let mut value = Vec::with_capacity(subject.len() + 1 + payload.len());
                value.extend_from_slice(subject.as_bytes());
                value.push(b'\n');
                value.extend_from_slice(&payload);
                saga.write(&format!("{COMPENSATION}{count:04}:{name}"), &value)
                    .await?;
            }
        }
        let payload = cmd.encode()?;
        let id = format!("{}/{name}", saga.id());
        match saga
            .inner
            .ctx
            .client()
            .request_with_id(C::SUBJECT, payload, &id)
            .await
        {
            Ok(answer) => {
                saga.write(&format!("{DONE}{name}"), &answer).await?;
                decode::<C::Reply>(name, &answer)
            }
            Err(e) if e.is_retryable() => Err(e),
            Err(e) => {
                saga.abort(Some(name), &e).await?;
                Err(e)
            }
        }
    }
}

impl<C: Command> IntoFuture for Step<C>
where
    C: Send + 'static,
    C::Reply: Send,
{
    type Output = Result<C::Reply>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<C::Reply>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

fn decode<R: Decode>(step: &str, answer: &[u8]) -> Result<R> {
    R::decode(answer, std::any::type_name::<R>()).map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!(
                "the journaled answer of step {step} cannot be read: {}",
                e.message()
            ),
        )
    })
}
