//! Choosing the AI node for a chat: round-robin over the pool with the
//! health filter and the retry's "not tried yet" filter, the same
//! `select_with` call as `AiPool::dispatch` on the same
//! `LoadBalancer<RoundRobin>` (built from a static list here; the pool's
//! discovery and health checks only change which nodes are ready).
//!
//! Run: `cargo bench -p backend --bench node_selection` (or `benches/run.sh`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use pingora_load_balancing::selection::RoundRobin;
use pingora_load_balancing::{Backend, LoadBalancer};

fn pool(nodes: usize) -> LoadBalancer<RoundRobin> {
    LoadBalancer::try_from_iter((1..=nodes).map(|i| format!("127.0.0.1:{}", 8000 + i))).expect("static addresses")
}

fn pick(lb: &LoadBalancer<RoundRobin>, tried: &[Backend]) -> Option<Backend> {
    lb.select_with(b"", 256, |b, healthy| healthy && !tried.contains(b))
}

fn round_robin(c: &mut Criterion) {
    let mut g = c.benchmark_group("node_select");
    for nodes in [3, 16] {
        let lb = pool(nodes);
        g.bench_function(format!("{nodes}_healthy"), |b| b.iter(|| black_box(pick(&lb, black_box(&[])))));
    }
    let lb = pool(3);
    let all: Vec<Backend> = lb.backends().get_backend().iter().cloned().collect();
    lb.backends().set_enable(&all[0], false);
    g.bench_function("3_nodes_1_unhealthy", |b| b.iter(|| black_box(pick(&lb, black_box(&[])))));
    let tried = [all[1].clone()];
    g.bench_function("3_nodes_1_unhealthy_1_tried", |b| b.iter(|| black_box(pick(&lb, black_box(&tried)))));
    g.finish();
}

criterion_group!(benches, round_robin);
criterion_main!(benches);
