//! Who the client is, behind proxies: the one rule the edge proxy (sticky
//! routing, rate limits) and the backend (rate limits) both apply.
//!
//! 1. A peer that is not trusted speaks only for itself: the client is the peer.
//! 2. Otherwise `X-Forwarded-For` (all its lines, in order) is walked from the
//!    right, skipping the hops that are trusted proxies; the first hop that is
//!    not trusted is the client. Everything left of it could be forged. A hop
//!    that is not an address ends the walk: the client is then the last
//!    address walked past (a trusted proxy), or the peer.
//! 3. Without `X-Forwarded-For`, a valid `X-Real-IP` names the client.
//! 4. Otherwise the client is the peer.

use std::net::IpAddr;

/// The client's address, by the rule above. `forwarded_for` yields the
/// values of the `X-Forwarded-For` lines in order; `real_ip` is `X-Real-IP`.
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl IntoIterator<Item = &'a str>,
    real_ip: Option<&str>,
    is_trusted: impl Fn(IpAddr) -> bool,
) -> IpAddr {
    if !is_trusted(peer) {
        return peer;
    }
    let hops: Vec<&str> = forwarded_for.into_iter().flat_map(|line| line.split(',')).map(str::trim).collect();
    if hops.iter().any(|h| !h.is_empty()) {
        let mut nearest = peer;
        for hop in hops.iter().rev().filter(|h| !h.is_empty()) {
            match hop.parse::<IpAddr>() {
                Ok(ip) if is_trusted(ip) => nearest = ip,
                Ok(ip) => return ip,
                Err(_) => return nearest,
            }
        }
        // Every hop is a trusted proxy: the leftmost is the nearest to the client.
        return nearest;
    }
    real_ip.and_then(|v| v.trim().parse().ok()).unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted(ip: IpAddr) -> bool {
        matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 10)
    }

    #[test]
    fn the_rule_as_a_table() {
        // (peer, X-Forwarded-For lines, X-Real-IP, client)
        let cases: &[(&str, &[&str], Option<&str>, &str)] = &[
            ("9.9.9.9", &["1.2.3.4"], Some("5.6.7.8"), "9.9.9.9"),
            ("10.0.0.1", &[], None, "10.0.0.1"),
            ("10.0.0.1", &[], Some("5.6.7.8"), "5.6.7.8"),
            ("10.0.0.1", &[], Some("junk"), "10.0.0.1"),
            ("10.0.0.1", &["1.2.3.4"], None, "1.2.3.4"),
            ("10.0.0.1", &["1.2.3.4, 10.0.0.7"], Some("5.6.7.8"), "1.2.3.4"),
            ("10.0.0.1", &["6.6.6.6, 1.2.3.4, 10.1.1.1"], None, "1.2.3.4"),
            ("10.0.0.1", &["6.6.6.6", "1.2.3.4, 10.1.1.1"], None, "1.2.3.4"),
            ("10.0.0.1", &["10.0.0.5, 10.0.0.6"], None, "10.0.0.5"),
            ("10.0.0.1", &["1.2.3.4, garbage, 10.0.0.7"], None, "10.0.0.7"),
            ("10.0.0.1", &["garbage"], None, "10.0.0.1"),
            ("10.0.0.1", &[" , "], Some("5.6.7.8"), "5.6.7.8"),
            ("10.0.0.1", &["2001:db8::1"], None, "2001:db8::1"),
        ];
        for (peer, xff, real, want) in cases {
            let got = client_ip(ip(peer), xff.iter().copied(), *real, trusted);
            assert_eq!(got, ip(want), "peer {peer}, X-Forwarded-For {xff:?}, X-Real-IP {real:?}");
        }
    }
}
