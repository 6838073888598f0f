//! The synthetic engine: deterministic text derived from the message, at a
//! configured pace, with injectable failures. It makes the cluster testable
//! and benchmarkable without a model, and makes every answer predictable.

use super::{Engine, EngineError, Prompt, TextStream};
use crate::config::SyntheticConfig;
use async_trait::async_trait;
use futures::StreamExt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

const WORDS: &[&str] = &[
    "the", "stream", "arrives", "in", "order", "and", "every", "chunk", "counts", "once", "proxy", "backend", "node",
    "answer", "token", "latency", "is", "low", "because", "nothing", "waits", "for", "a", "buffer", "redis", "carries",
    "each", "piece", "to", "socket", "quickly", "so", "reader", "sees", "text", "grow", "while", "model", "thinks",
    "about", "your", "question",
];

pub struct SyntheticEngine {
    config: SyntheticConfig,
}

impl SyntheticEngine {
    pub fn new(config: SyntheticConfig) -> Self {
        SyntheticEngine { config }
    }
}

/// The answer the synthetic engine gives to `message`, as the pieces it
/// streams: the same message always gives the same pieces.
pub fn synthetic_text(message: &str, tokens: usize) -> Vec<String> {
    let mut h = DefaultHasher::new();
    message.hash(&mut h);
    let mut state = h.finish();
    (0..tokens)
        .map(|i| {
            // splitmix64: a well-mixed, dependency-free deterministic sequence.
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let word = WORDS[(z % WORDS.len() as u64) as usize];
            match i {
                0 => capitalize(word) + " ",
                _ if i + 1 == tokens => format!("{word}."),
                _ => format!("{word} "),
            }
        })
        .collect()
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
}

#[async_trait]
impl Engine for SyntheticEngine {
    fn admit(&self) -> Result<(), EngineError> {
        if self.config.refuse_ratio > 0.0 && fastrand::f64() < self.config.refuse_ratio {
            return Err(EngineError::Refused("injected refusal".into()));
        }
        Ok(())
    }

    async fn generate(&self, prompt: Prompt) -> Result<TextStream, EngineError> {
        let mut pieces = synthetic_text(&prompt.message, self.config.answer_tokens);
        if !self.config.tag.is_empty() {
            for piece in &mut pieces {
                piece.push_str(&self.config.tag);
            }
        }
        if let Some(done) = &prompt.continue_from {
            // The text is deterministic: skip the pieces the earlier node already streamed.
            let mut covered = 0;
            let skip = pieces.iter().take_while(|p| {
                covered += p.len();
                covered <= done.len()
            });
            let skip = skip.count();
            pieces.drain(..skip);
        }
        let die_at = (self.config.die_ratio > 0.0 && fastrand::f64() < self.config.die_ratio)
            // Before one of the pieces after the first (1..len): never past
            // the last one, where the answer would end whole.
            .then(|| fastrand::usize(1..pieces.len().max(2)));
        let first = self.config.first_token;
        let gap = if self.config.tokens_per_second > 0.0 {
            Duration::from_secs_f64(1.0 / self.config.tokens_per_second)
        } else {
            Duration::ZERO
        };
        let stream = futures::stream::iter(pieces.into_iter().enumerate()).then(move |(i, piece)| async move {
            let pause = if i == 0 { first } else { gap };
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if die_at == Some(i) {
                return Err(EngineError::Failed(format!("injected failure after {i} pieces")));
            }
            Ok(piece)
        });
        // The stream ends after its first error.
        Ok(stream
            .scan(false, |failed, item| {
                let out = if *failed { None } else { Some(item) };
                *failed = out.as_ref().is_some_and(|r| r.is_err());
                futures::future::ready(out)
            })
            .boxed())
    }

    fn idle_timeout(&self) -> Duration {
        self.config.first_token.max(Duration::from_secs(1)) * 10
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_message_same_text() {
        assert_eq!(synthetic_text("hi", 12), synthetic_text("hi", 12));
        assert_ne!(synthetic_text("hi", 12), synthetic_text("ho", 12));
        assert_eq!(synthetic_text("hi", 12).len(), 12);
    }
}
