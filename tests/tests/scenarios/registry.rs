//! Wiring mistakes stop start-up with a clear error.

use catga::{ErrorKind, Result, command, event};
use catga_tests::Backend;
use serde::{Deserialize, Serialize};

/// Has two handlers in this module: a wiring bug the runtime must refuse.
#[command]
#[derive(Serialize, Deserialize, Debug)]
pub struct Dup;

/// Two handlers share a queue group on it: they would split its events.
#[event]
#[derive(Serialize, Deserialize, Debug)]
pub struct Split;

mod commands {
    use super::*;

    #[command]
    async fn dup_first(_: Dup) -> Result<()> {
        Ok(())
    }

    #[command]
    async fn dup_second(_: Dup) -> Result<()> {
        Ok(())
    }
}

mod events {
    use super::*;

    #[event(queue_group = "splitters")]
    async fn split_one(_: Split) -> Result<()> {
        Ok(())
    }

    #[event(queue_group = "splitters")]
    async fn split_two(_: Split) -> Result<()> {
        Ok(())
    }
}

catga_tests::on_both!(registry_checks);

async fn registry_checks(b: &Backend) {
    let module = module_path!();
    let err = b
        .builder(&format!("{module}::commands"), "r1")
        .start()
        .await
        .expect_err("two handlers for one command");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.message().contains("registry::commands::dup_first")
            && err.message().contains("registry::commands::dup_second"),
        "names both handlers: {err}"
    );
    let err = b
        .builder(&format!("{module}::events"), "r1")
        .start()
        .await
        .expect_err("two event handlers in one group");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.message().contains("queue group `splitters`") && err.message().contains("split_two"),
        "{err}"
    );
    let err = b
        .builder(&format!("{module}::nothing_here"), "r1")
        .start()
        .await
        .expect_err("no handlers");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("no handlers registered"), "{err}");
    let client_only = b
        .builder(&format!("{module}::nothing_here"), "r1")
        .client_only()
        .start()
        .await
        .expect("a pure client starts with no handlers");
    assert!(client_only.handlers().is_empty());
    client_only.shutdown().await.expect("clean shutdown");
}
