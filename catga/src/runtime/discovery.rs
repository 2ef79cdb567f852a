//! NATS micro discovery: every replica answers `$SRV.PING`, `$SRV.INFO`
//! and `$SRV.STATS` (for all services, for its service's name, and for its
//! own id) with its command handlers and keyed sagas as endpoints, and
//! `$SRV.SCHEMA` with its AsyncAPI document (catga's own verb; a keyed
//! saga's metadata names the partitions it serves here), so that `nats micro
//! ls|info|stats` and any micro-aware client list catga services. At
//! start-up the same protocol finds another service that already serves
//! one of this replica's command subjects.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::Shared;
use super::served::Served;
use crate::error::{Error, ErrorKind, Result};
use crate::registry::{HandlerKind, HandlerSpec};
use crate::transport::{Settle, SubscribeTo};

/// How long start-up listens for the answers of other services.
const LISTEN: Duration = Duration::from_millis(300);

/// A name as NATS micro allows it (`[A-Za-z0-9_-]+`).
pub(crate) fn micro_name(text: &str) -> String {
    let clean = crate::wire::subject_token(text);
    if clean.is_empty() { "_".to_owned() } else { clean }
}

fn base(shared: &Shared, kind: &str) -> serde_json::Map<String, Value> {
    let c = &shared.config;
    let mut m = serde_json::Map::new();
    m.insert("type".into(), json!(format!("io.nats.micro.v1.{kind}_response")));
    m.insert("name".into(), json!(micro_name(&c.service)));
    m.insert("id".into(), json!(micro_name(&c.instance_id)));
    m.insert("version".into(), json!(c.service_version));
    let mut metadata = json!({
        "framework": "catga",
        "leader": shared.leadership.token().is_some().to_string(),
    });
    if let Some(region) = &c.region {
        metadata["region"] = json!(region);
    }
    m.insert("metadata".into(), metadata);
    m
}

/// One endpoint as discovery lists it.
struct Endpoint {
    name: String,
    spec: &'static HandlerSpec,
    queue_group: String,
    /// What discovery says of it beyond the handler and message type.
    metadata: Vec<(&'static str, String)>,
    /// The serve loops whose counters its statistics add up.
    served: Vec<Arc<Served>>,
}

/// The command handlers being served and the keyed sagas this replica
/// runs, with unique endpoint names (the handler's function name,
/// numbered if two share one). A keyed saga says which of its partitions
/// are served here and whether this replica routes its triggers; its
/// statistics add up those partitions'.
fn endpoints(shared: &Shared) -> Vec<Endpoint> {
    let mut found: Vec<Endpoint> = shared
        .endpoints
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .values()
        .filter(|s| s.spec.kind() == HandlerKind::Command)
        .map(|s| Endpoint {
            name: String::new(),
            spec: s.spec,
            queue_group: s.to.queue_group.clone().unwrap_or_default(),
            metadata: Vec::new(),
            served: vec![Arc::clone(s)],
        })
        .collect();
    for view in shared
        .keyed_view
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        let served: Vec<String> = view.partitions.iter().map(|(p, _)| p.to_string()).collect();
        found.push(Endpoint {
            name: String::new(),
            spec: view.spec,
            queue_group: String::new(),
            metadata: vec![
                ("kind", KEYED_SAGA.to_owned()),
                ("partitions", served.join(",")),
                (
                    "partitions_total",
                    view.spec.partitions().unwrap_or(1).to_string(),
                ),
                ("routing", (!view.routing.is_empty()).to_string()),
                (
                    "routing_shares",
                    view.routing
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                (
                    "router_shares_total",
                    super::keyed::router_shares(view.spec, &shared.config).to_string(),
                ),
            ],
            served: view.partitions.iter().map(|(_, s)| Arc::clone(s)).collect(),
        });
    }
    found.sort_by_key(|e| e.spec.name());
    let mut out: Vec<Endpoint> = Vec::with_capacity(found.len());
    for mut e in found {
        let short = micro_name(e.spec.name().rsplit("::").next().unwrap_or(e.spec.name()));
        let mut name = short.clone();
        let mut n = 1;
        while out.iter().any(|taken| taken.name == name) {
            n += 1;
            name = format!("{short}_{n}");
        }
        e.name = name;
        out.push(e);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The `kind` a keyed saga's endpoint carries in its metadata.
const KEYED_SAGA: &str = "keyed_saga";

fn endpoint(e: &Endpoint) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("name".into(), json!(e.name));
    m.insert("subject".into(), json!(e.spec.subject()));
    m.insert("queue_group".into(), json!(e.queue_group));
    let mut metadata = serde_json::Map::new();
    metadata.insert("handler".into(), json!(e.spec.name()));
    metadata.insert("message_type".into(), json!(e.spec.message_type()));
    for (k, v) in &e.metadata {
        metadata.insert((*k).into(), json!(v));
    }
    m.insert("metadata".into(), Value::Object(metadata));
    m
}

/// The answer to `$SRV.<verb>...`.
fn answer(shared: &Shared, verb: &str, started: &str) -> Option<Value> {
    match verb {
        "PING" => Some(Value::Object(base(shared, "ping"))),
        "INFO" => {
            let mut m = base(shared, "info");
            m.insert(
                "description".into(),
                json!(format!("catga service {}", shared.config.service)),
            );
            let list: Vec<Value> = endpoints(shared)
                .iter()
                .map(|e| Value::Object(endpoint(e)))
                .collect();
            m.insert("endpoints".into(), Value::Array(list));
            Some(Value::Object(m))
        }
        "STATS" => {
            let mut m = base(shared, "stats");
            m.insert("started".into(), json!(started));
            let list: Vec<Value> = endpoints(shared)
                .iter()
                .map(|ep| {
                    let mut e = endpoint(ep);
                    let (mut requests, mut errors, mut ns) = (0u64, 0u64, 0u64);
                    let mut last_error = String::new();
                    for s in &ep.served {
                        let st = &s.metrics.stats;
                        requests += st.requests.load(Ordering::Relaxed);
                        errors += st.errors.load(Ordering::Relaxed);
                        ns = ns.saturating_add(st.processing_ns.load(Ordering::Relaxed));
                        let last = st
                            .last_error
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        if !last.is_empty() {
                            last.clone_into(&mut last_error);
                        }
                    }
                    e.insert("num_requests".into(), json!(requests));
                    e.insert("num_errors".into(), json!(errors));
                    e.insert("last_error".into(), json!(last_error));
                    e.insert("processing_time".into(), json!(ns));
                    e.insert(
                        "average_processing_time".into(),
                        json!(ns.checked_div(requests).unwrap_or(0)),
                    );
                    e.insert("data".into(), Value::Null);
                    Value::Object(e)
                })
                .collect();
            m.insert("endpoints".into(), Value::Array(list));
            Some(Value::Object(m))
        }
        _ => None,
    }
}

/// Answers discovery requests until the runtime stops (NATS only).
pub(crate) async fn serve(shared: Arc<Shared>) {
    let transport = shared.client.transport().clone();
    if !transport.is_nats() {
        return;
    }
    let started = rfc3339(SystemTime::now());
    let name = micro_name(&shared.config.service);
    let id = micro_name(&shared.config.instance_id);
    let mut subs = Vec::new();
    for subject in [
        "$SRV.*".to_owned(),
        format!("$SRV.*.{name}"),
        format!("$SRV.*.{name}.{id}"),
    ] {
        match transport
            .subscribe(&SubscribeTo {
                subject: subject.clone(),
                queue_group: None,
            })
            .await
        {
            Ok(s) => subs.push(s),
            Err(e) => tracing::warn!(error = %e, %subject, "NATS micro discovery: cannot subscribe"),
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for mut sub in subs {
        let (shared, started) = (Arc::clone(&shared), started.clone());
        tasks.spawn(async move {
            while let Some(delivery) = sub.next().await {
                let verb = delivery.subject.split('.').nth(1).unwrap_or("").to_owned();
                let subject_of = delivery.subject.to_string();
                let (_, settler) = delivery.split();
                if verb == "SCHEMA" {
                    // Only when asked by name: a bare `$SRV.SCHEMA` would
                    // have every replica of every service send its whole
                    // document.
                    if delivery_subject_named(&subject_of) {
                        let body = schema_answer(&shared);
                        if let Err(e) = settler.settle(Settle::Reply(body)).await {
                            tracing::warn!(error = %e, "NATS micro discovery: cannot send the AsyncAPI document");
                        }
                    } else {
                        settler.settle(Settle::Drop).await.unwrap_or(());
                    }
                    continue;
                }
                match answer(&shared, &verb, &started) {
                    Some(body) => {
                        let _ = settler.settle(Settle::Reply(body.to_string().into())).await;
                    }
                    None => settler.settle(Settle::Drop).await.unwrap_or(()),
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Whether a discovery subject names a service (`$SRV.<verb>.<name>...`).
fn delivery_subject_named(subject: &str) -> bool {
    subject.split('.').count() >= 3
}

/// The answer to `$SRV.SCHEMA.<name>`: the document, or, when it is larger
/// than the broker takes, a small JSON object whose `error` says so.
fn schema_answer(shared: &Shared) -> bytes::Bytes {
    let body = shared.asyncapi_bytes();
    let limit = shared.client.transport().max_payload();
    if body.len() <= limit {
        return body;
    }
    tracing::warn!(
        bytes = body.len(),
        max_payload = limit,
        "the AsyncAPI document is larger than the broker's max_payload: not sent; run `catga schema` in          the service's binary instead"
    );
    json!({
        "error": format!(
            "the AsyncAPI document of `{}` is {} bytes, more than the broker's max_payload ({limit}):              run `catga schema` in the service's binary instead",
            shared.config.service,
            body.len()
        ),
    })
    .to_string()
    .into()
}

/// Asks every micro service for its endpoints and finds those of another
/// service on one of `subjects` (this replica's command subjects). Returns
/// `(other service, subject)` pairs. A broker that is not reachable yet is
/// not a conflict: the check is skipped, and said so.
pub(crate) async fn conflicts(shared: &Shared, selected: &[&'static HandlerSpec]) -> Vec<(String, String)> {
    let mine: Vec<&str> = selected
        .iter()
        .filter(|s| s.kind() == HandlerKind::Command)
        .map(|s| s.subject())
        .collect();
    if mine.is_empty() {
        return Vec::new();
    }
    let answers = match shared.client.transport().gather("$SRV.INFO", LISTEN).await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "could not ask NATS micro discovery for subject conflicts; not checked");
            return Vec::new();
        }
    };
    let me = micro_name(&shared.config.service);
    let mut found = Vec::new();
    for raw in answers {
        let Ok(info) = serde_json::from_slice::<Value>(&raw) else {
            continue;
        };
        let name = info["name"].as_str().unwrap_or_default();
        if name == me {
            continue;
        }
        for e in info["endpoints"].as_array().into_iter().flatten() {
            // A keyed saga's trigger subject is an event's: several
            // services may run sagas on it.
            if e["metadata"]["kind"].as_str() == Some(KEYED_SAGA) {
                continue;
            }
            if let Some(subject) = e["subject"].as_str()
                && mine.contains(&subject)
                && !found
                    .iter()
                    .any(|(n, s): &(String, String)| n == name && s == subject)
            {
                found.push((name.to_owned(), subject.to_owned()));
            }
        }
    }
    found
}

/// The start-up check: refuses (or warns about) command subjects another
/// service already serves.
pub(crate) async fn check_conflicts(shared: &Shared, selected: &[&'static HandlerSpec]) -> Result<()> {
    let found = conflicts(shared, selected).await;
    if found.is_empty() {
        return Ok(());
    }
    let list = found
        .iter()
        .map(|(service, subject)| format!("{subject} (served by `{service}`)"))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "another service already serves command subjects of `{}`: {list}; its replicas and these would \
         answer each other's commands. Give the types explicit subjects, or set \
         CATGA_SUBJECT_CONFLICT=warn to start anyway",
        shared.config.service
    );
    if shared.config.refuse_subject_conflicts {
        return Err(Error::new(ErrorKind::Config, text));
    }
    tracing::error!("{text}");
    Ok(())
}

/// `SystemTime` as RFC 3339 in UTC, to the second.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_in_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_824_000)),
            "2026-11-28T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_661)),
            "2000-02-29T01:01:01Z"
        );
    }

    #[test]
    fn names_fit_the_micro_rules() {
        assert_eq!(micro_name("order-system"), "order-system");
        assert_eq!(micro_name("a.b c"), "a_b_c");
        assert_eq!(micro_name(""), "_");
    }
}
