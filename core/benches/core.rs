//! Micro-benchmarks of the pure core: one allocation at 0%, 50% and 95% range use, and
//! rendering one sandbox's nft transaction and iptables payload. Run with `just bench`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use randport_core::render::{iptables, nft};
use randport_core::{
    HostPortAllocator, IpFamily, PortKey, PortRange, Protocol, ReservedPorts, examples,
};

fn allocation(c: &mut Criterion) {
    let range = PortRange::DEFAULT;
    let key = PortKey::any(Protocol::Tcp);
    let mut group = c.benchmark_group("allocate_one_port");
    for percent in [0usize, 50, 95] {
        let mut alloc = HostPortAllocator::new(range, ReservedPorts::none());
        let mut rng = fastrand::Rng::with_seed(1);
        let target = range.len() * percent / 100;
        for _ in 0..target {
            alloc.allocate(key, &mut rng, |_, _| true).expect("fill");
        }
        group.bench_function(
            BenchmarkId::from_parameter(format!("{percent}%_used")),
            |b| {
                b.iter(|| {
                    // Allocate and give back, so the fill level stays where it is.
                    let port = alloc.allocate(key, &mut rng, |_, _| true).expect("port");
                    alloc.release(key, black_box(port));
                });
            },
        );
    }
    group.finish();
}

fn rendering(c: &mut Criterion) {
    let record = examples::tcp_udp_containers();
    c.bench_function("render_nft_add_sandbox", |b| {
        b.iter(|| nft::add_sandbox("randport", black_box(&record)))
    });
    c.bench_function("render_iptables_add_sandbox", |b| {
        b.iter(|| iptables::add_sandbox(IpFamily::V4, black_box(&record)))
    });
    let node = examples::many(5000);
    c.bench_function("render_nft_ruleset_10000_mappings", |b| {
        b.iter(|| nft::ruleset("randport", black_box(&node)))
    });
}

criterion_group!(benches, allocation, rendering);
criterion_main!(benches);
