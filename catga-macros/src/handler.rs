//! `#[command]` / `#[event]` on an `async fn`: a handler. The function is
//! re-emitted unchanged; a zero-sized type implements catga's
//! `CommandHandler` or `EventHandler` by calling it, and a `HandlerSpec`
//! for that type goes into the `linkme` registry. Decoding, encoding and
//! the facts of the message type are generic code in catga.
//!
//! Parse (the arguments, by [`attr`](crate::attr); the signature here),
//! validate (every mistake of the signature, at once), expand.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, ReturnType, Type};

use crate::attr::{self, Errors, HandlerArgs};
use crate::role::{Attr, Role, Target};

/// The parts of a valid handler signature.
struct Signature<'a> {
    takes_context: bool,
    message: &'a Type,
    output: &'a Type,
}

/// Checks the signature, collecting every mistake.
fn validate<'a>(attr: Attr, f: &'a ItemFn, errors: &mut Errors) -> Option<Signature<'a>> {
    let sig = &f.sig;
    let noun = attr.noun();
    let a = attr.a();
    if sig.asyncness.is_none() {
        errors.spanned(sig.fn_token, format!("{a} handler must be an `async fn`"));
    }
    if let Some(c) = &sig.constness {
        errors.spanned(c, format!("{a} handler cannot be a `const fn`"));
    }
    if let syn::Safety::Unsafe(u) = &sig.safety {
        errors.spanned(u, format!("{a} handler cannot be an `unsafe fn`"));
    }
    if let Some(abi) = &sig.abi {
        errors.spanned(abi, format!("{a} handler cannot have an `extern` ABI"));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.spanned(
            &sig.generics,
            format!("{a} handler cannot be generic: the registry needs one concrete {noun} type"),
        );
    }
    if let Some(v) = &sig.variadic {
        errors.spanned(v, format!("{a} handler cannot be variadic"));
    }

    let forms = if attr == Attr::Saga {
        format!("`async fn {name}(saga: &Saga, event: E)`", name = sig.ident)
    } else {
        format!(
            "`async fn {name}({noun}: T)` or `async fn {name}(ctx: &Context, {noun}: T)`",
            name = sig.ident
        )
    };
    let mut typed = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => errors.spanned(
                r,
                format!(
                    "{a} handler is a free function: methods with `self` cannot be registered; use {forms}"
                ),
            ),
            FnArg::Typed(pt) => typed.push(pt),
        }
    }
    let (ctx, msg) = match typed.as_slice() {
        [] => {
            if sig.receiver().is_none() {
                errors.at(
                    sig.paren_token.span.join(),
                    format!("{a} handler takes the {noun} it handles: {forms}"),
                );
            }
            (None, None)
        }
        [msg] if attr == Attr::Saga => {
            errors.spanned(msg, format!("{a} takes its saga first: {forms}"));
            (None, None)
        }
        [msg] => (None, Some(*msg)),
        [ctx, msg] => (Some(*ctx), Some(*msg)),
        [_, _, extra @ ..] => {
            for e in extra {
                errors.spanned(e, format!("too many arguments: {a} handler is {forms}"));
            }
            (None, None)
        }
    };
    if let Some(ctx) = ctx {
        match &*ctx.ty {
            Type::Reference(r) if r.mutability.is_none() => {}
            other if attr == Attr::Saga => errors.spanned(
                other,
                format!("the first argument of {a} is the saga, taken by shared reference: `saga: &Saga`"),
            ),
            other => errors.spanned(
                other,
                format!("the first argument of {a} handler is the context, taken by shared reference: `ctx: &Context`"),
            ),
        }
    }
    if let Some(Type::Reference(r)) = msg.map(|m| &*m.ty) {
        let elem = &r.elem;
        errors.spanned(
            r,
            format!(
                "{a} handler takes the {noun} by value: `{noun}: {}`",
                quote!(#elem)
            ),
        );
    }
    let output = match &sig.output {
        ReturnType::Type(_, ty) => Some(&**ty),
        ReturnType::Default => {
            let reply = match attr {
                Attr::Command => "Reply",
                Attr::Event | Attr::Saga | Attr::Job => "()",
            };
            errors.at(
                sig.paren_token.span.close(),
                format!("{a} handler returns `catga::Result<{reply}>`: add `-> catga::Result<{reply}>`"),
            );
            None
        }
    };
    Some(Signature {
        takes_context: ctx.is_some(),
        message: &msg?.ty,
        output: output?,
    })
}

/// Checks the keys that only make sense together.
fn combinations(attr: Attr, args: &HandlerArgs, errors: &mut Errors) {
    // A saga's trigger is always durable.
    let durable = args.durable.is_some() || attr == Attr::Saga;
    if let (Some(key), Some(_)) = (args.written("leader"), args.written("key")) {
        errors.spanned(
            key,
            "a keyed saga runs on the replica that owns its key's partition, not on the leader: \
             remove `leader` or `key`",
        );
    }
    if let (Some(key), None) = (args.written("partitions"), args.written("key")) {
        errors.spanned(
            key,
            "`partitions` splits a keyed saga's instances: add `key = <field of the trigger event>`",
        );
    }
    if let (Some(key), false) = (args.written("max_deliver"), durable) {
        errors.spanned(
            key,
            "`max_deliver` counts the deliveries of a durable consumer: add `durable = \"name\"`",
        );
    }
    if let (Some(key), true) = (args.written("queue_group"), durable) {
        errors.spanned(
            key,
            "a durable handler shares its events by its durable name (replicas with the same name split \
             them): remove `queue_group`",
        );
    }
}

/// Emits the function unchanged plus its registration.
pub(crate) fn expand(attr: Attr, args: TokenStream, item: &TokenStream, f: &ItemFn) -> TokenStream {
    let mut errors = Errors::default();
    let role = Role {
        attr,
        target: Target::Handler,
    };
    let args = attr::handler(args, role, &mut errors);
    combinations(attr, &args, &mut errors);
    let sig = validate(attr, f, &mut errors);
    match sig {
        Some(sig) if errors.is_empty() => {
            let registration = registration(attr, &args, f, &sig);
            quote! {
                #item
                #registration
            }
        }
        _ => {
            let errs = errors.to_compile_errors();
            quote!(#item #errs)
        }
    }
}

/// The handler type, its trait impl and its registry entry, in an
/// anonymous const.
fn registration(attr: Attr, args: &HandlerArgs, f: &ItemFn, sig: &Signature<'_>) -> TokenStream {
    let krate = &args.krate;
    let p = quote!(#krate::__private);
    let handler_impl = handler_impl(attr, &p, args, f, sig);
    let spec = spec(attr, &p, args, f, sig);
    quote! {
        #[doc(hidden)]
        #[allow(non_upper_case_globals, unused_qualifications, clippy::absolute_paths)]
        const _: () = {
            struct __CatgaHandler;

            #handler_impl

            #[#p::linkme::distributed_slice(#p::HANDLERS)]
            #[linkme(crate = #p::linkme)]
            static __CATGA_HANDLER: #p::HandlerSpec = #spec;
        };
    }
}

/// `impl CommandHandler` (or `EventHandler`) for the handler type: calls
/// the user's function.
fn handler_impl(
    attr: Attr,
    p: &TokenStream,
    args: &HandlerArgs,
    f: &ItemFn,
    sig: &Signature<'_>,
) -> TokenStream {
    let fn_ident = &f.sig.ident;
    let msg_ty = sig.message;
    let (message_trait, handler_trait) = attr.traits();
    let handler_trait = format_ident!("{}", handler_trait, span = Span::call_site());
    let assoc = format_ident!("{}", message_trait, span = msg_ty.span());
    let call = if attr == Attr::Saga {
        quote!(#p::run_saga(&__catga_ctx, move |__catga_saga| async move {
            #fn_ident(&__catga_saga, __catga_msg).await
        }))
    } else if sig.takes_context {
        quote!(#fn_ident(&__catga_ctx, __catga_msg))
    } else {
        quote!({
            let _ = &__catga_ctx;
            #fn_ident(__catga_msg)
        })
    };
    let user_output = sig.output;
    let (assoc_reply, output) = match attr {
        Attr::Command => (
            quote_spanned!(user_output.span()=> type Reply = <#user_output as #p::HandlerResult>::Ok;),
            quote!(#p::Result<Self::Reply>),
        ),
        Attr::Event | Attr::Saga | Attr::Job => (quote!(), quote!(#p::Result<()>)),
    };
    // The return type of `call` is spanned on the function's name: a
    // future that is not `Send` (an `Rc` held across an await) is reported
    // there, once, as axum's `debug_handler` does.
    let returns = quote_spanned! {fn_ident.span()=>
        impl ::core::future::Future<Output = #output> + ::core::marker::Send
    };
    let key_fn = key_fn(p, args, msg_ty);
    quote! {
        #[automatically_derived]
        impl #p::#handler_trait for __CatgaHandler {
            type #assoc = #msg_ty;
            #assoc_reply

            fn call(__catga_ctx: #p::Context, __catga_msg: #msg_ty) -> #returns {
                async move { #call.await }
            }

            #key_fn
        }
    }
}

/// A keyed saga's key: the field, as text. Spanned on the field as
/// written: a missing field or one that is not `Display` is reported
/// there.
fn key_fn(p: &TokenStream, args: &HandlerArgs, msg_ty: &Type) -> TokenStream {
    let Some(field) = &args.key else {
        return quote!();
    };
    let read = quote_spanned! {field.span()=>
        #p::saga_key(&__catga_event.#field)
    };
    quote! {
        fn key(__catga_event: &#msg_ty) -> ::core::option::Option<::std::string::String> {
            ::core::option::Option::Some(#read)
        }
    }
}

/// The registry entry: the handler's name and its options.
fn spec(attr: Attr, p: &TokenStream, args: &HandlerArgs, f: &ItemFn, sig: &Signature<'_>) -> TokenStream {
    let fn_name = f.sig.ident.to_string();
    let some = |v: Option<TokenStream>| match v {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    let queue_group = some(args.queue_group.as_ref().map(|lit| quote!(#lit)));
    let concurrency = some(args.concurrency.map(|n| quote!(#n)));
    let parallel = some(args.parallel.map(|n| quote!(#n)));
    let durable = some(match &args.durable {
        Some(lit) => Some(quote!(#lit)),
        // A saga's trigger is durable: none is lost while it cannot run.
        None if attr == Attr::Saga => Some(quote!(#fn_name)),
        None => None,
    });
    let max_deliver = some(args.max_deliver.map(|n| quote!(#n)));
    let retry = args.retry.unwrap_or(0);
    let idempotent = args.idempotent;
    let leader = args.leader;
    let saga = attr == Attr::Saga;
    let keyed = args.key.is_some();
    let partitions = some(args.partitions.map(|n| quote!(#n)));
    let timeout_ms = some(args.timeout_ms.map(|n| quote!(#n)));
    let constructor = match attr {
        Attr::Command => quote!(command),
        Attr::Event | Attr::Saga | Attr::Job => quote!(event),
    };
    // The one place that requires the handled type to be a catga command
    // (or event) with the reply the function returns, spanned on the
    // handled type: a misuse is reported there, once.
    quote_spanned! {sig.message.span()=>
        #p::HandlerSpec::#constructor::<__CatgaHandler>(
            ::core::concat!(::core::module_path!(), "::", #fn_name),
            #p::HandlerOptions {
                queue_group: #queue_group,
                concurrency: #concurrency,
                parallel: #parallel,
                durable: #durable,
                max_deliver: #max_deliver,
                retry: #retry,
                idempotent: #idempotent,
                leader: #leader,
                saga: #saga,
                keyed: #keyed,
                partitions: #partitions,
                timeout_ms: #timeout_ms,
                job: ::core::option::Option::None,
            },
        )
    }
}
