//! Redis names. Every key and channel the cluster uses is built here, so the
//! layout documented in the README has one source.
//!
//! Each name carries a Redis Cluster hash tag (the part in braces), so what
//! one script touches sits in one slot: a request's stream, claim and lease
//! share `{<request id>}`; a session's channel, history and owner share
//! `{<session id>}`; everything one API key spends shares `{<key id>}`. On a
//! single Redis the braces are only characters.
//!
//! The session id is validated (see `ids`) before it is put in a name, so no
//! glob characters (`*?[]`) ever reach a channel name.

/// Pub/sub channel carrying every event of every request of one session.
pub fn session_channel(session_id: &str) -> String {
    format!("chat:session:{{{session_id}}}:events")
}

/// Stream holding every event of one request, for replay and resume.
pub fn request_stream(request_id: &str) -> String {
    format!("chat:req:{{{request_id}}}:events")
}

/// Claim of a request by a node: makes a repeated request id one request.
pub fn request_claim(request_id: &str) -> String {
    format!("chat:req:{{{request_id}}}:claim")
}

/// Lease of a request's producer: present while the producing node is alive.
pub fn request_lease(request_id: &str) -> String {
    format!("chat:req:{{{request_id}}}:lease")
}

/// Bounded list of the conversation turns of one session.
pub fn session_history(session_id: &str) -> String {
    format!("chat:session:{{{session_id}}}:history")
}

/// An API key's record, by the SHA-256 of the key: `id`, limits, `revoked`.
pub fn api_key(sha256: &str) -> String {
    format!("chat:apikey:{sha256}")
}

/// The id of the API key that owns a session (absent with keys off).
pub fn session_owner(session_id: &str) -> String {
    format!("chat:session:{{{session_id}}}:owner")
}

/// The prefix of everything one API key spends: `<prefix>:usage` (hash
/// `requests prompt_tokens completion_tokens`), `<prefix>:rpm:<minute>` and
/// `<prefix>:tpm:<minute>` (this minute's requests and tokens), and
/// `<prefix>:running` (its running requests, a sorted set). The Lua scripts
/// that count them add the suffixes, with the minute taken from Redis's own
/// clock (`TIME`), so every backend and node counts in the same minute.
pub fn key_prefix(key_id: &str) -> String {
    format!("chat:key:{{{key_id}}}")
}

/// Usage totals of one API key.
pub fn key_usage(key_id: &str) -> String {
    format!("{}:usage", key_prefix(key_id))
}

/// Requests of one API key still running: a sorted set, scored by start time.
pub fn key_running(key_id: &str) -> String {
    format!("{}:running", key_prefix(key_id))
}

/// The session id of a channel made by `session_channel`.
pub fn session_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("chat:session:{")?.strip_suffix("}:events")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_round_trip() {
        assert_eq!(session_of_channel(&session_channel("s-1:x")), Some("s-1:x"));
        assert_eq!(session_of_channel("other"), None);
    }

    #[test]
    fn what_one_script_touches_shares_a_hash_tag() {
        let tag = |name: &str| name[name.find('{').unwrap()..=name.find('}').unwrap()].to_owned();
        assert_eq!(tag(&request_stream("r1")), "{r1}");
        assert_eq!(tag(&request_claim("r1")), tag(&request_lease("r1")));
        assert_eq!(tag(&session_channel("s1")), tag(&session_history("s1")));
        assert_eq!(tag(&session_owner("s1")), "{s1}");
        assert_eq!(tag(&key_usage("k1")), tag(&key_running("k1")));
    }
}
