//! The order service's messages and handlers, in a library crate so that
//! clients (the demo driver, tests, other services) share the message types.

pub mod demo;
pub mod expiry;
pub mod fulfilment;
pub mod invoicing;
pub mod load;
pub mod orders;
