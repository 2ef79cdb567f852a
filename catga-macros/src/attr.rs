//! Argument parsing shared by every attribute: `key = value` pairs, checked
//! against the keys the attribute accepts in its role, every mistake
//! collected and reported at once.

use proc_macro2::{Span, TokenStream};
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::{Ident, LitInt, LitStr, Path, Token, Type};

/// Collects every error of one expansion (after serde_derive's `Ctxt`).
#[derive(Default)]
pub(crate) struct Errors(Vec<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, err: syn::Error) {
        self.0.push(err);
    }

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

/// One `key = value` (or bare `key`) argument.
pub(crate) struct Arg {
    pub key: Ident,
    pub value: Value,
}

/// The value of an argument, as written.
pub(crate) enum Value {
    Flag,
    Str(LitStr),
    Int(LitInt),
    Type(Box<Type>),
}

impl Parse for Arg {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        // `parse_any` accepts keywords, for `crate = "..."`.
        let key = input.call(Ident::parse_any)?;
        if !input.peek(Token![=]) {
            return Ok(Arg {
                key,
                value: Value::Flag,
            });
        }
        input.parse::<Token![=]>()?;
        let value = if input.peek(LitStr) {
            Value::Str(input.parse()?)
        } else if input.peek(LitInt) {
            Value::Int(input.parse()?)
        } else {
            Value::Type(Box::new(input.parse()?))
        };
        Ok(Arg { key, value })
    }
}

/// Parses the attribute's argument list.
pub(crate) fn parse(tokens: TokenStream) -> syn::Result<Vec<Arg>> {
    let args = Punctuated::<Arg, Token![,]>::parse_terminated.parse2(tokens)?;
    Ok(args.into_iter().collect())
}

/// Which attribute, on which kind of item.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    CommandType,
    EventType,
    CommandHandler,
    EventHandler,
}

impl Role {
    pub(crate) fn attr(self) -> &'static str {
        match self {
            Role::CommandType | Role::CommandHandler => "#[command]",
            Role::EventType | Role::EventHandler => "#[event]",
        }
    }

    fn on(self) -> &'static str {
        match self {
            Role::CommandType => "a command type",
            Role::EventType => "an event type",
            Role::CommandHandler => "a command handler",
            Role::EventHandler => "an event handler",
        }
    }

    fn keys(self) -> &'static [&'static str] {
        match self {
            Role::CommandType => &["subject", "reply", "version", "crate"],
            Role::EventType => &["subject", "version", "crate"],
            Role::CommandHandler | Role::EventHandler => &["queue_group", "concurrency", "crate"],
        }
    }

    fn is_type(self) -> bool {
        matches!(self, Role::CommandType | Role::EventType)
    }
}

/// The arguments of one attribute, validated for its role.
#[derive(Default)]
pub(crate) struct Options {
    pub subject: Option<LitStr>,
    pub reply: Option<Type>,
    pub version: Option<u32>,
    pub queue_group: Option<LitStr>,
    pub concurrency: Option<usize>,
    pub krate: Option<Path>,
}

impl Options {
    /// The path to the catga crate: `crate = "..."` or `::catga`.
    pub(crate) fn krate(&self) -> Path {
        self.krate.clone().unwrap_or_else(|| syn::parse_quote!(::catga))
    }
}

/// Why a known key is refused in this role, if it belongs to another.
fn misplaced(role: Role, key: &str) -> Option<String> {
    let a = role.attr();
    match (key, role.is_type()) {
        ("reply", true) => Some("events have no reply: `reply` is only for #[command] types".to_owned()),
        ("reply", false) => Some(
            "`reply` goes on the command type (`#[command(reply = T)]` on the struct), not on its handler; \
             the handler returns `catga::Result<T>`"
                .to_owned(),
        ),
        ("subject" | "version", false) => Some(format!(
            "`{key}` goes on the message type (`{a}` on the struct or enum), not on its handler"
        )),
        ("queue_group" | "concurrency", true) => Some(format!(
            "`{key}` goes on a handler (`{a}` on an `async fn`), not on a message type"
        )),
        _ => None,
    }
}

/// Checks every argument against the role, collecting every mistake.
pub(crate) fn validate(args: Vec<Arg>, role: Role, errors: &mut Errors) -> Options {
    let mut opts = Options::default();
    let mut seen: Vec<String> = Vec::new();
    for Arg { key, value } in args {
        let name = key.to_string();
        if !role.keys().contains(&name.as_str()) {
            let msg = misplaced(role, &name).unwrap_or_else(|| {
                let expected = role
                    .keys()
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    "unknown argument `{name}` for {} on {}; expected one of: {expected}",
                    role.attr(),
                    role.on()
                )
            });
            errors.spanned(&key, msg);
            continue;
        }
        if seen.contains(&name) {
            errors.spanned(&key, format!("duplicate argument `{name}`"));
            continue;
        }
        seen.push(name.clone());
        match (name.as_str(), value) {
            (_, Value::Flag) => errors.spanned(&key, format!("`{name}` needs a value: `{name} = ...`")),
            ("subject", Value::Str(lit)) => match crate::names::check_subject(&lit.value()) {
                Ok(()) => opts.subject = Some(lit),
                Err(why) => errors.spanned(&lit, format!("invalid subject {:?}: {why}", lit.value())),
            },
            ("queue_group", Value::Str(lit)) => match crate::names::check_queue_group(&lit.value()) {
                Ok(()) => opts.queue_group = Some(lit),
                Err(why) => errors.spanned(&lit, format!("invalid queue group {:?}: {why}", lit.value())),
            },
            ("crate", Value::Str(lit)) => match lit.parse::<Path>() {
                Ok(path) => opts.krate = Some(path),
                Err(_) => errors.spanned(&lit, "`crate` takes a path, e.g. crate = \"::my_app::catga\""),
            },
            ("version", Value::Int(lit)) => match lit.base10_parse::<u32>() {
                Ok(v) if v >= 1 => opts.version = Some(v),
                _ => errors.spanned(&lit, "`version` must be a whole number from 1 to 4294967295"),
            },
            ("concurrency", Value::Int(lit)) => match lit.base10_parse::<usize>() {
                Ok(n) if (1..=1_000_000).contains(&n) => opts.concurrency = Some(n),
                _ => errors.spanned(&lit, "`concurrency` must be a whole number from 1 to 1000000"),
            },
            ("reply", Value::Type(ty)) => opts.reply = Some(*ty),
            ("reply", Value::Str(lit)) => {
                errors.spanned(&lit, "`reply` takes a type, not a string: reply = OrderId")
            }
            ("reply", Value::Int(lit)) => errors.spanned(&lit, "`reply` takes a type: reply = OrderId"),
            ("subject" | "queue_group" | "crate", other) => errors.push(value_error(
                &key,
                other,
                "a string literal, e.g. \"orders.created\"",
            )),
            (_, other) => errors.push(value_error(&key, other, "a whole number")),
        }
    }
    opts
}

fn value_error(key: &Ident, value: Value, expected: &str) -> syn::Error {
    let msg = format!("`{key}` takes {expected}");
    match value {
        Value::Flag => syn::Error::new_spanned(key, msg),
        Value::Str(v) => syn::Error::new_spanned(v, msg),
        Value::Int(v) => syn::Error::new_spanned(v, msg),
        Value::Type(v) => syn::Error::new_spanned(v, msg),
    }
}
