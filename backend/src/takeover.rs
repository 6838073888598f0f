//! Mid-stream takeover: when a request's events stop and its producer's lease
//! has lapsed (its AI node died or is paused), one backend fences the request
//! at the next epoch and sends it to another node,
//! which continues the answer after the text already streamed, with `seq`
//! continuing. Readers see no gap and no repeat. When no node can take it,
//! the request is ended for everyone with a stored `node_failed` error.

use crate::metrics::Metrics;
use crate::nodes::{AiPool, DispatchError, NodeChat, Takeover};
use chat_wire::ledger::{Emitted, Fence, Ledger};
use chat_wire::{Event, EventKind};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Producers one answer may have (the first and its successors); past it the
/// answer ends with `node_failed` rather than hopping from node to node.
const MAX_PRODUCERS: u64 = 4;

pub struct Takeovers {
    ledger: Arc<dyn Ledger>,
    pool: Arc<AiPool>,
    /// Requests this process is taking over now, so readers of one request start one takeover.
    in_progress: Mutex<HashSet<String>>,
    metrics: Arc<Metrics>,
}

impl Takeovers {
    pub fn new(ledger: Arc<dyn Ledger>, pool: Arc<AiPool>, metrics: Arc<Metrics>) -> Arc<Takeovers> {
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
        let record = match self.ledger.record(request_id).await {
            Ok(Some(record)) => record,
            Ok(None) => return "unknown",
            Err(e) => {
                log::warn!("request_id={request_id} takeover: store unavailable: {e}");
                return "store_unavailable";
            }
        };
        // The fence comes first: it holds only once the producer's lease has
        // lapsed, and after it nothing of an older epoch can be stored, so
        // what is read next is final.
        let (epoch, cancelled) = match self.ledger.fence(request_id, record.epoch).await {
            Ok(Fence::Won(epoch)) => (epoch, false),
            Ok(Fence::Cancelled(epoch)) => (epoch, true),
            Ok(Fence::ProducerAlive) => return "producer_alive",
            Ok(Fence::Ended) => return "already_ended",
            Ok(Fence::Moved(_)) => return "lost_race",
            Err(e) => {
                log::warn!("request_id={request_id} takeover: fence failed: {e}");
                return "store_unavailable";
            }
        };
        let stored = match self.ledger.read(request_id).await {
            Ok(stored) => stored.unwrap_or_default(),
            Err(e) => {
                // Fenced without a producer: the next stall check fences again.
                log::warn!("request_id={request_id} takeover: store unavailable after the fence: {e}");
                return "store_unavailable";
            }
        };
        let after_seq = stored.last().map_or(0, |e| e.seq);
        let end = End { request_id, session_id: &record.session_id, epoch, after_seq };
        if cancelled {
            // Cancelled with no producer alive: nobody continues it; its end is stored here.
            self.end(end, "cancelled", "the request was cancelled".into()).await;
            return "cancelled";
        }
        if epoch > MAX_PRODUCERS {
            let why = format!("{MAX_PRODUCERS} AI nodes in turn stopped producing this answer");
            self.end(end, "node_failed", why).await;
            return "gave_up";
        }
        let text: String =
            stored.iter().filter(|e| e.kind == EventKind::Chunk).filter_map(|e| e.delta.as_deref()).collect();
        log::warn!(
            "request_id={request_id} the lease of node {} lapsed after seq {after_seq}; taking over at epoch {epoch}",
            record.node
        );
        let chat = NodeChat {
            request_id: Some(request_id.to_owned()),
            session_id: record.session_id.clone(),
            message: record.message,
            user_id: record.user_id,
            takeover: Some(Takeover { epoch, after_seq, text }),
            owner: None,
        };
        match self.pool.dispatch(&chat).await {
            Ok(accepted) => {
                log::info!("request_id={request_id} continued by {} at epoch {epoch}", accepted.node_url);
                "continued"
            }
            Err(DispatchError::Rejected { status: 409, .. }) => "lost_race",
            Err(e) => {
                log::warn!("request_id={request_id} takeover failed: {e}");
                let why = format!("the AI node stopped and no other could continue: {e}");
                self.end(end, "node_failed", why).await;
                "failed"
            }
        }
    }

    /// Stores the request's end (`node_failed`, `cancelled`) at the fenced
    /// epoch, charging the chunks already stored; refused (harmlessly) if a
    /// node adopted the epoch after all.
    async fn end(&self, end: End<'_>, code: &str, why: String) {
        let End { request_id, session_id, epoch, after_seq } = end;
        let mut event = Event::error(request_id, after_seq + 1, code, why);
        event.epoch = Some(epoch);
        event.ts_us = Some(chat_wire::now_micros());
        // Every stored event before the end is a chunk the engine produced.
        let event = event.with_usage(chat_wire::Usage::new(0, after_seq));
        match self.ledger.emit(session_id, &event).await {
            Ok(Emitted::Published) if code == "node_failed" => self.metrics.stalls.inc(),
            Ok(Emitted::Published) => {}
            Ok(Emitted::Fenced | Emitted::Cancelled) => {
                log::info!("request_id={request_id} a node adopted epoch {epoch} after all")
            }
            Err(e) => log::warn!("request_id={request_id} could not store {code}: {e}"),
        }
    }
}

/// Where a request ends: at which epoch, after which stored seq.
struct End<'a> {
    request_id: &'a str,
    session_id: &'a str,
    epoch: u64,
    after_seq: u64,
}
