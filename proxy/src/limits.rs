//! Per-client request rate limit, on Pingora's count-min `Rate` estimator:
//! requests from one client IP within a one-second window beyond the limit
//! are answered `429`.

use std::net::IpAddr;
use std::time::Duration;

use pingora_limits::rate::Rate;

/// Counts requests per client IP in one-second windows.
pub struct RateLimiter {
    /// Estimator of requests per key in the current window.
    rate: Rate,
    /// Requests allowed per second per IP; 0 means no limit.
    per_second: u32,
}

impl RateLimiter {
    /// A limiter allowing `per_second` requests per second per IP (0: off).
    pub fn new(per_second: u32) -> Self {
        Self { rate: Rate::new(Duration::from_secs(1)), per_second }
    }

    /// Counts a request from `ip`; false when it is over the limit.
    pub fn allow(&self, ip: IpAddr) -> bool {
        if self.per_second == 0 {
            return true;
        }
        let seen = self.rate.observe(&ip, 1);
        seen <= self.per_second as isize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_each_ip_separately() {
        let l = RateLimiter::new(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!((0..3).all(|_| l.allow(a)));
        assert!(!l.allow(a));
        assert!(l.allow(b));
    }

    #[test]
    fn zero_means_unlimited() {
        let l = RateLimiter::new(0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!((0..1000).all(|_| l.allow(a)));
    }
}
