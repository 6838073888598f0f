//! A stream event as stored in Redis and forwarded to clients: whatever
//! decodes must re-encode to an event that decodes to the same value.
#![no_main]

use chat_wire::Event;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(event) = Event::from_json(text) else { return };
    let json = event.to_json();
    let again = Event::from_json(&json).unwrap_or_else(|e| panic!("re-encoded event does not decode: {e}\n{json}"));
    assert_eq!(again, event, "round trip changed the event: {json}");
    assert_eq!(again.to_json(), json, "encoding is not stable");
    let _ = event.is_terminal();
});
