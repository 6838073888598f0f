//! One answer, from engine to Redis: numbers the pieces, stamps and emits
//! them, and always ends the request with `done` or `error`, so no reader
//! waits on silence that the node could have broken.

use crate::engine::{Engine, EngineError, Prompt};
use crate::store::{Store, Turn};
use chat_wire::ledger::{Emitted, Renewal};
use chat_wire::{count_tokens, now_micros, Event, Usage};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Most text kept of one answer for the session's history.
const MAX_REMEMBERED_BYTES: usize = 64 * 1024;
/// Tries of one emit before the stream is given up as unpublishable.
const EMIT_ATTEMPTS: u32 = 3;

/// A request accepted by the node.
#[derive(Debug, Clone)]
pub struct Job {
    pub request_id: String,
    pub session_id: String,
    pub message: String,
    /// This producer's epoch (1, or more after takeovers); stamped on every event.
    pub epoch: u64,
    /// The last `seq` already stored by an earlier producer (0 for a new request).
    pub after_seq: u64,
    /// The answer's text already streamed by an earlier producer, which this one continues.
    pub prefix: String,
}

/// What the generation task needs from the node.
pub struct Generator {
    pub node_id: String,
    pub store: Arc<Store>,
    pub engine: Arc<dyn Engine>,
}

/// How an answer ended, for logs and tests.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Done {
        chunks: u64,
    },
    Failed {
        code: String,
    },
    /// Redis would not take the events: nobody could be told.
    Unpublished,
    /// A takeover fenced this producer off: another node continues the answer.
    Fenced,
    /// The request was cancelled (by a client, or abandoned): stored as an
    /// `error` with code `cancelled`, the engine stopped.
    Cancelled,
}

/// What became of one emitted event.
enum Step {
    Stored,
    /// The request was cancelled: this chunk was not stored; end it.
    Cancelled,
    /// The answer must stop here, with this outcome.
    Stop(Outcome),
}

/// The stored end of a cancelled request.
fn cancelled(request_id: &str, seq: u64) -> Event {
    Event::error(request_id, seq, "cancelled", "the request was cancelled")
}

impl Generator {
    /// Generates the answer to `job`; `cancel` ends it early with an `error` event (shutdown).
    pub async fn run(&self, job: Job, cancel: CancellationToken) -> Outcome {
        // The lease says this node is alive while the engine is silent; a
        // renewal that is refused means another node took the answer over,
        // one that says cancelled means the answer must end now.
        let (fenced, stop) = (CancellationToken::new(), CancellationToken::new());
        let _renewer = AbortOnDrop(tokio::spawn(renew_lease(
            self.store.clone(),
            job.request_id.clone(),
            job.epoch,
            self.node_id.clone(),
            fenced.clone(),
            stop.clone(),
        )));
        let history = match self.store.history(&job.session_id).await {
            Ok(h) => h,
            Err(e) => {
                log::warn!("request_id={} history unavailable, answering without it: {e}", job.request_id);
                Vec::new()
            }
        };
        let continue_from = (!job.prefix.is_empty()).then(|| job.prefix.clone());
        let prompt_tokens =
            count_tokens(&job.message) + history.iter().map(|turn| count_tokens(&turn.content)).sum::<u64>();
        let prompt = Prompt { message: job.message.clone(), history, continue_from };
        let mut seq = job.after_seq;
        let mut answer = job.prefix.clone();
        let started = tokio::select! {
            _ = fenced.cancelled() => return Outcome::Fenced,
            _ = stop.cancelled() => None,
            started = self.engine.generate(prompt) => Some(started),
        };
        let ending = match started {
            None => cancelled(&job.request_id, seq + 1),
            Some(Err(e)) => Event::error(&job.request_id, seq + 1, failure_code(&e), e.to_string()),
            // Dropping `pieces` closes the engine's stream (the upstream
            // request of the `openai` engine) wherever the answer ends.
            Some(Ok(mut pieces)) => {
                let idle = self.engine.idle_timeout();
                loop {
                    let next = tokio::select! {
                        _ = cancel.cancelled() => break Event::error(&job.request_id, seq + 1, "node_shutdown", "the AI node shut down before the answer finished"),
                        _ = fenced.cancelled() => return Outcome::Fenced,
                        _ = stop.cancelled() => break cancelled(&job.request_id, seq + 1),
                        next = tokio::time::timeout(idle, pieces.next()) => next,
                    };
                    match next {
                        Err(_) => {
                            break Event::error(
                                &job.request_id,
                                seq + 1,
                                "engine_timeout",
                                format!("the engine sent nothing for {idle:?}"),
                            )
                        }
                        Ok(None) => break Event::done(&job.request_id, seq + 1, "stop"),
                        Ok(Some(Err(e))) => {
                            break Event::error(&job.request_id, seq + 1, failure_code(&e), e.to_string())
                        }
                        Ok(Some(Ok(_))) if seq + 1 >= self.store.max_events() => {
                            // The stream keeps every event of an answer; a longer one is cut here.
                            break Event::done(&job.request_id, seq + 1, "length");
                        }
                        Ok(Some(Ok(delta))) => {
                            if answer.len() < MAX_REMEMBERED_BYTES {
                                answer.push_str(&delta);
                            }
                            match self.emit(&job, Event::chunk(&job.request_id, seq + 1, delta)).await {
                                Step::Stored => seq += 1,
                                Step::Cancelled => break cancelled(&job.request_id, seq + 1),
                                Step::Stop(outcome) => return outcome,
                            }
                        }
                    }
                }
            }
        };
        // Every chunk of the answer is one piece the engine produced, also
        // those of earlier producers (seq counts them all).
        let ending = ending.with_usage(Usage::new(prompt_tokens, seq));
        let outcome = match ending.code.as_deref() {
            None => Outcome::Done { chunks: seq },
            Some("cancelled") => Outcome::Cancelled,
            Some(code) => Outcome::Failed { code: code.to_owned() },
        };
        if let Step::Stop(stopped) = self.emit(&job, ending).await {
            return stopped;
        }
        if let Outcome::Done { .. } = outcome {
            let turns = [
                Turn { role: "user".into(), content: job.message },
                Turn { role: "assistant".into(), content: answer },
            ];
            if let Err(e) = self.store.remember(&job.session_id, &turns).await {
                log::warn!("request_id={} history not saved: {e}", job.request_id);
            }
        }
        outcome
    }

    /// Stamps and emits one event, retrying briefly; `Step::Stop` when the
    /// answer must stop (Redis would not take it, or a takeover fenced this
    /// producer off), `Step::Cancelled` when a chunk was refused because the
    /// request was cancelled.
    async fn emit(&self, job: &Job, mut event: Event) -> Step {
        event.node = Some(self.node_id.clone());
        event.epoch = Some(job.epoch);
        for attempt in 1..=EMIT_ATTEMPTS {
            event.ts_us = Some(now_micros());
            match self.store.emit(&job.session_id, &event).await {
                Ok(Emitted::Published) => return Step::Stored,
                Ok(Emitted::Cancelled) => return Step::Cancelled,
                Ok(Emitted::Fenced) => {
                    log::info!(
                        "request_id={} seq={} fenced off: another node took the request over",
                        job.request_id,
                        event.seq
                    );
                    return Step::Stop(Outcome::Fenced);
                }
                Err(e) if attempt < EMIT_ATTEMPTS => {
                    log::warn!(
                        "request_id={} seq={} emit failed (attempt {attempt}), retrying: {e}",
                        job.request_id,
                        event.seq
                    );
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
                Err(e) => {
                    log::error!("request_id={} seq={} emit failed, stream abandoned: {e}", job.request_id, event.seq)
                }
            }
        }
        Step::Stop(Outcome::Unpublished)
    }
}

/// Aborts the task when dropped (the answer ended, one way or another).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Renews the lease every third of it until aborted; cancels `fenced` when a
/// renewal is refused, `stop` when the request was cancelled (renewing on,
/// so the lease holds while the end is stored). A failed renewal (Redis
/// unreachable) is retried: the lease may lapse meanwhile, and then the next
/// emit learns of the takeover.
async fn renew_lease(
    store: Arc<Store>,
    request_id: String,
    epoch: u64,
    node_id: String,
    fenced: CancellationToken,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(store.lease() / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match store.renew(&request_id, epoch, &node_id).await {
            Ok(Renewal::Held) => {}
            Ok(Renewal::Cancelled) => {
                if !stop.is_cancelled() {
                    log::info!("request_id={request_id} cancelled: stopping the engine");
                }
                stop.cancel();
            }
            Ok(Renewal::Lost) => {
                log::info!(
                    "request_id={request_id} lease refused at epoch {epoch}: another node took the request over"
                );
                fenced.cancel();
                return;
            }
            Err(e) => log::warn!("request_id={request_id} lease renewal failed: {e}"),
        }
    }
}

fn failure_code(e: &EngineError) -> &'static str {
    match e {
        EngineError::Refused(_) => "engine_refused",
        EngineError::Failed(_) => "engine_failed",
    }
}
