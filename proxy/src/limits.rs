//! Per-client request rate limit: requests from one client IP within a
//! one-second window beyond the limit are answered `429`.
//!
//! The counts live in a count-min table of atomics that every worker process
//! shares (see [`crate::workers`]), so a client is limited once however the
//! kernel spreads its connections over the workers (as nginx's `limit_req`
//! zone in shared memory). Each slot holds its window and its count in one
//! word, so a slot from an older window starts again at its next use and
//! nothing has to sweep the table. Like every count-min sketch it can only
//! overcount, when four slots all collide with busier clients.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Hash rows of the table.
const ROWS: usize = 4;
/// Slots per row: with 3,000 clients in one second, all four of a client's
/// slots are shared with another client for about 1 in 1,300 (512 KiB in all).
const WIDTH: usize = 16384;

/// Counts requests per client IP in one-second windows.
pub struct RateLimiter {
    /// `ROWS * WIDTH` slots: window number in the high 32 bits, count in the low.
    slots: &'static [AtomicU64],
    /// Requests allowed per second per IP; 0 means no limit.
    per_second: u32,
    /// Window 0 starts here (the same instant in every worker: made before the fork).
    epoch: Instant,
    /// Keyed hasher (the same keys in every worker), so clients cannot aim at each other's slots.
    hasher: std::collections::hash_map::RandomState,
}

impl RateLimiter {
    /// Words the table takes in shared memory.
    pub const WORDS: usize = ROWS * WIDTH;

    /// A limiter allowing `per_second` requests per second per IP (0: off),
    /// counting in `slots` (at least [`Self::WORDS`]).
    pub fn over(
        slots: &'static [AtomicU64],
        per_second: u32,
        epoch: Instant,
        hasher: std::collections::hash_map::RandomState,
    ) -> Self {
        assert!(slots.len() >= Self::WORDS);
        Self { slots: &slots[..Self::WORDS], per_second, epoch, hasher }
    }

    /// A limiter with a table of its own (one process).
    pub fn private(per_second: u32) -> Self {
        let slots: Vec<AtomicU64> = (0..Self::WORDS).map(|_| AtomicU64::new(0)).collect();
        Self::over(Box::leak(slots.into_boxed_slice()), per_second, Instant::now(), Default::default())
    }

    /// Counts a request from `ip`; false when it is over the limit.
    pub fn allow(&self, ip: IpAddr) -> bool {
        if self.per_second == 0 {
            return true;
        }
        let window = self.epoch.elapsed().as_secs() as u32;
        self.observe(ip, window) <= self.per_second
    }

    /// `ip`'s slot in hash row `row`.
    fn slot(&self, row: usize, ip: IpAddr) -> &AtomicU64 {
        &self.slots[row * WIDTH + (self.hasher.hash_one((row, ip)) as usize % WIDTH)]
    }

    /// Adds one request from `ip` in `window`; the estimate of its requests there.
    fn observe(&self, ip: IpAddr, window: u32) -> u32 {
        let mut least = u32::MAX;
        for row in 0..ROWS {
            let slot = self.slot(row, ip);
            let mut now = slot.load(Ordering::Relaxed);
            let count = loop {
                let next = if (now >> 32) as u32 == window {
                    now & !0xffff_ffff | u64::from((now as u32).saturating_add(1))
                } else {
                    u64::from(window) << 32 | 1
                };
                match slot.compare_exchange_weak(now, next, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => break next as u32,
                    Err(seen) => now = seen,
                }
            };
            least = least.min(count);
        }
        least
    }
}

#[cfg(test)]
impl RateLimiter {
    /// `ip`'s count in `window`, without counting.
    fn estimate(&self, ip: IpAddr, window: u32) -> u32 {
        (0..ROWS)
            .map(|row| {
                let w = self.slot(row, ip).load(Ordering::Relaxed);
                if (w >> 32) as u32 == window {
                    w as u32
                } else {
                    0
                }
            })
            .min()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_each_ip_separately() {
        let l = RateLimiter::private(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!((0..3).all(|_| l.allow(a)));
        assert!(!l.allow(a));
        assert!(l.allow(b));
    }

    #[test]
    fn zero_means_unlimited() {
        let l = RateLimiter::private(0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!((0..1000).all(|_| l.allow(a)));
    }

    #[test]
    fn a_new_window_starts_from_zero_and_two_limiters_on_one_table_count_together() {
        let l = RateLimiter::private(5);
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!((0..7).map(|_| l.observe(a, 10)).last(), Some(7));
        assert_eq!(l.observe(a, 11), 1, "the next window starts again");
        assert_eq!(l.estimate(a, 10), 0, "the old window is gone from every row");
        // Two workers: the same words, epoch and keys.
        let other = RateLimiter::over(l.slots, 5, l.epoch, l.hasher.clone());
        assert_eq!(other.observe(a, 11), 2);
        assert_eq!(l.observe(a, 11), 3);
    }

    #[test]
    fn thousands_of_clients_in_one_second_are_counted_exactly_but_for_a_few() {
        let l = RateLimiter::private(100);
        let clients: Vec<IpAddr> = (0..3000u32).map(|i| IpAddr::from((0x0a00_0000 + i).to_be_bytes())).collect();
        for (n, ip) in clients.iter().enumerate() {
            for _ in 0..(n % 4 + 1) {
                l.observe(*ip, 1);
            }
        }
        let exact = clients.iter().enumerate().filter(|(n, ip)| l.estimate(**ip, 1) == (n % 4 + 1) as u32).count();
        assert!(exact >= 2990, "{exact} of 3000 exact");
    }
}
