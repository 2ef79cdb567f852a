//! A replica's stall switch, for the fault simulator
//! (`catga::testing::Simulation`): the embedded bus handle and the store
//! handle of a replica share one, and wait while it is on.

/// A replica's stall switch (the fault simulator's): while it is on,
/// what the replica sends and receives on the bus and asks of the store
/// waits, as with a process stopped by the OS or a long pause. Its acks
/// go out when it wakes; the "still working" signals of its durable
/// deliveries are not sent, so their ack waits run out. A reply whose
/// handler had nothing left to wait for goes out at once.
pub(crate) struct Gate {
    stalled: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    pub(crate) fn new() -> Gate {
        Gate {
            stalled: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Stalls or wakes the replica.
    pub(crate) fn set(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }

    /// Whether the replica is stalled.
    pub(crate) fn is_stalled(&self) -> bool {
        *self.stalled.borrow()
    }

    /// Waits while the replica is stalled.
    pub(crate) async fn pass(&self) {
        if self.is_stalled() {
            let mut rx = self.stalled.subscribe();
            let _ = rx.wait_for(|stalled| !*stalled).await;
        }
    }
}
