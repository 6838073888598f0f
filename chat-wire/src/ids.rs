//! Rules for what clients may send: session and user ids, request ids and
//! messages. Both the backend and the AI node apply them, so a request that
//! passes one passes the other.

use thiserror::Error;

/// Longest session, user or request id.
pub const MAX_ID_LEN: usize = 128;
/// Longest message, in characters (not bytes).
pub const MAX_MESSAGE_CHARS: usize = 32_768;

/// A field that breaks the rules; the message names the field and the rule.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct InvalidInput {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidInput {
    InvalidInput { field, reason: reason.into() }
}

/// An id: 1 to 128 characters from `A-Z a-z 0-9 _ - . :`.
pub fn validate_id(field: &'static str, id: &str) -> Result<(), InvalidInput> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(invalid(field, format!("must be 1 to {MAX_ID_LEN} characters")));
    }
    if let Some(bad) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || "_-.:".contains(*c))) {
        return Err(invalid(field, format!("character {bad:?} is not allowed (use A-Z a-z 0-9 _ - . :)")));
    }
    Ok(())
}

/// A message: 1 to 32,768 characters.
pub fn validate_message(message: &str) -> Result<(), InvalidInput> {
    if message.trim().is_empty() {
        return Err(invalid("message", "must not be empty"));
    }
    // Counting chars walks the string; the byte length bounds it first.
    if message.len() > MAX_MESSAGE_CHARS && message.chars().count() > MAX_MESSAGE_CHARS {
        return Err(invalid("message", format!("must be at most {MAX_MESSAGE_CHARS} characters")));
    }
    Ok(())
}

/// A fresh request id: `r-` and a random UUID in simple form.
pub fn new_request_id() -> String {
    format!("r-{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_alphabet() {
        assert!(validate_id("session_id", "s-42.a:b_C").is_ok());
        for bad in ["", "a b", "a*", "a?", "[x]", "é", "a/b", &"x".repeat(129)] {
            assert!(validate_id("session_id", bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn messages_are_bounded_in_characters() {
        assert!(validate_message("hi").is_ok());
        assert!(validate_message("   ").is_err());
        assert!(validate_message(&"é".repeat(MAX_MESSAGE_CHARS)).is_ok());
        assert!(validate_message(&"a".repeat(MAX_MESSAGE_CHARS + 1)).is_err());
    }

    #[test]
    fn request_ids_are_unique_and_valid() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert!(validate_id("request_id", &a).is_ok());
    }
}
