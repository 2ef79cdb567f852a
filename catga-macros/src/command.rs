//! `#[command]`: a command type (subject, reply type, version) or a command
//! handler (queue group, concurrency).

use proc_macro2::TokenStream;

use crate::item::{self, Kind};

/// Expands `#[command(args)]` on `item`.
pub(crate) fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    item::expand(Kind::Command, args, item)
}
