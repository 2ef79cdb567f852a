//! Attribute arguments: `key = value` pairs and bare flags, checked against
//! one table of keys ([`KEYS`]): which roles take each key, what value it
//! takes, and what to say when it is put on the wrong item. Adding a key is
//! one row here plus the code that reads it.
//!
//! Every mistake is collected in [`Errors`] and reported at once, each on
//! the token that is wrong.

use proc_macro2::{Span, TokenStream};
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Ident, LitInt, LitStr, Path, Token, Type};

use crate::role::{Attr, Role, Target};

/// Collects every error of one expansion (after serde_derive's `Ctxt`).
#[derive(Default)]
pub(crate) struct Errors(Vec<syn::Error>);

impl Errors {
    pub(crate) fn at(&mut self, span: Span, msg: impl std::fmt::Display) {
        self.0.push(syn::Error::new(span, msg));
    }

    pub(crate) fn spanned(&mut self, tokens: impl quote::ToTokens, msg: impl std::fmt::Display) {
        self.0.push(syn::Error::new_spanned(tokens, msg));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// All errors as `compile_error!` invocations.
    pub(crate) fn to_compile_errors(&self) -> TokenStream {
        self.0.iter().map(syn::Error::to_compile_error).collect()
    }
}

/// One argument as written: `key = value` or a bare `key`.
struct Arg {
    key: Ident,
    value: Option<Written>,
}

/// A value as written.
enum Written {
    Str(LitStr),
    Int(LitInt),
    Bool(syn::LitBool),
    Type(Box<Type>),
}

impl Written {
    fn span(&self) -> Span {
        match self {
            Written::Str(v) => v.span(),
            Written::Int(v) => v.span(),
            Written::Bool(v) => v.span(),
            Written::Type(v) => v.span(),
        }
    }
}

impl Parse for Arg {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        // `parse_any` accepts keywords, for `crate = "..."`.
        let key = input.call(Ident::parse_any)?;
        if !input.peek(Token![=]) {
            return Ok(Arg { key, value: None });
        }
        input.parse::<Token![=]>()?;
        let value = if input.peek(LitStr) {
            Written::Str(input.parse()?)
        } else if input.peek(LitInt) {
            Written::Int(input.parse()?)
        } else if input.peek(syn::LitBool) {
            Written::Bool(input.parse()?)
        } else {
            Written::Type(Box::new(input.parse()?))
        };
        Ok(Arg {
            key,
            value: Some(value),
        })
    }
}

/// What a key takes.
enum Takes {
    /// A string literal, checked by the function.
    Str(fn(&str) -> Result<(), String>),
    /// A whole number in `min..=max`.
    Int { min: u64, max: u64 },
    /// A type.
    Type,
    /// A path, written as a string (`crate = "::my::catga"`).
    Path,
    /// A field name of the handled message (`key = order_id`).
    Field,
    /// Nothing: a bare flag.
    Flag,
}

/// One row of the key table.
struct Key {
    name: &'static str,
    roles: &'static [Role],
    takes: Takes,
    /// Where the key goes instead, said when it is put elsewhere.
    belongs: &'static str,
}

const COMMAND_TYPE: Role = Role {
    attr: Attr::Command,
    target: Target::Type,
};
const EVENT_TYPE: Role = Role {
    attr: Attr::Event,
    target: Target::Type,
};
const COMMAND_HANDLER: Role = Role {
    attr: Attr::Command,
    target: Target::Handler,
};
const EVENT_HANDLER: Role = Role {
    attr: Attr::Event,
    target: Target::Handler,
};
const SAGA: Role = Role {
    attr: Attr::Saga,
    target: Target::Handler,
};
const JOB: Role = Role {
    attr: Attr::Job,
    target: Target::Handler,
};
/// Every role an attribute can have.
const ROLES: [Role; 6] = [
    COMMAND_TYPE,
    EVENT_TYPE,
    COMMAND_HANDLER,
    EVENT_HANDLER,
    SAGA,
    JOB,
];

/// Every key of every attribute.
const KEYS: &[Key] = &[
    Key {
        name: "subject",
        roles: &[COMMAND_TYPE, EVENT_TYPE],
        takes: Takes::Str(crate::names::check_subject),
        belongs: "on the message type (the struct or enum), not on its handler",
    },
    Key {
        name: "reply",
        roles: &[COMMAND_TYPE],
        takes: Takes::Type,
        belongs: "on the command type (`#[command(reply = T)]` on the struct); events have no reply, \
                  and a handler returns `catga::Result<T>`",
    },
    Key {
        name: "version",
        roles: &[COMMAND_TYPE, EVENT_TYPE],
        takes: Takes::Int {
            min: 1,
            max: u32::MAX as u64,
        },
        belongs: "on the message type (the struct or enum), not on its handler",
    },
    Key {
        name: "upcast_from",
        roles: &[COMMAND_TYPE, EVENT_TYPE],
        takes: Takes::Type,
        belongs: "on the message type (`#[event(version = 2, upcast_from = PlacedV1)]` on the struct), \
                  not on its handler",
    },
    Key {
        name: "queue_group",
        roles: &[COMMAND_HANDLER, EVENT_HANDLER],
        takes: Takes::Str(crate::names::check_queue_group),
        belongs: "on a handler (an `async fn`), not on a message type",
    },
    Key {
        name: "concurrency",
        roles: &[COMMAND_HANDLER, EVENT_HANDLER, SAGA],
        takes: Takes::Int {
            min: 1,
            max: 1_000_000,
        },
        belongs: "on a handler (an `async fn`), not on a message type",
    },
    Key {
        name: "parallel",
        roles: &[COMMAND_HANDLER, EVENT_HANDLER],
        takes: Takes::Int { min: 1, max: 1024 },
        belongs: "on a handler (an `async fn`), not on a message type",
    },
    Key {
        name: "idempotent",
        roles: &[COMMAND_TYPE, EVENT_HANDLER, JOB],
        takes: Takes::Flag,
        belongs: "on a command type (`#[command(idempotent)]` on the struct: its senders attach a message id) \
                  or on an event handler (`#[event(idempotent)]` on an async fn)",
    },
    Key {
        name: "leader",
        roles: &[EVENT_HANDLER, SAGA],
        takes: Takes::Flag,
        belongs: "on an event handler (`#[event(leader)]` on an async fn): only the replica holding \
                  the service's leader lease serves it",
    },
    Key {
        name: "durable",
        roles: &[EVENT_HANDLER, SAGA],
        takes: Takes::Str(crate::names::check_durable),
        belongs: "on an event handler (`#[event(durable = \"billing\")]` on an async fn)",
    },
    Key {
        name: "max_deliver",
        roles: &[EVENT_HANDLER, SAGA, JOB],
        takes: Takes::Int { min: 1, max: 1000 },
        belongs: "on a durable event handler (`#[event(durable = \"billing\", max_deliver = 5)]`)",
    },
    Key {
        name: "retry",
        roles: &[COMMAND_HANDLER, EVENT_HANDLER, SAGA, JOB],
        takes: Takes::Int { min: 0, max: 100 },
        belongs: "on a handler (an `async fn`), not on a message type",
    },
    Key {
        name: "key",
        roles: &[COMMAND_TYPE, EVENT_TYPE, SAGA],
        takes: Takes::Field,
        belongs: "on a message type (`#[command(key = account)]` on the struct: its handler's writes \
                  commit in that key's store shard) or on a saga (`#[saga(key = order_id)]` on an async \
                  fn: its instances are partitioned by that field of the trigger event)",
    },
    Key {
        name: "partitions",
        roles: &[SAGA],
        takes: Takes::Int { min: 1, max: 4096 },
        belongs: "on a keyed saga (`#[saga(key = order_id, partitions = 64)]`)",
    },
    Key {
        name: "timeout",
        roles: &[SAGA],
        takes: Takes::Str(check_duration),
        belongs: "on a saga (`#[saga(timeout = \"30s\")]`): past it, an unfinished saga is compensated",
    },
    Key {
        name: "every",
        roles: &[JOB],
        takes: Takes::Str(check_every),
        belongs: "on a job (`#[job(every = \"30s\")]` on an async fn)",
    },
    Key {
        name: "cron",
        roles: &[JOB],
        takes: Takes::Str(check_cron),
        belongs: "on a job (`#[job(cron = \"0 */5 * * * *\")]` on an async fn)",
    },
    Key {
        name: "tz",
        roles: &[JOB],
        takes: Takes::Str(check_tz),
        belongs: "on a cron job (`#[job(cron = \"0 0 9 * * MON-FRI\", tz = \"Europe/Berlin\")]` on an async fn)",
    },
    Key {
        name: "missed",
        roles: &[JOB],
        takes: Takes::Str(check_missed),
        belongs: "on a job (`#[job(every = \"1h\", missed = \"skip\")]` on an async fn)",
    },
    Key {
        name: "jitter",
        roles: &[JOB],
        takes: Takes::Str(check_jitter),
        belongs: "on a job (`#[job(every = \"1h\", jitter = \"30s\")]` on an async fn)",
    },
    Key {
        name: "overlap",
        roles: &[JOB],
        takes: Takes::Flag,
        belongs: "on a job (`#[job(every = \"1m\", overlap)]` on an async fn)",
    },
    Key {
        name: "crate",
        roles: &ROLES,
        takes: Takes::Path,
        belongs: "",
    },
];

/// A checked value.
enum Value {
    Field(Ident),
    Str(LitStr),
    Int(u64),
    Type(Box<Type>),
    Path(Path),
    Flag,
}

/// The checked arguments of one attribute, by key, before they are read
/// into [`MessageArgs`] or [`HandlerArgs`].
#[derive(Default)]
pub(crate) struct Options {
    values: Vec<(&'static str, Value)>,
    /// Each accepted key's token, to point at it.
    keys: Vec<(&'static str, Ident)>,
    /// Keys written with a value that was refused (already reported), so
    /// that checks of combinations do not report them again.
    refused: Vec<&'static str>,
}

impl Options {
    /// Takes a key's value out. Reading a key that is not in [`KEYS`]
    /// panics in a debug build, and a key of [`KEYS`] that no field reads
    /// fails `every_key_is_read_into_a_field`.
    fn take(&mut self, key: &str) -> Option<Value> {
        debug_assert!(KEYS.iter().any(|k| k.name == key), "`{key}` is not in KEYS");
        let at = self.values.iter().position(|(k, _)| *k == key)?;
        Some(self.values.remove(at).1)
    }

    fn str(&mut self, key: &str) -> Option<LitStr> {
        match self.take(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A whole number, in the type of its field (its row's range fits).
    fn int<T: TryFrom<u64>>(&mut self, key: &str) -> Option<T> {
        match self.take(key)? {
            Value::Int(n) => T::try_from(n).ok(),
            _ => None,
        }
    }

    fn ty(&mut self, key: &str) -> Option<Box<Type>> {
        match self.take(key)? {
            Value::Type(t) => Some(t),
            _ => None,
        }
    }

    fn field(&mut self, key: &str) -> Option<Ident> {
        match self.take(key)? {
            Value::Field(f) => Some(f),
            _ => None,
        }
    }

    fn flag(&mut self, key: &str) -> bool {
        matches!(self.take(key), Some(Value::Flag))
    }

    /// The path to the catga crate: `crate = "..."` or `::catga`.
    fn krate(&mut self) -> Path {
        match self.take("crate") {
            Some(Value::Path(p)) => p,
            _ => syn::parse_quote!(::catga),
        }
    }

    /// The keys no field took (empty unless a reader forgot one).
    fn left(&self) -> Vec<&'static str> {
        self.values.iter().map(|(k, _)| *k).collect()
    }
}

/// `#[command(...)]` or `#[event(...)]` on a message type.
pub(crate) struct MessageArgs {
    /// `subject = "..."`.
    pub(crate) subject: Option<LitStr>,
    /// `reply = T` (commands).
    pub(crate) reply: Option<Box<Type>>,
    /// `version = N`.
    pub(crate) version: Option<u32>,
    /// `version` was written with a value already refused.
    pub(crate) version_refused: bool,
    /// `upcast_from = T`: how older versions are read.
    pub(crate) upcast_from: Option<Box<Type>>,
    /// `idempotent` (commands).
    pub(crate) idempotent: bool,
    /// `key = field`: the field whose value places the message's writes.
    pub(crate) key: Option<Ident>,
    /// `crate = "..."`, or `::catga`.
    pub(crate) krate: Path,
}

impl MessageArgs {
    fn read(opts: &mut Options) -> MessageArgs {
        MessageArgs {
            subject: opts.str("subject"),
            reply: opts.ty("reply"),
            version: opts.int("version"),
            version_refused: opts.refused.contains(&"version"),
            upcast_from: opts.ty("upcast_from"),
            idempotent: opts.flag("idempotent"),
            key: opts.field("key"),
            krate: opts.krate(),
        }
    }
}

/// `#[command(...)]`, `#[event(...)]` or `#[saga(...)]` on an `async fn`.
pub(crate) struct HandlerArgs {
    /// `queue_group = "..."`.
    pub(crate) queue_group: Option<LitStr>,
    /// `concurrency = N`.
    pub(crate) concurrency: Option<usize>,
    /// `parallel = N`.
    pub(crate) parallel: Option<usize>,
    /// `durable = "..."`.
    pub(crate) durable: Option<LitStr>,
    /// `max_deliver = N`.
    pub(crate) max_deliver: Option<u32>,
    /// `retry = N`.
    pub(crate) retry: Option<u32>,
    /// `idempotent` (event handlers).
    pub(crate) idempotent: bool,
    /// `leader`.
    pub(crate) leader: bool,
    /// `key = field` (sagas).
    pub(crate) key: Option<Ident>,
    /// `partitions = N` (keyed sagas).
    pub(crate) partitions: Option<u32>,
    /// `timeout = "30s"` (sagas), in milliseconds.
    pub(crate) timeout_ms: Option<u64>,
    /// `every = "30s"` (jobs), in milliseconds.
    pub(crate) every_ms: Option<u64>,
    /// `cron = "..."` (jobs).
    pub(crate) cron: Option<LitStr>,
    /// `tz = "Europe/Berlin"` (cron jobs).
    pub(crate) tz: Option<LitStr>,
    /// `missed = "skip"` (jobs): a late occurrence is skipped.
    pub(crate) missed_skip: bool,
    /// `jitter = "2s"` (jobs), in milliseconds.
    pub(crate) jitter_ms: Option<u64>,
    /// `overlap` (jobs).
    pub(crate) overlap: bool,
    /// `crate = "..."`, or `::catga`.
    pub(crate) krate: Path,
    /// Each key as written, for errors about combinations.
    written: Vec<(&'static str, Ident)>,
    /// Keys written with a value already refused.
    refused: Vec<&'static str>,
}

impl HandlerArgs {
    fn read(opts: &mut Options) -> HandlerArgs {
        HandlerArgs {
            queue_group: opts.str("queue_group"),
            concurrency: opts.int("concurrency"),
            parallel: opts.int("parallel"),
            durable: opts.str("durable"),
            max_deliver: opts.int("max_deliver"),
            retry: opts.int("retry"),
            idempotent: opts.flag("idempotent"),
            leader: opts.flag("leader"),
            key: opts.field("key"),
            partitions: opts.int("partitions"),
            // Checked by its row: a valid duration.
            timeout_ms: opts.str("timeout").and_then(|t| duration_ms(&t.value()).ok()),
            every_ms: opts.str("every").and_then(|t| duration_ms(&t.value()).ok()),
            cron: opts.str("cron"),
            tz: opts.str("tz"),
            missed_skip: opts.str("missed").is_some_and(|m| m.value() == "skip"),
            jitter_ms: opts.str("jitter").and_then(|t| duration_ms(&t.value()).ok()),
            overlap: opts.flag("overlap"),
            krate: opts.krate(),
            written: std::mem::take(&mut opts.keys),
            refused: std::mem::take(&mut opts.refused),
        }
    }

    /// Whether the key was written at all (accepted or refused).
    pub(crate) fn mentions(&self, key: &str) -> bool {
        self.written(key).is_some() || self.refused.contains(&key)
    }

    /// The key as written, for errors about combinations.
    pub(crate) fn written(&self, key: &str) -> Option<&Ident> {
        self.written
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, ident)| ident)
    }
}

/// Parses and checks the arguments of `#[command]` or `#[event]` on a
/// message type.
pub(crate) fn message(tokens: TokenStream, role: Role, errors: &mut Errors) -> MessageArgs {
    let mut opts = parse(tokens, role, errors);
    let args = MessageArgs::read(&mut opts);
    debug_assert!(opts.left().is_empty(), "{:?} not read", opts.left());
    args
}

/// Parses and checks the arguments of an attribute on a handler.
pub(crate) fn handler(tokens: TokenStream, role: Role, errors: &mut Errors) -> HandlerArgs {
    let mut opts = parse(tokens, role, errors);
    let args = HandlerArgs::read(&mut opts);
    debug_assert!(opts.left().is_empty(), "{:?} not read", opts.left());
    args
}

/// Parses and checks the arguments of an attribute in `role`.
fn parse(tokens: TokenStream, role: Role, errors: &mut Errors) -> Options {
    let args = match Punctuated::<Arg, Token![,]>::parse_terminated.parse2(tokens) {
        Ok(args) => args,
        Err(e) => {
            errors.0.push(e);
            return Options::default();
        }
    };
    let mut opts = Options::default();
    for Arg { key, value } in args {
        let name = key.to_string();
        let Some(row) = KEYS.iter().find(|k| k.name == name) else {
            let expected = KEYS
                .iter()
                .filter(|k| k.roles.contains(&role))
                .map(|k| format!("`{}`", k.name))
                .collect::<Vec<_>>()
                .join(", ");
            errors.spanned(
                &key,
                format!(
                    "unknown argument `{name}` for {} on {}; expected one of: {expected}",
                    role.attr.name(),
                    role.item()
                ),
            );
            continue;
        };
        if !row.roles.contains(&role) {
            if (role == SAGA || role == JOB) && row.roles.iter().any(|r| r.target == Target::Handler) {
                let expected = KEYS
                    .iter()
                    .filter(|k| k.roles.contains(&role))
                    .map(|k| format!("`{}`", k.name))
                    .collect::<Vec<_>>()
                    .join(", ");
                errors.spanned(
                    &key,
                    format!(
                        "`{name}` is not an argument of {}; {} takes {expected}",
                        role.attr.name(),
                        role.item()
                    ),
                );
            } else {
                errors.spanned(&key, format!("`{name}` goes {}", row.belongs));
            }
            continue;
        }
        if opts.values.iter().any(|(k, _)| *k == row.name) {
            errors.spanned(&key, format!("duplicate argument `{name}`"));
            continue;
        }
        if let Some(v) = check(row, &key, value, errors) {
            opts.values.push((row.name, v));
            opts.keys.push((row.name, key));
        } else {
            opts.refused.push(row.name);
        }
    }
    opts
}

/// Checks one value against its key's row.
fn check(row: &Key, key: &Ident, value: Option<Written>, errors: &mut Errors) -> Option<Value> {
    let name = row.name;
    match (&row.takes, value) {
        (Takes::Flag, None) => Some(Value::Flag),
        (Takes::Flag, Some(v)) => {
            errors.at(
                v.span(),
                format!("`{name}` is a flag and takes no value: write `{name}`"),
            );
            None
        }
        (_, None) => {
            errors.spanned(key, format!("`{name}` needs a value: `{name} = ...`"));
            None
        }
        (Takes::Str(rule), Some(Written::Str(lit))) => match rule(&lit.value()) {
            Ok(()) => Some(Value::Str(lit)),
            Err(why) => {
                errors.spanned(
                    &lit,
                    format!("invalid {} {:?}: {why}", name.replace('_', " "), lit.value()),
                );
                None
            }
        },
        (Takes::Int { min, max }, Some(Written::Int(lit))) => match lit.base10_parse::<u64>() {
            Ok(n) if (*min..=*max).contains(&n) => Some(Value::Int(n)),
            _ => {
                errors.spanned(
                    &lit,
                    format!("`{name}` must be a whole number from {min} to {max}"),
                );
                None
            }
        },
        (Takes::Type, Some(Written::Type(ty))) => Some(Value::Type(ty)),
        (Takes::Field, Some(Written::Type(ty))) => match &*ty {
            Type::Path(p) if p.qself.is_none() && p.path.get_ident().is_some() => {
                p.path.get_ident().cloned().map(Value::Field)
            }
            _ => {
                errors.spanned(
                    &ty,
                    format!("`{name}` names one field of the message: `{name} = order_id`"),
                );
                None
            }
        },
        (Takes::Path, Some(Written::Str(lit))) => match lit.parse::<Path>() {
            Ok(path) => Some(Value::Path(path)),
            Err(_) => {
                errors.spanned(&lit, "`crate` takes a path, e.g. crate = \"::my_app::catga\"");
                None
            }
        },
        (takes, Some(other)) => {
            let expected = match takes {
                Takes::Str(_) => "a string literal, e.g. \"orders.created\"".to_owned(),
                Takes::Int { .. } => "a whole number".to_owned(),
                Takes::Type => format!("a type, not a literal: {name} = OrderId"),
                Takes::Path => "a path in a string, e.g. crate = \"::my_app::catga\"".to_owned(),
                Takes::Field => {
                    format!("the name of a field of the message, not a literal: {name} = order_id")
                }
                Takes::Flag => unreachable_flag(),
            };
            errors.at(other.span(), format!("`{name}` takes {expected}"));
            None
        }
    }
}

/// A duration: a whole number and a unit (`ms`, `s`, `m`, `h`), at least
/// 1 ms.
pub(crate) fn duration_ms(text: &str) -> Result<u64, String> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &text[digits.len()..];
    let n: u64 = digits
        .parse()
        .map_err(|_| "write a whole number and a unit: \"500ms\", \"30s\", \"5m\", \"2h\"".to_owned())?;
    let per = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(format!("add a unit: \"{n}s\" (ms, s, m or h)")),
        other => return Err(format!("unknown unit `{other}`; use ms, s, m or h")),
    };
    match n.checked_mul(per) {
        Some(0) => Err("must be at least 1ms".to_owned()),
        Some(ms) => Ok(ms),
        None => Err("too long".to_owned()),
    }
}

fn check_duration(text: &str) -> Result<(), String> {
    duration_ms(text).map(|_| ())
}

fn check_every(text: &str) -> Result<(), String> {
    let min = crate::names::schedule::MIN_EVERY_MS;
    match duration_ms(text)? {
        ms if ms < min => Err(format!(
            "`every` must be at least {min}ms: each occurrence is a message stored by the broker"
        )),
        _ => Ok(()),
    }
}

/// The longest `jitter`: an occurrence published later than this after
/// its time would pass the broker's duplicate window (2 minutes by
/// default), and a job's spread is meant to be small next to its period.
pub(crate) const MAX_JITTER_MS: u64 = 60_000;

fn check_jitter(text: &str) -> Result<(), String> {
    match duration_ms(text)? {
        ms if ms > MAX_JITTER_MS => Err(format!("`jitter` is at most {}s", MAX_JITTER_MS / 1000)),
        _ => Ok(()),
    }
}

fn check_cron(text: &str) -> Result<(), String> {
    crate::names::schedule::parse_cron(text).map(|_| ())
}

fn check_tz(text: &str) -> Result<(), String> {
    crate::names::schedule::parse_zone(text).map(|_| ())
}

fn check_missed(text: &str) -> Result<(), String> {
    match text {
        "latest" | "skip" => Ok(()),
        _ => {
            Err("write \"latest\" (run the newest missed occurrence once) or \"skip\" (run none)".to_owned())
        }
    }
}

/// Flags are matched before this arm; kept total without a panic.
fn unreachable_flag() -> String {
    "no value".to_owned()
}

#[cfg(test)]
mod unit {
    use quote::quote;

    use super::*;

    /// Every key a role takes, written validly.
    fn every_key(role: Role) -> TokenStream {
        let mut args = Vec::new();
        for key in KEYS.iter().filter(|k| k.roles.contains(&role)) {
            let name = if key.name == "crate" {
                quote!(crate)
            } else {
                let plain = Ident::new(key.name, Span::call_site());
                quote!(#plain)
            };
            args.push(match &key.takes {
                Takes::Flag => name,
                Takes::Int { min, .. } => {
                    let n = proc_macro2::Literal::u64_unsuffixed((*min).max(1));
                    quote!(#name = #n)
                }
                Takes::Str(_) if ["timeout", "every", "jitter"].contains(&key.name) => quote!(#name = "30s"),
                Takes::Str(_) if key.name == "cron" => quote!(#name = "0 * * * * *"),
                Takes::Str(_) if key.name == "missed" => quote!(#name = "skip"),
                Takes::Str(_) if key.name == "tz" => quote!(#name = "Europe/Berlin"),
                Takes::Str(_) => quote!(#name = "orders"),
                Takes::Type => quote!(#name = OrderId),
                Takes::Field => quote!(#name = order_id),
                Takes::Path => quote!(#name = "::my::catga"),
            });
        }
        quote!(#(#args),*)
    }

    #[test]
    fn every_key_is_read_into_a_field() {
        for role in ROLES {
            let mut errors = Errors::default();
            let mut opts = parse(every_key(role), role, &mut errors);
            assert!(
                errors.is_empty(),
                "{:?}",
                errors.0.iter().map(ToString::to_string).collect::<Vec<_>>()
            );
            assert!(!opts.values.is_empty());
            if role.target == Target::Type {
                let _ = MessageArgs::read(&mut opts);
            } else {
                let _ = HandlerArgs::read(&mut opts);
            }
            assert!(
                opts.left().is_empty(),
                "{role:?}: {:?} is in KEYS but read by no field",
                opts.left()
            );
        }
    }

    #[test]
    fn values_arrive_typed() {
        let mut errors = Errors::default();
        let args = handler(
            quote!(
                key = order_id,
                partitions = 16,
                concurrency = 4,
                timeout = "2m",
                crate = "::my::catga"
            ),
            SAGA,
            &mut errors,
        );
        assert!(errors.is_empty());
        assert_eq!(
            args.key.as_ref().map(ToString::to_string).as_deref(),
            Some("order_id")
        );
        assert_eq!(args.partitions, Some(16));
        assert_eq!(args.concurrency, Some(4));
        assert_eq!(args.timeout_ms, Some(120_000));
        assert_eq!(args.parallel, None);
        assert!(args.written("partitions").is_some());
        let krate = &args.krate;
        assert_eq!(quote!(#krate).to_string().replace(' ', ""), "::my::catga");
    }
}
