//! Engines: what turns a message (and the session's history) into a stream of
//! text pieces. The node does not care where text comes from; it only numbers
//! the pieces and publishes them.

mod openai;
mod synthetic;

pub use openai::OpenAiEngine;
pub use synthetic::{synthetic_text, SyntheticEngine};

use crate::config::EngineConfig;
use crate::store::Turn;
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    /// The engine will not take the request now; the caller should try another node.
    #[error("engine refused the request: {0}")]
    Refused(String),
    /// The engine failed before or during the answer.
    #[error("engine failed: {0}")]
    Failed(String),
}

/// What an engine is asked.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub message: String,
    /// Earlier turns of the session, oldest first.
    pub history: Vec<Turn>,
    /// The answer so far, when this node takes over from one that died: the
    /// engine streams only what comes after it.
    pub continue_from: Option<String>,
}

/// Text pieces in order; an `Err` ends the answer as failed.
pub type TextStream = BoxStream<'static, Result<String, EngineError>>;

#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Decides up front whether to take a request, before the node claims it,
    /// so a refused request can be retried elsewhere under the same id.
    fn admit(&self) -> Result<(), EngineError> {
        Ok(())
    }

    /// Starts an answer.
    async fn generate(&self, prompt: Prompt) -> Result<TextStream, EngineError>;

    /// Longest wait for the next piece before the answer is failed.
    fn idle_timeout(&self) -> Duration;
}

/// Builds the engine the configuration names.
pub fn from_config(config: &EngineConfig) -> Result<Arc<dyn Engine>, EngineError> {
    Ok(match config {
        EngineConfig::Synthetic(c) => Arc::new(SyntheticEngine::new(c.clone())),
        EngineConfig::OpenAi(c) => Arc::new(OpenAiEngine::new(c.clone())?),
    })
}
