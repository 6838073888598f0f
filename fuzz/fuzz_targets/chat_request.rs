//! The JSON body of `POST /api/chat` (backend) and `POST /chat` (AI node),
//! decoded as the handlers do and validated field by field.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = serde_json::from_slice::<backend::api::ChatBody>(data) {
        let _ = chat_wire::validate_id("session_id", &body.session_id);
        let _ = chat_wire::validate_message(&body.message);
        if let Some(user) = &body.user_id {
            let _ = chat_wire::validate_id("user_id", user);
        }
    }
    if let Ok(req) = serde_json::from_slice::<ai_node::api::ChatRequest>(data) {
        let ok = chat_wire::validate_id("session_id", &req.session_id).is_ok()
            & chat_wire::validate_message(&req.message).is_ok();
        if let Some(user) = &req.user_id {
            let _ = chat_wire::validate_id("user_id", user);
        }
        if let Some(id) = &req.request_id {
            let _ = chat_wire::validate_id("request_id", id);
        }
        if let Some(t) = &req.takeover {
            let _ = (t.epoch, t.after_seq, t.text.len());
        }
        // An id that passes is plain ASCII from the documented alphabet.
        if ok {
            assert!(req.session_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b)));
        }
    }
});
