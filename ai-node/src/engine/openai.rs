//! The OpenAI-compatible engine: streams from any `/v1/chat/completions`
//! endpoint that speaks OpenAI's SSE wire format (Ollama, vLLM, llama.cpp
//! server, OpenAI itself).

use super::{Engine, EngineError, Prompt, TextStream};
use crate::config::OpenAiConfig;
use async_trait::async_trait;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

pub struct OpenAiEngine {
    config: OpenAiConfig,
    http: reqwest::Client,
}

impl OpenAiEngine {
    pub fn new(config: OpenAiConfig) -> Result<Self, EngineError> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // The answer streams for as long as it takes; stalls are caught by the idle timeout.
            .read_timeout(config.idle_timeout)
            .build()
            .map_err(|e| EngineError::Failed(format!("cannot build the HTTP client: {e}")))?;
        Ok(OpenAiEngine { config, http })
    }

    fn body(&self, prompt: &Prompt) -> serde_json::Value {
        let mut messages = Vec::with_capacity(prompt.history.len() + 2);
        if let Some(system) = &self.config.system_prompt {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.extend(prompt.history.iter().map(|t| json!({"role": t.role, "content": t.content})));
        messages.push(json!({"role": "user", "content": prompt.message}));
        if let Some(partial) = &prompt.continue_from {
            // Taking over from a node that died: the model continues its own partial answer.
            messages.push(json!({"role": "assistant", "content": partial}));
            messages.push(json!({"role": "user", "content": "Continue your answer exactly where it stopped, without repeating anything."}));
        }
        let mut body = json!({"model": self.config.model, "messages": messages, "stream": true});
        if let Some(max) = self.config.max_tokens {
            body["max_tokens"] = json!(max);
        }
        body
    }
}

/// One streamed `chat.completion.chunk`; only the fields we read.
#[derive(Deserialize)]
struct CompletionChunk {
    #[serde(default)]
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Delta,
}

#[derive(Deserialize, Default)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

#[async_trait]
impl Engine for OpenAiEngine {
    async fn generate(&self, prompt: Prompt) -> Result<TextStream, EngineError> {
        let url = format!("{}/chat/completions", self.config.base_url);
        let mut request = self.http.post(&url).json(&self.body(&prompt));
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let response = tokio::time::timeout(self.config.idle_timeout, request.send())
            .await
            .map_err(|_| EngineError::Failed(format!("{url} did not answer within {:?}", self.config.idle_timeout)))?
            .map_err(|e| EngineError::Failed(format!("{url}: {e}")))?;
        let status = response.status();
        if status.as_u16() == 429 || status.as_u16() == 503 {
            return Err(EngineError::Refused(format!("{url} answered {status}")));
        }
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let snippet: String = text.chars().take(200).collect();
            return Err(EngineError::Failed(format!("{url} answered {status}: {snippet}")));
        }
        let events = response.bytes_stream().eventsource();
        let pieces = events
            .map(Some)
            .chain(futures::stream::once(async { None }))
            // `finished` turns true at `[DONE]` or the first error; a stream cut before `[DONE]` is an error.
            .scan(false, |finished, item| {
                let out = match (*finished, item) {
                    (true, _) => None,
                    (false, None) => {
                        *finished = true;
                        Some(Some(Err(EngineError::Failed("the stream ended before [DONE]".into()))))
                    }
                    (false, Some(Err(e))) => {
                        *finished = true;
                        Some(Some(Err(EngineError::Failed(format!("the stream broke: {e}")))))
                    }
                    (false, Some(Ok(event))) if event.data.trim() == "[DONE]" => {
                        *finished = true;
                        None
                    }
                    (false, Some(Ok(event))) => match serde_json::from_str::<CompletionChunk>(&event.data) {
                        Ok(chunk) => Some(
                            chunk
                                .choices
                                .into_iter()
                                .next()
                                .and_then(|c| c.delta.content)
                                .filter(|t| !t.is_empty())
                                .map(Ok),
                        ),
                        Err(e) => {
                            *finished = true;
                            Some(Some(Err(EngineError::Failed(format!("a streamed chunk is not JSON: {e}")))))
                        }
                    },
                };
                futures::future::ready(out)
            })
            .filter_map(futures::future::ready);
        Ok(pieces.boxed())
    }

    fn idle_timeout(&self) -> Duration {
        self.config.idle_timeout
    }
}
