//! `#[command]` / `#[event]` on a struct or enum: implements the message
//! traits (subject, name, version, reply type).
//!
//! Parse (the arguments, by [`attr`](crate::attr)), validate (no generics),
//! expand. On a recoverable mistake the impls are still emitted with
//! defaults for the bad arguments, so that one mistake yields one error and
//! no follow-up errors where the type is used.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Generics, Ident};

use crate::attr::{self, Errors, MessageArgs};
use crate::role::{Attr, Role, Target};

/// Checks what the arguments cannot: a message type is not generic.
fn validate(attr: Attr, generics: &Generics, errors: &mut Errors) -> bool {
    if generics.params.is_empty() && generics.where_clause.is_none() {
        return true;
    }
    errors.spanned(
        generics,
        format!(
            "{} types cannot be generic: the subject and the handler registry are fixed at compile time",
            attr.noun()
        ),
    );
    false
}

/// Emits the item and its trait impls.
pub(crate) fn expand(
    attr: Attr,
    args: TokenStream,
    item: &TokenStream,
    ident: &Ident,
    generics: &Generics,
) -> TokenStream {
    let mut errors = Errors::default();
    let role = Role {
        attr,
        target: Target::Type,
    };
    let args = attr::message(args, role, &mut errors);
    if !validate(attr, generics, &mut errors) {
        let errs = errors.to_compile_errors();
        return quote!(#item #errs);
    }
    let impls = impls(attr, &args, ident);
    let errs = errors.to_compile_errors();
    quote! {
        #item
        #errs
        #[doc(hidden)]
        #[allow(non_upper_case_globals, unused_qualifications, clippy::absolute_paths)]
        const _: () = {
            #impls
        };
    }
}

fn impls(attr: Attr, args: &MessageArgs, ident: &Ident) -> TokenStream {
    let p = {
        let krate = &args.krate;
        quote!(#krate::__private)
    };
    let name = ident.to_string();
    let subject = match &args.subject {
        Some(lit) => lit.value(),
        None => crate::names::default_subject(attr.subject_prefix(), &name),
    };
    let version = args.version.unwrap_or(1);
    let (kind, _) = attr.traits();
    let kind = Ident::new(kind, ident.span());
    let message_impl = quote_spanned! {ident.span()=>
        #[automatically_derived]
        impl #p::Message for #ident {
            const SUBJECT: &'static str = #subject;
            const NAME: &'static str = #name;
            const VERSION: u32 = #version;
            const KIND: #p::MessageKind = #p::MessageKind::#kind;
        }
    };
    let role_impl = match attr {
        Attr::Command => {
            let reply = match &args.reply {
                Some(ty) => quote_spanned!(ty.span()=> #ty),
                None => quote!(()),
            };
            let span = args.reply.as_ref().map_or(ident.span(), |t| t.span());
            let idempotent = args.idempotent;
            quote_spanned! {span=>
                #[automatically_derived]
                impl #p::Command for #ident {
                    type Reply = #reply;
                    const IDEMPOTENT: bool = #idempotent;
                }
            }
        }
        // `#[saga]` on a type is refused before it gets here.
        Attr::Event | Attr::Saga => quote_spanned! {ident.span()=>
            #[automatically_derived]
            impl #p::Event for #ident {}
        },
    };
    quote! {
        #message_impl
        #role_impl
    }
}
