//! `#[command]` / `#[event]` on an `async fn`: validates the signature and
//! registers a trampoline in catga's `linkme` handler slice.

use proc_macro2::TokenStream;
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, ReturnType, Type};

use crate::attr::{self, Arg, Errors, Role};
use crate::item::Kind;

/// The parts of a valid handler signature.
struct Signature<'a> {
    takes_context: bool,
    message: &'a Type,
    output: &'a Type,
}

/// Checks the signature, collecting every mistake.
fn validate<'a>(kind: Kind, f: &'a ItemFn, errors: &mut Errors) -> Option<Signature<'a>> {
    let sig = &f.sig;
    let noun = kind.noun();
    let attr = kind.attr();
    if sig.asyncness.is_none() {
        errors.spanned(sig.fn_token, format!("a {attr} handler must be an `async fn`"));
    }
    if let Some(c) = &sig.constness {
        errors.spanned(c, format!("a {attr} handler cannot be a `const fn`"));
    }
    if let syn::Safety::Unsafe(u) = &sig.safety {
        errors.spanned(u, format!("a {attr} handler cannot be an `unsafe fn`"));
    }
    if let Some(abi) = &sig.abi {
        errors.spanned(abi, format!("a {attr} handler cannot have an `extern` ABI"));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.spanned(
            &sig.generics,
            format!("a {attr} handler cannot be generic: the registry needs one concrete {noun} type"),
        );
    }
    if let Some(v) = &sig.variadic {
        errors.spanned(v, format!("a {attr} handler cannot be variadic"));
    }

    let forms = format!(
        "`async fn {name}({noun}: T)` or `async fn {name}(ctx: &Context, {noun}: T)`",
        name = sig.ident
    );
    let mut typed = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => errors.spanned(
                r,
                format!("a {attr} handler is a free function: methods with `self` cannot be registered; use {forms}"),
            ),
            FnArg::Typed(pt) => typed.push(pt),
        }
    }
    let (ctx, msg) = match typed.as_slice() {
        [] => {
            if sig.receiver().is_none() {
                errors.at(
                    sig.paren_token.span.join(),
                    format!("a {attr} handler takes the {noun} it handles: {forms}"),
                );
            }
            (None, None)
        }
        [msg] => (None, Some(*msg)),
        [ctx, msg] => (Some(*ctx), Some(*msg)),
        [_, _, extra @ ..] => {
            for e in extra {
                errors.spanned(e, format!("too many arguments: a {attr} handler is {forms}"));
            }
            (None, None)
        }
    };
    if let Some(ctx) = ctx {
        match &*ctx.ty {
            Type::Reference(r) if r.mutability.is_none() => {}
            other => errors.spanned(
                other,
                format!("the first argument of a {attr} handler is the context, taken by shared reference: `ctx: &Context`"),
            ),
        }
    }
    if let Some(Type::Reference(r)) = msg.map(|m| &*m.ty) {
        let elem = &r.elem;
        errors.spanned(
            r,
            format!(
                "a {attr} handler takes the {noun} by value: `{noun}: {}`",
                quote!(#elem)
            ),
        );
    }
    let output = match &sig.output {
        ReturnType::Type(_, ty) => Some(&**ty),
        ReturnType::Default => {
            let reply = match kind {
                Kind::Command => "Reply",
                Kind::Event => "()",
            };
            errors.at(
                sig.paren_token.span.close(),
                format!("a {attr} handler returns `catga::Result<{reply}>`: add `-> catga::Result<{reply}>`"),
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

/// Emits the function unchanged plus its registration.
pub(crate) fn expand(kind: Kind, args: Vec<Arg>, item: &TokenStream, f: &ItemFn) -> TokenStream {
    let role = match kind {
        Kind::Command => Role::CommandHandler,
        Kind::Event => Role::EventHandler,
    };
    let mut errors = Errors::default();
    let opts = attr::validate(args, role, &mut errors);
    let sig = validate(kind, f, &mut errors);
    let sig = match sig {
        Some(sig) if errors.is_empty() => sig,
        _ => {
            let errs = errors.to_compile_errors();
            return quote!(#item #errs);
        }
    };

    let krate = opts.krate();
    let p = quote!(#krate::__private);
    let fn_ident = &f.sig.ident;
    let fn_name = fn_ident.to_string();
    let msg_ty = sig.message;
    let queue_group = match &opts.queue_group {
        Some(lit) => quote!(::core::option::Option::Some(#lit)),
        None => quote!(::core::option::Option::None),
    };
    let concurrency = opts.concurrency.unwrap_or(0);
    let kind_variant = match kind {
        Kind::Command => quote!(Command),
        Kind::Event => quote!(Event),
    };
    // The one expression that requires `T: Command` (or `Event`), spanned on
    // the user's type: "`X` is not a catga command" points there, once (the
    // associated const's type is an error type after that, so nothing else
    // that depends on the reply type is reported again).
    let info =
        quote_spanned!(msg_ty.span()=> let __catga_described = <#msg_ty as #p::#kind_variant>::__DESCRIBED;);
    let call = if sig.takes_context {
        quote!(#fn_ident(&__catga_ctx, __catga_msg))
    } else {
        quote!({
            let _ = &__catga_ctx;
            #fn_ident(__catga_msg)
        })
    };
    // The result variable carries the span of the user's return type, so a
    // wrong reply type is reported there.
    let ret_span = sig
        .output
        .to_token_stream()
        .into_iter()
        .next()
        .map_or_else(proc_macro2::Span::call_site, |t| t.span());
    let out = quote_spanned!(ret_span=> __catga_out);
    let reply = match kind {
        Kind::Command => quote_spanned! {msg_ty.span()=>
            let #out = #call.await;
            #p::encode(&#p::reply_of(&__catga_described, #out)?)
        },
        Kind::Event => quote_spanned! {msg_ty.span()=>
            let #out = #call.await;
            #p::reply_of(&__catga_described, #out)?;
            ::core::result::Result::Ok(#p::Bytes::new())
        },
    };

    // Spanned on the user's message type, like `#info`, the only expression
    // that names the `Command`/`Event` bound: a type that is not one is
    // reported once, there.
    let entry = quote_spanned! {msg_ty.span()=>
        fn __catga_entry(__catga_invocation: #p::Invocation) -> #p::Outcome {
            #info
            match __catga_invocation {
                #p::Invocation::Describe => #p::Outcome::Described(__catga_described.info),
                #p::Invocation::Call(__catga_ctx, __catga_payload) => {
                    #p::Outcome::Running(::std::boxed::Box::pin(async move {
                        let __catga_msg: #msg_ty =
                            #p::decode_payload(&__catga_payload, __catga_described.info.name)?;
                        #reply
                    }))
                }
            }
        }
    };

    quote! {
        #item
        const _: () = {
            #[#p::linkme::distributed_slice(#p::HANDLERS)]
            #[linkme(crate = #p::linkme)]
            static __CATGA_HANDLER: #p::HandlerSpec = #p::HandlerSpec {
                kind: #p::HandlerKind::#kind_variant,
                name: ::core::concat!(::core::module_path!(), "::", #fn_name),
                queue_group: #queue_group,
                concurrency: #concurrency,
                entry: __catga_entry,
            };

            #entry
        };
    }
}
