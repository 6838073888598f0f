//! The loop every reader of a session runs, a WebSocket and an SSE response
//! alike: live deliveries from the hub, refills after a pub/sub reconnect,
//! stall checks and catching up on stored pages all go through one
//! `Follower`, so exactly-once delivery is written once.
//!
//! `wake` only waits (it is cancel-safe, for a `select!` with the socket's
//! own branches); `handle` then does the work and returns what to send.

use crate::follow::{Follower, Out};
use crate::hub::{Attachment, Delivery};
use crate::App;
use std::sync::Arc;
use tokio::time::Interval;

pub struct Reader {
    pub follower: Follower,
    attachment: Attachment,
    stall_tick: Interval,
}

/// What woke the reader.
pub enum Wake {
    Delivery(Option<Delivery>),
    StallTick,
    Behind,
}

/// The hub detached this reader: it read slower than its queue allows.
#[derive(Debug)]
pub struct TooSlow;

impl Reader {
    /// A reader attached to `session_id` (subscribed before anything is dispatched).
    pub async fn attach(app: &Arc<App>, session_id: &str) -> Reader {
        let attachment = app.hub.attach(session_id).await;
        let follower = Follower::new(app.ledger.clone(), app.takeovers.clone(), app.config.stall_timeout);
        let mut stall_tick = tokio::time::interval(crate::STALL_TICK);
        stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Reader { follower, attachment, stall_tick }
    }

    /// A reader of one request of `session_id` (an SSE response).
    pub async fn attach_for(app: &Arc<App>, session_id: &str, request_id: &str) -> Reader {
        let mut reader = Self::attach(app, session_id).await;
        reader.follower = reader.follower.only(request_id);
        reader
    }

    /// Waits for the next thing to do. Cancel-safe.
    pub async fn wake(&mut self) -> Wake {
        if self.follower.is_behind() {
            // Catching up on stored pages, the hub's queue is still drained,
            // so a long live answer cannot get its reader dropped meanwhile
            // (an event ahead of the cursor just reads the next page).
            use tokio::sync::mpsc::error::TryRecvError;
            return match self.attachment.rx.try_recv() {
                Ok(delivery) => Wake::Delivery(Some(delivery)),
                Err(TryRecvError::Empty) => Wake::Behind,
                Err(TryRecvError::Disconnected) => Wake::Delivery(None),
            };
        }
        tokio::select! {
            delivery = self.attachment.rx.recv() => Wake::Delivery(delivery),
            _ = self.stall_tick.tick() => Wake::StallTick,
        }
    }

    /// Does what woke the reader; returns what to send, in order.
    pub async fn handle(&mut self, wake: Wake) -> Result<Vec<Out>, TooSlow> {
        let mut out = match wake {
            Wake::Delivery(Some(Delivery::Event(e))) => self.follower.on_live(&e).await,
            Wake::Delivery(Some(Delivery::Refill)) => self.follower.refill_all().await,
            Wake::Delivery(None) => return Err(TooSlow),
            Wake::StallTick => self.follower.check_stalls().await,
            Wake::Behind => self.follower.catch_up().await,
        };
        out.extend(self.follower.take_notices());
        Ok(out)
    }
}

/// What a reader of one request (an SSE response, a `/v1` answer) gets.
pub enum Item {
    /// An event of the request, in `seq` order, each once; the last one is terminal.
    Event(chat_wire::Event),
    /// A reader-level error that ends this reader (not the request): `too_slow`,
    /// `events_trimmed`, `resume_past_end`, ...; the client may resume.
    Notice { code: &'static str, message: String },
}

/// Follows `request_id` to its end on a task of its own: `first` (what the
/// reader already holds), then every later event, once each, in order. The
/// task stops after the terminal event or a notice, and as soon as the
/// receiver is dropped (the client left). `charge`: the API key whose
/// request this reader started, counted in the metrics when it ends.
pub fn follow_one(
    app: Arc<App>,
    mut reader: Reader,
    request_id: String,
    first: Vec<Out>,
    charge: Option<String>,
) -> tokio::sync::mpsc::Receiver<Item> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Item>(64);
    tokio::spawn(async move {
        let send_timeout = app.config.ws_send_timeout;
        let mut pending = first;
        loop {
            for out in pending.drain(..) {
                let (item, end) = match out {
                    Out::Event(e) if e.request_id == request_id => {
                        app.metrics.observe_delivery(e.ts_us);
                        let end = e.is_terminal();
                        if let (true, Some(key), Some(usage)) = (end, &charge, e.usage) {
                            app.metrics.charge(key, usage);
                        }
                        (Item::Event(e), end)
                    }
                    Out::Notice { request_id: id, code, message } if id == request_id => {
                        (Item::Notice { code, message }, true)
                    }
                    _ => continue,
                };
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
            if !reader.follower.is_following(&request_id) {
                // Ended at or below what the client said it has: nothing more comes.
                return;
            }
            let wake = tokio::select! {
                wake = reader.wake() => wake,
                _ = tx.closed() => return,
            };
            match reader.handle(wake).await {
                Ok(events) => pending = events,
                Err(TooSlow) => {
                    app.metrics.slow_consumers.inc();
                    let message = "the client read too slowly; resume with Last-Event-ID".to_string();
                    let _ =
                        tokio::time::timeout(send_timeout, tx.send(Item::Notice { code: "too_slow", message })).await;
                    return;
                }
            }
        }
    });
    rx
}
