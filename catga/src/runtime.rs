//! Start-up, serving and graceful shutdown: [`run`], [`Runtime`] and
//! [`RuntimeBuilder`].

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::client::{Client, Context, error_body, error_headers};
use crate::config::{Config, redact_url};
use crate::error::{Error, ErrorKind, Result};
use crate::message::MessageMeta;
use crate::message::headers;
use crate::registry::{self, HandlerKind, HandlerSpec, MessageInfo};
use crate::transport::memory::MemoryBus;
use crate::transport::nats::NatsTransport;
use crate::transport::{Incoming, Subscription, Transport};

/// Runs the service: reads [`Config`] from the environment, serves every
/// registered handler and returns after a graceful drain on SIGTERM or
/// Ctrl-C.
///
/// Without `NATS_URL` it runs on the embedded in-memory transport and says so
/// in its log.
pub async fn run() -> Result<()> {
    start().await?.run_until_signal().await
}

/// What [`run`] does before it waits for a signal: sets up logging, reads the
/// environment, starts serving, and returns the [`Runtime`] so that `main`
/// can also use its [`client`](Runtime::client).
pub async fn start() -> Result<Runtime> {
    init_logging();
    Runtime::builder().config(Config::from_env()?).start().await
}

/// Installs a plain log subscriber (filter from `RUST_LOG`, default `info`)
/// unless the application installed one.
fn init_logging() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer().with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
        )
        .with(filter)
        .try_init();
}

type Filter = Box<dyn Fn(&HandlerSpec) -> bool + Send + Sync>;

/// Builds a [`Runtime`] in code: the same settings as the environment
/// variables of [`Config`], for tests and embedding.
pub struct RuntimeBuilder {
    config: Config,
    bus: Option<MemoryBus>,
    filter: Option<Filter>,
}

impl RuntimeBuilder {
    /// Replaces every setting with `config`.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Serves over NATS at `url`.
    pub fn nats_url(mut self, url: impl Into<String>) -> Self {
        self.config.nats_url = Some(url.into());
        self
    }

    /// Serves on the given in-memory bus (share it between runtimes and
    /// clients of one process). Takes precedence over a NATS URL.
    pub fn memory(mut self, bus: MemoryBus) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Sets the service name.
    pub fn service(mut self, name: impl Into<String>) -> Self {
        self.config.service = name.into();
        self
    }

    /// Sets the replica id.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.config.instance_id = id.into();
        self
    }

    /// Sets the default reply time-out of `send`.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// Sets how long shutdown waits for in-flight handlers.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// Sets the default in-flight limit per handler.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n.max(1);
        self
    }

    /// Sets how many messages each subscription buffers before it drops
    /// (and counts) further ones; see [`Runtime::dropped_messages`].
    pub fn subscription_capacity(mut self, n: usize) -> Self {
        self.config.subscription_capacity = n.max(1);
        self
    }

    /// Starts without handlers: a process that only sends and publishes.
    pub fn client_only(mut self) -> Self {
        self.config.client_only = true;
        self
    }

    /// Serves only the handlers for which `keep` returns true (several
    /// runtimes in one process, or a binary that splits its handlers over
    /// deployments).
    pub fn handlers(mut self, keep: impl Fn(&HandlerSpec) -> bool + Send + Sync + 'static) -> Self {
        self.filter = Some(Box::new(keep));
        self
    }

    /// Checks the handler table, connects and subscribes.
    ///
    /// Returns as soon as the subscriptions are requested: a broker that is
    /// down is retried in the background, and [`Runtime::ready`] tells when
    /// the server confirmed every subscription.
    pub async fn start(self) -> Result<Runtime> {
        let RuntimeBuilder { config, bus, filter } = self;
        let selected: Vec<&'static HandlerSpec> = if config.client_only {
            Vec::new()
        } else {
            registry::handlers()
                .iter()
                .filter(|s| filter.as_ref().is_none_or(|f| f(s)))
                .collect()
        };
        registry::check(&selected, config.client_only)?;

        let (transport, mode) = match (bus, &config.nats_url) {
            (Some(bus), _) => (Transport::Memory(bus), "a shared in-memory bus"),
            (None, Some(url)) => {
                let name = format!("{}/{}", config.service, config.instance_id);
                let nats = NatsTransport::connect(url, &name, config.subscription_capacity).await?;
                (Transport::Nats(nats), "NATS")
            }
            (None, None) => (
                Transport::Memory(MemoryBus::new()),
                "the embedded in-memory transport, one process (NATS_URL is not set)",
            ),
        };
        tracing::info!(
            service = %config.service,
            instance = %config.instance_id,
            nats_url = %config.nats_url.as_deref().map(redact_url).unwrap_or_default(),
            "running on {mode}"
        );
        log_table(&selected, &config);

        let client = Client::from_transport(
            transport.clone(),
            config.service.clone(),
            config.instance_id.clone(),
            config.request_timeout,
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut loops = Vec::with_capacity(selected.len());
        for spec in &selected {
            // Asked once here; the loop and every message reuse it.
            let info = spec.info();
            let sub = transport
                .subscribe(info.subject, spec.queue_group(), config.subscription_capacity)
                .await?;
            let limit = if spec.concurrency > 0 {
                spec.concurrency
            } else {
                config.concurrency
            };
            loops.push(tokio::spawn(serve(
                spec,
                info,
                sub,
                client.clone(),
                limit,
                stop_rx.clone(),
                config.drain_timeout,
            )));
        }

        let (ready_tx, ready_rx) = watch::channel(false);
        let confirm = tokio::spawn(confirm_subscriptions(
            transport.clone(),
            config.instance_id.clone(),
            ready_tx,
        ));
        Ok(Runtime {
            client,
            handlers: selected,
            loops,
            confirm,
            stop: stop_tx,
            ready: ready_rx,
            drain_timeout: config.drain_timeout,
        })
    }
}

fn log_table(selected: &[&'static HandlerSpec], config: &Config) {
    tracing::info!(count = selected.len(), "handler table");
    for s in selected {
        let kind = match s.kind {
            HandlerKind::Command => "command",
            HandlerKind::Event => "event",
        };
        let info = s.info();
        tracing::info!(
            kind,
            subject = info.subject,
            queue_group = s.queue_group().unwrap_or("-"),
            handler = s.name,
            message_type = info.name,
            concurrency = if s.concurrency > 0 {
                s.concurrency
            } else {
                config.concurrency
            },
            "handler"
        );
    }
}

/// Confirms that the server has every subscription: the server handles one
/// connection's protocol lines in order, so once a message published after
/// the subscriptions comes back to a probe subscription made after them,
/// they are all in place.
async fn confirm_subscriptions(transport: Transport, instance_id: String, ready: watch::Sender<bool>) {
    let subject =
        crate::transport::Subject::from(format!("_CATGA.probe.{}", crate::message::new_message_id()));
    let mut probe = match transport.subscribe(&subject, None, 4).await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe the readiness probe");
            return;
        }
    };
    loop {
        if let Err(e) = transport
            .publish(&subject, crate::transport::Headers::new(), bytes::Bytes::new())
            .await
        {
            tracing::warn!(error = %e, "readiness probe not sent");
        }
        match tokio::time::timeout(Duration::from_millis(500), probe.next()).await {
            Ok(Some(_)) => break,
            Ok(None) => return,
            Err(_) => tracing::debug!("waiting for the broker to confirm subscriptions"),
        }
    }
    tracing::info!(instance = %instance_id, "ready: every subscription is confirmed by the broker");
    let _ = ready.send(true);
    probe.drain().await;
}

/// A running replica. Dropping it without [`shutdown`](Self::shutdown)
/// aborts its handlers.
pub struct Runtime {
    client: Client,
    handlers: Vec<&'static HandlerSpec>,
    loops: Vec<JoinHandle<bool>>,
    confirm: JoinHandle<()>,
    stop: watch::Sender<bool>,
    ready: watch::Receiver<bool>,
    drain_timeout: Duration,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("client", &self.client)
            .field("handlers", &self.handlers.len())
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl Runtime {
    /// A builder with the defaults of [`Config`] (not the environment).
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder {
            config: Config::default(),
            bus: None,
            filter: None,
        }
    }

    /// A client on this runtime's transport, carrying its service and
    /// instance id.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The handlers this runtime serves.
    pub fn handlers(&self) -> &[&'static HandlerSpec] {
        &self.handlers
    }

    /// True once the broker confirmed every subscription and while the
    /// connection is up.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow() && self.client.is_connected()
    }

    /// Messages dropped because a subscription's buffer was full (a slow
    /// consumer); each drop is also logged. Over NATS this counts the slow
    /// consumer events of this runtime's connection (at least one per burst
    /// of drops); on the in-memory bus, every dropped message of the bus.
    pub fn dropped_messages(&self) -> u64 {
        self.client.transport().dropped_messages()
    }

    /// Waits until the broker confirmed every subscription.
    pub async fn ready(&self) -> Result<()> {
        let mut ready = self.ready.clone();
        ready
            .wait_for(|r| *r)
            .await
            .map(|_| ())
            .map_err(|_| Error::new(ErrorKind::Internal, "readiness probe stopped"))
    }

    /// Serves until SIGTERM or Ctrl-C, then shuts down gracefully.
    pub async fn run_until_signal(self) -> Result<()> {
        shutdown_signal().await;
        tracing::info!("shutdown signal received: draining");
        self.shutdown().await
    }

    /// Stops taking work, drains every subscription, waits (up to the drain
    /// time-out) for in-flight handlers and flushes their replies.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        self.confirm.abort();
        let deadline = self.drain_timeout + Duration::from_secs(1);
        let mut clean = true;
        for handle in std::mem::take(&mut self.loops) {
            match tokio::time::timeout(deadline, handle).await {
                Ok(Ok(true)) => {}
                // The loop gave up on handlers still running at its deadline.
                Ok(Ok(false)) => clean = false,
                Ok(Err(e)) => {
                    clean = false;
                    tracing::error!(error = %e, "handler loop failed");
                }
                Err(_) => clean = false,
            }
        }
        let flushed = tokio::time::timeout(Duration::from_secs(2), self.client.transport().flush()).await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::warn!("could not flush the last replies to the broker");
        }
        tracing::info!(clean, "shutdown complete");
        if clean {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Unavailable,
                "shutdown deadline passed with handlers still running",
            ))
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.confirm.abort();
        for l in &self.loops {
            l.abort();
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// One handler's loop: takes messages while fewer than `limit` are in
/// flight and drives them concurrently on this task (no task spawn per
/// message: that halved throughput in the benchmark); on stop it drains the
/// subscription and finishes the handlers in flight.
///
/// The handlers of one subscription therefore share a task: they run
/// concurrently, not in parallel. A handler doing heavy CPU work should move
/// it to `tokio::task::spawn_blocking`.
///
/// Returns false when handlers were still running at the drain deadline
/// (they are cancelled: their messages get no reply).
async fn serve(
    spec: &'static HandlerSpec,
    info: MessageInfo,
    mut sub: Subscription,
    client: Client,
    limit: usize,
    mut stop: watch::Receiver<bool>,
    drain_timeout: Duration,
) -> bool {
    let mut inflight = futures_util::stream::FuturesUnordered::new();
    // One stop future for the whole loop: making a new `changed()` future on
    // every message would register and unregister a waiter each time.
    let stopped = async move {
        // An error means the runtime is gone: stop as well.
        let _ = stop.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stopped);
    let mut draining = false;
    loop {
        tokio::select! {
            biased;
            () = &mut stopped, if !draining => {
                draining = true;
                sub.drain().await;
            }
            Some(()) = inflight.next(), if !inflight.is_empty() => {}
            msg = sub.next(), if inflight.len() < limit => match msg {
                Some(msg) => inflight.push(handle(spec, info, msg, client.clone())),
                None => break,
            },
        }
    }
    let finish = async { while inflight.next().await.is_some() {} };
    if tokio::time::timeout(drain_timeout, finish).await.is_err() {
        tracing::warn!(
            handler = spec.name,
            "drain time-out: handlers still running at shutdown are cancelled"
        );
        return false;
    }
    true
}

/// Runs one message through its handler and answers it.
async fn handle(spec: &'static HandlerSpec, info: MessageInfo, msg: Incoming, client: Client) {
    let Incoming {
        subject,
        headers: hdrs,
        payload,
        reply,
    } = msg;
    let version_check = check_version(spec, &info, hdrs.as_ref());
    let meta = MessageMeta::new(subject, hdrs);
    let span = tracing::info_span!(
        "handle",
        handler = spec.name,
        subject = meta.subject(),
        message_id = meta.message_id(),
        correlation_id = meta.correlation_id(),
    );
    // Everything below runs inside the span, across its awaits too.
    async move {
        let result = match version_check {
            Err(e) => Err(e),
            Ok(()) => {
                let ctx = Context::new(client.clone(), meta);
                match AssertUnwindSafe(spec.call(ctx, payload)).catch_unwind().await {
                    Ok(r) => r,
                    Err(panic) => Err(Error::new(
                        ErrorKind::Panic,
                        format!("handler `{}` panicked: {}", spec.name, panic_message(&panic)),
                    )),
                }
            }
        };
        match &result {
            Err(e) if e.kind() == ErrorKind::Panic => tracing::error!(error = %e, "handler panicked"),
            Err(e) if e.code() >= 500 => tracing::error!(error = %e, "handler failed"),
            Err(e) => tracing::warn!(error = %e, "message rejected"),
            Ok(_) => tracing::trace!("handled"),
        }
        let Some(reply) = reply else {
            return;
        };
        let sent = match result {
            Ok(body) => client.transport().respond(reply, None, body).await,
            Err(e) => {
                client
                    .transport()
                    .respond(reply, Some(error_headers(&e)), error_body(&e))
                    .await
            }
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "reply not sent");
        }
    }
    .instrument(span)
    .await
}

fn check_version(
    spec: &HandlerSpec,
    info: &MessageInfo,
    hdrs: Option<&crate::transport::Headers>,
) -> Result<()> {
    let Some(v) = hdrs.and_then(|h| h.get(headers::VERSION)) else {
        return Ok(());
    };
    match v.as_str().trim().parse::<u32>() {
        Ok(v) if v <= info.version => Ok(()),
        _ => Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "unknown version {} of `{}`: handler `{}` understands up to version {}",
                v.as_str(),
                info.name,
                spec.name,
                info.version
            ),
        )),
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
