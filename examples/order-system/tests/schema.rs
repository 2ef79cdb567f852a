//! The example's AsyncAPI document: `order-system schema` prints the
//! checked-in `asyncapi.json` (`UPDATE_SNAPSHOTS=1` rewrites it), which the
//! AsyncAPI 3.0.0 JSON Schema accepts, whose references all resolve, and
//! whose payload schemas accept what the example really sends (and refuse
//! what it would not decode).

use std::path::Path;
use std::process::Command;

use catga_tests::asyncapi::{payload_problems, problems};
use order_system::expiry::{ExpireOrder, PaymentReminder};
use order_system::fulfilment::{BookCourier, Fulfilment, GetFulfilment, ReleaseStock, ReserveStock};
use order_system::invoicing::{GetInvoices, Invoices, IssueInvoice};
use order_system::orders::{
    CancelOrder, CreateOrder, GetOrder, GetRevenue, Line, OrderCancelled, OrderCreated, OrderId, OrderPaid,
    OrderShipped, OrderView, PayOrder, Revenue, ShipOrder, Status,
};
use serde::Serialize;
use serde_json::{Value, json};

/// What the binary prints for `schema`, as the service `order-system` at
/// version 0.1.0.
fn exported() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_order-system"))
        .arg("schema")
        .env("CATGA_SERVICE", "order-system")
        .env("CATGA_SERVICE_VERSION", "0.1.0")
        .env_remove("NATS_URL")
        .env_remove("REDIS_URL")
        .output()
        .expect("run order-system schema");
    assert!(
        out.status.success(),
        "order-system schema failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn document() -> Value {
    serde_json::from_str(&exported()).expect("the document is JSON")
}

#[test]
fn the_checked_in_document_is_what_the_binary_exports() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("asyncapi.json");
    let now = exported();
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &now).expect("write asyncapi.json");
        return;
    }
    let before = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        before == now,
        "asyncapi.json is not what `order-system schema` prints; run with UPDATE_SNAPSHOTS=1 and review \
         the diff"
    );
}

#[test]
fn the_document_is_valid_asyncapi_3() {
    let doc = document();
    let found = problems(&doc);
    assert!(found.is_empty(), "{found:#?}");
    assert_eq!(doc["asyncapi"], "3.0.0");
    assert_eq!(doc["info"]["title"], "order-system");
    assert_eq!(doc["info"]["version"], "0.1.0");

    // The checks can fail: a wrong action, a missing version and a
    // reference to nothing are each reported.
    let mut broken = doc.clone();
    broken["operations"]["order_system.orders.create_order"]["action"] = json!("listen");
    broken["info"].as_object_mut().expect("info").remove("version");
    broken["channels"]["orders.paid"]["messages"]["OrderPaid"]["$ref"] = json!("#/components/messages/Nope");
    let found = problems(&broken);
    assert!(found.len() >= 3, "{found:#?}");
    assert!(found.iter().any(|p| p.contains("Nope")), "{found:#?}");
}

#[test]
fn every_handler_is_an_operation_with_its_queue_group_and_options() {
    let doc = document();
    let ops = doc["operations"].as_object().expect("operations");
    let create = &ops["order_system.orders.create_order"];
    assert_eq!(create["action"], "receive");
    assert_eq!(create["channel"]["$ref"], "#/channels/cmd.create_order");
    assert_eq!(create["bindings"]["nats"]["queue"], "order-workers");
    assert_eq!(create["x-catga"]["idempotent"], true);
    assert_eq!(
        create["reply"]["messages"],
        json!([
            { "$ref": "#/channels/cmd.create_order.reply/messages/CreateOrder.reply" },
            { "$ref": "#/channels/cmd.create_order.reply/messages/catga.Error" },
        ])
    );
    // A durable consumer is not a core NATS queue group.
    let billing = ops
        .values()
        .find(|o| o["x-catga"]["durable"] == "billing")
        .expect("the billing consumer");
    assert!(billing.get("bindings").is_none(), "{billing}");
    assert!(billing.get("reply").is_none(), "{billing}");
    let keyed = ops
        .values()
        .find(|o| o["x-catga"]["kind"] == "keyed_saga")
        .expect("the invoicing saga");
    assert!(keyed["x-catga"]["partitions"].as_u64().is_some(), "{keyed}");
    // Every command and event of the example has a real schema.
    for (id, m) in doc["components"]["messages"].as_object().expect("messages") {
        let text = m["payload"].to_string();
        assert!(!text.contains("does not derive"), "{id} has no schema: {text}");
    }
}

fn fits<T: Serialize>(doc: &Value, message: &str, value: &T) {
    let payload = serde_json::to_value(value).expect("encode");
    let found = payload_problems(doc, message, &payload);
    assert!(found.is_empty(), "{message} {payload}: {found:#?}");
}

#[test]
fn payloads_the_example_sends_fit_their_schemas_and_others_do_not() {
    let doc = document();
    let id = OrderId("o-1".into());
    let line = Line {
        sku: "sku-1".into(),
        quantity: 2,
        unit_cents: 250,
    };
    fits(
        &doc,
        "CreateOrder",
        &CreateOrder {
            customer: "ada".into(),
            lines: vec![line],
        },
    );
    fits(&doc, "CreateOrder.reply", &id);
    fits(
        &doc,
        "PayOrder",
        &PayOrder {
            id: id.clone(),
            amount_cents: 500,
        },
    );
    fits(&doc, "PayOrder.reply", &());
    fits(&doc, "ShipOrder", &ShipOrder { id: id.clone() });
    fits(&doc, "ShipOrder.reply", &"TRACK-1".to_owned());
    fits(
        &doc,
        "CancelOrder",
        &CancelOrder {
            id: id.clone(),
            reason: "changed my mind".into(),
        },
    );
    fits(&doc, "GetOrder", &GetOrder { id: id.clone() });
    fits(
        &doc,
        "GetOrder.reply",
        &OrderView {
            id: id.clone(),
            customer: "ada".into(),
            total_cents: 500,
            status: Status::Shipped,
            tracking: None,
            version: 3,
        },
    );
    fits(&doc, "GetRevenue", &GetRevenue);
    fits(&doc, "GetRevenue.reply", &Revenue::default());
    fits(
        &doc,
        "OrderCreated",
        &OrderCreated {
            id: id.clone(),
            customer: "ada".into(),
            total_cents: 500,
        },
    );
    fits(
        &doc,
        "OrderPaid",
        &OrderPaid {
            id: id.clone(),
            customer: "ada".into(),
            amount_cents: 500,
        },
    );
    fits(
        &doc,
        "OrderShipped",
        &OrderShipped {
            id: id.clone(),
            tracking: "TRACK-1".into(),
        },
    );
    fits(
        &doc,
        "OrderCancelled",
        &OrderCancelled {
            id: id.clone(),
            reason: "r".into(),
        },
    );
    fits(&doc, "ReserveStock", &ReserveStock { id: id.clone() });
    fits(&doc, "ReleaseStock", &ReleaseStock { id: id.clone() });
    fits(&doc, "BookCourier", &BookCourier { id: id.clone() });
    fits(&doc, "GetFulfilment", &GetFulfilment { id: id.clone() });
    fits(&doc, "GetFulfilment.reply", &Fulfilment::default());
    fits(
        &doc,
        "IssueInvoice",
        &IssueInvoice {
            customer: "ada".into(),
            id: id.clone(),
        },
    );
    fits(
        &doc,
        "GetInvoices",
        &GetInvoices {
            customer: "ada".into(),
        },
    );
    fits(&doc, "GetInvoices.reply", &Invoices::default());
    fits(
        &doc,
        "PaymentReminder",
        &PaymentReminder {
            id: id.clone(),
            placed_ms: 1,
        },
    );
    fits(&doc, "ExpireOrder", &ExpireOrder { id });

    // What the handlers would refuse to decode, the schemas refuse too.
    for (message, payload) in [
        ("PayOrder", json!({ "id": "o-1", "amount_cents": "500" })),
        ("PayOrder", json!({ "amount_cents": 500 })),
        (
            "CreateOrder",
            json!({ "customer": "ada", "lines": [{ "sku": "s", "quantity": -1, "unit_cents": 1 }] }),
        ),
        (
            "GetOrder.reply",
            json!({ "id": "o-1", "customer": "a", "total_cents": 1, "status": "Lost", "tracking": null, "version": 1 }),
        ),
    ] {
        assert!(
            !payload_problems(&doc, message, &payload).is_empty(),
            "{message} {payload} should not fit"
        );
    }
}
