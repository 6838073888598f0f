//! The proxy's per-request hot paths: the sticky key of a request and the
//! ketama ring lookup that skips unavailable backends.
//!
//! Run: `cargo bench -p proxy --bench hot_paths` (or `benches/run.sh`).

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderMap;
use proxy::sticky::{client_ip, Cidr, StickyKey};
use proxy::upstreams::UpstreamGroup;

/// The benchmark's upstream group: the three servers of benches/proxy-bench.toml.
fn group(healthy: usize) -> (std::sync::Arc<UpstreamGroup>, Vec<SocketAddr>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/proxy-bench.toml");
    let config = proxy::config::load(&path, &Default::default()).expect("benches/proxy-bench.toml loads");
    let upstream = config.upstreams.into_iter().next().expect("one upstream group");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let group = rt.block_on(UpstreamGroup::new(upstream));
    let addrs: Vec<SocketAddr> = group.states().iter().map(|s| s.addr).collect();
    for state in group.states().iter().take(healthy) {
        state.observe_check(true, 1, 1);
    }
    (group, addrs)
}

fn sticky_key(c: &mut Criterion) {
    let client: IpAddr = "203.0.113.77".parse().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("host", "chat.example".parse().unwrap());
    headers.insert("user-agent", "bench/1.0".parse().unwrap());
    headers.insert("cookie", "theme=dark; sid=s-0123456789abcdef; lang=en".parse().unwrap());
    headers.insert("x-forwarded-for", "198.51.100.1, 10.0.0.9".parse().unwrap());
    let trusted: Vec<Cidr> = ["10.0.0.0/8".parse().unwrap(), "127.0.0.0/8".parse().unwrap()].into();
    let peer: IpAddr = "10.0.0.9".parse().unwrap();

    let mut g = c.benchmark_group("sticky_key");
    for spec in ["ip", "ip24", "header:user-agent", "cookie:sid"] {
        let key: StickyKey = spec.parse().unwrap();
        g.bench_function(spec, |b| b.iter(|| black_box(key.hash_input(black_box(client), black_box(&headers)))));
    }
    g.bench_function("client_ip_trusted_xff", |b| {
        b.iter(|| black_box(client_ip(black_box(peer), black_box(&headers), black_box(&trusted))))
    });
    g.finish();
}

fn ring_select(c: &mut Criterion) {
    let ips: Vec<Vec<u8>> = (0..1024u32).map(|i| format!("10.{}.{}.{}", i >> 8, i & 255, i % 7).into_bytes()).collect();
    let mut g = c.benchmark_group("ring_select");
    for healthy in [3, 1] {
        let (group, addrs) = group(healthy);
        let mut i = 0usize;
        g.bench_function(format!("{healthy}_of_3_healthy"), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(group.select(black_box(&ips[i]), &[]))
            })
        });
        if healthy == 3 {
            let tried = [addrs[0]];
            g.bench_function("retry_skips_tried", |b| {
                b.iter(|| {
                    i = (i + 1) & 1023;
                    black_box(group.select(black_box(&ips[i]), black_box(&tried)))
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, sticky_key, ring_select);
criterion_main!(benches);
