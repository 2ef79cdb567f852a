//! Procedural macros of [catga](https://docs.rs/catga): `#[command]`,
//! `#[event]`, `#[saga]` and `#[job]`. Use them through the `catga` crate, which re-exports them.
//!
//! One attribute, two roles ([`role`]): on a struct or enum it declares a
//! message type ([`message`]: subject, reply type, version); on an
//! `async fn` it registers a handler ([`handler`]). Arguments are checked
//! against one table of keys ([`attr`]); subject rules live in [`names`].
#![forbid(unsafe_code)]

mod attr;
mod handler;
mod job;
mod message;
use catga_names as names;
mod role;
#[cfg(test)]
mod tests;

use proc_macro::TokenStream;
use role::Attr;

/// Declares a command type, or registers a command handler.
///
/// On a struct or enum: `#[command]`, `#[command(subject = "orders.create",
/// reply = OrderId, version = 1)]`. The subject defaults to `cmd.` plus the
/// type name in snake case; the reply defaults to `()`. `version = 2,
/// upcast_from = OrderV1` reads commands of older versions as `OrderV1`
/// and converts them with `From`.
///
/// On an `async fn(C) -> catga::Result<C::Reply>` or
/// `async fn(&Context, C) -> catga::Result<C::Reply>`:
/// `#[command(queue_group = "order-workers", concurrency = 32, parallel = 2)]`.
/// Exactly one replica of the queue group (default: the command's subject)
/// handles each command.
#[proc_macro_attribute]
pub fn command(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(Attr::Command, attr.into(), item.into()).into()
}

/// Declares an event type, or registers an event handler.
///
/// On a struct or enum: `#[event]`, `#[event(subject = "orders.created",
/// version = 2)]`. The subject defaults to `evt.` plus the type name in snake
/// case. `version = 2, upcast_from = CreatedV1` reads events of older
/// versions as `CreatedV1` and converts them with `From`.
///
/// On an `async fn(E) -> catga::Result<()>` or
/// `async fn(&Context, E) -> catga::Result<()>`: `#[event]` (every replica
/// receives each event) or `#[event(queue_group = "billing")]` (one replica
/// per group).
#[proc_macro_attribute]
pub fn event(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(Attr::Event, attr.into(), item.into()).into()
}

/// Registers a saga: `#[saga]` or `#[saga(leader)]` on an
/// `async fn(saga: &Saga, event: E) -> catga::Result<()>`.
///
/// The function runs through `Context::saga` in a handler of a durable
/// consumer of `E` (named after the function, or `durable = "..."`), so
/// its steps are journaled and it resumes after a crash; with `leader`,
/// only the replica holding the leader lease runs it. Also takes
/// `max_deliver`, `retry`, `concurrency`.
#[proc_macro_attribute]
pub fn saga(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(Attr::Saga, attr.into(), item.into()).into()
}

/// Registers a recurring job: `#[job(every = "30s")]` or
/// `#[job(cron = "0 */5 * * * *")]` on an `async fn() -> catga::Result<()>`
/// or `async fn(ctx: &Context) -> catga::Result<()>`.
///
/// Each occurrence (at multiples of `every` since the Unix epoch, or when
/// the cron expression says, in UTC or on the wall clock of
/// `tz = "Europe/Berlin"`) runs once across the replicas of the service:
/// exactly once in effect with `idempotent` (the occurrence's message id
/// is `<job>:<scheduled unix ms>`), at least once otherwise. Also takes
/// `missed = "latest" | "skip"`, `jitter = "2s"`, `overlap`,
/// `max_deliver` and `retry`.
#[proc_macro_attribute]
pub fn job(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(Attr::Job, attr.into(), item.into()).into()
}

/// Expands `attr(args)` on `item`: finds the role from the item and hands
/// it to [`message`](crate::message) or [`handler`](crate::handler). The
/// item is always re-emitted unchanged.
fn expand(
    attr: Attr,
    args: proc_macro2::TokenStream,
    item: proc_macro2::TokenStream,
) -> proc_macro2::TokenStream {
    let parsed: syn::Item = match syn::parse2(item.clone()) {
        Ok(parsed) => parsed,
        // Not even an item: rustc reports the syntax error itself.
        Err(_) => return item,
    };
    match &parsed {
        syn::Item::Struct(_) | syn::Item::Enum(_) if attr == Attr::Job => {
            let err = syn::Error::new_spanned(
                &parsed,
                "#[job] goes on an `async fn() -> catga::Result<()>` or `async fn(ctx: &Context) -> \
                 catga::Result<()>`: a job is code run on a schedule, not a message type",
            )
            .to_compile_error();
            quote::quote!(#item #err)
        }
        syn::Item::Fn(f) if attr == Attr::Job => job::expand(args, &item, f),
        syn::Item::Struct(_) | syn::Item::Enum(_) if attr == Attr::Saga => {
            let err = syn::Error::new_spanned(
                &parsed,
                "#[saga] goes on an `async fn(saga: &Saga, event: E) -> catga::Result<()>`; \
                 the event that starts it is an #[event] type",
            )
            .to_compile_error();
            quote::quote!(#item #err)
        }
        syn::Item::Struct(s) => message::expand(attr, args, &item, &s.ident, &s.generics, false),
        syn::Item::Enum(e) => message::expand(attr, args, &item, &e.ident, &e.generics, true),
        syn::Item::Fn(f) => handler::expand(attr, args, &item, f),
        other => {
            let text = if attr == Attr::Job {
                "#[job] goes on an `async fn` (the code run at each occurrence)".to_owned()
            } else {
                format!(
                    "{} goes on a struct or an enum (a message type) or on an `async fn` (a handler)",
                    attr.name()
                )
            };
            let err = syn::Error::new_spanned(other, text).to_compile_error();
            quote::quote!(#item #err)
        }
    }
}
