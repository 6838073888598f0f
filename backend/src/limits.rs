//! Who the client is (its IP, believing forwarded headers only from trusted
//! proxies) and how often it may chat (per-session and per-IP token buckets).

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

/// Resume frames per second of one session (all its sockets on this
/// backend), and the burst a reconnecting client may spend at once.
const SESSION_RESUMES_PER_SEC: f64 = 20.0;
const SESSION_RESUME_BURST: u32 = 100;
/// The same for one socket.
pub const SOCKET_RESUMES_PER_SEC: f64 = 10.0;
pub const SOCKET_RESUME_BURST: u32 = 50;

pub struct Limits {
    sessions: DefaultKeyedRateLimiter<String>,
    resumes: DefaultKeyedRateLimiter<String>,
    ips: DefaultKeyedRateLimiter<IpAddr>,
    trusted: Vec<IpNet>,
}

/// Which bucket ran dry.
#[derive(Debug, PartialEq, Eq)]
pub enum Limited {
    Session,
    Ip,
}

pub fn quota(per_sec: f64, burst: u32) -> Quota {
    Quota::with_period(Duration::from_secs_f64(1.0 / per_sec))
        .expect("the rate is checked positive")
        .allow_burst(NonZeroU32::new(burst).expect("the burst is checked positive"))
}

impl Limits {
    pub fn new(session_rate: f64, session_burst: u32, ip_rate: f64, ip_burst: u32, trusted: Vec<IpNet>) -> Limits {
        Limits {
            sessions: RateLimiter::keyed(quota(session_rate, session_burst)),
            resumes: RateLimiter::keyed(quota(SESSION_RESUMES_PER_SEC, SESSION_RESUME_BURST)),
            ips: RateLimiter::keyed(quota(ip_rate, ip_burst)),
            trusted,
        }
    }

    /// Takes one chat from the session's and the IP's buckets.
    pub fn admit_chat(&self, session_id: &str, ip: IpAddr) -> Result<(), Limited> {
        self.ips.check_key(&ip).map_err(|_| Limited::Ip)?;
        self.sessions.check_key(&session_id.to_owned()).map_err(|_| Limited::Session)
    }

    /// Takes one resume from the session's bucket; false when it ran dry.
    pub fn admit_resume(&self, session_id: &str) -> bool {
        self.resumes.check_key(&session_id.to_owned()).is_ok()
    }

    /// Forgets idle buckets; call now and then so memory stays bounded.
    pub fn prune(&self) {
        self.resumes.retain_recent();
        self.resumes.shrink_to_fit();
        self.sessions.retain_recent();
        self.ips.retain_recent();
        self.sessions.shrink_to_fit();
        self.ips.shrink_to_fit();
    }

    /// The client's IP: the peer's, unless the peer is a trusted proxy, in
    /// which case `X-Real-IP`, else the right-most untrusted `X-Forwarded-For` hop.
    pub fn client_ip(&self, peer: SocketAddr, headers: &axum::http::HeaderMap) -> IpAddr {
        let forwarded = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok());
        let real_ip = headers.get("x-real-ip").and_then(|v| v.to_str().ok());
        client_addr::client_ip(peer.ip(), forwarded, real_ip, |ip| self.is_trusted(ip))
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn limits() -> Limits {
        Limits::new(1.0, 2, 100.0, 100, vec!["10.0.0.0/8".parse().unwrap()])
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_peers() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "1.2.3.4, 10.0.0.7".parse().unwrap());
        let l = limits();
        assert_eq!(l.client_ip("8.8.8.8:1".parse().unwrap(), &headers), "8.8.8.8".parse::<IpAddr>().unwrap());
        assert_eq!(l.client_ip("10.0.0.2:1".parse().unwrap(), &headers), "1.2.3.4".parse::<IpAddr>().unwrap());
        // One rule with the proxy (`client-addr`): X-Forwarded-For first,
        // X-Real-IP only without it.
        headers.insert("x-real-ip", "5.6.7.8".parse().unwrap());
        assert_eq!(l.client_ip("10.0.0.2:1".parse().unwrap(), &headers), "1.2.3.4".parse::<IpAddr>().unwrap());
        headers.remove("x-forwarded-for");
        assert_eq!(l.client_ip("10.0.0.2:1".parse().unwrap(), &headers), "5.6.7.8".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_session_past_its_burst_is_limited() {
        let l = limits();
        let ip: IpAddr = "1.1.1.1".parse().unwrap();
        assert!(l.admit_chat("s", ip).is_ok());
        assert!(l.admit_chat("s", ip).is_ok());
        assert_eq!(l.admit_chat("s", ip), Err(Limited::Session));
        assert!(l.admit_chat("other", ip).is_ok());
    }
}
