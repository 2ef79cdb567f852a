//! `#[job]` on an `async fn`: a recurring job. The function is re-emitted
//! unchanged; a zero-sized type implements catga's `JobHandler` by calling
//! it, and a `HandlerSpec` for that type goes into the `linkme` registry
//! with its schedule. The runtime publishes each occurrence to the job's
//! stream and serves it as a durable message (see catga's `runtime::jobs`).
//!
//! Parse (the arguments, by [`attr`](crate::attr); the signature here),
//! validate (every mistake at once), expand.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, ReturnType, Type};

use crate::attr::{self, Errors, HandlerArgs};
use crate::role::{Attr, Role, Target};

const FORMS: &str =
    "`async fn name() -> catga::Result<()>` or `async fn name(ctx: &Context) -> catga::Result<()>`";

/// Checks the signature, collecting every mistake; whether the function
/// takes the context.
fn validate(f: &ItemFn, errors: &mut Errors) -> Option<Span> {
    let sig = &f.sig;
    if sig.asyncness.is_none() {
        errors.spanned(sig.fn_token, "a #[job] must be an `async fn`");
    }
    if let Some(c) = &sig.constness {
        errors.spanned(c, "a #[job] cannot be a `const fn`");
    }
    if let syn::Safety::Unsafe(u) = &sig.safety {
        errors.spanned(u, "a #[job] cannot be an `unsafe fn`");
    }
    if let Some(abi) = &sig.abi {
        errors.spanned(abi, "a #[job] cannot have an `extern` ABI");
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.spanned(&sig.generics, "a #[job] cannot be generic");
    }
    let name = sig.ident.unraw().to_string();
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        errors.spanned(
            &sig.ident,
            "a #[job]'s name is part of its subject and its occurrences' ids: use ASCII letters, digits \
             and `_`",
        );
    }
    let mut takes_context = None;
    for (i, input) in sig.inputs.iter().enumerate() {
        match input {
            FnArg::Receiver(r) => errors.spanned(
                r,
                format!("a #[job] is a free function: methods with `self` cannot be registered; use {FORMS}"),
            ),
            FnArg::Typed(pt) if i > 0 => errors.spanned(
                pt,
                format!("too many arguments: a #[job] takes at most the context: {FORMS}"),
            ),
            FnArg::Typed(pt) => match &*pt.ty {
                Type::Reference(r) if r.mutability.is_none() => takes_context = Some(r.elem.span()),
                other => errors.spanned(
                    other,
                    "a #[job] takes only the context, by shared reference: `ctx: &Context`; the \
                     occurrence's time is `ctx.scheduled_at()`",
                ),
            },
        }
    }
    if let ReturnType::Default = sig.output {
        errors.at(
            sig.paren_token.span.close(),
            "a #[job] returns `catga::Result<()>`: add `-> catga::Result<()>`",
        );
    }
    takes_context
}

/// Checks the keys that only make sense together: one schedule, and a
/// jitter shorter than the period.
fn combinations(args: &HandlerArgs, errors: &mut Errors) {
    if args.mentions("every") && args.mentions("cron") {
        errors.at(
            args.written("cron").map_or_else(Span::call_site, |c| c.span()),
            "a job has one schedule: `every = \"30s\"` or `cron = \"...\"`, not both",
        );
    }
    if let (Some(every), Some(jitter), Some(key)) = (args.every_ms, args.jitter_ms, args.written("jitter"))
        && jitter >= every
    {
        errors.spanned(
            key,
            "`jitter` must be shorter than `every`: each occurrence is published up to the jitter late",
        );
    }
    if let Some(tz) = args.written("tz")
        && !args.mentions("cron")
    {
        errors.spanned(
            tz,
            "`tz` applies to `cron = \"...\"`: `every` counts from the Unix epoch, the same in every zone",
        );
    }
    // A schedule written with a refused value is reported already.
    if !args.mentions("every") && !args.mentions("cron") {
        errors.at(
            Span::call_site(),
            "a #[job] runs on a schedule: add `every = \"30s\"` or `cron = \"0 */5 * * * *\"` (UTC)",
        );
    }
}

/// Emits the function unchanged plus its registration.
pub(crate) fn expand(args: TokenStream, item: &TokenStream, f: &ItemFn) -> TokenStream {
    let mut errors = Errors::default();
    let role = Role {
        attr: Attr::Job,
        target: Target::Handler,
    };
    let args = attr::handler(args, role, &mut errors);
    combinations(&args, &mut errors);
    let takes_context = validate(f, &mut errors);
    if errors.is_empty() {
        let registration = registration(&args, f, takes_context);
        quote! {
            #item
            #registration
        }
    } else {
        let errs = errors.to_compile_errors();
        quote!(#item #errs)
    }
}

/// The handler type, its trait impl and its registry entry, in an
/// anonymous const.
fn registration(args: &HandlerArgs, f: &ItemFn, takes_context: Option<Span>) -> TokenStream {
    let krate = &args.krate;
    let p = quote!(#krate::__private);
    let fn_ident = &f.sig.ident;
    let fn_name = fn_ident.unraw().to_string();
    let call = if let Some(ty) = takes_context {
        // Spanned on the argument's type: a reference to something other
        // than the context is reported there.
        let ctx = quote_spanned!(ty=> &__catga_ctx);
        quote!(#fn_ident(#ctx))
    } else {
        quote!({
            let _ = &__catga_ctx;
            #fn_ident()
        })
    };
    let returns = quote_spanned! {fn_ident.span()=>
        impl ::core::future::Future<Output = #p::Result<()>> + ::core::marker::Send
    };
    let some = |v: Option<TokenStream>| match v {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    let schedule = match (&args.every_ms, &args.cron) {
        (Some(ms), _) => quote!(#p::JobSchedule::Every(#ms)),
        (None, Some(cron)) => quote!(#p::JobSchedule::Cron(#cron)),
        // Refused in `combinations`.
        (None, None) => quote!(#p::JobSchedule::Every(1000)),
    };
    let max_deliver = some(args.max_deliver.map(|n| quote!(#n)));
    let retry = args.retry.unwrap_or(0);
    let idempotent = args.idempotent;
    let skip_missed = args.missed_skip;
    let jitter_ms = args.jitter_ms.unwrap_or(0);
    let overlap = args.overlap;
    let tz = some(args.tz.as_ref().map(|tz| quote!(#tz)));
    // The user's return type must be `catga::Result<()>`: checked by a
    // trait spanned on that type, so that a mistake is reported there.
    let awaited = match &f.sig.output {
        ReturnType::Type(_, ty) => {
            let into = quote_spanned! {ty.span()=> <#ty as #p::JobResult>::into_outcome};
            quote!({ #into(#call.await) })
        }
        // Refused in `validate`.
        ReturnType::Default => quote!({ #call.await }),
    };
    quote! {
        #[doc(hidden)]
        #[allow(non_upper_case_globals, unused_qualifications, clippy::absolute_paths)]
        const _: () = {
            struct __CatgaHandler;

            #[automatically_derived]
            impl #p::JobHandler for __CatgaHandler {
                fn call(__catga_ctx: #p::Context) -> #returns {
                    async move #awaited
                }
            }

            #[#p::linkme::distributed_slice(#p::HANDLERS)]
            #[linkme(crate = #p::linkme)]
            static __CATGA_HANDLER: #p::HandlerSpec = #p::HandlerSpec::for_job::<__CatgaHandler>(
                ::core::concat!(::core::module_path!(), "::", #fn_name),
                ::core::concat!("catga.job.", ::core::env!("CARGO_CRATE_NAME"), ".", #fn_name),
                #p::HandlerOptions {
                    durable: ::core::option::Option::Some(#fn_name),
                    max_deliver: #max_deliver,
                    retry: #retry,
                    idempotent: #idempotent,
                    job: ::core::option::Option::Some(#p::JobOptions {
                        schedule: #schedule,
                        skip_missed: #skip_missed,
                        jitter_ms: #jitter_ms,
                        overlap: #overlap,
                        tz: #tz,
                    }),
                    ..#p::HandlerOptions::DEFAULT
                },
            );
        };
    }
}
