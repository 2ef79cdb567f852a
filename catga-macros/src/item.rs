//! The flow every attribute shares: parse the item and the arguments, then
//! hand a message type to [`message`](crate::message) and a function to
//! [`handler`](crate::handler). The item is always re-emitted unchanged.

use proc_macro2::TokenStream;
use quote::quote;

use crate::attr;

/// Which attribute is expanding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Command,
    Event,
}

impl Kind {
    pub(crate) fn attr(self) -> &'static str {
        match self {
            Kind::Command => "#[command]",
            Kind::Event => "#[event]",
        }
    }

    pub(crate) fn noun(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::Event => "event",
        }
    }
}

/// Expands `#[command(attr)]` / `#[event(attr)]` on `item`.
pub(crate) fn expand(kind: Kind, args: TokenStream, item: TokenStream) -> TokenStream {
    let parsed: syn::Item = match syn::parse2(item.clone()) {
        Ok(parsed) => parsed,
        // Not even an item: rustc reports the syntax error itself.
        Err(_) => return item,
    };
    let args = match attr::parse(args) {
        Ok(args) => args,
        Err(err) => {
            let err = err.to_compile_error();
            return quote!(#item #err);
        }
    };
    match &parsed {
        syn::Item::Struct(s) => crate::message::expand(kind, args, &item, &s.ident, &s.generics),
        syn::Item::Enum(e) => crate::message::expand(kind, args, &item, &e.ident, &e.generics),
        syn::Item::Fn(f) => crate::handler::expand(kind, args, &item, f),
        other => {
            let err = syn::Error::new_spanned(
                other,
                format!(
                    "{} goes on a struct or an enum (a message type) or on an `async fn` (a handler)",
                    kind.attr()
                ),
            )
            .to_compile_error();
            quote!(#item #err)
        }
    }
}
