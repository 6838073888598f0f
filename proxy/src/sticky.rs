//! Who the client is and what pins it to a backend: the trusted-proxy rules
//! for `X-Forwarded-For` / `X-Real-IP`, and the sticky key fed to the ketama
//! ring (client IP, its /24 like nginx `ip_hash`, a header or a cookie).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use http::HeaderMap;

/// Read access to a request's headers, so the same rules serve Pingora's
/// parsed `HeaderMap` and the lean path's raw header slices ([`crate::h1`]).
pub trait Headers {
    /// Every value of header `name` (lowercase), in order.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a;

    /// The first value of header `name` (lowercase).
    fn first<'a>(&'a self, name: &'a str) -> Option<&'a [u8]> {
        self.values(name).next()
    }
}

impl Headers for HeaderMap {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).iter().map(|v| v.as_bytes())
    }
}

/// What a request is hashed by to choose its backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyKey {
    /// The client IP.
    Ip,
    /// The client's /24 (IPv4) or whole address (IPv6), like nginx `ip_hash`.
    Ip24,
    /// A request header's value; the client IP when absent.
    Header(String),
    /// A cookie's value; the client IP when absent.
    Cookie(String),
}

impl FromStr for StickyKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not one of ip, ip24, header:<name>, cookie:<name>");
        match s {
            "ip" => Ok(Self::Ip),
            "ip24" => Ok(Self::Ip24),
            _ => match s.split_once(':') {
                Some(("header", name)) if http::HeaderName::from_str(name).is_ok() => {
                    Ok(Self::Header(name.to_ascii_lowercase()))
                }
                Some(("cookie", name)) if !name.is_empty() && !name.contains([';', '=', ' ']) => {
                    Ok(Self::Cookie(name.to_string()))
                }
                _ => Err(bad()),
            },
        }
    }
}

impl StickyKey {
    /// The bytes hashed onto the ring for this request.
    pub fn hash_input(&self, client: IpAddr, headers: &impl Headers) -> Vec<u8> {
        match self {
            Self::Ip => client.to_string().into_bytes(),
            Self::Ip24 => match client {
                IpAddr::V4(v4) => {
                    let [a, b, c, _] = v4.octets();
                    format!("{a}.{b}.{c}").into_bytes()
                }
                IpAddr::V6(v6) => v6.to_string().into_bytes(),
            },
            Self::Header(name) => match headers.first(name.as_str()) {
                Some(v) if !v.is_empty() => v.to_vec(),
                _ => client.to_string().into_bytes(),
            },
            Self::Cookie(name) => {
                cookie(headers, name).map(|v| v.as_bytes().to_vec()).unwrap_or_else(|| client.to_string().into_bytes())
            }
        }
    }
}

/// The value of cookie `name`, if the request has it.
fn cookie<'a>(headers: &'a impl Headers, name: &'a str) -> Option<&'a str> {
    headers
        .values("cookie")
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// An IP network, e.g. `10.0.0.0/8`; a bare address is a /32 (or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    addr: IpAddr,
    /// Prefix length in bits.
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not an address or CIDR like 10.0.0.0/8");
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// Whether `ip` is inside this network (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The client's IP: the peer's, unless the peer is a trusted proxy, in which
/// case the right-most untrusted `X-Forwarded-For` entry (or `X-Real-IP`).
pub fn client_ip(peer: IpAddr, headers: &impl Headers, trusted: &[Cidr]) -> IpAddr {
    let forwarded = headers.values("x-forwarded-for").filter_map(|v| std::str::from_utf8(v).ok());
    let real_ip = headers.first("x-real-ip").and_then(|v| std::str::from_utf8(v).ok());
    client_addr::client_ip(peer, forwarded, real_ip, |ip| is_trusted(ip, trusted))
}

/// Whether the peer may speak for the client in forwarding headers.
pub fn is_trusted(peer: IpAddr, trusted: &[Cidr]) -> bool {
    trusted.iter().any(|c| c.contains(peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_str(k).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forged_forwarded_for_from_untrusted_peer_is_ignored() {
        let h = headers(&[("x-forwarded-for", "1.2.3.4"), ("x-real-ip", "5.6.7.8")]);
        assert_eq!(client_ip(ip("9.9.9.9"), &h, &[]), ip("9.9.9.9"));
    }

    #[test]
    fn trusted_peer_speaks_for_the_client() {
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.1.1.1")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("1.2.3.4"));
        let h = headers(&[("x-real-ip", "5.6.7.8")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("5.6.7.8"));
        assert_eq!(client_ip(ip("10.0.0.1"), &HeaderMap::new(), &trusted), ip("10.0.0.1"));
    }

    #[test]
    fn cidr_matching() {
        let c: Cidr = "127.0.0.0/24".parse().unwrap();
        assert!(c.contains(ip("127.0.0.200")));
        assert!(!c.contains(ip("127.0.1.1")));
        assert!(c.contains(ip("::ffff:127.0.0.9")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        assert!("1.2.3.4/33".parse::<Cidr>().is_err());
        assert!("::1".parse::<Cidr>().unwrap().contains(ip("::1")));
    }

    #[test]
    fn ip24_groups_a_slash_24() {
        let h = HeaderMap::new();
        let k = StickyKey::Ip24;
        assert_eq!(k.hash_input(ip("1.2.3.4"), &h), k.hash_input(ip("1.2.3.200"), &h));
        assert_ne!(k.hash_input(ip("1.2.3.4"), &h), k.hash_input(ip("1.2.4.4"), &h));
    }

    #[test]
    fn header_and_cookie_keys_fall_back_to_the_ip() {
        let k: StickyKey = "cookie:sid".parse().unwrap();
        let h = headers(&[("cookie", "a=1; sid=xyz")]);
        assert_eq!(k.hash_input(ip("1.1.1.1"), &h), b"xyz");
        assert_eq!(k.hash_input(ip("1.1.1.1"), &HeaderMap::new()), b"1.1.1.1");
        let k: StickyKey = "header:X-User".parse().unwrap();
        let h = headers(&[("x-user", "bob")]);
        assert_eq!(k.hash_input(ip("1.1.1.1"), &h), b"bob");
        assert!("bogus".parse::<StickyKey>().is_err());
    }
}
