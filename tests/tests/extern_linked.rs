//! A handler in a library crate serves once the binary names the crate with
//! `catga::link!`.

catga::link!(catga_extern_handlers);

#[test]
fn named_library_crate_keeps_its_handlers() {
    let names: Vec<&str> = catga::handlers().iter().map(|h| h.name()).collect();
    assert!(
        names.contains(&"catga_extern_handlers::greet"),
        "registered handlers: {names:?}"
    );
}

#[tokio::test]
async fn library_handler_serves() {
    let bus = catga::MemoryBus::new();
    let rt = catga::Runtime::builder()
        .memory(bus.clone())
        .handlers(|s| s.name().starts_with("catga_extern_handlers::"))
        .start()
        .await
        .expect("starts");
    let reply = catga::Client::memory(&bus)
        .send(catga_extern_handlers::Greet {
            name: "linker".into(),
        })
        .await
        .expect("reply");
    assert_eq!(reply, "hello, linker");
    rt.shutdown().await.expect("clean shutdown");
}
