//! The wire shared by the backend and the AI nodes.
//!
//! Three things live here because both sides must agree on them exactly:
//! the stream events (`events`), the Redis key and channel names (`keys`), and
//! the rules for ids and messages that both sides validate (`ids`); with them
//! the backend-to-node contract (`node_api`), and the request ledger and the
//! one way both talk to Redis for commands (`ledger`, `redis_conn`). What the
//! services share as servers (flags, configuration, the HTTP error shape)
//! is `service-kit`'s: this crate pulls in no web framework.

pub mod events;
pub mod ids;
pub mod keys;
pub mod ledger;
pub mod node_api;
pub mod redis_conn;

pub use events::{count_tokens, now_micros, Event, EventKind, Usage};
pub use ids::{new_request_id, validate_id, validate_message, InvalidInput, MAX_ID_LEN, MAX_MESSAGE_CHARS};
