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
    #[allow(
        dead_code,
        reason = "the first flags (`idempotent`, `leader`) arrive with their features"
    )]
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
        roles: &[COMMAND_TYPE, EVENT_HANDLER],
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
        roles: &[EVENT_HANDLER, SAGA],
        takes: Takes::Int { min: 1, max: 1000 },
        belongs: "on a durable event handler (`#[event(durable = \"billing\", max_deliver = 5)]`)",
    },
    Key {
        name: "retry",
        roles: &[COMMAND_HANDLER, EVENT_HANDLER, SAGA],
        takes: Takes::Int { min: 0, max: 100 },
        belongs: "on a handler (an `async fn`), not on a message type",
    },
    Key {
        name: "key",
        roles: &[SAGA],
        takes: Takes::Field,
        belongs: "on a saga (`#[saga(key = order_id)]` on an async fn): its instances are partitioned by \
                  that field of the trigger event",
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
        name: "crate",
        roles: &[COMMAND_TYPE, EVENT_TYPE, COMMAND_HANDLER, EVENT_HANDLER, SAGA],
        takes: Takes::Path,
        belongs: "",
    },
];

/// A checked value.
pub(crate) enum Value {
    Field(Ident),
    Str(LitStr),
    Int(u64),
    Type(Box<Type>),
    Path(Path),
    Flag,
}

/// The checked arguments of one attribute.
#[derive(Default)]
pub(crate) struct Options {
    values: Vec<(&'static str, Value)>,
    /// Each accepted key's token, to point at it.
    keys: Vec<(&'static str, Ident)>,
}

impl Options {
    fn get(&self, key: &str) -> Option<&Value> {
        debug_assert!(KEYS.iter().any(|k| k.name == key), "`{key}` is not in KEYS");
        self.values.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub(crate) fn str(&self, key: &str) -> Option<&LitStr> {
        match self.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// The key as written, for errors about combinations.
    pub(crate) fn written(&self, key: &str) -> Option<&Ident> {
        self.keys.iter().find(|(k, _)| *k == key).map(|(_, ident)| ident)
    }

    pub(crate) fn int(&self, key: &str) -> Option<u64> {
        match self.get(key) {
            Some(Value::Int(n)) => Some(*n),
            _ => None,
        }
    }

    pub(crate) fn ty(&self, key: &str) -> Option<&Type> {
        match self.get(key) {
            Some(Value::Type(t)) => Some(t),
            _ => None,
        }
    }

    pub(crate) fn field(&self, key: &str) -> Option<&Ident> {
        match self.get(key) {
            Some(Value::Field(f)) => Some(f),
            _ => None,
        }
    }

    pub(crate) fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some(Value::Flag))
    }

    /// The path to the catga crate: `crate = "..."` or `::catga`.
    pub(crate) fn krate(&self) -> Path {
        match self.get("crate") {
            Some(Value::Path(p)) => p.clone(),
            _ => syn::parse_quote!(::catga),
        }
    }
}

/// Parses and checks the arguments of an attribute in `role`.
pub(crate) fn parse(tokens: TokenStream, role: Role, errors: &mut Errors) -> Options {
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
            if role == SAGA && row.roles.iter().any(|r| r.target == Target::Handler) {
                let expected = KEYS
                    .iter()
                    .filter(|k| k.roles.contains(&SAGA))
                    .map(|k| format!("`{}`", k.name))
                    .collect::<Vec<_>>()
                    .join(", ");
                errors.spanned(
                    &key,
                    format!("`{name}` is not an argument of #[saga]; a saga takes {expected}"),
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
                    format!("`{name}` names one field of the trigger event: `{name} = order_id`"),
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
                    format!("the name of a field of the trigger event, not a literal: {name} = order_id")
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

/// Flags are matched before this arm; kept total without a panic.
fn unreachable_flag() -> String {
    "no value".to_owned()
}
