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
//! [`Runtime::asyncapi`](crate::Runtime::asyncapi) gives the document of
//! a runtime's own selection of handlers, and a live replica answers
//! `$SRV.SCHEMA.<service>` on NATS with it (asked by name only: a bare
//! `$SRV.SCHEMA` is not answered); the standalone `catga schema --service
//! NAME` and [`Client::asyncapi`](crate::Client::asyncapi) ask that. `catga
//! schema` run in the service's binary (`order-system schema`) gives the
//! document of every handler linked into it, as this function does.
//!
//! What it holds:
//! - a channel per subject, with the message types it carries; a
//!   command's reply channel (the requester's inbox, so its address is
//!   `null`) carries the reply and catga's error reply;
//! - a `receive` operation per handler (recurring jobs are internal and
//!   left out): its queue group as the NATS binding's `queue`, and under
//!   `x-catga` its kind, durable consumer, retries and the rest of its
//!   attribute;
//! - message types this binary links but does not handle (the events it
//!   publishes, most often) as channels without an operation; the linker
//!   keeps a library crate's types only if the binary uses the crate (see
//!   [`link!`](crate::link));
//! - every version of a type linked (`v1::Pay` beside `v2::Pay` during a
//!   roll-out): the newest keyed by its name, older ones as `Pay.v1`; a
//!   version above 1 requires its `Catga-Version` header, without which
//!   it would be read as version 1;
//! - the headers catga reads (`Nats-Msg-Id`, `Catga-Version`,
//!   `traceparent`, ...) and the error reply's headers with every error
//!   kind and its status code.
//!
//! A payload's schema is its type's `schemars::JsonSchema` (schemars 1:
//! add `schemars = { version = "1", features = ["derive"] }` to the
//! service's dependencies and derive it beside `Serialize`). A type that
//! does not derive it (or derives another major version's) is exported
//! with a schema that accepts any JSON value and says so in its
//! description; nothing fails to build for want of a schema. Schemas
//! describe how a type is read (serde's `Deserialize` side): a reply type
//! whose `Serialize` side differs (`skip_deserializing`, asymmetric
//! renames, a hand-written `Serialize`) is described as it would be read.
//! A document larger than the broker's `max_payload` is not sent over
//! NATS: the asker gets a `TooLarge` error saying so.

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
    /// Its reply's key there (commands).
    reply_id: String,
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
        // In name order whatever the link order, so that the document and
        // its numbered keys do not depend on it.
        let mut handlers: Vec<&'static HandlerSpec> =
            handlers.iter().copied().filter(|s| s.job().is_none()).collect();
        handlers.sort_by_key(|s| (s.name(), s.subject()));
        let types = message_types(&handlers, linked);
        let groups = by_subject(&types);
        // The subjects' channels first, then the reply channels, each key
        // once: a subject `x.reply` and the replies of `x` do not meet.
        let mut taken = BTreeSet::new();
        let channel_keys: BTreeMap<&str, String> = groups
            .keys()
            .map(|subject| (*subject, unique(&mut taken, &channel_id(subject))))
            .collect();
        let reply_keys: BTreeMap<&str, String> = groups
            .iter()
            .filter(|(_, of)| of.iter().any(|t| t.reply.is_some()))
            .map(|(subject, _)| (*subject, unique(&mut taken, &reply_id(&channel_keys[subject]))))
            .collect();
        let mut channels = Map::new();
        let mut messages = Map::new();
        for (subject, of_subject) in &groups {
            let mut listed = Map::new();
            for t in of_subject {
                listed.insert(
                    t.id.clone(),
                    reference(&format!("#/components/messages/{}", t.id)),
                );
                messages.insert(t.id.clone(), self.message(t));
            }
            let kind = of_subject.first().map(|t| t.kind);
            channels.insert(
                channel_keys[subject].clone(),
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
            let Some(key) = reply_keys.get(subject) else {
                continue;
            };
            let mut listed = Map::new();
            for t in of_subject.iter().filter(|t| t.reply.is_some()) {
                listed.insert(
                    t.reply_id.clone(),
                    reference(&format!("#/components/messages/{}", t.reply_id)),
                );
                messages.insert(t.reply_id.clone(), self.reply(t));
            }
            listed.insert(
                ERROR_MESSAGE.to_owned(),
                reference(&format!("#/components/messages/{ERROR_MESSAGE}")),
            );
            channels.insert(
                key.clone(),
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
        let mut operations = Map::new();
        let mut taken = BTreeSet::new();
        for spec in &handlers {
            let Some(t) = types.iter().find(|t| {
                t.subject == spec.subject() && t.name == spec.message_type() && t.version == spec.version()
            }) else {
                continue;
            };
            let id = unique(&mut taken, &operation_id(spec.name()));
            let channel = &channel_keys[spec.subject()];
            let reply = reply_keys.get(spec.subject()).map(String::as_str);
            operations.insert(id, operation(spec, t, channel, reply));
        }
        if !reply_keys.is_empty() {
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
            Some(mut s) => {
                // What is not a definition (a tuple, an `Option`) gets the
                // draft-07 rewrites here; definitions get them when taken.
                for t in self.generator.transforms_mut() {
                    t.transform(&mut s);
                }
                s.to_value()
            }
            None => json!({
                "description": format!(
                    "{what} does not derive `schemars::JsonSchema` (schemars 1): any JSON value is \
                     shown here"
                ),
            }),
        }
    }

    fn message(&mut self, t: &Entry) -> Value {
        let payload = self.payload(t.schema, t.name);
        let headers = reference(&format!("#/components/schemas/{HEADERS}"));
        // A payload of version 2 or later is read as such only with its
        // version in the header: without it, it is read as version 1.
        let headers = if t.version > 1 {
            json!({
                "allOf": [
                    headers,
                    {
                        "type": "object",
                        "required": [headers::VERSION.to_string()],
                        "properties": { headers::VERSION.to_string(): { "const": t.version.to_string() } },
                    },
                ],
            })
        } else {
            headers
        };
        json!({
            "name": t.name,
            "title": t.name,
            "summary": match t.kind {
                MessageKind::Command => format!("Command `{}` version {}, on `{}`.", t.name, t.version, t.subject),
                MessageKind::Event => format!("Event `{}` version {}, on `{}`.", t.name, t.version, t.subject),
            },
            "contentType": "application/json",
            "headers": headers,
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
            "name": t.reply_id,
            "title": format!("Reply to {}", t.name),
            "summary": format!("The answer of `{}`'s handler.", t.name),
            "contentType": "application/json",
            "payload": payload,
        })
    }
}

/// The handled types (from the handlers, so that a type in a crate the
/// linker kept only for its handler is there) and the linked ones, each
/// version of each once, with unique component keys.
fn message_types(handlers: &[&'static HandlerSpec], linked: &'static [MessageSpec]) -> Vec<Entry> {
    type Key = (&'static str, &'static str, u32);
    let entry = |(subject, name, version): Key, kind, (schema, reply): (SchemaFn, Option<SchemaFn>)| Entry {
        id: String::new(),
        reply_id: String::new(),
        name,
        subject,
        version,
        kind,
        schema,
        reply,
    };
    let mut found: BTreeMap<Key, Entry> = BTreeMap::new();
    for spec in handlers {
        let key = (spec.subject(), spec.message_type(), spec.version());
        let kind = match spec.kind() {
            HandlerKind::Command => MessageKind::Command,
            HandlerKind::Event => MessageKind::Event,
        };
        found
            .entry(key)
            .or_insert_with(|| entry(key, kind, spec.schemas()));
    }
    for m in linked {
        let key = (m.subject(), m.name(), m.version());
        found
            .entry(key)
            .or_insert_with(|| entry(key, m.kind(), m.schemas()));
    }
    // A type's key is its name; a name on two subjects adds the subject;
    // an older version of a type (`v1::Pay` beside `v2::Pay`, both on one
    // subject, during a roll-out) adds `.v<N>`. In the map's order, so
    // that keys do not depend on link order.
    let mut subjects: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut newest: BTreeMap<(&str, &str), u32> = BTreeMap::new();
    for (subject, name, version) in found.keys() {
        subjects.entry(name).or_default().insert(subject);
        let n = newest.entry((subject, name)).or_default();
        *n = (*n).max(*version);
    }
    let mut taken = BTreeSet::from([ERROR_MESSAGE.to_owned()]);
    let mut types: Vec<Entry> = found
        .into_values()
        .map(|mut t| {
            let mut base = if subjects.get(t.name).is_some_and(|s| s.len() > 1) {
                format!("{}.{}", t.name, t.subject)
            } else {
                t.name.to_owned()
            };
            if newest.get(&(t.subject, t.name)).is_some_and(|n| *n != t.version) {
                base = format!("{base}.v{}", t.version);
            }
            t.id = unique(&mut taken, &component_key(&base));
            t
        })
        .collect();
    for t in types.iter_mut().filter(|t| t.reply.is_some()) {
        t.reply_id = unique(&mut taken, &reply_id(&t.id));
    }
    types
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
fn operation(spec: &HandlerSpec, t: &Entry, channel: &str, reply: Option<&str>) -> Value {
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
    if spec.kind() == HandlerKind::Command
        && let Some(reply) = reply
    {
        op.insert(
            "reply".into(),
            json!({
                "channel": reference(&format!("#/channels/{reply}")),
                "messages": [
                    reference(&format!("#/channels/{reply}/messages/{}", t.reply_id)),
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
        "contentType": "text/plain",
        "headers": reference(&format!("#/components/schemas/{ERROR_HEADERS}")),
        "payload": { "type": "string", "maxLength": 0, "description": "Empty." },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc_of(linked: Vec<MessageSpec>) -> Value {
        Builder::new().build("svc", "1.0.0", &[], Box::leak(linked.into_boxed_slice()))
    }

    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if k == "$ref" {
                        out.push(v.as_str().unwrap_or_default().to_owned());
                    }
                    refs(v, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    fn dangling(doc: &Value) -> Vec<String> {
        let mut all = Vec::new();
        refs(doc, &mut all);
        all.into_iter()
            .filter(|r| r.strip_prefix('#').is_none_or(|p| doc.pointer(p).is_none()))
            .collect()
    }

    #[test]
    fn a_subject_named_like_a_reply_channel_keeps_its_own() {
        let doc = doc_of(vec![
            MessageSpec::for_test("a", "Ask", 1, MessageKind::Command),
            MessageSpec::for_test("a.reply", "Told", 1, MessageKind::Event),
        ]);
        let channels = &doc["channels"];
        assert_eq!(channels["a.reply"]["address"], "a.reply", "{channels}");
        assert_eq!(channels["a.reply.2"]["address"], Value::Null, "{channels}");
        assert!(
            channels["a.reply.2"]["messages"]["Ask.reply"].is_object(),
            "{channels}"
        );
        assert!(dangling(&doc).is_empty(), "{:?}", dangling(&doc));
    }

    #[test]
    fn two_versions_of_a_type_on_one_subject_are_both_listed() {
        let doc = doc_of(vec![
            MessageSpec::for_test("pay", "Pay", 2, MessageKind::Command),
            MessageSpec::for_test("pay", "Pay", 1, MessageKind::Command),
        ]);
        let messages = &doc["components"]["messages"];
        assert_eq!(messages["Pay"]["x-catga-version"], 2, "{messages}");
        assert_eq!(messages["Pay.v1"]["x-catga-version"], 1, "{messages}");
        // Version 2 is read as such only with its header.
        let v2 = messages["Pay"]["headers"].to_string();
        assert!(
            v2.contains("\"required\":[\"Catga-Version\"]") && v2.contains("\"const\":\"2\""),
            "{v2}"
        );
        assert_eq!(
            messages["Pay.v1"]["headers"]["$ref"],
            "#/components/schemas/catga.Headers"
        );
        let listed = doc["channels"]["pay"]["messages"].as_object().map(|m| m.len());
        assert_eq!(listed, Some(2));
        assert!(dangling(&doc).is_empty(), "{:?}", dangling(&doc));
    }

    #[test]
    fn the_document_does_not_depend_on_link_order() {
        let a = || MessageSpec::for_test("x.one", "Same", 1, MessageKind::Event);
        let b = || MessageSpec::for_test("x.two", "Same", 1, MessageKind::Event);
        let one = doc_of(vec![a(), b()]);
        let other = doc_of(vec![b(), a()]);
        assert_eq!(one, other);
        assert!(one["components"]["messages"]["Same.x.one"].is_object(), "{one}");
    }

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
