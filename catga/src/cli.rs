//! The operator CLI (`catga`, the binary of this crate), as a library:
//! it works against any catga deployment from the environment the
//! replicas have (`NATS_URL`, `REDIS_URL`, `CATGA_SERVICE`; see
//! [`Config`]).
//!
//! ```text
//! catga services                     replicas answering NATS micro discovery:
//!                                    service, instance, version, leader,
//!                                    command handlers and keyed sagas (with
//!                                    the partitions each replica serves)
//! catga dlq list [FROM]              dead letters of CATGA_SERVICE
//! catga dlq show N | replay N [--force] | purge N | purge-all
//! catga sagas [N]                    the newest N sagas and their steps (REDIS_URL)
//! catga outbox                       events saved and not yet published, per shard (REDIS_URL)
//! catga delayed [N]                  the N soonest delayed messages (REDIS_URL)
//! catga delayed cancel ID            cancels one that has not come due
//! catga jobs                         the recurring jobs of this binary: schedule,
//!                                    next occurrence, last one stored (NATS_URL)
//! catga jobs run NAME                runs one now, once, outside its schedule
//! catga schema [--live]              the AsyncAPI 3 document (see [`schema`](crate::schema))
//!                                    of this binary's handlers; the standalone
//!                                    `catga` (no handlers) or `--live` asks a live
//!                                    replica of the service (NATS_URL)
//! ```
//!
//! Every command takes `--json` (one JSON document on standard output) and
//! `--service NAME` (instead of `CATGA_SERVICE`; `services` lists every
//! service whatever it names). `sagas` and `outbox` read the store
//! directly: they start no runtime, so they never take a replica's part.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use crate::store::Store;
use crate::{Client, Config, DeadLetter, DeadLetters, Error, Result, SagaInfo};

/// How long `services` listens for the replicas' answers.
const LISTEN: Duration = Duration::from_millis(500);

/// One replica, as it answers NATS micro discovery (`$SRV.INFO`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// The service's name.
    pub name: String,
    /// The replica's instance id.
    pub id: String,
    /// Its version (`CATGA_SERVICE_VERSION`).
    pub version: String,
    /// Its metadata: `framework` (`catga`), `leader` (`true` while it holds
    /// the leader lease) for catga replicas.
    pub metadata: BTreeMap<String, String>,
    /// Its endpoints.
    pub endpoints: Vec<EndpointInfo>,
}

/// One endpoint of a [`ServiceInfo`]: a command handler, or a keyed saga
/// (`metadata["kind"] == "keyed_saga"`, with `partitions`, the partitions
/// this replica serves, `partitions_total`, `routing` (whether it routes
/// triggers), `routing_shares` (the router shares it runs, one per
/// partition stream) and `router_shares_total`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Its name (the handler function's).
    pub name: String,
    /// The subject it serves.
    pub subject: String,
    /// Its queue group.
    pub queue_group: String,
    /// `handler`, `message_type`, and a keyed saga's fields.
    pub metadata: BTreeMap<String, String>,
}

fn strings(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                .collect()
        })
        .unwrap_or_default()
}

impl ServiceInfo {
    fn from_json(v: &Value) -> Option<ServiceInfo> {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        Some(ServiceInfo {
            name: v["name"].as_str()?.to_owned(),
            id: text(&v["id"]),
            version: text(&v["version"]),
            metadata: strings(&v["metadata"]),
            endpoints: v["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| EndpointInfo {
                    name: text(&e["name"]),
                    subject: text(&e["subject"]),
                    queue_group: text(&e["queue_group"]),
                    metadata: strings(&e["metadata"]),
                })
                .collect(),
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "metadata": self.metadata,
            "endpoints": self.endpoints.iter().map(|e| json!({
                "name": e.name,
                "subject": e.subject,
                "queue_group": e.queue_group,
                "metadata": e.metadata,
            })).collect::<Vec<_>>(),
        })
    }
}

impl Client {
    /// Every replica that answers NATS micro discovery within half a
    /// second (catga services and any other micro service), sorted by
    /// service and instance. Over NATS only: the embedded transport has no
    /// discovery.
    pub async fn services(&self) -> Result<Vec<ServiceInfo>> {
        let transport = self.transport();
        if !transport.is_nats() {
            return Err(Error::new(
                crate::ErrorKind::Config,
                "discovery needs NATS: set NATS_URL as the replicas have it",
            ));
        }
        let mut out: Vec<ServiceInfo> = transport
            .gather("$SRV.INFO", LISTEN)
            .await?
            .iter()
            .filter_map(|raw| serde_json::from_slice::<Value>(raw).ok())
            .filter_map(|v| ServiceInfo::from_json(&v))
            .collect();
        out.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        Ok(out)
    }

    /// The AsyncAPI document of `service`, as a live replica of it answers
    /// `$SRV.SCHEMA.<service>` (see [`schema`](crate::schema)): the first
    /// answer. `NoHandler` when no replica answers.
    pub async fn asyncapi(&self, service: &str) -> Result<Value> {
        let transport = self.transport();
        if !transport.is_nats() {
            return Err(Error::new(
                crate::ErrorKind::Config,
                "a live replica's document needs NATS: set NATS_URL as the replicas have it",
            ));
        }
        let token = crate::wire::subject_token(service);
        let subject = format!("$SRV.SCHEMA.{}", if token.is_empty() { "_" } else { &token });
        let answers: Vec<Value> = transport
            .gather(&subject, LISTEN)
            .await?
            .iter()
            .filter_map(|raw| serde_json::from_slice::<Value>(raw).ok())
            .collect();
        // Names that differ only in what a subject token cannot hold
        // (`orders.v2`, `orders_v2`) share the subject: take the one named.
        if let Some(doc) = answers.iter().find(|d| d["info"]["title"] == service) {
            return Ok(doc.clone());
        }
        if let Some(why) = answers.iter().find_map(|d| d["error"].as_str()) {
            return Err(Error::new(crate::ErrorKind::TooLarge, why.to_owned()));
        }
        Err(Error::new(
            crate::ErrorKind::NoHandler,
            format!("no replica of `{service}` answered {subject}: is it running under that name?"),
        ))
    }
}

/// Runs the CLI with `args` (without the program name) and `config`,
/// returning what it prints. Errors are the commands' (a usage error is
/// `Invalid`).
pub async fn run(args: &[String], config: Config) -> Result<String> {
    // Boxed: the commands' futures are large, and a caller's async fn in a
    // debug build keeps a stack slot of that size per call site (a test
    // calling it a dozen times overflowed a test thread's 2 MiB).
    Box::pin(run_boxed(args, config)).await
}

async fn run_boxed(args: &[String], mut config: Config) -> Result<String> {
    let mut json = false;
    let mut force = false;
    let mut live = false;
    let mut rest: Vec<&str> = Vec::new();
    let mut it = args.iter().map(String::as_str);
    while let Some(a) = it.next() {
        match a {
            "--json" => json = true,
            "--force" => force = true,
            "--live" => live = true,
            "--service" => {
                config.service = it
                    .next()
                    .ok_or_else(|| Error::invalid(format!("--service needs a name\n{USAGE}")))?
                    .to_owned();
            }
            flag if flag.starts_with("--") && flag.len() > 2 => {
                if let Some(name) = flag.strip_prefix("--service=") {
                    config.service = name.to_owned();
                } else if !matches!(flag, "--help") {
                    return Err(Error::invalid(format!("unknown option `{flag}`\n{USAGE}")));
                } else {
                    rest.push(flag);
                }
            }
            _ => rest.push(a),
        }
    }
    let at_most = |n: usize| -> Result<()> {
        match rest.get(n) {
            Some(extra) => Err(Error::invalid(format!("unexpected `{extra}`\n{USAGE}"))),
            None => Ok(()),
        }
    };
    match rest.first().copied() {
        Some("services") => {
            at_most(1)?;
            services(config, json).await
        }
        Some("dlq") => {
            at_most(3)?;
            dlq(&rest[1..], force, config, json).await
        }
        Some("sagas") => {
            at_most(2)?;
            sagas(&rest[1..], config, json).await
        }
        Some("outbox") => {
            at_most(1)?;
            outbox(config, json).await
        }
        Some("delayed") => {
            at_most(if rest.get(1) == Some(&"cancel") { 3 } else { 2 })?;
            delayed(&rest[1..], config, json).await
        }
        Some("jobs") if rest.get(1) == Some(&"run") => {
            at_most(3)?;
            let name = rest
                .get(2)
                .ok_or_else(|| Error::invalid(format!("jobs run NAME\n{USAGE}")))?;
            run_job(name, config, json).await
        }
        Some("jobs") => {
            at_most(1)?;
            jobs(config, json).await
        }
        Some("schema") => {
            at_most(1)?;
            schema(config, live).await
        }
        Some("help" | "--help" | "-h") | None => Ok(USAGE.to_owned()),
        Some(other) => Err(Error::invalid(format!("unknown command `{other}`\n{USAGE}"))),
    }
}

/// `schema`: this binary's document, or a live replica's when it has no
/// handlers (the standalone `catga`) or `--live` says so. Always JSON.
async fn schema(config: Config, live: bool) -> Result<String> {
    let doc = if live || crate::registry::handlers().is_empty() {
        let client = Client::connect_with(&config).await?;
        client.asyncapi(&config.service).await?
    } else {
        crate::schema::asyncapi(&config)
    };
    let mut out = serde_json::to_string_pretty(&doc)
        .map_err(|e| Error::new(crate::ErrorKind::Internal, e.to_string()))?;
    out.push('\n');
    Ok(out)
}

/// What `catga help` prints.
pub const USAGE: &str = "usage: catga [--json] [--service NAME] COMMAND
  services                      replicas answering NATS micro discovery
                                (every service, whatever --service names)
  dlq list [FROM]               dead letters (from sequence FROM)
  dlq show N                    one dead letter, with its headers and payload
  dlq replay N [--force]        publish it again (--force: also one not written by catga)
  dlq purge N | purge-all       delete one, or all
  sagas [N]                     the newest N (20) sagas and their steps (REDIS_URL)
  outbox                        events saved and not yet published, per shard (REDIS_URL)
  delayed [N]                   the N (20) soonest delayed messages (REDIS_URL)
  delayed cancel ID             cancel one that has not come due
  jobs                          the recurring jobs of this binary (the service's
                                own binary): schedule, next, last stored (NATS_URL)
  jobs run NAME                 run one now, once, outside its schedule
  schema [--live]               the AsyncAPI 3 document of this binary's handlers;
                                the standalone catga, or --live: a live replica's (NATS_URL)
The settings come from the environment, as the replicas read them (NATS_URL, REDIS_URL, CATGA_SERVICE, ...).
";

async fn services(config: Config, json: bool) -> Result<String> {
    let client = Client::connect_with(&config).await?;
    let found = client.services().await?;
    if json {
        return Ok(Value::Array(found.iter().map(ServiceInfo::to_json).collect()).to_string() + "\n");
    }
    let mut out = String::new();
    if found.is_empty() {
        out.push_str("no service answered\n");
    }
    for s in &found {
        let leader = if s.metadata.get("leader").is_some_and(|l| l == "true") {
            " leader"
        } else {
            ""
        };
        let _ = writeln!(out, "{} {} v{}{leader}", s.name, s.id, s.version);
        for e in &s.endpoints {
            let handler = e.metadata.get("handler").map_or("-", String::as_str);
            if e.metadata.get("kind").is_some_and(|k| k == "keyed_saga") {
                let get = |k: &str| e.metadata.get(k).map_or("", String::as_str);
                let _ = writeln!(
                    out,
                    "  keyed saga {handler} on {}: partitions [{}] of {}{}",
                    e.subject,
                    get("partitions"),
                    get("partitions_total"),
                    match (get("routing"), get("router_shares_total")) {
                        ("true", "" | "1") => ", routes the triggers".to_owned(),
                        ("true", total) => format!(
                            ", routes the triggers of partition streams [{}] of {total}",
                            get("routing_shares")
                        ),
                        _ => String::new(),
                    }
                );
            } else {
                let _ = writeln!(
                    out,
                    "  command {handler} on {} (queue group {})",
                    e.subject, e.queue_group
                );
            }
        }
    }
    Ok(out)
}

fn letter_json(l: &DeadLetter, with_payload: bool) -> Value {
    let mut v = json!({
        "seq": l.seq,
        "subject": l.subject,
        "service": l.service,
        "handler": l.handler,
        "error_kind": l.error_kind.as_str(),
        "error": l.error,
        "deliveries": l.deliveries,
        "message_id": l.message_id,
        "authentic": l.authentic,
        "truncated": l.truncated,
    });
    if with_payload {
        v["headers"] = json!(l.headers);
        v["payload"] = json!(String::from_utf8_lossy(&l.payload));
    }
    v
}

fn mark(l: &DeadLetter) -> &'static str {
    match l.authentic {
        Some(true) => "",
        Some(false) => " NOT WRITTEN BY CATGA (or changed)",
        None => " (not checked: REDIS_URL unset)",
    }
}

async fn dlq(args: &[&str], force: bool, config: Config, json: bool) -> Result<String> {
    let seq = |i: usize| -> Result<u64> {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::invalid(format!("a dead letter's number is needed\n{USAGE}")))
    };
    // The command is checked before connecting: a usage error is said at
    // once, also while the broker is away.
    let (command, n) = match args.first().copied() {
        Some("list") => ("list", if args.len() > 1 { seq(1)? } else { 0 }),
        Some(c @ ("show" | "replay" | "purge")) => (c, seq(1)?),
        Some("purge-all") if args.len() == 1 => ("purge-all", 0),
        _ => return Err(Error::invalid(format!("which dlq command?\n{USAGE}"))),
    };
    let dlq = DeadLetters::connect(&config).await?;
    let mut out = String::new();
    match command {
        "list" => {
            let letters = dlq.list(n, 100).await?;
            if json {
                let all: Vec<Value> = letters.iter().map(|l| letter_json(l, false)).collect();
                return Ok(Value::Array(all).to_string() + "\n");
            }
            for l in letters {
                let _ = writeln!(
                    out,
                    "#{} {} handler={} deliveries={} {}: {}{}",
                    l.seq,
                    l.subject,
                    l.handler,
                    l.deliveries,
                    l.error_kind,
                    l.error,
                    mark(&l)
                );
            }
        }
        "show" => {
            let l = dlq.get(n).await?;
            if json {
                return Ok(letter_json(&l, true).to_string() + "\n");
            }
            let _ = writeln!(
                out,
                "#{} on {} (service {}, handler {})",
                l.seq, l.subject, l.service, l.handler
            );
            let _ = writeln!(
                out,
                "failed {} times, last {}: {}",
                l.deliveries, l.error_kind, l.error
            );
            let _ = writeln!(out, "message id: {}", l.message_id.as_deref().unwrap_or("-"));
            if let Some(size) = l.truncated {
                let _ = writeln!(out, "cut to fit: {} of {size} bytes kept", l.payload.len());
            }
            let _ = writeln!(
                out,
                "authentic:{}",
                if mark(&l).is_empty() { " yes" } else { mark(&l) }
            );
            for (k, v) in &l.headers {
                let _ = writeln!(out, "{k}: {v}");
            }
            let _ = writeln!(out, "{}", String::from_utf8_lossy(&l.payload));
        }
        "replay" => {
            if force {
                dlq.replay_forced(n).await?;
            } else {
                dlq.replay(n).await?;
            }
            out = done(json, json!({ "replayed": n }), format!("replayed #{n}"));
        }
        "purge" => {
            dlq.purge(n).await?;
            out = done(json, json!({ "purged": n }), format!("purged #{n}"));
        }
        _ => {
            let n = dlq.purge_all().await?;
            out = done(json, json!({ "purged": n }), format!("purged {n}"));
        }
    }
    Ok(out)
}

fn done(json: bool, v: Value, text: String) -> String {
    let mut out = if json { v.to_string() } else { text };
    out.push('\n');
    out
}

/// The store of the service's replicas (`REDIS_URL`), read directly: no
/// runtime, so that the CLI never takes a replica's part (the outbox
/// relay's lease, discovery, the HTTP endpoint).
///
/// It reads as many shards as the store was written with (its mark), not
/// `CATGA_STORE_SHARDS` as the operator's shell has it, and never marks a
/// store.
async fn the_store(config: &Config, what: &str) -> Result<Store> {
    crate::store::open_from(config, false).await?.ok_or_else(|| {
        Error::invalid(format!(
            "{what} are read from the store: set REDIS_URL (and CATGA_SERVICE) as the replicas have it"
        ))
    })
}

async fn sagas(args: &[&str], config: Config, json: bool) -> Result<String> {
    let n = match args.first() {
        None => 20,
        Some(s) => s
            .parse()
            .map_err(|_| Error::invalid(format!("sagas [N], not `{s}`\n{USAGE}")))?,
    };
    let store = the_store(&config, "sagas").await?;
    let mut found = Vec::new();
    for id in store.saga_list(n).await? {
        let journal = store.saga_load(&id).await?;
        found.push(SagaInfo::from_journal(id, &journal));
    }
    if json {
        let all: Vec<Value> = found
            .iter()
            .map(|s| {
                json!({
                    "id": s.id,
                    "status": s.status.as_str(),
                    "error": s.error,
                    "steps": s.steps.iter().map(|st| json!({
                        "name": st.name, "done": st.done, "compensation": st.compensation,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        return Ok(Value::Array(all).to_string() + "\n");
    }
    let mut out = String::new();
    for saga in found {
        let steps: Vec<String> = saga
            .steps
            .iter()
            .map(|s| {
                let done = if s.done { "done" } else { "not done" };
                match &s.compensation {
                    Some(c) => format!("{} ({done}, compensation {c})", s.name),
                    None => format!("{} ({done})", s.name),
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "{} {} {}{}",
            saga.id,
            saga.status.as_str(),
            steps.join(", "),
            saga.error.map(|e| format!(" error: {e}")).unwrap_or_default()
        );
    }
    Ok(out)
}

async fn outbox(config: Config, json: bool) -> Result<String> {
    let store = the_store(&config, "the outbox's entries").await?;
    let mut shards = store.outbox_waiting(std::time::Duration::from_secs(2)).await;
    // Nothing answered: the store's error, as every other command gives.
    if shards.iter().all(Result::is_err) && !shards.is_empty() {
        return Err(shards
            .swap_remove(0)
            .err()
            .unwrap_or_else(|| Error::unavailable("no shard answers")));
    }
    let total: Option<u64> = shards.iter().map(|s| s.as_ref().ok().map(|s| s.waiting)).sum();
    let oldest = |s: &crate::OutboxShard| {
        (s.waiting > 0).then(|| format!(", the oldest for {:.1} s", s.oldest.as_secs_f64()))
    };
    let v = json!({
        "outbox_backlog": total,
        "shards": shards.iter().enumerate().map(|(n, s)| match s {
            Ok(s) => json!({ "shard": s.shard, "waiting": s.waiting, "oldest_ms": s.oldest.as_millis() as u64 }),
            Err(e) => json!({ "shard": n, "error": e.message() }),
        }).collect::<Vec<_>>(),
    });
    let mut text = match (total, shards.as_slice()) {
        (Some(n), [Ok(one)]) => format!(
            "{n} events saved and not yet published{}",
            oldest(one).unwrap_or_default()
        ),
        (Some(n), _) => format!("{n} events saved and not yet published"),
        (None, _) => format!(
            "at least {} events saved and not yet published (the shards that do not answer are not counted)",
            shards
                .iter()
                .filter_map(|s| s.as_ref().ok())
                .map(|s| s.waiting)
                .sum::<u64>()
        ),
    };
    if shards.len() > 1 {
        for (n, s) in shards.iter().enumerate() {
            // A shard's error names its shard already.
            let line = match s {
                Ok(s) if s.waiting == 0 => format!("shard {n}: none waiting"),
                Ok(s) => format!(
                    "shard {n}: {} waiting{}",
                    s.waiting,
                    oldest(s).unwrap_or_default()
                ),
                Err(e) => e.message().to_owned(),
            };
            let _ = write!(text, "\n{line}");
        }
    }
    Ok(done(json, v, text))
}

/// `when` relative to now: `in 12s`, `3s ago`.
fn relative(when: std::time::SystemTime) -> String {
    let now = std::time::SystemTime::now();
    match when.duration_since(now) {
        Ok(ahead) => format!("in {}s", ahead.as_secs()),
        Err(behind) => format!("{}s ago", behind.duration().as_secs()),
    }
}

async fn delayed(args: &[&str], config: Config, json: bool) -> Result<String> {
    let store = the_store(&config, "delayed messages").await?;
    if let Some(&"cancel") = args.first() {
        let id = args
            .get(1)
            .ok_or_else(|| Error::invalid(format!("delayed cancel ID\n{USAGE}")))?;
        let cancelled = store.delayed_cancel(id).await?;
        let text = if cancelled {
            format!("cancelled {id}: it will not be published")
        } else {
            format!("no delayed message {id} is waiting (published already, cancelled, or unknown)")
        };
        return Ok(done(json, json!({ "id": id, "cancelled": cancelled }), text));
    }
    let n = match args.first() {
        None => 20,
        Some(s) => s
            .parse()
            .map_err(|_| Error::invalid(format!("delayed [N], not `{s}`\n{USAGE}")))?,
    };
    let found = store.delayed_list(n).await?;
    if json {
        let all: Vec<Value> = found
            .iter()
            .map(|(id, subject, due)| json!({ "id": id, "subject": subject, "due_ms": due }))
            .collect();
        return Ok(done(true, Value::Array(all), String::new()));
    }
    let total = store.delayed_count().await?;
    let mut out = format!("{total} delayed messages waiting; the {} soonest:\n", found.len());
    for (id, subject, due) in &found {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(*due);
        let _ = writeln!(out, "{id}  {subject}  due {}", relative(at));
    }
    Ok(out)
}

async fn run_job(name: &str, config: Config, json: bool) -> Result<String> {
    let spec = crate::runtime::find_job(crate::registry::handlers(), name)?;
    let client = Client::connect_with(&config).await?;
    let at = crate::runtime::run_job_now(client.transport(), &config.streams, config.request_timeout, spec)
        .await?;
    Ok(done(
        json,
        json!({ "name": spec.name(), "at_ms": at }),
        format!("{} stored to run now (occurrence {at})", spec.name()),
    ))
}

async fn jobs(config: Config, json: bool) -> Result<String> {
    let specs: Vec<_> = crate::registry::handlers()
        .iter()
        .filter(|s| s.job().is_some())
        .collect();
    if specs.is_empty() {
        return Ok(done(
            json,
            Value::Array(Vec::new()),
            "no recurring jobs in this binary: run `jobs` from the service's own binary (e.g. \
             `order-system jobs`)"
                .to_owned(),
        ));
    }
    let client = Client::connect_with(&config).await?;
    let mut found = Vec::new();
    for spec in specs {
        if let Some(info) = crate::runtime::job_info(client.transport(), spec).await? {
            found.push(info);
        }
    }
    let ms = |t: Option<std::time::SystemTime>| {
        t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
    };
    if json {
        let all: Vec<Value> = found
            .iter()
            .map(|j| json!({ "name": j.name, "schedule": j.schedule, "next_ms": ms(j.next), "last_ms": ms(j.last) }))
            .collect();
        return Ok(done(true, Value::Array(all), String::new()));
    }
    let mut out = String::new();
    for j in &found {
        let _ = writeln!(
            out,
            "{}  {}  next {}  last {}",
            j.name,
            j.schedule,
            j.next.map_or_else(|| "never".to_owned(), relative),
            j.last.map_or_else(|| "none stored".to_owned(), relative),
        );
    }
    Ok(out)
}
