//! Generated datasets for the benchmark harness, seeded and deterministic.
//!
//! - A parquet-like table: files of row groups, each row group holding one
//!   column chunk per column (int64 ids, int64 timestamps, float32 scores,
//!   a dictionary-encoded string column, a variable-length text column),
//!   then a small footer listing the row groups, framed by `PAR1` like
//!   parquet. v2 appends 5% new row groups (to the last file) and rewrites
//!   one row group in the middle of the first file with a different row
//!   count, so every byte after it moves.
//! - A tree of small files: `count` files of 1-16 KiB in nested
//!   directories, half text, half binary. v2 rewrites 5% of the files and
//!   adds 1% new ones.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Rows per row group (about 3.5 MiB of column data).
pub const ROWS_PER_GROUP: usize = 65_536;

const CATEGORIES: [&str; 16] = [
    "books",
    "music",
    "video",
    "garden",
    "kitchen",
    "toys",
    "sports",
    "tools",
    "beauty",
    "health",
    "grocery",
    "office",
    "pets",
    "baby",
    "auto",
    "electronics",
];

const WORDS: [&str; 32] = [
    "the",
    "model",
    "data",
    "weights",
    "of",
    "and",
    "a",
    "train",
    "loss",
    "token",
    "layer",
    "attention",
    "to",
    "in",
    "is",
    "batch",
    "step",
    "gradient",
    "learning",
    "rate",
    "value",
    "query",
    "key",
    "head",
    "norm",
    "embedding",
    "vocab",
    "sequence",
    "length",
    "output",
    "input",
    "state",
];

/// One row group's bytes: column chunks one after another, each prefixed
/// with its column index and byte length.
pub fn row_group(seed: u64, rows: usize) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(rows * 56);
    let column = |out: &mut Vec<u8>, index: u8, data: Vec<u8>| {
        out.push(index);
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(&data);
    };
    // int64 ids: consecutive from a random start.
    let start: i64 = rng.gen_range(0..1 << 40);
    column(
        &mut out,
        0,
        (0..rows as i64)
            .flat_map(|i| (start + i).to_le_bytes())
            .collect(),
    );
    // int64 timestamps: increasing with random gaps.
    let mut ts: i64 = 1_700_000_000_000 + rng.gen_range(0..1 << 30);
    let mut data = Vec::with_capacity(rows * 8);
    for _ in 0..rows {
        ts += rng.gen_range(0..5_000);
        data.extend_from_slice(&ts.to_le_bytes());
    }
    column(&mut out, 1, data);
    // float32 scores: normal(0.5, 0.2).
    let normal = Normal::new(0.5f32, 0.2).expect("valid parameters");
    column(
        &mut out,
        2,
        (0..rows)
            .flat_map(|_| normal.sample(&mut rng).to_le_bytes())
            .collect(),
    );
    // dictionary-encoded strings: the dictionary page, then u8 indices.
    let mut data = Vec::with_capacity(256 + rows);
    data.push(CATEGORIES.len() as u8);
    for c in CATEGORIES {
        data.push(c.len() as u8);
        data.extend_from_slice(c.as_bytes());
    }
    data.extend((0..rows).map(|_| {
        // Skewed: low indices are more frequent.
        let a = rng.gen_range(0..CATEGORIES.len() as u8);
        let b = rng.gen_range(0..CATEGORIES.len() as u8);
        a.min(b)
    }));
    column(&mut out, 3, data);
    // variable-length text: u32 offsets, then the bytes.
    let mut offsets = Vec::with_capacity(rows * 4);
    let mut text = Vec::with_capacity(rows * 24);
    for _ in 0..rows {
        offsets.extend_from_slice(&(text.len() as u32).to_le_bytes());
        for w in 0..rng.gen_range(1..6) {
            if w > 0 {
                text.push(b' ');
            }
            text.extend_from_slice(WORDS[rng.gen_range(0..WORDS.len())].as_bytes());
        }
    }
    offsets.extend_from_slice(&text);
    column(&mut out, 4, offsets);
    out
}

fn group_seed(seed: u64, file: u64, group: u64, rewritten: bool) -> u64 {
    seed.wrapping_mul(0x9e37_79b9)
        .wrapping_add(file << 32)
        .wrapping_add(group * 2 + u64::from(rewritten))
}

/// Writes a table of about `total` bytes in files of about `file_bytes`
/// into `dir` (version 1 or 2); returns the files.
pub fn write_table(
    dir: &Path,
    total: u64,
    file_bytes: u64,
    version: u32,
    seed: u64,
) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let group_bytes = row_group(0, ROWS_PER_GROUP).len() as u64;
    let groups = (total / group_bytes).max(1);
    let per_file = (file_bytes / group_bytes).clamp(1, groups);
    let files = groups.div_ceil(per_file);
    let appended = if version >= 2 {
        (groups * 5).div_ceil(100)
    } else {
        0
    };
    let mut out = Vec::new();
    for f in 0..files {
        let first = f * per_file;
        let mut plan: Vec<(u64, usize)> = (first..((f + 1) * per_file).min(groups))
            .map(|g| {
                let rewritten = version >= 2 && f == 0 && g == per_file.min(groups) / 2;
                let rows = if rewritten {
                    ROWS_PER_GROUP - 1000
                } else {
                    ROWS_PER_GROUP
                };
                (group_seed(seed, f, g, rewritten), rows)
            })
            .collect();
        if f == files - 1 {
            plan.extend(
                (groups..groups + appended)
                    .map(|g| (group_seed(seed, f, g, false), ROWS_PER_GROUP)),
            );
        }
        let path = dir.join(format!("train-{:05}-of-{:05}.parquet", f, files));
        let mut w = BufWriter::with_capacity(1 << 20, fs::File::create(&path)?);
        w.write_all(b"PAR1")?;
        let mut footer = String::from("{\"version\":1,\"columns\":[\"id:int64\",\"ts:int64\",\"score:float32\",\"category:dict<string>\",\"text:string\"],\"row_groups\":[");
        let mut offset = 4u64;
        for (k, (s, rows)) in plan.iter().enumerate() {
            let g = row_group(*s, *rows);
            w.write_all(&g)?;
            if k > 0 {
                footer.push(',');
            }
            footer.push_str(&format!(
                "{{\"offset\":{offset},\"length\":{},\"rows\":{rows}}}",
                g.len()
            ));
            offset += g.len() as u64;
        }
        footer.push_str("]}");
        w.write_all(footer.as_bytes())?;
        w.write_all(&(footer.len() as u32).to_le_bytes())?;
        w.write_all(b"PAR1")?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        out.push(path);
    }
    Ok(out)
}

fn small_file(seed: u64, i: u64, rewritten: bool) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(31)
            .wrapping_add(i * 2 + u64::from(rewritten)),
    );
    let len = rng.gen_range(1024..=16 * 1024);
    if i & 1 == 0 {
        let mut v = Vec::with_capacity(len + 16);
        while v.len() < len {
            v.extend_from_slice(WORDS[rng.gen_range(0..WORDS.len())].as_bytes());
            v.push(if rng.gen_range(0..12) == 0 {
                b'\n'
            } else {
                b' '
            });
        }
        v.truncate(len);
        v
    } else {
        let mut v = vec![0u8; len];
        rng.fill_bytes(&mut v);
        v
    }
}

/// Writes `count` small files (1-16 KiB) in nested directories under `dir`
/// (version 1 or 2); returns the number of files and bytes.
pub fn write_small_files(
    dir: &Path,
    count: u64,
    version: u32,
    seed: u64,
) -> io::Result<(u64, u64)> {
    let added = if version >= 2 { count.div_ceil(100) } else { 0 };
    let mut bytes = 0;
    for i in 0..count + added {
        let rewritten = version >= 2 && i % 20 == 7;
        let sub = dir.join(format!("d{:02}/e{:02}", i % 37, (i / 37) % 23));
        if i < 37 * 23 {
            fs::create_dir_all(&sub)?;
        }
        let data = small_file(seed, i, rewritten);
        bytes += data.len() as u64;
        let ext = if i & 1 == 0 { "txt" } else { "bin" };
        fs::write(sub.join(format!("f{i:06}.{ext}")), data)?;
    }
    Ok((count + added, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_versions_share_most_row_groups() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_table(&dir.path().join("v1"), 20 << 20, 8 << 20, 1, 3).unwrap();
        let b = write_table(&dir.path().join("v2"), 20 << 20, 8 << 20, 2, 3).unwrap();
        assert_eq!(a.len(), b.len());
        let last = a.len() - 1;
        let (x, y) = (fs::read(&a[last]).unwrap(), fs::read(&b[last]).unwrap());
        assert!(y.len() > x.len(), "row groups appended");
        assert_eq!(&x[..1000], &y[..1000]);
        assert_eq!(&y[..4], b"PAR1");
        assert_eq!(&y[y.len() - 4..], b"PAR1");
        assert_ne!(fs::read(&a[0]).unwrap(), fs::read(&b[0]).unwrap());
        let again = write_table(&dir.path().join("v1b"), 20 << 20, 8 << 20, 1, 3).unwrap();
        assert_eq!(fs::read(&a[0]).unwrap(), fs::read(&again[0]).unwrap());
    }

    #[test]
    fn small_files_are_small_and_nested() {
        let dir = tempfile::tempdir().unwrap();
        let (n, bytes) = write_small_files(dir.path(), 100, 2, 1).unwrap();
        assert_eq!(n, 101);
        assert!((101 * 1024..=101 * 16 * 1024).contains(&bytes));
        assert!(dir.path().join("d00/e00/f000000.txt").exists());
    }
}
