//! One test, two transports: a [`Backend`] builds runtimes and clients either
//! on a real nats-server or on one shared in-memory bus.

use catga::{Client, MemoryBus, Runtime, RuntimeBuilder};

use crate::servers::NatsServer;

/// Where the runtimes of a test talk to each other.
pub enum Backend {
    /// A real nats-server, killed when the backend is dropped.
    Nats(NatsServer),
    /// The embedded bus.
    Memory(MemoryBus),
}

impl Backend {
    /// A fresh nats-server.
    pub fn nats() -> Backend {
        Backend::Nats(NatsServer::start())
    }

    /// A fresh in-memory bus.
    pub fn memory() -> Backend {
        Backend::Memory(MemoryBus::new())
    }

    /// A runtime builder on this backend, serving only handlers whose path
    /// starts with `catga_tests::handlers::{module}::`.
    pub fn builder(&self, module: &str, instance: &str) -> RuntimeBuilder {
        let prefix = format!("catga_tests::handlers::{module}::");
        let b = Runtime::builder()
            .service("catga-tests")
            .instance_id(instance)
            .handlers(move |s| s.name.starts_with(&prefix));
        match self {
            Backend::Nats(s) => b.nats_url(s.url()),
            Backend::Memory(bus) => b.memory(bus.clone()),
        }
    }

    /// Starts a runtime and waits until it is ready.
    pub async fn runtime(&self, module: &str, instance: &str) -> Runtime {
        let rt = self
            .builder(module, instance)
            .start()
            .await
            .unwrap_or_else(|e| panic!("runtime {instance} failed to start: {e}"));
        tokio::time::timeout(std::time::Duration::from_secs(10), rt.ready())
            .await
            .expect("runtime ready within 10 s")
            .expect("readiness");
        rt
    }

    /// Starts `n` ready replicas `r1`..`rn` serving one handler module.
    pub async fn replicas(&self, module: &str, n: usize) -> Vec<Runtime> {
        let mut out = Vec::with_capacity(n);
        for i in 1..=n {
            out.push(self.runtime(module, &format!("r{i}")).await);
        }
        out
    }

    /// A client that hosts no handlers.
    pub async fn client(&self) -> Client {
        match self {
            Backend::Nats(s) => {
                let c = Client::connect(&s.url()).await.expect("client connects");
                // Wait for the first connection so that tests start clean.
                for _ in 0..200 {
                    if c.is_connected() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                c
            }
            Backend::Memory(bus) => Client::memory(bus),
        }
    }
}
