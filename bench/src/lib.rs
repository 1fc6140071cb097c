//! Seeded, deterministic workloads for benchmarks and tests: the same seed
//! always yields the same bytes, so runs compare like with like.

pub mod dataset;
pub mod model;

use cas_protocol::chunking::chunks;
use cas_protocol::xorb::{BuiltXorb, Compression, EncodedChunk, XorbBuilder};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// CPU time of the calling thread, so a measurement on a machine
/// shared with other work counts only this thread's cycles.
pub struct CpuClock(u64);

impl CpuClock {
    pub fn start() -> Self {
        Self(thread_cpu_ns())
    }

    /// CPU seconds of this thread since [`CpuClock::start`].
    pub fn seconds(&self) -> f64 {
        thread_cpu_ns().saturating_sub(self.0) as f64 / 1e9
    }
}

/// CLOCK_THREAD_CPUTIME_ID in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Incompressible bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// normal(0, 0.02) values: the distribution of freshly initialised or
/// fine-tuned transformer weights.
fn weights(seed: u64, count: usize) -> impl Iterator<Item = f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.02).expect("valid parameters");
    (0..count).map(move |_| normal.sample(&mut rng))
}

/// Model weights as little-endian bf16, `len` bytes.
pub fn bf16_weights(seed: u64, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = weights(seed, len.div_ceil(2))
        .flat_map(|w| half::bf16::from_f32(w).to_le_bytes())
        .collect();
    v.truncate(len);
    v
}

/// Model weights as little-endian f16, `len` bytes.
pub fn f16_weights(seed: u64, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = weights(seed, len.div_ceil(2))
        .flat_map(|w| half::f16::from_f32(w).to_le_bytes())
        .collect();
    v.truncate(len);
    v
}

/// Model weights as little-endian f32, `len` bytes.
pub fn f32_weights(seed: u64, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = weights(seed, len.div_ceil(4))
        .flat_map(f32::to_le_bytes)
        .collect();
    v.truncate(len);
    v
}

/// Model weights quantized to int8 with one absmax scale per block of 4096
/// (as in common 8-bit weight formats), `len` bytes.
pub fn int8_weights(seed: u64, len: usize) -> Vec<u8> {
    let w: Vec<f32> = weights(seed, len).collect();
    w.chunks(4096)
        .flat_map(|block| {
            let scale = block.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            block
                .iter()
                .map(move |x| (x / scale).round().clamp(-127.0, 127.0) as i8 as u8)
        })
        .collect()
}

/// `base` with `fraction` of its bytes rewritten in `edits` places: a
/// fine-tune that touched part of the weights.
pub fn edited(base: &[u8], seed: u64, edits: usize, fraction: f64) -> Vec<u8> {
    let mut v = base.to_vec();
    if v.is_empty() || edits == 0 {
        return v;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let span = ((v.len() as f64 * fraction) as usize / edits).max(1);
    for _ in 0..edits {
        let at = rng.gen_range(0..v.len());
        let end = (at + span).min(v.len());
        rng.fill_bytes(&mut v[at..end]);
    }
    v
}

/// Chunks `data` and packs every chunk into xorbs under `policy`, in order
/// (no dedup): the xorbs an uploader of this data would build.
pub fn pack(data: &[u8], policy: Compression) -> Vec<BuiltXorb> {
    let mut out = Vec::new();
    let mut b = XorbBuilder::new();
    for r in chunks(data) {
        let c = EncodedChunk::encode(&data[r], policy).expect("chunks are within limits");
        if let Err(c) = b.try_push(c) {
            out.push(
                std::mem::take(&mut b)
                    .finish()
                    .expect("a full xorb is not empty"),
            );
            b.try_push(c).expect("a chunk fits an empty xorb");
        }
    }
    if !b.is_empty() {
        out.push(b.finish().expect("not empty"));
    }
    out
}
