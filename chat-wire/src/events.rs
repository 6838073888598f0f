//! Stream events: the JSON frames of `../shared/API.md` (`chunk`, `done`,
//! `error`), with the fields we add for our own use (`ts_us`, `node`).
//!
//! One struct rather than an enum per type keeps encode and decode one
//! `serde_json` call and lets the backend forward a stored event untouched.

use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// Which of the three terminal or non-terminal events this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Chunk,
    Done,
    Error,
}

/// One event of a request's stream, exactly as a client receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub request_id: String,
    /// Counts from 1 within a request; `done`/`error` take the next number.
    pub seq: u64,
    /// The text of a `chunk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<String>,
    /// Why a `done` ended (`stop`, `length`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Machine-readable cause of an `error` (`node_failed`, `engine_failed`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Human-readable cause of an `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Unix time in microseconds when the producer published the event, so a
    /// reader can measure publish-to-client latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts_us: Option<u64>,
    /// Id of the AI node that produced the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The producer's epoch: 1 for the first node, one more for each takeover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Tokens of the request, on the terminal event a node stores
    /// (`done`, and an `error` after which tokens were spent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// Tokens one request used, counted the same way whether it was streamed or
/// read whole: `completion_tokens` is the number of pieces the engine
/// produced (one `chunk` each, across takeovers), `prompt_tokens` the
/// [`count_tokens`] of what the engine was sent (message and history).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Usage {
        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// An engine-independent token count of a text, close to what BPE
/// tokenizers give for English: a word is one token per four characters
/// (rounded up), each other visible character one token.
pub fn count_tokens(text: &str) -> u64 {
    let mut tokens = 0u64;
    let mut word = 0u64;
    for c in text.chars() {
        if c.is_alphanumeric() {
            word += 1;
            continue;
        }
        tokens += word.div_ceil(4);
        word = 0;
        if !c.is_whitespace() {
            tokens += 1;
        }
    }
    tokens + word.div_ceil(4)
}

impl Event {
    pub fn chunk(request_id: &str, seq: u64, delta: impl Into<String>) -> Self {
        Self::bare(EventKind::Chunk, request_id, seq).with(|e| e.delta = Some(delta.into()))
    }

    pub fn done(request_id: &str, seq: u64, finish_reason: &str) -> Self {
        Self::bare(EventKind::Done, request_id, seq).with(|e| e.finish_reason = Some(finish_reason.to_owned()))
    }

    pub fn error(request_id: &str, seq: u64, code: &str, message: impl Into<String>) -> Self {
        Self::bare(EventKind::Error, request_id, seq).with(|e| {
            e.code = Some(code.to_owned());
            e.message = Some(message.into());
        })
    }

    fn bare(kind: EventKind, request_id: &str, seq: u64) -> Self {
        Event {
            kind,
            request_id: request_id.to_owned(),
            seq,
            delta: None,
            finish_reason: None,
            code: None,
            message: None,
            ts_us: None,
            node: None,
            epoch: None,
            usage: None,
        }
    }

    /// The same event carrying `usage`.
    pub fn with_usage(self, usage: Usage) -> Self {
        self.with(|e| e.usage = Some(usage))
    }

    fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }

    /// `done` and `error` end a request.
    pub fn is_terminal(&self) -> bool {
        self.kind != EventKind::Chunk
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an Event always serializes")
    }

    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }
}

/// Microseconds since the Unix epoch, the unit of `Event::ts_us`.
pub fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_encodes_as_the_contract_says() {
        let json = Event::chunk("r-1", 1, "Hel").to_json();
        assert_eq!(json, r#"{"type":"chunk","request_id":"r-1","seq":1,"delta":"Hel"}"#);
    }

    #[test]
    fn usage_rides_on_done_as_the_contract_says() {
        let done = Event::done("r-1", 3, "stop").with_usage(Usage::new(5, 2));
        let json = done.to_json();
        assert!(json.contains(r#""usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}"#), "{json}");
        assert_eq!(Event::from_json(&json).unwrap(), done);
    }

    #[test]
    fn tokens_are_counted_from_words_and_marks() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("hello world"), 4);
        assert_eq!(count_tokens("Hi, you!"), 4);
        assert_eq!(count_tokens("  a  b  "), 2);
        assert_eq!(count_tokens("extraordinarily"), 4);
    }

    #[test]
    fn error_and_done_round_trip() {
        for e in [Event::done("r-1", 7, "stop"), Event::error("r-1", 4, "node_failed", "gone")] {
            assert_eq!(Event::from_json(&e.to_json()).unwrap(), e);
            assert!(e.is_terminal());
        }
    }
}
