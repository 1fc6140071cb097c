//! Criterion benchmarks of the protocol's CPU work: chunking, hashing, xorb
//! build and verify. Run: `cargo bench -p cas-bench --bench protocol`.

use cas_bench::{bf16_weights, random_bytes};
use cas_protocol::chunking::{chunk_and_hash, chunk_and_hash_parallel, chunks};
use cas_protocol::compression::{group, predict, ungroup};
use cas_protocol::xorb::{Compression, EncodedChunk, Scheme, XorbBuilder, XorbView};
use cas_protocol::{ChunkHash, Sha256};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

const LEN: usize = 64 * 1024 * 1024;

fn chunking_and_hashing(c: &mut Criterion) {
    let data = random_bytes(1, LEN);
    let mut g = c.benchmark_group("chunk_hash");
    g.throughput(Throughput::Bytes(LEN as u64)).sample_size(10);
    g.bench_function("fastcdc_only", |b| {
        b.iter(|| black_box(chunks(&data).count()))
    });
    g.bench_function("blake3_chunks_only", |b| {
        let ranges: Vec<_> = chunks(&data).collect();
        b.iter(|| {
            for r in &ranges {
                black_box(ChunkHash::of(&data[r.clone()]));
            }
        })
    });
    g.bench_function("chunk_and_hash_1_thread", |b| {
        b.iter(|| black_box(chunk_and_hash(&data)))
    });
    g.bench_function("chunk_and_hash_parallel", |b| {
        b.iter(|| black_box(chunk_and_hash_parallel(&data)))
    });
    g.bench_function("sha256", |b| b.iter(|| black_box(Sha256::of(&data))));
    g.finish();
}

fn build(data: &[u8], compression: Compression) -> Vec<u8> {
    let mut builder = XorbBuilder::new();
    for r in chunks(data) {
        let chunk = EncodedChunk::encode(&data[r], compression).expect("chunk within limits");
        builder.try_push(chunk).expect("input fits one xorb");
    }
    builder.finish().expect("non-empty").bytes
}

fn xorbs(c: &mut Criterion) {
    let mut g = c.benchmark_group("xorb");
    g.throughput(Throughput::Bytes(LEN as u64)).sample_size(10);
    for (name, data) in [
        ("random", random_bytes(2, LEN)),
        ("bf16", bf16_weights(3, LEN)),
    ] {
        for (cname, comp) in [
            ("auto", Compression::Auto),
            ("zstd1", Compression::Fixed(Scheme::Zstd)),
            ("raw", Compression::Raw),
        ] {
            g.bench_function(BenchmarkId::new(format!("build_{cname}"), name), |b| {
                b.iter(|| black_box(build(&data, comp)))
            });
            let bytes = build(&data, comp);
            let view = XorbView::parse(&bytes).expect("valid");
            let hash = view.hash();
            eprintln!(
                "{name}/{cname}: stored {:.3} of raw",
                bytes.len() as f64 / LEN as f64
            );
            g.bench_function(BenchmarkId::new(format!("verify_{cname}"), name), |b| {
                b.iter(|| {
                    XorbView::parse(&bytes)
                        .expect("valid")
                        .verify(hash)
                        .expect("verifies")
                })
            });
        }
    }
    g.finish();
}

/// The byte-plane transforms of the byte-grouped schemes, per 64 KiB chunk
/// (ungroup runs on every fetch of a grouped chunk), and the scheme predictor.
fn regroup(c: &mut Criterion) {
    let data = bf16_weights(4, LEN);
    let mut g = c.benchmark_group("regroup");
    g.throughput(Throughput::Bytes(LEN as u64)).sample_size(10);
    let mut buf = Vec::new();
    let mut out = vec![0u8; 65536];
    for w in [2, 4] {
        g.bench_function(BenchmarkId::new("group", w), |b| {
            b.iter(|| data.chunks(65536).for_each(|c| group(c, w, &mut buf)))
        });
        g.bench_function(BenchmarkId::new("ungroup", w), |b| {
            b.iter(|| {
                data.chunks(65536)
                    .for_each(|c| ungroup(c, w, &mut out[..c.len()]))
            })
        });
    }
    g.bench_function("predict", |b| {
        b.iter(|| data.chunks(65536).map(|c| predict(c) as u8).sum::<u8>())
    });
    g.finish();
}

criterion_group!(benches, chunking_and_hashing, xorbs, regroup);
criterion_main!(benches);
