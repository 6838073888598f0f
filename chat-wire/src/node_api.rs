//! The contract between a backend and an AI node, written once: the body of
//! the node's `POST /chat`, the takeover it may carry, the node's answer, and
//! the node's check of the body. The backend sends these types, the node
//! reads them, and one fuzz target covers both.

use crate::ids::{validate_id, validate_message, InvalidInput};
use serde::{Deserialize, Serialize};

/// The header carrying the secret nodes share with backends, when one is
/// configured: without it a node starts and takes over nothing.
pub const SECRET_HEADER: &str = "x-node-secret";

/// Whether `presented` is `secret`, compared in time independent of where
/// they differ.
pub fn secret_matches(secret: &str, presented: &[u8]) -> bool {
    let secret = secret.as_bytes();
    secret.len() == presented.len() && secret.iter().zip(presented).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// `POST /chat` on an AI node. Unknown fields are ignored: callers may add some.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeChat {
    pub session_id: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The request id the backend fixed; the node makes one up without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Set by a backend taking over a request whose producer stopped mid-stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takeover: Option<Takeover>,
    /// The API key id the request is charged to (keys on), kept on its claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Continue a request after what was already streamed, as its producer at `epoch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Takeover {
    /// The epoch the backend fenced the request at.
    pub epoch: u64,
    /// The last `seq` already stored; the node continues at `after_seq + 1`.
    pub after_seq: u64,
    /// The answer's text so far, which the node continues.
    #[serde(default)]
    pub text: String,
}

/// The node's `202 Accepted` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeAccepted {
    pub request_id: String,
    pub session_id: String,
    /// The id of the node that produces the request (another one's for a duplicate).
    pub node: String,
    /// Always `accepted`.
    pub status: String,
    /// The request id was claimed before: nothing new was started.
    #[serde(default)]
    pub duplicate: bool,
}

impl NodeChat {
    /// The node's check of every field, as the backend's check of the client's.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        validate_id("session_id", &self.session_id)?;
        validate_message(&self.message)?;
        if let Some(user) = &self.user_id {
            validate_id("user_id", user)?;
        }
        if let Some(id) = &self.request_id {
            validate_id("request_id", id)?;
        }
        if let Some(owner) = &self.owner {
            validate_id("owner", owner)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_round_trips_and_is_checked_field_by_field() {
        let chat = NodeChat {
            session_id: "s-1".into(),
            message: "hi".into(),
            user_id: None,
            request_id: Some("r-1".into()),
            takeover: Some(Takeover { epoch: 2, after_seq: 3, text: "Hel".into() }),
            owner: Some("team-a".into()),
        };
        let json = serde_json::to_string(&chat).unwrap();
        assert!(!json.contains("user_id"), "absent fields are left out: {json}");
        assert_eq!(serde_json::from_str::<NodeChat>(&json).unwrap(), chat);
        assert_eq!(chat.validate(), Ok(()));
        let bad = NodeChat { owner: Some("no spaces".into()), ..chat.clone() };
        assert_eq!(bad.validate().unwrap_err().field, "owner");
        let bad = NodeChat { request_id: Some("r 1".into()), ..chat };
        assert_eq!(bad.validate().unwrap_err().field, "request_id");
    }
}
