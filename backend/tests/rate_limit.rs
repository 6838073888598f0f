//! A session that sends chats faster than its budget is told so with 429,
//! without slowing other sessions down.

mod common;

use common::*;
use serde_json::json;

const BURST: usize = 3;

#[tokio::test]
async fn a_burst_beyond_the_session_budget_gets_429_with_the_json_error() {
    let redis = redis_url();
    let node = AiNode::start(&redis, Pace::QUICK).await;
    // One token back every 5 s: none returns during the burst.
    let backend = Backend::builder(&redis, &[&node])
        .set("limits", "session_burst", BURST)
        .set("limits", "session_rate_per_sec", 0.2)
        .start()
        .await;
    backend.wait_healthy_nodes(1).await;

    let session = unique("s");
    let mut statuses = Vec::new();
    let mut rejected = Vec::new();
    for i in 0..BURST + 4 {
        let res = backend.post_chat(&json!({"session_id": session, "message": format!("quick {i}")})).await;
        statuses.push(res.status().as_u16());
        if res.status() == 429 {
            rejected.push(res);
        }
    }
    assert_eq!(&statuses[..BURST], &[202; BURST], "the burst itself is accepted: {statuses:?}");
    assert_eq!(&statuses[BURST..], &[429; 4], "past the burst every chat is refused: {statuses:?}");
    for res in rejected {
        assert_error(res, 429).await;
    }

    backend.chat(&unique("s"), "another session is not limited").await;
}
