//! The naming rules of catga, in one place for both of its crates: the
//! macros check subjects, queue groups and durable names at compile time,
//! the runtime checks subjects sent at run time (`Client::send_raw`), with
//! the same rules and the same test table.

pub mod schedule;

/// The longest subject catga sends.
pub const MAX_SUBJECT_LEN: usize = 1024;

/// The default subject of a message type: `prefix.` plus its name in snake
/// case (`CreateOrder` → `cmd.create_order`).
pub fn default_subject(prefix: &str, ident: &str) -> String {
    format!("{prefix}.{}", snake_case(ident))
}

/// `CreateOrder` → `create_order`, `HTTPRequest` → `http_request`.
pub fn snake_case(ident: &str) -> String {
    let ident = ident.strip_prefix("r#").unwrap_or(ident);
    let chars: Vec<char> = ident.chars().collect();
    let mut out = String::with_capacity(ident.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let prev = i.checked_sub(1).map(|p| chars[p]);
            let next = chars.get(i + 1);
            let boundary = match prev {
                None | Some('_') => false,
                Some(p) if p.is_lowercase() || p.is_ascii_digit() => true,
                Some(p) => p.is_uppercase() && next.is_some_and(|n| n.is_lowercase()),
            };
            if boundary {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a subject token is ASCII letters, digits, `_` and `-` only.
pub fn token_chars_ok(token: &str) -> bool {
    token
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A message subject: dot-separated tokens of ASCII letters, digits, `_` and
/// `-`; no wildcards; not in the `$` or `_INBOX` name spaces.
pub fn check_subject(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_SUBJECT_LEN {
        return Err(format!(
            "a subject must be 1 to {MAX_SUBJECT_LEN} characters long"
        ));
    }
    if s.chars().any(char::is_whitespace) {
        return Err("a subject cannot contain white space".to_owned());
    }
    if s.starts_with('$') || s == "_INBOX" || s.starts_with("_INBOX.") {
        return Err("subjects starting with `$` or `_INBOX` are reserved by NATS".to_owned());
    }
    for token in s.split('.') {
        if token == "*" || token == ">" || token.contains('*') || token.contains('>') {
            return Err("wildcards (`*`, `>`) are not allowed in a message subject".to_owned());
        }
        if token.is_empty() {
            return Err("empty token: a subject cannot start or end with `.` or contain `..`".to_owned());
        }
        if !token_chars_ok(token) {
            return Err(format!(
                "token `{token}` may only contain ASCII letters, digits, `_` and `-`"
            ));
        }
    }
    Ok(())
}

/// A queue group: ASCII letters, digits, `_`, `-` and `.`; not empty.
pub fn check_queue_group(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("a queue group cannot be empty".to_owned());
    }
    if s.chars().any(char::is_whitespace) {
        return Err("a queue group cannot contain white space".to_owned());
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err("a queue group may only contain ASCII letters, digits, `_`, `-` and `.`".to_owned());
    }
    Ok(())
}

/// A durable consumer name: ASCII letters, digits, `_` and `-` (JetStream
/// refuses `.`, wildcards and white space in consumer names).
pub fn check_durable(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 64 {
        return Err("a durable name must be 1 to 64 characters long".to_owned());
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    {
        return Err("a durable name may only contain ASCII letters, digits, `_` and `-`".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_of_type_names() {
        assert_eq!(snake_case("CreateOrder"), "create_order");
        assert_eq!(snake_case("HTTPRequest"), "http_request");
        assert_eq!(snake_case("Order2Paid"), "order2_paid");
        assert_eq!(snake_case("Ping"), "ping");
        assert_eq!(default_subject("evt", "OrderCreated"), "evt.order_created");
    }

    #[test]
    fn subject_rules() {
        assert!(check_subject("orders.created").is_ok());
        assert!(check_subject("orders.v2-created_x").is_ok());
        for bad in [
            "",
            "orders.*",
            "orders.>",
            "a..b",
            ".a",
            "a.",
            "a b",
            "$JS.x",
            "_INBOX.x",
            "a.b%",
            "a:b",
            "a\nb",
            &"x".repeat(MAX_SUBJECT_LEN + 1),
        ] {
            assert!(check_subject(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn durable_rules() {
        assert!(check_durable("billing-v2").is_ok());
        for bad in ["", "a.b", "a b", "a*", &"x".repeat(65)] {
            assert!(check_durable(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn queue_group_rules() {
        assert!(check_queue_group("order-workers").is_ok());
        assert!(check_queue_group("").is_err());
        assert!(check_queue_group("a b").is_err());
        assert!(check_queue_group("a*").is_err());
    }
}
