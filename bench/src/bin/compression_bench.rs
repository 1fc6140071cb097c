//! Compression schemes side by side on synthetic tensors: stored/raw ratio,
//! encode throughput (the compression stage alone, one thread),
//! xorb build throughput (chunk hash + compress + serialize, one thread: the
//! client's upload CPU cost), verify throughput (parse + decompress +
//! re-hash, one thread: the server's upload cost and the client's fetch
//! cost), and how often the Auto predictor picks the best scheme.
//!
//! Times are CPU time of the measuring thread, so other load on the
//! machine does not inflate them.
//!
//! Run: `cargo run --release -p cas-bench --bin compression-bench`

use cas_bench::{
    bf16_weights, f16_weights, f32_weights, int8_weights, pack, random_bytes, CpuClock,
};
use cas_protocol::chunking::chunks;
use cas_protocol::compression::{compress, encode, predict, Compression, Scheme};
use cas_protocol::xorb::XorbView;
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// MiB of each data type.
    #[arg(long, default_value_t = 64)]
    mib: usize,
}

fn name(c: Compression) -> &'static str {
    match c {
        Compression::Raw => "raw",
        Compression::Fixed(Scheme::Zstd) => "zstd",
        Compression::Fixed(Scheme::ByteGrouped2Zstd) => "bg2+zstd",
        Compression::Fixed(Scheme::ByteGrouped4Zstd) => "bg4+zstd",
        Compression::Fixed(Scheme::BytePlanes2) => "planes2",
        Compression::Fixed(Scheme::BytePlanes4) => "planes4",
        Compression::Fixed(Scheme::Raw) => "raw",
        Compression::Auto => "auto",
    }
}

/// Builds xorbs of `data` under `policy`: (serialized xorbs, seconds).
fn build(data: &[u8], policy: Compression) -> (Vec<Vec<u8>>, f64) {
    let t = CpuClock::start();
    let xorbs = pack(data, policy).into_iter().map(|x| x.bytes).collect();
    (xorbs, t.seconds())
}

/// CPU seconds to encode every chunk of `data` under `policy`: the
/// compression stage alone (no chunking, hashing or serializing).
fn encode_only(data: &[u8], policy: Compression) -> f64 {
    let ranges: Vec<_> = chunks(data).collect();
    let t = CpuClock::start();
    for r in ranges {
        std::hint::black_box(encode(&data[r], policy));
    }
    t.seconds()
}

fn verify(xorbs: &[Vec<u8>]) -> f64 {
    let t = CpuClock::start();
    for x in xorbs {
        let v = XorbView::parse(x).expect("valid");
        v.verify(v.hash()).expect("verifies");
    }
    t.seconds()
}

/// Per chunk: does the predictor's scheme store it (within 1%) as small as
/// the best scheme tried exhaustively? Returns (hit rate, auto bytes /
/// oracle bytes, predictor MB/s).
fn predictor_quality(data: &[u8]) -> (f64, f64, f64) {
    let ranges: Vec<_> = chunks(data).collect();
    let t = CpuClock::start();
    let picks: Vec<Scheme> = ranges.iter().map(|r| predict(&data[r.clone()])).collect();
    let predict_mbs = data.len() as f64 / t.seconds() / 1e6;
    let size = |chunk: &[u8], s: Scheme| compress(chunk, s).map_or(chunk.len(), |z| z.len());
    let (mut hits, mut auto, mut oracle) = (0usize, 0usize, 0usize);
    for (r, pick) in ranges.iter().zip(&picks) {
        let chunk = &data[r.clone()];
        let best = Scheme::ALL
            .iter()
            .map(|&s| size(chunk, s))
            .min()
            .expect("schemes");
        let got = size(chunk, *pick);
        hits += usize::from(got as f64 <= best as f64 * 1.01);
        auto += got;
        oracle += best;
    }
    (
        hits as f64 / ranges.len() as f64,
        auto as f64 / oracle as f64,
        predict_mbs,
    )
}

fn main() {
    let args = Args::parse();
    let len = args.mib << 20;
    let datasets: [(&str, Vec<u8>); 5] = [
        ("bf16", bf16_weights(1, len)),
        ("f16", f16_weights(2, len)),
        ("f32", f32_weights(3, len)),
        ("int8", int8_weights(4, len)),
        ("random", random_bytes(5, len)),
    ];
    let policies = [
        Compression::Raw,
        Compression::Fixed(Scheme::Zstd),
        Compression::Fixed(Scheme::ByteGrouped2Zstd),
        Compression::Fixed(Scheme::ByteGrouped4Zstd),
        Compression::Fixed(Scheme::BytePlanes2),
        Compression::Fixed(Scheme::BytePlanes4),
        Compression::Auto,
    ];
    println!("| data | scheme | stored / raw | encode MB/s | build MB/s | verify MB/s |");
    println!("|---|---|---|---|---|---|");
    for (dname, data) in &datasets {
        for &p in &policies {
            let (xorbs, build_s) = build(data, p);
            let stored: usize = xorbs.iter().map(Vec::len).sum();
            let verify_s = verify(&xorbs);
            let encode = match p {
                Compression::Raw => "—".to_owned(),
                p => format!("{:.0}", data.len() as f64 / encode_only(data, p) / 1e6),
            };
            println!(
                "| {dname} | {} | {:.3} | {encode} | {:.0} | {:.0} |",
                name(p),
                stored as f64 / data.len() as f64,
                data.len() as f64 / build_s / 1e6,
                data.len() as f64 / verify_s / 1e6
            );
        }
    }
    println!();
    println!("| data | predictor picks the best scheme (within 1%) | auto bytes / best-per-chunk bytes | predictor MB/s |");
    println!("|---|---|---|---|");
    for (dname, data) in &datasets {
        let (hit, loss, mbs) = predictor_quality(data);
        println!("| {dname} | {:.1}% | {loss:.4} | {mbs:.0} |", hit * 100.0);
    }
}
