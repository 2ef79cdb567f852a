//! Sagas: journaled steps with compensations (see [`Saga`]).

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;

use crate::client::Context;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Command;
use crate::wire::codec::Decode;

/// Journal fields.
const STATUS: &str = "status";
/// The inbox scope of saga runs (one claim per saga id while it runs).
const RUNS: &str = "saga-run";
const ERROR: &str = "error";
/// `s:<step>`: the step's answer.
const DONE: &str = "s:";
/// `c:<nnnn>:<step>`: the step's compensation (subject, newline, payload).
const COMPENSATION: &str = "c:";
/// `u:<step>`: the step's compensation was sent (or not needed).
const UNDONE: &str = "u:";
/// When the saga first ran (ms since the Unix epoch), for its `timeout`.
const STARTED: &str = "started";
/// `w:<timer>`: when a durable timer of the saga fires (ms since the
/// Unix epoch).
const WAKE: &str = "w:";
/// Journal field prefix: the payload a step was first sent with (`p:<step>`);
/// a resumed saga sends exactly that again, so that the step's inbox,
/// bound to the payload, gives its answer instead of a conflict.
const PAYLOAD: &str = "p:";
/// `pv:<step>` and `cv:<step>`: the version a step's command and its
/// compensation were encoded at, written with them (at every version), so
/// that a resumed saga, perhaps of a newer release, sends the journaled
/// payload under that version and the handler upcasts it if it must. A
/// journal without them was written by a release before versions were
/// journaled: its steps go out under the command's version now and its
/// compensations with no version, as that release sent them (it knew no
/// upcasting). In their own fields, not in the values, so that a replica
/// of that release resuming the saga reads the values as it wrote them.
const PAYLOAD_VERSION: &str = "pv:";
const COMPENSATION_VERSION: &str = "cv:";

/// A journaled version (`pv:`/`cv:`), if readable.
fn journaled_version(v: Option<Bytes>) -> Option<u32> {
    v.and_then(|v| std::str::from_utf8(&v).ok().and_then(|v| v.parse().ok()))
}

/// A wait this short is slept in the process; a longer one hands the
/// trigger back to the broker to come back when the timer fires.
const IN_PROCESS_WAIT: Duration = Duration::from_secs(1);

use crate::wire::unix_ms as ms_of;

fn parse_ms(v: &[u8]) -> u64 {
    std::str::from_utf8(v)
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

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
    /// The saga's id (`<handler fn>:<trigger's message id>`).
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
/// ```
/// # use catga::{command, event, Context, Result};
/// # use serde::{Deserialize, Serialize};
/// # #[event]
/// # #[derive(Serialize, Deserialize)]
/// # pub struct OrderPlaced { pub id: u64, pub cents: u64 }
/// # #[command(reply = u64, idempotent)]
/// # #[derive(Serialize, Deserialize)]
/// # pub struct Reserve { pub order: u64 }
/// # #[command(idempotent)]
/// # #[derive(Serialize, Deserialize)]
/// # pub struct Release { pub order: u64 }
/// # #[command(idempotent)]
/// # #[derive(Serialize, Deserialize)]
/// # pub struct Charge { pub order: u64, pub cents: u64 }
/// # #[command(idempotent)]
/// # #[derive(Serialize, Deserialize)]
/// # pub struct Refund { pub order: u64 }
/// # #[command(idempotent)]
/// # #[derive(Serialize, Deserialize)]
/// # pub struct Ship { pub order: u64, pub hold: u64 }
/// #[event(durable = "fulfil", leader)]
/// async fn fulfil(ctx: &Context, e: OrderPlaced) -> Result<()> {
///     ctx.saga(|saga| async move {
///         let hold = saga.step("reserve", Reserve { order: e.id })
///             .compensate(Release { order: e.id })
///             .await?;
///         saga.step("charge", Charge { order: e.id, cents: e.cents })
///             .compensate(Refund { order: e.id })
///             .await?;
///         saga.step("ship", Ship { order: e.id, hold }).await?;
///         Ok(())
///     })
///     .await?;
///     Ok(())
/// }
/// ```
///
/// - A saga is identified by its handler's function name and the message
///   that triggers it (`fulfil:<message id>`), so a redelivered trigger (a
///   durable event: its replica died, or the saga failed retryably)
///   resumes the same saga, and two sagas started by one event keep
///   separate journals.
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
///   token (a keyed saga's: its partition's lease): a replica that lost the
///   lease cannot move a saga on.
/// - Time: a step may have a time-out ([`Step::timeout`]); a `#[saga]`
///   may have one (`timeout = "30s"`), past which it is compensated; and
///   [`Saga::sleep`] waits durably (the wake-up time is journaled, a long
///   wait gives the trigger back to the broker until then). A retryable
///   failure on the trigger's last delivery, or past the saga's time-out,
///   compensates instead of leaving the saga half done; so does a step
///   whose outcome is unknown then (it timed out): its own compensation is
///   sent too, so compensations must accept undoing what never happened.
#[derive(Clone)]
pub struct Saga {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Context,
    id: String,
    /// The mark of this run's claim in the store, if it has one: every
    /// journal write checks that the run still holds it (another run took
    /// it over when this replica was thought gone). Fenced sagas have
    /// none: their lease's token fences the writes.
    run: Option<String>,
    journal: Mutex<BTreeMap<String, Bytes>>,
    /// When the saga times out (ms since the Unix epoch); 0: never.
    deadline: AtomicU64,
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
        // Two sagas may start from one event: each has its own journal.
        let name = self.handler().rsplit("::").next().unwrap_or_default();
        let id = crate::wire::bounded_id(format!("{name}:{}", self.message_id()));
        // One run of a saga id at a time. A fenced saga (a leader's, a
        // keyed saga's partition) runs on the one replica holding its
        // lease, whose token fences every write: a run claim in this
        // process is enough, and costs no store round trip (two per saga
        // halved a keyed saga's throughput on a 3-node cluster). Any other
        // saga runs on any replica: its run is claimed in the store.
        let ran = if self.work().fence.is_some() {
            // Per replica: several runtimes in one process (a test kit's,
            // the fault simulator's) are several replicas.
            let _running = LocalRun::enter(&format!("{}\u{0}{id}", self.work().member)).await;
            self.run_saga(id, None, saga).await
        } else {
            let (run, _running) = self.claim_run(&id).await?;
            // Dropped half way (cancelled at a drain deadline), the run's
            // claim is given up in the background.
            let guard = RunGuard {
                orphans: &self.work().orphans,
                shard: self.work().store.shard_of(&id),
                run: Some(&run),
            };
            let ran = self.run_saga(id, Some(run.1.mark()), saga).await;
            if self
                .work()
                .store
                .inbox_abandon(self.work().store.shard_of(&run.0), RUNS, &run.0, &run.1)
                .await
                .is_err()
            {
                let shard = self.work().store.shard_of(&run.0);
                self.work().orphans.give_up(shard, RUNS, &run.0, &run.1);
            }
            guard.disarm();
            ran
        };
        // A retryable failure of a step (a command's replica that was
        // busy, a stale save there) must stay retryable: the saga resumes
        // when its trigger comes back. Passed on as is, it would count as
        // this handler's own failure of a nested send (500, not
        // retryable), and the trigger would be dead-lettered.
        ran.map_err(|e| {
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

    /// Takes the run of saga `id` (waiting while another run of it holds
    /// it, or until that run's replica is gone): one run of a saga at a
    /// time, whatever delivered its trigger twice (a redelivery while it
    /// ran, a duplicate publish outside the stream's window).
    async fn claim_run(&self, id: &str) -> Result<((String, crate::store::Claim), crate::store::Attempt)> {
        let work = self.work();
        let claim = crate::store::Claim {
            digest: String::new(),
            attempt: crate::wire::new_message_id(),
            member: work.member.to_string(),
        };
        // Counted before it is asked for (see `Orphans::is_stale`).
        let mut running = work.orphans.hold(&claim.attempt);
        let mut waited = false;
        let mut doubted = None;
        loop {
            let ttl = Duration::from_secs(24 * 3600);
            // Dropped while the claim is asked for, or failed without an
            // answer, it may be written: given up in the background.
            let run = (id.to_owned(), claim.clone());
            let asking = RunGuard {
                orphans: &work.orphans,
                shard: work.store.shard_of(id),
                run: Some(&run),
            };
            let begun = work
                .store
                .inbox_begin(work.store.shard_of(id), RUNS, id, &claim, ttl, work.alive_for)
                .await;
            if begun.is_ok() {
                asking.disarm();
            } else {
                drop(asking);
            }
            let begun = begun?;
            match begun {
                crate::store::Inbox::Busy(mark) if work.orphans.is_stale(&mark, &work.member, RUNS, id) => {
                    // This replica's run claim, held by nothing here: its
                    // end was lost (a store failover). Given up, and taken
                    // again.
                    tracing::warn!(
                        saga = %id,
                        "a run claim of this replica's that nothing here holds (its end was lost, as in a \
                         store failover): given up"
                    );
                    work.store
                        .inbox_abandon_mark(work.store.shard_of(id), RUNS, id, &mark)
                        .await?;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                crate::store::Inbox::Busy(mark) => {
                    // Another replica's run claim may be one whose end a
                    // store failover lost, which only it can tell.
                    let shard = work.store.shard_of(id);
                    let (me, every) = (&work.member, work.alive_for);
                    work.store
                        .doubt_claim(shard, RUNS, id, &mark, me, every, &mut doubted);
                    if !waited {
                        tracing::info!(saga = %id, "another run of this saga is in progress: waiting for it");
                        waited = true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => {
                    running.owns(RUNS, id);
                    return Ok(((id.to_owned(), claim), running));
                }
            }
        }
    }

    async fn run_saga<F, Fut, T>(&self, id: String, run: Option<String>, saga: F) -> Result<SagaOutcome<T>>
    where
        F: FnOnce(Saga) -> Fut,
        Fut: Future<Output = Result<T>> + Send,
    {
        let journal = self.work().store.saga_load(&id).await?;
        let s = Saga {
            inner: Arc::new(Inner {
                ctx: self.clone(),
                id,
                run,
                journal: Mutex::new(journal),
                deadline: AtomicU64::new(0),
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
        if let Some(timeout) = self.work().saga_timeout {
            let started = match s.get(STARTED) {
                Some(v) => parse_ms(&v),
                None => {
                    let now = self.now_ms();
                    s.write(STARTED, now.to_string().as_bytes()).await?;
                    now
                }
            };
            let deadline = started + timeout.as_millis() as u64;
            s.inner.deadline.store(deadline, Ordering::Relaxed);
            if self.now_ms() >= deadline {
                let cause = Error::new(
                    ErrorKind::Timeout,
                    format!("the saga timed out: it did not finish within {timeout:?}"),
                );
                tracing::warn!(saga = %s.id(), "the saga timed out: compensating");
                s.abort(None, &cause).await?;
                return Ok(SagaOutcome::Compensated { cause });
            }
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
            SagaStatus::Running | SagaStatus::Compensating if failure.is_retryable() && !s.out_of_time() => {
                Err(failure)
            }
            // Failed for good in the saga's own code (or a panic).
            _ => {
                s.abort(None, &failure).await?;
                Ok(SagaOutcome::Compensated { cause: failure })
            }
        }
    }
}

/// A saga id running in this process (see [`Context::saga`]): a second
/// run of it waits until the first ends.
struct LocalRun(String);

/// The saga ids running in this process.
static LOCAL_RUNS: Mutex<Option<std::collections::HashSet<String>>> = Mutex::new(None);

impl LocalRun {
    async fn enter(id: &str) -> LocalRun {
        let mut waited = false;
        loop {
            let entered = LOCAL_RUNS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert_with(Default::default)
                .insert(id.to_owned());
            if entered {
                return LocalRun(id.to_owned());
            }
            if !waited {
                tracing::info!(saga = %id, "another run of this saga is in progress: waiting for it");
                waited = true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for LocalRun {
    fn drop(&mut self) {
        if let Some(running) = LOCAL_RUNS.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
            running.remove(&self.0);
        }
    }
}

/// Gives a saga's run claim up in the background if dropped armed.
struct RunGuard<'a> {
    orphans: &'a crate::store::Orphans,
    /// The store shard of the run's claim (the saga's).
    shard: u32,
    run: Option<&'a (String, crate::store::Claim)>,
}

impl RunGuard<'_> {
    fn disarm(mut self) {
        self.run = None;
    }
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        if let Some((id, claim)) = self.run.take() {
            self.orphans.give_up(self.shard, RUNS, id, claim);
        }
    }
}

impl Saga {
    /// The saga's id: its handler's function name and the id of the
    /// message that triggered it (`fulfil:<message id>`).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The context of the handler running the saga (its trigger's
    /// identity, this replica's client and store).
    pub fn context(&self) -> &Context {
        &self.inner.ctx
    }

    /// Waits durably for `wait` from the first time the saga reaches this
    /// timer (`name`, unique in the saga): the wake-up time is journaled,
    /// so a resumed saga waits only for what is left. A wait of more than a
    /// second hands the trigger back to the broker, to come back when the
    /// timer fires (each such wait costs one delivery of the trigger:
    /// count them in `max_deliver`).
    pub async fn sleep(&self, name: &'static str, wait: Duration) -> Result<()> {
        self.timer(name, self.inner.ctx.now_ms() + wait.as_millis() as u64)
            .await
    }

    /// Waits durably until `at` (see [`sleep`](Self::sleep)): a resumed
    /// saga keeps the time journaled the first time, whatever `at` it
    /// passes then.
    pub async fn sleep_until(&self, name: &'static str, at: SystemTime) -> Result<()> {
        self.timer(name, ms_of(at)).await
    }

    /// Timer `name`: journals `first` as its wake-up time the first time
    /// it is reached, then waits until the journaled time.
    async fn timer(&self, name: &str, first: u64) -> Result<()> {
        let field = format!("{WAKE}{name}");
        let wake = match self.get(&field) {
            Some(v) => parse_ms(&v),
            None => {
                self.write(&field, first.to_string().as_bytes()).await?;
                first
            }
        };
        self.wait_until(name, wake).await
    }

    async fn wait_until(&self, name: &str, wake: u64) -> Result<()> {
        let now = self.inner.ctx.now_ms();
        if now >= wake {
            return Ok(());
        }
        let left = Duration::from_millis(wake - now);
        if left <= IN_PROCESS_WAIT {
            tokio::time::sleep(left).await;
            return Ok(());
        }
        // A timer past the saga's time-out brings the trigger back at the
        // time-out, which compensates then, not when the timer would ring.
        let back_in = match self.deadline() {
            Some(d) if d < wake => Duration::from_millis(d.saturating_sub(now).max(1)),
            _ => left,
        };
        Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "saga {} waits for its timer {name} ({} ms left): its trigger comes back in {} ms",
                self.id(),
                left.as_millis(),
                back_in.as_millis()
            ),
        )
        .with_retry_after(back_in))
    }

    /// When it times out, if it has a time-out.
    fn deadline(&self) -> Option<u64> {
        match self.inner.deadline.load(Ordering::Relaxed) {
            0 => None,
            d => Some(d),
        }
    }

    /// No more tries: the trigger's last delivery, or past the time-out.
    /// A retryable failure then compensates.
    fn out_of_time(&self) -> bool {
        self.inner.ctx.work().last_delivery || self.deadline().is_some_and(|d| self.inner.ctx.now_ms() >= d)
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
            timeout: None,
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
        self.write_all(&[(field, value)]).await
    }

    /// Journals fields in one write, fenced by the lease the handler runs
    /// under and by this run's claim.
    async fn write_all(&self, fields: &[(&str, &[u8])]) -> Result<()> {
        let work = self.inner.ctx.work();
        let run = self.inner.run.as_deref().map(|mark| (RUNS, mark));
        if !work
            .store
            .saga_write(&self.inner.id, fields, work.fence.as_ref(), run)
            .await?
        {
            return Err(crate::state::fenced());
        }
        let mut journal = self.inner.journal.lock().unwrap_or_else(PoisonError::into_inner);
        for (field, value) in fields {
            journal.insert((*field).to_owned(), Bytes::copy_from_slice(value));
        }
        Ok(())
    }

    /// Ends the saga after `failed` (a step that took no effect, or its
    /// own code when `None`) failed for good with `cause`: compensates the
    /// steps before (and a step whose outcome is unknown, not named here).
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
            let version = journaled_version(self.get(&format!("{COMPENSATION_VERSION}{step}")));
            let id = crate::wire::bounded_id(format!("{}/{step}/undo", self.id()));
            self.inner.ctx.work().check_fence()?;
            // Under the version it was encoded at (see `COMPENSATION_VERSION`).
            // An id the broker refuses fails like a refused send (into the
            // match), not past it.
            let sent = match self.inner.ctx.headers_with_id(version.unwrap_or(1), &id) {
                Ok(headers) => {
                    self.inner
                        .ctx
                        .client()
                        .request_with_id(&subject, payload, headers, None)
                        .await
                }
                Err(e) => Err(e),
            };
            match sent {
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
    compensation: Option<Result<(&'static str, u32, Bytes)>>,
    timeout: Option<Duration>,
}

impl<C: Command> Step<C> {
    /// What undoes this step if a later one fails for good: an idempotent
    /// command, sent once.
    pub fn compensate<K: Command>(mut self, undo: K) -> Self {
        self.compensation = Some(undo.encode().map(|payload| (K::SUBJECT, K::VERSION, payload)));
        self
    }

    /// How long the step may take (its command sent again meanwhile while
    /// no replica takes it); the request time-out without it. Past it, the
    /// step failed retryably: the saga resumes later, or compensates if it
    /// is out of time (this step included, since it may have run).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    async fn run(self) -> Result<C::Reply> {
        let Step {
            saga,
            name,
            cmd,
            compensation,
            timeout,
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
        // The payload as first sent (journaled), or encoded now and
        // journaled with the step's compensation before it is sent.
        let payload_field = format!("{PAYLOAD}{name}");
        let version_field = format!("{PAYLOAD_VERSION}{name}");
        let journaled = saga.get(&payload_field);
        let (payload, version) = match &journaled {
            // Journaled without its version: by a release that sent it
            // (and every step) as the command is now.
            Some(p) => (
                p.clone(),
                journaled_version(saga.get(&version_field)).unwrap_or(C::VERSION),
            ),
            None => (cmd.encode()?, C::VERSION),
        };
        let mut writes: Vec<(String, Vec<u8>)> = Vec::new();
        if journaled.is_none() {
            writes.push((payload_field, payload.to_vec()));
            writes.push((version_field, version.to_string().into_bytes()));
        }
        if let Some(compensation) = compensation {
            let (subject, undo_version, undo) = compensation?;
            let (known, count) = {
                let journal = saga.inner.journal.lock().unwrap_or_else(PoisonError::into_inner);
                let known = compensations(&journal).any(|(step, _)| step == name);
                (known, compensations(&journal).count())
            };
            if !known {
                let mut value = Vec::with_capacity(subject.len() + 1 + undo.len());
                value.extend_from_slice(subject.as_bytes());
                value.push(b'\n');
                value.extend_from_slice(&undo);
                writes.push((format!("{COMPENSATION}{count:04}:{name}"), value));
                writes.push((
                    format!("{COMPENSATION_VERSION}{name}"),
                    undo_version.to_string().into_bytes(),
                ));
            }
        }
        if !writes.is_empty() {
            let fields: Vec<(&str, &[u8])> = writes.iter().map(|(f, v)| (f.as_str(), v.as_slice())).collect();
            saga.write_all(&fields).await?;
        }
        let id = crate::wire::bounded_id(format!("{}/{name}", saga.id()));
        // Within the saga's time-out too.
        let left = saga
            .deadline()
            .map(|d| Duration::from_millis(d.saturating_sub(saga.inner.ctx.now_ms()).max(1)));
        let within = match (timeout, left) {
            (Some(t), Some(l)) => Some(t.min(l)),
            (t, l) => t.or(l),
        };
        saga.inner.ctx.work().check_fence()?;
        // An id the broker refuses fails like a refused send: the step is
        // not run, and the steps before it are compensated.
        let sent = match saga.inner.ctx.headers_with_id(version, &id) {
            Ok(headers) => {
                let request = saga
                    .inner
                    .ctx
                    .client()
                    .request_with_id(C::SUBJECT, payload, headers, within);
                match saga.deadline() {
                    // The saga's time-out also ends a request in flight
                    // when a test kit moves the clock past it (by the
                    // system's clock, the request's own deadline does).
                    Some(deadline) => {
                        let clock = saga.inner.ctx.client().transport().clock();
                        tokio::select! {
                            sent = request => sent,
                            () = clock.until_ms(deadline) => Err(Error::new(
                                ErrorKind::Timeout,
                                format!("step {name}: the saga's time-out passed while it waited for the answer"),
                            )),
                        }
                    }
                    None => request.await,
                }
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(answer) => {
                saga.write(&format!("{DONE}{name}"), &answer).await?;
                decode::<C::Reply>(name, &answer)
            }
            // Out of tries: the step may or may not have run; compensate
            // it with the others.
            Err(e) if e.is_retryable() && saga.out_of_time() => {
                tracing::warn!(saga = %saga.id(), step = name, error = %e, "the saga is out of time: compensating");
                saga.abort(None, &e).await?;
                Err(e)
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
