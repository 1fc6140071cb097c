//! Seeded, deterministic workloads for benchmarks and tests: the same seed
//! always yields the same bytes, so runs compare like with like.

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Incompressible bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Model weights as bf16: normal(0, 0.02) values, little endian, the
/// distribution of freshly initialised or fine-tuned transformer weights.
pub fn bf16_weights(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.02).expect("valid parameters");
    let mut v = Vec::with_capacity(len + 1);
    while v.len() < len {
        let bits = normal.sample(&mut rng).to_bits();
        // bf16 is the upper half of an f32 (rounded to nearest even).
        let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
        v.extend_from_slice(&(rounded as u16).to_le_bytes());
    }
    v.truncate(len);
    v
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
