//! Placement at scale: 10,000 subtasks over 1,000 providers in three regions, with and
//! without residency pinning, and one chat request over the same 1,000 providers.
//! `cargo bench -p beacon-router --bench placement`.

use std::collections::HashMap;

use beacon_proto::{Digest, Keypair};
use beacon_router::placement::{Policy, ProviderView, Subtask, place};
use criterion::{Criterion, criterion_group, criterion_main};

fn world(providers: usize, subtasks: usize) -> (Vec<Subtask>, Vec<ProviderView>) {
    let models: Vec<Digest> = (0..5u8).map(|i| Digest::of(&[i])).collect();
    let regions = ["us-east", "eu-west", "ap-south"];
    let ps = (0..providers)
        .map(|i| ProviderView {
            peer: Keypair::generate().peer_id(),
            region: regions[i % 3].to_string(),
            models: models
                .iter()
                .copied()
                .filter(|m| (m.0[0] as usize + i).is_multiple_of(2))
                .collect(),
            free_memory: 8 << 30,
            slots: 1 + (i % 8) as u32,
            busy: (i % 5) as u32,
            rtt_ms: 5.0 + (i % 200) as f64,
            decode_tps: HashMap::new(),
            default_tps: 20.0 + (i % 100) as f64,
            prefill_tps: 500.0 + (i % 1000) as f64,
            price_per_mtok: (i % 7) as f64,
            quarantined: i.is_multiple_of(97),
        })
        .collect();
    let ts = (0..subtasks)
        .map(|i| Subtask {
            model: models[i % models.len()],
            prompt_tokens: 200 + (i % 1500) as u32,
            max_tokens: 64 + (i % 200) as u32,
            exclude: vec![],
            prefix: None,
        })
        .collect();
    (ts, ps)
}

fn bench(c: &mut Criterion) {
    let (subtasks, providers) = world(1000, 10_000);
    let mut group = c.benchmark_group("placement");
    group.sample_size(10);
    group.bench_function("10k subtasks x 1k providers", |b| {
        b.iter(|| place(&subtasks, &providers, &Policy::default()))
    });
    let pinned = Policy {
        allowed_regions: Some(["eu-west".to_string()].into()),
        cost_weight: 100.0,
        ..Policy::default()
    };
    group.bench_function("10k x 1k, pinned to one region, cost-weighted", |b| {
        b.iter(|| place(&subtasks, &providers, &pinned))
    });
    // A chat request: one subtask among every provider, as the dispatcher places each.
    let one = &subtasks[..1];
    group.sample_size(100);
    group.bench_function("1 chat request x 1k providers", |b| {
        b.iter(|| place(one, &providers, &Policy::default()))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
