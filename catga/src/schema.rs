//! Schema export: an [AsyncAPI 3.0](https://www.asyncapi.com/docs/reference/specification/v3.0.0)
//! document of a service, generated from the handler registry.
//!
//! ```no_run
//! # async fn demo() -> catga::Result<()> {
//! // Every handler and message type linked into this binary:
//! let doc = catga::schema::asyncapi(&catga::Config::from_env()?);
//! println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
//! # Ok(()) }
//! ```
//!
//! The same document comes from [`Runtime::asyncapi`](crate::Runtime::asyncapi)
//! (the runtime's own selection of handlers), from `catga schema` run in
//! the service's binary (`order-system schema`), and from a live replica:
//! every replica answers `$SRV.SCHEMA.<service>` on NATS with it, which is
//! what the standalone `catga schema --service NAME` asks.
//!
//! What it holds:
//! - a channel per subject, with the message types it carries; a
//!   command's reply channel (the requester's inbox, so its address is
//!   `null`) carries the reply and catga's error reply;
//! - a `receive` operation per handler: its queue group as the NATS
//!   binding's `queue`, and under `x-catga` its kind, durable consumer,
//!   retries and the rest of its attribute;
//! - message types this binary links but does not handle (the events it
//!   publishes, most often) as channels without an operation;
//! - the headers catga reads (`Nats-Msg-Id`, `Catga-Version`,
//!   `traceparent`, ...) and the error reply's headers with every error
//!   kind and its status code.
//!
//! A payload's schema is its type's `schemars::JsonSchema` (add `schemars
//! = "1"` to the service's dependencies and derive it beside `Serialize`).
//! A type that does not derive it is exported with a schema that accepts
//! any JSON value and says so in its description; nothing fails to build
//! for want of a schema. Only the current version of a type is described:
//! the older payloads it upcasts from (`upcast_from`) are not.

use std::collections::{BTreeMap, BTreeSet};

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::config::Config;
use crate::error::ALL_KINDS;
use crate::message::MessageKind;
use crate::registry::{HandlerKind, HandlerSpec, MessageSpec, SchemaFn};
use crate::wire::headers;

/// The AsyncAPI version of the documents.
pub const ASYNCAPI_VERSION: &str = "3.0.0";

/// The document of every handler and message type linked into this
/// binary, for the service `config` names.
pub fn asyncapi(config: &Config) -> Value {
    let handlers: Vec<&'static HandlerSpec> = crate::registry::handlers().iter().collect();
    document(&config.service, &config.service_version, &handlers)
}

/// The document of `handlers` (and of every message type linked into this
/// binary) for service `service` at `version`.
pub fn document(service: &str, version: &str, handlers: &[&'static HandlerSpec]) -> Value {
    Builder::new().build(service, version, handlers, crate::registry::messages())
}

/// The autoref probe the attributes use to find a type's schema: a type
/// that implements `schemars::JsonSchema` takes `Described`'s method, any
/// other `Undescribed`'s (method lookup tries the receiver as it is
/// before it adds a reference). Generated code only.
#[doc(hidden)]
pub mod probe {
    use std::marker::PhantomData;

    use schemars::{JsonSchema, Schema, SchemaGenerator};

    /// Names `T` for the probe.
    pub struct SchemaProbe<T>(PhantomData<fn() -> T>);

    impl<T> SchemaProbe<T> {
        /// The probe of `T`.
        pub const fn new() -> Self {
            SchemaProbe(PhantomData)
        }
    }

    impl<T> Default for SchemaProbe<T> {
        fn default() -> Self {
            Self::new()
        }
    }

    /// A type with a JSON Schema.
    pub trait Described {
        /// Its schema (a reference to its definition when it has a name).
        fn __catga_schema_of(&self, generator: &mut SchemaGenerator) -> Option<Schema>;
    }

    impl<T: JsonSchema> Described for SchemaProbe<T> {
        fn __catga_schema_of(&self, generator: &mut SchemaGenerator) -> Option<Schema> {
            Some(generator.subschema_for::<T>())
        }
    }

    /// A type without one.
    pub trait Undescribed {
        /// `None`.
        fn __catga_schema_of(&self, generator: &mut SchemaGenerator) -> Option<Schema>;
    }

    impl<T> Undescribed for &SchemaProbe<T> {
        fn __catga_schema_of(&self, generator: &mut SchemaGenerator) -> Option<Schema> {
            let _ = generator;
            None
        }
    }
}

/// One message type as the document describes it.
struct Entry {
    /// Its key under `components.messages`.
    id: String,
    name: &'static str,
    subject: &'static str,
    version: u32,
    kind: MessageKind,
    schema: SchemaFn,
    reply: Option<SchemaFn>,
}

/// The error reply's component key.
const ERROR_MESSAGE: &str = "catga.Error";
/// The message headers' schema key.
const HEADERS: &str = "catga.Headers";
/// The error reply headers' schema key.
const ERROR_HEADERS: &str = "catga.ErrorHeaders";

struct Builder {
    generator: schemars::SchemaGenerator,
}

impl Builder {
    fn new() -> Self {
        let mut settings = SchemaSettings::draft07();
        settings.definitions_path = "/components/schemas".into();
        settings.meta_schema = None;
        Builder {
            generator: settings.into_generator(),
        }
    }

    fn build(
        mut self,
        service: &str,
        version: &str,
        handlers: &[&'static HandlerSpec],
        linked: &'static [MessageSpec],
    ) -> Value {
        let types = message_types(handlers, linked);
        let mut channels = Map::new();
        let mut messages = Map::new();
        // Channels and messages by subject, in subject order.
        for (subject, of_subject) in by_subject(&types) {
            let channel = channel_id(subject);
            let mut listed = Map::new();
            for t in &of_subject {
                listed.insert(
                    t.id.clone(),
                    reference(&format!("#/components/messages/{}", t.id)),
                );
                messages.insert(t.id.clone(), self.message(t));
            }
            let kind = of_subject.first().map(|t| t.kind);
            channels.insert(
                channel.clone(),
                json!({
                    "address": subject,
                    "title": subject,
                    "description": match kind {
                        Some(MessageKind::Command) => "Commands: a request, answered on the reply channel.",
                        _ => "Events: published to every subscriber, or once per queue group.",
                    },
                    "messages": listed,
                }),
            );
            // The reply channel of a command subject.
            let replies: Vec<&&Entry> = of_subject.iter().filter(|t| t.reply.is_some()).collect();
            if !replies.is_empty() {
                let mut listed = Map::new();
                for t in replies {
                    let id = reply_id(&t.id);
                    listed.insert(id.clone(), reference(&format!("#/components/messages/{id}")));
                    messages.insert(id, self.reply(t));
                }
                listed.insert(
                    ERROR_MESSAGE.to_owned(),
                    reference(&format!("#/components/messages/{ERROR_MESSAGE}")),
                );
                channels.insert(
                    reply_id(&channel),
                    json!({
                        "address": null,
                        "description": format!(
                            "Replies to `{subject}`: the requester's inbox (the request's NATS reply \
                             subject), so its address is not known in advance."
                        ),
                        "messages": listed,
                    }),
                );
            }
        }
        let mut operations = Map::new();
        let mut taken = BTreeSet::new();
        for spec in handlers.iter().filter(|s| s.job().is_none()) {
            let Some(t) = types
                .iter()
                .find(|t| t.subject == spec.subject() && t.name == spec.message_type())
            else {
                continue;
            };
            let id = unique(&mut taken, &operation_id(spec.name()));
            operations.insert(id, operation(spec, t));
        }
        if channels.values().any(|c| c["address"].is_null()) {
            messages.insert(ERROR_MESSAGE.to_owned(), error_message());
        }
        let mut schemas = self.generator.take_definitions(true);
        schemas.insert(HEADERS.to_owned(), headers_schema());
        schemas.insert(ERROR_HEADERS.to_owned(), error_headers_schema());
        json!({
            "asyncapi": ASYNCAPI_VERSION,
            "info": {
                "title": service,
                "version": version,
                "description": format!(
                    "The messages of the catga service `{service}`: its commands (request/reply, \
                     answered by one replica of each queue group) and events, generated from its \
                     handler registry."
                ),
            },
            "defaultContentType": "application/json",
            "channels": channels,
            "operations": operations,
            "components": {
                "messages": messages,
                "schemas": schemas,
            },
        })
    }

    fn payload(&mut self, schema: SchemaFn, what: &str) -> Value {
        match schema(&mut self.generator) {
            Some(s) => s.to_value(),
            None => json!({
                "description": format!(
                    "{what} does not derive `schemars::JsonSchema`: any JSON value is shown here"
                ),
            }),
        }
    }

    fn message(&mut self, t: &Entry) -> Value {
        let payload = self.payload(t.schema, t.name);
        json!({
            "name": t.name,
            "title": t.name,
            "summary": match t.kind {
                MessageKind::Command => format!("Command `{}`, on `{}`.", t.name, t.subject),
                MessageKind::Event => format!("Event `{}`, on `{}`.", t.name, t.subject),
            },
            "contentType": "application/json",
            "headers": reference(&format!("#/components/schemas/{HEADERS}")),
            "payload": payload,
            "x-catga-version": t.version,
        })
    }

    fn reply(&mut self, t: &Entry) -> Value {
        let what = format!("The reply to {}", t.name);
        let payload = match t.reply {
            Some(f) => self.payload(f, &what),
            None => json!({}),
        };
        json!({
            "name": reply_id(t.name),
            "title": format!("Reply to {}", t.name),
            "summary": format!("The answer of `{}`'s handler.", t.name),
            "contentType": "application/json",
            "payload": payload,
        })
    }
}

/// The handled types (from the handlers, so that a type in a crate the
/// linker kept only for its handler is there) and the linked ones, each
/// once, with unique component keys.
fn message_types(handlers: &[&'static HandlerSpec], linked: &'static [MessageSpec]) -> Vec<Entry> {
    let mut found: BTreeMap<(&'static str, &'static str), Entry> = BTreeMap::new();
    for spec in handlers.iter().filter(|s| s.job().is_none()) {
        let (schema, reply) = spec.schemas();
        found
            .entry((spec.subject(), spec.message_type()))
            .or_insert_with(|| Entry {
                id: String::new(),
                name: spec.message_type(),
                subject: spec.subject(),
                version: spec.version(),
                kind: match spec.kind() {
                    HandlerKind::Command => MessageKind::Command,
                    HandlerKind::Event => MessageKind::Event,
                },
                schema,
                reply,
            });
    }
    for m in linked {
        let (schema, reply) = m.schemas();
        found.entry((m.subject(), m.name())).or_insert_with(|| Entry {
            id: String::new(),
            name: m.name(),
            subject: m.subject(),
            version: m.version(),
            kind: m.kind(),
            schema,
            reply,
        });
    }
    // A type's key is its name; two types of one name (two modules, two
    // subjects) add their subject, in the map's order, so that the keys do
    // not depend on link order.
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, name) in found.keys() {
        *names.entry(name).or_default() += 1;
    }
    let mut taken = BTreeSet::new();
    found
        .into_values()
        .map(|mut t| {
            let base = if names.get(t.name).copied().unwrap_or(0) > 1 {
                format!("{}.{}", t.name, t.subject)
            } else {
                t.name.to_owned()
            };
            t.id = unique(&mut taken, &component_key(&base));
            t
        })
        .collect()
}

/// The types grouped by subject, in subject order.
fn by_subject(types: &[Entry]) -> BTreeMap<&'static str, Vec<&Entry>> {
    let mut out: BTreeMap<&'static str, Vec<&Entry>> = BTreeMap::new();
    for t in types {
        out.entry(t.subject).or_default().push(t);
    }
    out
}

/// The `receive` operation of one handler.
fn operation(spec: &HandlerSpec, t: &Entry) -> Value {
    let channel = channel_id(spec.subject());
    let mut op = Map::new();
    op.insert("action".into(), json!("receive"));
    op.insert("channel".into(), reference(&format!("#/channels/{channel}")));
    op.insert(
        "title".into(),
        json!(spec.name().rsplit("::").next().unwrap_or(spec.name())),
    );
    op.insert("summary".into(), json!(format!("Handled by `{}`.", spec.name())));
    op.insert(
        "messages".into(),
        json!([reference(&format!("#/channels/{channel}/messages/{}", t.id))]),
    );
    let kind = match spec.kind() {
        HandlerKind::Command => "command",
        HandlerKind::Event if spec.is_saga() && spec.partitions().is_some() => "keyed_saga",
        HandlerKind::Event if spec.is_saga() => "saga",
        HandlerKind::Event => "event",
    };
    let mut catga = Map::new();
    catga.insert("kind".into(), json!(kind));
    catga.insert("handler".into(), json!(spec.name()));
    if let Some(durable) = spec.durable() {
        catga.insert("durable".into(), json!(durable));
    }
    if spec.is_idempotent() {
        catga.insert("idempotent".into(), json!(true));
    }
    if spec.is_leader() {
        catga.insert("leader".into(), json!(true));
    }
    if let Some(n) = spec.partitions() {
        catga.insert("partitions".into(), json!(n));
    }
    if spec.retries() > 0 {
        catga.insert("retry".into(), json!(spec.retries()));
    }
    if let Some(n) = spec.max_deliver() {
        catga.insert("max_deliver".into(), json!(n));
    }
    if let Some(t) = spec.saga_timeout() {
        catga.insert("timeout_ms".into(), json!(t.as_millis() as u64));
    }
    // A durable handler reads a JetStream consumer, not a core NATS queue
    // group: the binding says nothing of it.
    if spec.durable().is_none()
        && let Some(group) = spec.queue_group()
    {
        op.insert(
            "bindings".into(),
            json!({ "nats": { "queue": group, "bindingVersion": "0.1.0" } }),
        );
        catga.insert("queue_group".into(), json!(group));
    }
    op.insert("x-catga".into(), Value::Object(catga));
    if spec.kind() == HandlerKind::Command {
        let reply = reply_id(&channel);
        op.insert(
            "reply".into(),
            json!({
                "channel": reference(&format!("#/channels/{reply}")),
                "messages": [
                    reference(&format!("#/channels/{reply}/messages/{}", reply_id(&t.id))),
                    reference(&format!("#/channels/{reply}/messages/{ERROR_MESSAGE}")),
                ],
            }),
        );
    }
    Value::Object(op)
}

fn reference(to: &str) -> Value {
    json!({ "$ref": to })
}

fn reply_id(of: &str) -> String {
    format!("{of}.reply")
}

/// A key AsyncAPI accepts (`[A-Za-z0-9._-]+`): anything else becomes `_`.
fn component_key(text: &str) -> String {
    let key: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if key.is_empty() { "_".to_owned() } else { key }
}

/// A subject's channel key.
fn channel_id(subject: &str) -> String {
    component_key(subject)
}

/// A handler's operation key: its path, dotted.
fn operation_id(handler: &str) -> String {
    component_key(&handler.replace("::", "."))
}

/// `key`, numbered when taken already.
fn unique(taken: &mut BTreeSet<String>, key: &str) -> String {
    let mut candidate = key.to_owned();
    let mut n = 2;
    while !taken.insert(candidate.clone()) {
        candidate = format!("{key}.{n}");
        n += 1;
    }
    candidate
}

/// The headers catga reads on a message.
fn headers_schema() -> Value {
    let h = |name: &async_nats::HeaderName, description: &str| {
        (
            name.to_string(),
            json!({ "type": "string", "description": description }),
        )
    };
    let props: Map<String, Value> = [
        h(
            &headers::MESSAGE_ID,
            "The message's id, 1 to 256 visible ASCII characters: the key of idempotent handlers' inbox \
             and of JetStream's de-duplication. Set it to make a retry of an idempotent command safe.",
        ),
        h(
            &headers::VERSION,
            "The payload's schema version (`x-catga-version` of its message); absent means 1.",
        ),
        h(
            &headers::TRACEPARENT,
            "W3C trace context: the handler's span continues the caller's trace.",
        ),
        h(
            &headers::DEADLINE,
            "A request's deadline in milliseconds since the Unix epoch: a replica does not start a \
             request whose sender stopped waiting.",
        ),
        h(
            &headers::CORRELATION_ID,
            "Shared by every message caused, directly or not, by one root message.",
        ),
        h(
            &headers::CAUSATION_ID,
            "The id of the message whose handler sent this one.",
        ),
    ]
    .into_iter()
    .collect();
    json!({
        "type": "object",
        "description": "NATS headers catga reads; all optional.",
        "properties": props,
    })
}

/// The headers of an error reply, with every kind and its code.
fn error_headers_schema() -> Value {
    let kinds: Vec<&str> = ALL_KINDS.iter().map(|k| k.as_str()).collect();
    let table = ALL_KINDS
        .iter()
        .map(|k| format!("{} {}", k.as_str(), k.code()))
        .collect::<Vec<_>>()
        .join(", ");
    let codes: BTreeSet<String> = ALL_KINDS.iter().map(|k| k.code().to_string()).collect();
    let mut props = Map::new();
    props.insert(
        headers::SERVICE_ERROR.to_string(),
        json!({
            "type": "string",
            "maxLength": crate::wire::errors::MAX_TEXT,
            "description": "What went wrong: the handler's text for a 4xx kind; for a 5xx kind, the \
                            kind and an error id only (the full text is in the replica's log under \
                            that id).",
        }),
    );
    props.insert(
        headers::SERVICE_ERROR_CODE.to_string(),
        json!({ "type": "string", "enum": codes, "description": "The status code of the kind." }),
    );
    props.insert(
        headers::ERROR_KIND.to_string(),
        json!({
            "type": "string",
            "enum": kinds,
            "description": format!("catga's error kind, with its code: {table}."),
        }),
    );
    props.insert(
        headers::ERROR_ID.to_string(),
        json!({
            "type": "string",
            "description": "The id under which the replica logged a 5xx failure's full text.",
        }),
    );
    json!({
        "type": "object",
        "description": "An error reply, in the NATS micro convention; the body is empty.",
        "required": [headers::SERVICE_ERROR.to_string(), headers::SERVICE_ERROR_CODE.to_string()],
        "properties": props,
    })
}

/// catga's error reply.
fn error_message() -> Value {
    json!({
        "name": ERROR_MESSAGE,
        "title": "Error reply",
        "summary": "A command that failed: the headers say why, the body is empty.",
        "headers": reference(&format!("#/components/schemas/{ERROR_HEADERS}")),
        "payload": { "type": "string", "maxLength": 0, "description": "Empty." },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fit_asyncapi() {
        assert_eq!(component_key("cmd.place_order"), "cmd.place_order");
        assert_eq!(component_key("a b/c"), "a_b_c");
        assert_eq!(component_key(""), "_");
        assert_eq!(operation_id("shop::orders::place"), "shop.orders.place");
        let mut taken = BTreeSet::new();
        assert_eq!(unique(&mut taken, "a"), "a");
        assert_eq!(unique(&mut taken, "a"), "a.2");
        assert_eq!(unique(&mut taken, "a"), "a.3");
    }

    #[test]
    fn error_headers_list_every_kind() {
        let s = error_headers_schema();
        let kind = headers::ERROR_KIND.to_string();
        let kinds = s["properties"][&kind]["enum"].as_array().map(Vec::len);
        assert_eq!(kinds, Some(ALL_KINDS.len()));
        assert!(
            s["properties"][&kind]["description"]
                .as_str()
                .is_some_and(|d| d.contains("not_found 404")),
            "{s}"
        );
    }
}
