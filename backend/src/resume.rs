//! Resuming one request from a cursor, on any backend: the SSE resume of
//! `/api` and the one of `/v1` both start here.

use crate::auth::{self, Caller};
use crate::errors::ApiError;
use crate::follow::{Out, ResumeError};
use crate::reader::Reader;
use crate::App;
use axum::http::{HeaderMap, StatusCode};
use std::sync::Arc;

/// `Last-Event-ID`, a seq, when the client sent one.
pub fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get("last-event-id") else { return Ok(None) };
    let seq = v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()).ok_or_else(|| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", "Last-Event-ID must be a seq (a whole number)")
    })?;
    Ok(Some(seq))
}

/// A reader of `request_id` from `after_seq` on, on any backend, with what
/// it has to send first; `None` when the client has the whole request.
pub async fn open_resume(
    app: &Arc<App>,
    caller: &Caller,
    request_id: &str,
    after_seq: u64,
) -> Result<Option<(Reader, Vec<Out>)>, ApiError> {
    chat_wire::validate_id("request_id", request_id).map_err(ApiError::invalid)?;
    let unknown = || ApiError::new(StatusCode::NOT_FOUND, "unknown_request", "no such request, or it expired");
    let unavailable =
        || ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the event store is unreachable");
    let record = match app.ledger.record(request_id).await {
        Ok(Some(record)) => record,
        Ok(None) => return Err(unknown()),
        Err(_) => return Err(unavailable()),
    };
    // Another key's request is unknown here, as if it did not exist.
    auth::own_session(app, caller, &record.session_id).await.map_err(|e| match e.status {
        StatusCode::NOT_FOUND => unknown(),
        _ => e,
    })?;
    // Attached before reading the stream, so no event passes unseen in between.
    let mut reader = Reader::attach_for(app, &record.session_id, request_id).await;
    let first = match reader.follower.resume(request_id, after_seq).await {
        Ok(first) => first,
        Err(ResumeError::UnknownRequest) => return Err(unknown()),
        Err(ResumeError::StoreUnavailable) => return Err(unavailable()),
    };
    app.metrics.events_replayed.inc_by(first.len() as u64);
    let ended = first.is_empty() && !reader.follower.is_following(request_id);
    Ok((!ended).then_some((reader, first)))
}
