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

/// Checks what one key cannot: `upcast_from` reads versions older than
/// `version`, so there must be one. Reported on the user's type token; the
/// impls are still emitted (without the upcast).
fn check_upcast(args: &mut MessageArgs, errors: &mut Errors) {
    // A refused `version` is reported already: no upcast is emitted, so
    // that the one mistake gives one error.
    if args.version_refused {
        args.upcast_from = None;
        return;
    }
    if let Some(from) = &args.upcast_from
        && args.version.unwrap_or(1) < 2
    {
        errors.spanned(
            from,
            "`upcast_from` reads messages of versions older than this type's: declare `version = 2` or more \
             (the version this type is)",
        );
        args.upcast_from = None;
    }
}

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
    is_enum: bool,
) -> TokenStream {
    let mut errors = Errors::default();
    let role = Role {
        attr,
        target: Target::Type,
    };
    let mut args = attr::message(args, role, &mut errors);
    check_upcast(&mut args, &mut errors);
    if is_enum && let Some(field) = args.key.take() {
        errors.spanned(
            &field,
            "`key` names a field of a struct; an enum has no fields of its own: make the message a \
             struct, or leave `key` out",
        );
    }
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
    // Spanned on the user's type: a type that is not `Deserialize`, or
    // whose conversion into this one is missing, is reported there.
    let upcast = args.upcast_from.as_ref().map(|from| {
        let read_as = format!(
            "{name} (an older version, read as {})",
            quote!(#from).to_string().replace(' ', "")
        );
        quote_spanned! {from.span()=>
            fn __catga_upcast(
                __catga_version: u32,
                __catga_payload: &[u8],
            ) -> ::core::option::Option<#p::Result<Self>> {
                if __catga_version >= #version {
                    return ::core::option::Option::None;
                }
                ::core::option::Option::Some(
                    <#from as #p::Decode>::decode(__catga_payload, #read_as)
                        .map(<Self as ::core::convert::From<#from>>::from),
                )
            }
        }
    });
    // Spanned on the field the user named: a field that does not exist,
    // or whose type is not `Display`, is reported there.
    let key = args.key.as_ref().map(|field| {
        quote_spanned! {field.span()=>
            const __CATGA_KEYED: bool = true;
            fn __catga_key(&self) -> ::core::option::Option<::std::string::String> {
                ::core::option::Option::Some(#p::message_key_text(&self.#field))
            }
        }
    });
    // The payload's JSON Schema when the type derives `JsonSchema`, none
    // otherwise: the probe's method lookup decides, so a type without it
    // still compiles.
    let schema_of = |ty: TokenStream| {
        quote! {{
            #[allow(unused_imports)]
            use #p::{Described as _, Undescribed as _};
            (&#p::SchemaProbe::<#ty>::new()).__catga_schema_of(__catga_generator)
        }}
    };
    let schema = schema_of(quote!(Self));
    let message_impl = quote_spanned! {ident.span()=>
        #[automatically_derived]
        impl #p::Message for #ident {
            const SUBJECT: &'static str = #subject;
            const NAME: &'static str = #name;
            const VERSION: u32 = #version;
            const KIND: #p::MessageKind = #p::MessageKind::#kind;
            #upcast
            #key
            fn __catga_schema(
                __catga_generator: &mut #p::SchemaGenerator,
            ) -> ::core::option::Option<#p::Schema> {
                #schema
            }
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
            // The type as written, not `<Self as Command>::Reply`: that
            // projection would repeat every error of a type that is not a
            // command (not `Serialize`, say) a second time.
            let reply_schema = schema_of(reply.clone());
            quote_spanned! {span=>
                #[automatically_derived]
                impl #p::Command for #ident {
                    type Reply = #reply;
                    const IDEMPOTENT: bool = #idempotent;
                    fn __catga_reply_schema(
                        __catga_generator: &mut #p::SchemaGenerator,
                    ) -> ::core::option::Option<#p::Schema> {
                        #reply_schema
                    }
                }
            }
        }
        // `#[saga]` on a type is refused before it gets here.
        Attr::Event | Attr::Saga | Attr::Job => quote_spanned! {ident.span()=>
            #[automatically_derived]
            impl #p::Event for #ident {}
        },
    };
    let constructor = match attr {
        Attr::Command => quote!(command),
        Attr::Event | Attr::Saga | Attr::Job => quote!(event),
    };
    // Listed for the schema export, also when no handler of this binary
    // takes it (an event the service publishes).
    quote! {
        #message_impl
        #role_impl
        #[#p::linkme::distributed_slice(#p::MESSAGES)]
        #[linkme(crate = #p::linkme)]
        static __CATGA_MESSAGE: #p::MessageSpec = #p::MessageSpec::#constructor::<#ident>();
    }
}
