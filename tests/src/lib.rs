//! Test harness of catga: real `nats-server` and `redis-server` processes on
//! free loopback ports, a [`Backend`] that builds runtimes on NATS or on the
//! embedded bus, the handlers the tests use, and the scenarios that run the
//! same way on both transports.

pub mod backend;
pub mod handlers;
pub mod scenarios;
pub mod servers;

pub use backend::Backend;
pub use servers::{NatsServer, RedisServer};
