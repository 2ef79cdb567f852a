//! `#[event]`: an event type (subject, version) or an event handler (queue
//! group, concurrency).

use proc_macro2::TokenStream;

use crate::item::{self, Kind};

/// Expands `#[event(args)]` on `item`.
pub(crate) fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    item::expand(Kind::Event, args, item)
}
