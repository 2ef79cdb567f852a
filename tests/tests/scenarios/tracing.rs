//! W3C trace context across hops: a trace a client starts reaches a
//! handler two hops away (a nested command, and an event published from a
//! handler); without a trace, no `traceparent` is sent.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use catga::{Context, Result, TraceParent, command, event};
use catga_tests::{Backend, run_id};
use serde::{Deserialize, Serialize};

/// First hop: asks [`Back`] and publishes [`Traced`].
#[command(reply = String, subject = "tests.tracing.front")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Front {
    pub run: String,
}

/// Second hop: answers the trace it sees, as `trace id|parent id`.
#[command(reply = String, subject = "tests.tracing.back")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Back {
    pub run: String,
}

/// Published by the first hop.
#[event(subject = "tests.tracing.traced")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Traced {
    pub run: String,
}

/// What the event handler saw, per run.
static SEEN: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

fn seen(ctx: &Context) -> String {
    match ctx.meta().traceparent() {
        Some(t) => format!("{}|{}", t.trace_id(), t.parent_id()),
        None => "-".to_owned(),
    }
}

#[command]
async fn front(ctx: &Context, f: Front) -> Result<String> {
    ctx.publish(Traced { run: f.run.clone() }).await?;
    let back = ctx.send(Back { run: f.run }).await?;
    // The span id of this handling is the parent of what it sent.
    Ok(format!(
        "{back}|{}",
        ctx.meta().span_id().unwrap_or_else(|| "-".into())
    ))
}

#[command]
async fn back(ctx: &Context, _b: Back) -> Result<String> {
    Ok(seen(ctx))
}

#[event]
async fn on_traced(ctx: &Context, t: Traced) -> Result<()> {
    SEEN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get_or_insert_with(HashMap::new)
        .insert(t.run, seen(ctx));
    Ok(())
}

async fn event_seen(run: &str) -> String {
    let started = Instant::now();
    loop {
        if let Some(s) = SEEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .and_then(|m| m.get(run).cloned())
        {
            return s;
        }
        assert!(started.elapsed() < crate::WAIT, "the event never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

catga_tests::on_both!(a_trace_crosses_two_hops, no_trace_no_header);

async fn a_trace_crosses_two_hops(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let run = run_id();
    let root = TraceParent::new_root();
    let reply = root
        .scope(client.send(Front { run: run.clone() }))
        .await
        .expect("answered");
    let [trace, parent, front_span] = reply.split('|').collect::<Vec<_>>()[..] else {
        panic!("{reply}")
    };
    assert_eq!(
        trace,
        root.trace_id(),
        "the client's trace reached the second hop"
    );
    assert_eq!(parent, front_span, "its parent is the first hop's span");
    assert_ne!(parent, root.parent_id());
    let event = event_seen(&run).await;
    let [event_trace, event_parent] = event.split('|').collect::<Vec<_>>()[..] else {
        panic!("{event}")
    };
    assert_eq!(event_trace, root.trace_id(), "and the event published on the way");
    assert_eq!(event_parent, front_span);
    rt.shutdown().await.expect("clean shutdown");
}

async fn no_trace_no_header(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let run = run_id();
    let reply = client.send(Front { run: run.clone() }).await.expect("answered");
    assert_eq!(reply, "-|-", "no trace anywhere");
    assert_eq!(event_seen(&run).await, "-");
    rt.shutdown().await.expect("clean shutdown");
}
