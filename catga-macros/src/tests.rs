//! Expansion snapshots: each case expands an attribute on an item, pretty
//! prints the result with prettyplease and compares it with
//! `snapshots/<case>.snap`. `UPDATE_SNAPSHOTS=1 cargo test -p catga-macros`
//! rewrites them; review the diff before committing.

use proc_macro2::TokenStream;
use quote::quote;

use crate::item::{Kind, expand};

fn check(case: &str, kind: Kind, attr: TokenStream, item: TokenStream) {
    let out = expand(kind, attr, item);
    let file: syn::File =
        syn::parse2(out.clone()).unwrap_or_else(|e| panic!("{case}: expansion does not parse: {e}\n{out}"));
    let pretty = prettyplease::unparse(&file);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("snapshots")
        .join(format!("{case}.snap"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &pretty).expect("write snapshot");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "{case}: no snapshot at {}; run with UPDATE_SNAPSHOTS=1 and review it",
            path.display()
        )
    });
    assert_eq!(
        pretty, expected,
        "{case}: expansion changed; run with UPDATE_SNAPSHOTS=1 and review the diff"
    );
}

#[test]
fn command_type_with_defaults() {
    check(
        "command_type_defaults",
        Kind::Command,
        quote!(),
        quote! {
            #[derive(Serialize, Deserialize)]
            pub struct CreateOrder { pub customer: String }
        },
    );
}

#[test]
fn command_type_with_every_argument() {
    check(
        "command_type_full",
        Kind::Command,
        quote!(
            subject = "orders.pay",
            reply = OrderId,
            version = 2,
            crate = "::app::catga"
        ),
        quote! {
            #[derive(Serialize, Deserialize)]
            pub enum PayOrder { Card(String), Cash }
        },
    );
}

#[test]
fn event_type() {
    check(
        "event_type",
        Kind::Event,
        quote!(subject = "orders.created"),
        quote! {
            #[derive(Serialize, Deserialize)]
            pub struct OrderCreated { pub id: u64 }
        },
    );
}

#[test]
fn command_handler_with_context() {
    check(
        "command_handler",
        Kind::Command,
        quote!(queue_group = "order-workers", concurrency = 16),
        quote! {
            async fn create_order(ctx: &Context, cmd: CreateOrder) -> Result<OrderId> {
                ctx.publish(OrderCreated { id: 1 }).await?;
                Ok(OrderId(1))
            }
        },
    );
}

#[test]
fn event_handler_without_context() {
    check(
        "event_handler",
        Kind::Event,
        quote!(),
        quote! {
            pub async fn project(e: OrderCreated) -> catga::Result<()> {
                Ok(())
            }
        },
    );
}

#[test]
fn mistakes_keep_the_item_and_add_one_error_each() {
    check(
        "handler_errors",
        Kind::Command,
        quote!(queue_group = "", reply = u64),
        quote! {
            fn create_order<T>(&self) {}
        },
    );
}

#[test]
fn bad_type_arguments_still_implement_the_traits() {
    // The impls are emitted with defaults so that uses of the type do not
    // add follow-up errors to the one that matters.
    check(
        "type_errors",
        Kind::Event,
        quote!(subject = "orders.*"),
        quote! {
            pub struct OrderCreated;
        },
    );
}
