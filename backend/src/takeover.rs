//! Mid-stream takeover: when a request's events stop (its AI node died), one
//! backend fences the request at the next epoch and sends it to another node,
//! which continues the answer after the text already streamed, with `seq`
//! continuing. Readers see no gap and no repeat. When no node can take it,
//! the request is ended for everyone with a stored `node_failed` error.

use crate::metrics::Metrics;
use crate::nodes::{AiPool, DispatchError, NodeChat, TakeoverBody};
use chat_wire::ledger::Ledger;
use chat_wire::{Event, EventKind};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

pub struct Takeovers {
    ledger: Arc<Ledger>,
    pool: Arc<AiPool>,
    /// Requests this process is taking over now, so readers of one request start one takeover.
    in_progress: Mutex<HashSet<String>>,
    metrics: Arc<Metrics>,
}

impl Takeovers {
    pub fn new(ledger: Arc<Ledger>, pool: Arc<AiPool>, metrics: Arc<Metrics>) -> Arc<Takeovers> {
        Arc::new(Takeovers { ledger, pool, in_progress: Mutex::new(HashSet::new()), metrics })
    }

    /// Starts a takeover of `request_id` unless one runs here already.
    pub fn start(self: &Arc<Self>, request_id: &str) {
        if !self.in_progress.lock().unwrap().insert(request_id.to_owned()) {
            return;
        }
        let this = self.clone();
        let id = request_id.to_owned();
        tokio::spawn(async move {
            let outcome = this.take_over(&id).await;
            this.metrics.takeovers.with_label_values(&[outcome]).inc();
            this.in_progress.lock().unwrap().remove(&id);
        });
    }

    async fn take_over(&self, request_id: &str) -> &'static str {
        let (record, stored) = match (self.ledger.record(request_id).await, self.ledger.read(request_id).await) {
            (Ok(Some(record)), Ok(stored)) => (record, stored.unwrap_or_default()),
            (Ok(None), _) => return "unknown",
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("request_id={request_id} takeover: store unavailable: {e}");
                return "store_unavailable";
            }
        };
        let mut stored = stored;
        stored.sort_by_key(|e| e.seq);
        if stored.iter().any(|e| e.is_terminal()) {
            return "already_ended";
        }
        let after_seq = stored.last().map_or(0, |e| e.seq);
        let text: String =
            stored.iter().filter(|e| e.kind == EventKind::Chunk).filter_map(|e| e.delta.as_deref()).collect();
        let epoch = match self.ledger.fence(request_id, record.epoch).await {
            Ok(Ok(epoch)) => epoch,
            Ok(Err(_)) => return "lost_race",
            Err(e) => {
                log::warn!("request_id={request_id} takeover: fence failed: {e}");
                return "store_unavailable";
            }
        };
        log::warn!(
            "request_id={request_id} node {} went silent after seq {after_seq}; taking over at epoch {epoch}",
            record.node
        );
        let chat = NodeChat {
            request_id: request_id.to_owned(),
            session_id: record.session_id.clone(),
            message: record.message,
            user_id: record.user_id,
            takeover: Some(TakeoverBody { epoch, after_seq, text }),
        };
        match self.pool.dispatch(&chat).await {
            Ok(accepted) => {
                log::info!("request_id={request_id} continued by {} at epoch {epoch}", accepted.node_url);
                "continued"
            }
            Err(DispatchError::Rejected { status: 409, .. }) => "lost_race",
            Err(e) => {
                log::warn!("request_id={request_id} takeover failed: {e}");
                let mut failed = Event::error(
                    request_id,
                    after_seq + 1,
                    "node_failed",
                    format!("the AI node died and no other could continue: {e}"),
                );
                failed.epoch = Some(epoch);
                failed.ts_us = Some(chat_wire::now_micros());
                if let Err(e) = self.ledger.emit(&record.session_id, &failed).await {
                    log::warn!("request_id={request_id} could not store node_failed: {e}");
                }
                "failed"
            }
        }
    }
}
