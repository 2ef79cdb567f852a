//! Dead letters as the runtime writes them: recorded in the store first.

use super::Shared;
use crate::error::Result;

/// Makes `letter` ready to store: its own id, cut to fit the broker's
/// limit, and its digest recorded in the store for as long as letters are
/// kept, so that listings can tell it from a letter someone else
/// published (see [`crate::DeadLetters`]). An error means it was not
/// recorded: it is not stored either, and the message stays where it is.
pub(crate) async fn keep_letter(shared: &Shared, letter: &mut crate::transport::DeadLetter) -> Result<()> {
    if letter.letter_id.is_none() {
        letter.letter_id = Some(crate::wire::new_message_id());
    }
    *letter = letter.fit(shared.client.transport().max_payload());
    let keep = shared
        .config
        .streams
        .max_age
        .max(std::time::Duration::from_secs(30 * 24 * 3600));
    let id = letter.letter_id.clone().unwrap_or_default();
    Box::pin(shared.store.record_letter(&id, &letter.digest(), keep)).await
}
