//! Stream events are encoded once by the AI node and decoded (and
//! re-encoded) on the way to every socket: their JSON cost per chunk.
//!
//! Run: `cargo bench -p chat-wire --bench events` (or `benches/run.sh`).

use std::hint::black_box;

use chat_wire::Event;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn chunk() -> Event {
    let mut e = Event::chunk("r-6f9c1b2a4e7d4c0e9a1b3c5d7e9f0a1b", 17, "streaming ");
    e.ts_us = Some(1_767_225_600_123_456);
    e.node = Some("ai-2".into());
    e
}

fn events(c: &mut Criterion) {
    let chunk = chunk();
    let json = chunk.to_json();
    let done = Event::done("r-6f9c1b2a4e7d4c0e9a1b3c5d7e9f0a1b", 41, "stop").to_json();
    let mut g = c.benchmark_group("event");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_chunk", |b| b.iter(|| black_box(black_box(&chunk).to_json())));
    g.bench_function("decode_chunk", |b| b.iter(|| black_box(Event::from_json(black_box(&json)).unwrap())));
    g.bench_function("decode_done", |b| b.iter(|| black_box(Event::from_json(black_box(&done)).unwrap())));
    g.bench_function("decode_then_encode_chunk", |b| {
        b.iter(|| black_box(Event::from_json(black_box(&json)).unwrap().to_json()))
    });
    g.finish();
}

criterion_group!(benches, events);
criterion_main!(benches);
