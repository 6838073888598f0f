//! The JSON body of `POST /api/chat` (backend) and `POST /chat` (AI node,
//! `chat_wire::node_api`), decoded as the handlers do and validated as they are.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = serde_json::from_slice::<backend::chat::ChatBody>(data) {
        let _ = chat_wire::validate_id("session_id", &body.session_id);
        let _ = chat_wire::validate_message(&body.message);
        if let Some(user) = &body.user_id {
            let _ = chat_wire::validate_id("user_id", user);
        }
    }
    if let Ok(chat) = serde_json::from_slice::<chat_wire::node_api::NodeChat>(data) {
        // What passes is plain ASCII from the documented alphabet, and
        // survives a round trip through the wire unchanged.
        if chat.validate().is_ok() {
            assert!(chat.session_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b)));
            let again: chat_wire::node_api::NodeChat = serde_json::from_str(&serde_json::to_string(&chat).unwrap()).unwrap();
            assert_eq!(again, chat);
        }
    }
});
