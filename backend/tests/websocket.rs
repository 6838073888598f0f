//! A WebSocket gets every event of its session's requests in order, a client
//! that lost its socket resumes where it stopped (on any backend), and every
//! socket on a session sees the whole stream.

mod common;

use common::*;
use std::time::Duration;

/// The chunk a client has seen when its connection breaks.
const DROPPED_AFTER: u64 = 3;

#[tokio::test]
async fn websocket_receives_chunks_one_to_n_then_done() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = Backend::start(&redis, &[&node]).await;
    backend.wait_healthy_nodes(1).await;

    let mut ws = Ws::connect(&backend, &unique("s")).await;
    let accepted = ws.chat("tell me a story").await;
    assert_eq!(accepted.node, node.url);
    let events = ws.until_end(&accepted.request_id).await;

    let text = assert_complete(&events, 1);
    assert!(!text.trim().is_empty(), "the deltas make a non-empty answer");
    assert_eq!(events.len() as u64, Pace::QUICK.events());
    ws.assert_silent(Duration::from_millis(300)).await;
}

/// Reads a request on a first socket up to chunk `DROPPED_AFTER`, then drops it.
async fn start_and_drop(backend: &Backend, session: &str) -> String {
    let mut ws = Ws::connect(backend, session).await;
    let accepted = ws.chat("a long answer, please").await;
    for seq in 1..=DROPPED_AFTER {
        let event = ws.next_event(&accepted.request_id, EVENT_WAIT).await;
        assert_eq!(event.seq, seq);
    }
    ws.drop_abruptly();
    accepted.request_id
}

/// Resumes on a fresh socket and checks it gets the rest of the stream once.
async fn resume_and_check_rest(backend: &Backend, session: &str, request_id: &str) {
    let mut ws = Ws::connect(backend, session).await;
    ws.resume(request_id, DROPPED_AFTER).await;
    let rest = ws.until_end(request_id).await;
    assert_complete(&rest, DROPPED_AFTER + 1);
    assert_eq!(rest.last().unwrap().seq, Pace::SLOW.events(), "the resumed stream runs to the last seq");
    ws.assert_silent(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn client_that_drops_after_chunk_k_resumes_and_gets_the_rest_exactly_once() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::SLOW).await;
    let backend = Backend::start(&redis, &[&node]).await;
    backend.wait_healthy_nodes(1).await;
    let session = unique("s");

    let request_id = start_and_drop(&backend, &session).await;
    resume_and_check_rest(&backend, &session, &request_id).await;
}

#[tokio::test]
async fn client_resumes_on_another_backend_sharing_the_redis() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::SLOW).await;
    let first = Backend::start(&redis, &[&node]).await;
    let second = Backend::start(&redis, &[&node]).await;
    first.wait_healthy_nodes(1).await;
    let session = unique("s");

    let request_id = start_and_drop(&first, &session).await;
    resume_and_check_rest(&second, &session, &request_id).await;
}

#[tokio::test]
async fn resume_after_the_stream_ended_replays_it_from_storage() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = Backend::start(&redis, &[&node]).await;
    backend.wait_healthy_nodes(1).await;
    let session = unique("s");

    let mut ws = Ws::connect(&backend, &session).await;
    let accepted = ws.chat("remember this").await;
    let live = ws.until_end(&accepted.request_id).await;
    drop(ws);

    let mut again = Ws::connect(&backend, &session).await;
    again.resume(&accepted.request_id, 0).await;
    let replayed = again.until_end(&accepted.request_id).await;
    assert_complete(&replayed, 1);
    let deltas = |events: &[chat_wire::Event]| events.iter().map(|e| e.delta.clone()).collect::<Vec<_>>();
    assert_eq!(deltas(&replayed), deltas(&live), "the replay is the stream as it was sent");
    again.assert_silent(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn two_sockets_on_one_session_both_receive_the_whole_stream() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = Backend::start(&redis, &[&node]).await;
    backend.wait_healthy_nodes(1).await;
    let session = unique("s");

    let mut watcher = Ws::connect(&backend, &session).await;
    let mut asker = Ws::connect(&backend, &session).await;
    // The watcher's backend subscription is set up on connect; a round trip on
    // it shows its socket is being served before the answer starts.
    watcher.resume(&chat_wire::new_request_id(), 0).await;
    assert_eq!(watcher.next_json(EVENT_WAIT).await["code"], "unknown_request");

    let accepted = asker.chat("for both of us").await;
    let (asked, watched) = tokio::join!(asker.until_end(&accepted.request_id), watcher.until_end(&accepted.request_id));

    assert_eq!(assert_complete(&asked, 1), assert_complete(&watched, 1), "both sockets see the same answer");
    assert_eq!(asked.len() as u64, Pace::QUICK.events());
}

#[tokio::test]
async fn a_clients_close_is_answered_with_its_own_code_directly_and_through_the_proxy() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::Message;

    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    let backend = Backend::start(&redis, &[&node]).await;
    backend.wait_healthy_nodes(1).await;
    let proxy = EdgeProxy::start(&[&backend]).await;
    for url in [backend.ws_url(&unique("close")), proxy.ws_url(&unique("close"))] {
        let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("upgrade");
        let frame = CloseFrame { code: CloseCode::Normal, reason: "bye".into() };
        socket.send(Message::Close(Some(frame))).await.expect("close sent");
        // A ping may come first (the server's keep-alive); the close is what is waited for.
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match socket.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    other => break other,
                }
            }
        })
        .await
        .expect("an answer in time");
        match answer {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Normal, "{url}"),
            other => panic!("{url}: expected the close echoed, got {other:?}"),
        }
    }
}
