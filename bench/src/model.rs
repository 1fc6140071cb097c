//! A generated model directory: safetensors shards of bf16 tensors with
//! real headers, in versions that differ the way fine-tunes do.
//!
//! - v1: `model-0000k-of-0000n.safetensors` shards, tensors of
//!   `TENSOR_BYTES`, plus `config.json`;
//! - v2: every tenth tensor retrained (new values, same shapes), the
//!   config's version bumped;
//! - v3: v2 with one tensor appended to the last shard (its header, and so
//!   the position of all its data, changes).

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::bf16_weights;

/// 16 MiB: a 4096 x 2048 bf16 matrix.
pub const TENSOR_BYTES: u64 = 16 << 20;
const ROWS: u64 = 4096;

fn tensor_seed(seed: u64, index: u64, version: u32) -> u64 {
    // Tensors 3, 13, 23, ... change from v2 on.
    let retrained = version >= 2 && index % 10 == 3;
    seed.wrapping_mul(1_000_003) + index * 2 + u64::from(retrained)
}

/// Writes the model of `total` bytes (rounded to whole tensors, at least
/// one) in shards of about `shard` bytes into `dir`; returns the files.
pub fn write_model(
    dir: &Path,
    total: u64,
    shard: u64,
    version: u32,
    seed: u64,
) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let tensors = (total / TENSOR_BYTES).max(1);
    let per_shard = (shard / TENSOR_BYTES).clamp(1, tensors);
    let shards = tensors.div_ceil(per_shard);
    let mut files = Vec::new();
    for s in 0..shards {
        let mut indices: Vec<u64> = (s * per_shard..((s + 1) * per_shard).min(tensors)).collect();
        if version >= 3 && s == shards - 1 {
            indices.push(tensors);
        }
        let path = dir.join(format!("model-{:05}-of-{:05}.safetensors", s + 1, shards));
        write_shard(&path, &indices, version, seed)?;
        files.push(path);
    }
    let config = dir.join("config.json");
    fs::write(
        &config,
        format!(
            "{{\"architectures\": [\"Generated\"], \"torch_dtype\": \"bfloat16\", \
             \"num_tensors\": {}, \"version\": {version}}}\n",
            tensors + u64::from(version >= 3)
        ),
    )?;
    files.push(config);
    Ok(files)
}

fn write_shard(path: &Path, indices: &[u64], version: u32, seed: u64) -> io::Result<()> {
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    for (k, i) in indices.iter().enumerate() {
        let (a, b) = (k as u64 * TENSOR_BYTES, (k as u64 + 1) * TENSOR_BYTES);
        header.push_str(&format!(
            ",\"layers.{i}.weight\":{{\"dtype\":\"BF16\",\"shape\":[{ROWS},{}],\"data_offsets\":[{a},{b}]}}",
            TENSOR_BYTES / 2 / ROWS
        ));
    }
    header.push('}');
    // The format pads the header with spaces to a multiple of 8.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = BufWriter::with_capacity(1 << 20, fs::File::create(path)?);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(header.as_bytes())?;
    for &i in indices {
        out.write_all(&bf16_weights(
            tensor_seed(seed, i, version),
            TENSOR_BYTES as usize,
        ))?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_differ_like_fine_tunes() {
        let dir = tempfile::tempdir().unwrap();
        let v = |n| {
            let d = dir.path().join(format!("v{n}"));
            write_model(&d, 10 * TENSOR_BYTES, 4 * TENSOR_BYTES, n, 7).unwrap();
            d
        };
        let (v1, v2, v3) = (v(1), v(2), v(3));
        let read = |d: &Path, f: &str| fs::read(d.join(f)).unwrap();
        let first = "model-00001-of-00003.safetensors";
        let last = "model-00003-of-00003.safetensors";
        let a = read(&v1, first);
        let b = read(&v2, first);
        let header = 8 + u64::from_le_bytes(a[..8].try_into().unwrap()) as usize;
        assert_eq!(a[8], b'{');
        assert_eq!(a.len(), header + 4 * TENSOR_BYTES as usize);
        assert_eq!(a[..header], b[..header], "same header");
        let t = |x: &[u8], i: usize| {
            x[header + i * TENSOR_BYTES as usize..header + (i + 1) * TENSOR_BYTES as usize].to_vec()
        };
        assert_eq!(t(&a, 0), t(&b, 0));
        assert_ne!(t(&a, 3), t(&b, 3), "tensor 3 retrained");
        assert_eq!(read(&v2, last), read(&v1, last), "tensors 8, 9 unchanged");
        assert!(read(&v3, last).len() > read(&v2, last).len() + TENSOR_BYTES as usize);
        assert_eq!(read(&v3, first), b);
    }
}
