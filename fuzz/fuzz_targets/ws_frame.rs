//! A client's WebSocket text frame, through the backend's own parser and the
//! checks the socket applies to what parses.
#![no_main]

use backend::ws::{parse_client_frame, ClientFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A WebSocket text frame is UTF-8 by the protocol; the socket never sees other bytes as text.
    let Ok(text) = std::str::from_utf8(data) else { return };
    match parse_client_frame(text) {
        Ok(ClientFrame::Chat { message, user_id }) => {
            let _ = chat_wire::validate_message(&message);
            if let Some(user) = &user_id {
                let _ = chat_wire::validate_id("user_id", user);
            }
        }
        Ok(ClientFrame::Resume { request_id, after_seq: _ } | ClientFrame::Cancel { request_id }) => {
            let _ = chat_wire::validate_id("request_id", &request_id);
        }
        Err(e) => {
            // The socket answers with this text; building it must not panic.
            let _ = format!("not a chat, resume or cancel frame: {e}");
        }
    }
});
