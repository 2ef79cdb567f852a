//! `#[command]` / `#[event]` on a struct or enum: implements the message
//! traits (subject, name, version, reply type).

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Generics, Ident};

use crate::attr::{self, Arg, Errors, Role};
use crate::item::Kind;
use crate::names;

/// Validates the arguments and emits the item with its trait impls. On a
/// recoverable mistake the impls are still emitted (with defaults for the bad
/// arguments), so that one mistake yields one error and no follow-up errors
/// where the type is used.
pub(crate) fn expand(
    kind: Kind,
    args: Vec<Arg>,
    item: &TokenStream,
    ident: &Ident,
    generics: &Generics,
) -> TokenStream {
    let role = match kind {
        Kind::Command => Role::CommandType,
        Kind::Event => Role::EventType,
    };
    let mut errors = Errors::default();
    let opts = attr::validate(args, role, &mut errors);
    if !generics.params.is_empty() || generics.where_clause.is_some() {
        errors.spanned(
            generics,
            format!(
                "{} types cannot be generic: the subject and the handler registry are fixed at compile time",
                kind.noun()
            ),
        );
        let errs = errors.to_compile_errors();
        return quote!(#item #errs);
    }

    let krate = opts.krate();
    let name = ident.to_string();
    let subject = match &opts.subject {
        Some(lit) => lit.value(),
        None => names::default_subject(
            match kind {
                Kind::Command => "cmd",
                Kind::Event => "evt",
            },
            &name,
        ),
    };
    let version = opts.version.unwrap_or(1);
    let kind_variant = match kind {
        Kind::Command => quote!(Command),
        Kind::Event => quote!(Event),
    };
    let message_impl = quote_spanned! {ident.span()=>
        impl #krate::__private::Message for #ident {
            const SUBJECT: &'static str = #subject;
            const NAME: &'static str = #name;
            const VERSION: u32 = #version;
            const KIND: #krate::__private::MessageKind = #krate::__private::MessageKind::#kind_variant;
        }
    };
    let role_impl = match kind {
        Kind::Command => {
            let reply = match &opts.reply {
                Some(ty) => quote_spanned!(ty.span()=> #ty),
                None => quote!(()),
            };
            let span = opts.reply.as_ref().map_or(ident.span(), |t| t.span());
            quote_spanned! {span=>
                impl #krate::__private::Command for #ident {
                    type Reply = #reply;
                }
            }
        }
        Kind::Event => quote_spanned! {ident.span()=>
            impl #krate::__private::Event for #ident {}
        },
    };
    let errs = errors.to_compile_errors();
    quote! {
        #item
        #errs
        const _: () = {
            #message_impl
            #role_impl
        };
    }
}
