//! Where a mirror stopped inside a large file: a resume record per file
//! being downloaded, named by its listed SHA-256, in the client's cache
//! directory (`mirror-partial/<sha256>`).
//!
//! While a large file streams into the store, every checkpoint whose
//! chunks are all stored on the server (see
//! [`crate::upload::Source::stored`]) is appended: the chunks since the
//! previous one and the SHA-256 state after them. A rerun that finds the
//! record (same SHA-256 and size) and the server still storing every chunk
//! before its last checkpoint downloads only the bytes after it, and
//! chunks and hashes on from there: FastCDC restarts cleanly at a cut
//! point, and the SHA-256 of the whole file is still checked, carried
//! across the checkpoint. The record goes when the file is committed, or
//! when its bytes do not match the listing (the bytes before the
//! checkpoint may be the wrong ones).
//!
//! Format: a header (`cas-mirror-partial 1\n`, the SHA-256, the size as
//! u64 LE), then blocks, each `u32 LE length, body, BLAKE3(body)`; a body
//! is the SHA-256 state ([`Sha256Hasher::to_state`], which counts the
//! bytes up to the checkpoint) and the chunks (hash, u32 LE length) since
//! the previous checkpoint. Blocks are appended (`O_APPEND`), so a record
//! costs one write per checkpoint, however large the file. Reading stops
//! at the first torn or damaged block, and skips a block that does not
//! start where the chain read so far ends (another mirror of the same file
//! appending at once: the content is the same, so any block that starts
//! there is right). A run that starts or resumes a file writes its record
//! anew (aside, then renamed over), so appends never follow a torn block.
//! A record that cannot be read or written costs only downloads: it is a
//! warning, never an error. Records left alone for [`STALE`] (a file the
//! upstream no longer lists, a mirror given up) are removed by the next
//! mirror.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use cas_protocol::chunking::MAX_CHUNK;
use cas_protocol::{ChunkHash, ChunkInfo, Sha256, Sha256Hasher};

use crate::digest::Checkpoint;

const MAGIC: &[u8] = b"cas-mirror-partial 1\n";
const HEADER_LEN: usize = MAGIC.len() + 32 + 8;
const CHUNK_LEN: usize = 32 + 4;
/// The most chunks a block holds (a checkpoint's piece is at most a 16 MiB
/// segment, of chunks of 16 KiB at least; more is damage).
const MAX_BLOCK_CHUNKS: usize = 1 << 16;

/// A record not written to for this long is removed ([`sweep`]).
pub const STALE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Removes the records (and files left aside by a killed
/// [`Partial::start`]) in `dir` not modified for `age`.
pub fn sweep(dir: &Path, age: std::time::Duration) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|a| a >= age));
        if old {
            if let Err(err) = fs::remove_file(e.path()) {
                tracing::warn!("cannot remove {}: {err}", e.path().display());
            }
        }
    }
}

/// The resume record of one file.
#[derive(Debug, Clone)]
pub struct Partial {
    path: PathBuf,
    sha256: Sha256,
    size: u64,
}

fn block(at: &Checkpoint) -> Vec<u8> {
    let mut body = Vec::with_capacity(Sha256Hasher::STATE_LEN + at.chunks.len() * CHUNK_LEN);
    body.extend_from_slice(&at.sha.to_state());
    for c in &at.chunks {
        body.extend_from_slice(c.hash.as_bytes());
        body.extend_from_slice(&c.len.to_le_bytes());
    }
    let mut out = Vec::with_capacity(4 + body.len() + 32);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(blake3::hash(&body).as_bytes());
    out
}

/// The checkpoint of a block's body, or `None` when it is damaged.
fn parse_body(body: &[u8]) -> Option<Checkpoint> {
    let (state, chunks) = body.split_at_checked(Sha256Hasher::STATE_LEN)?;
    let sha = Sha256Hasher::from_state(state).ok()?;
    if chunks.len() % CHUNK_LEN != 0 {
        return None;
    }
    let chunks = chunks
        .chunks_exact(CHUNK_LEN)
        .map(|c| {
            let len = u32::from_le_bytes(c[32..].try_into().expect("4 bytes"));
            let hash = ChunkHash::from_bytes(c[..32].try_into().expect("32 bytes"));
            (1..=MAX_CHUNK as u32)
                .contains(&len)
                .then_some(ChunkInfo { hash, len })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Checkpoint { chunks, sha })
}

impl Partial {
    /// The record of the file with this listed SHA-256 and size, in `dir`.
    pub fn new(dir: &Path, sha256: Sha256, size: u64) -> Self {
        Self {
            path: dir.join(sha256.to_hex()),
            sha256,
            size,
        }
    }

    fn header(&self) -> Vec<u8> {
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(self.sha256.as_bytes());
        h.extend_from_slice(&self.size.to_le_bytes());
        h
    }

    /// The last checkpoint recorded, with every chunk before it; `None`
    /// without a record, or with one that is of another file or damaged
    /// before its first checkpoint.
    pub fn load(&self) -> Option<Checkpoint> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!("cannot read {}: {e}", self.path.display());
                return None;
            }
        };
        if bytes.get(..HEADER_LEN) != Some(&self.header()[..]) {
            tracing::warn!(
                "{} is not a resume record of this file; downloading it whole",
                self.path.display()
            );
            return None;
        }
        let mut rest = &bytes[HEADER_LEN..];
        let mut chain = Checkpoint {
            chunks: Vec::new(),
            sha: Sha256Hasher::new(),
        };
        while let Some((len, tail)) = rest.split_first_chunk::<4>() {
            let len = u32::from_le_bytes(*len) as usize;
            let Some((body, tail)) = tail.split_at_checked(len) else {
                break;
            };
            let Some((sum, tail)) = tail.split_first_chunk::<32>() else {
                break;
            };
            if blake3::hash(body).as_bytes() != sum {
                break;
            }
            rest = tail;
            let Some(at) = parse_body(body) else {
                break;
            };
            if at.chunks.len() > MAX_BLOCK_CHUNKS {
                break;
            }
            let covered: u64 = at.chunks.iter().map(|c| u64::from(c.len)).sum();
            // Another writer's block that does not continue this chain.
            if at.offset().checked_sub(covered) != Some(chain.offset()) || at.offset() > self.size {
                continue;
            }
            chain.chunks.extend(at.chunks);
            chain.sha = at.sha;
        }
        (chain.offset() > 0).then_some(chain)
    }

    /// Writes the record anew: the header and, when resuming, `from` as
    /// one block (aside, then renamed over whatever was there).
    pub fn start(&self, from: Option<&Checkpoint>) {
        let aside = self
            .path
            .with_extension(format!("{}.tmp", std::process::id()));
        let written = (|| {
            if let Some(dir) = self.path.parent() {
                fs::create_dir_all(dir)?;
            }
            let mut bytes = self.header();
            if let Some(f) = from {
                bytes.extend_from_slice(&block(f));
            }
            fs::write(&aside, bytes)?;
            fs::rename(&aside, &self.path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&aside);
            tracing::warn!(
                "cannot write the resume record {}: {e}",
                self.path.display()
            );
        }
    }

    /// Appends a checkpoint whose chunks are stored (one write).
    pub fn append(&self, at: &Checkpoint) {
        let written = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(&block(at)));
        if let Err(e) = written {
            tracing::warn!(
                "cannot append to the resume record {}: {e}",
                self.path.display()
            );
        }
    }

    /// Removes the record (the file is committed, or its bytes were wrong).
    pub fn remove(&self) {
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove {}: {e}", self.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` chunks of 20,000 bytes each after `from`, as the chunker would
    /// report them.
    fn next(from: &Checkpoint, data: &[u8], n: usize) -> Checkpoint {
        let start = from.offset() as usize;
        let mut sha = from.sha.clone();
        let chunks = (0..n)
            .map(|k| {
                let c = &data[start + k * 20_000..start + (k + 1) * 20_000];
                sha.update(c);
                ChunkInfo {
                    hash: ChunkHash::of(c),
                    len: 20_000,
                }
            })
            .collect();
        Checkpoint { chunks, sha }
    }

    fn data() -> Vec<u8> {
        (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn record() -> (tempfile::TempDir, Partial, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let data = data();
        let p = Partial::new(
            &dir.path().join("mirror-partial"),
            Sha256::of(&data),
            data.len() as u64,
        );
        (dir, p, data)
    }

    fn origin() -> Checkpoint {
        Checkpoint {
            chunks: Vec::new(),
            sha: Sha256Hasher::new(),
        }
    }

    /// Checkpoints appended come back as one: all chunks, the last state.
    #[test]
    fn checkpoints_chain_into_one() {
        let (_d, p, data) = record();
        assert!(p.load().is_none(), "no record yet");
        p.start(None);
        assert!(p.load().is_none(), "no checkpoint yet");
        let a = next(&origin(), &data, 3);
        let b = next(&a, &data, 2);
        p.append(&a);
        p.append(&b);
        let got = p.load().unwrap();
        assert_eq!(got.offset(), 100_000);
        assert_eq!(got.chunks.len(), 5);
        assert_eq!(got.chunks[..3], a.chunks[..]);
        assert_eq!(got.chunks[3..], b.chunks[..]);
        let mut sha = got.sha.clone();
        sha.update(&data[100_000..]);
        assert_eq!(sha.finalize(), Sha256::of(&data));

        // Resumed: written anew as one block, appended to again.
        p.start(Some(&got));
        assert_eq!(p.load().unwrap().chunks, got.chunks);
        p.append(&next(&got, &data, 1));
        let more = p.load().unwrap();
        assert_eq!((more.offset(), more.chunks.len()), (120_000, 6));
        p.remove();
        assert!(p.load().is_none());
        p.remove();
    }

    /// A block cut short (a kill while appending) or damaged ends the
    /// record there; garbage, another file's header and another size are
    /// not records.
    #[test]
    fn torn_damaged_and_foreign_records_are_ignored() {
        let (_d, p, data) = record();
        p.start(None);
        let a = next(&origin(), &data, 3);
        let b = next(&a, &data, 2);
        p.append(&a);
        p.append(&b);
        let whole = fs::read(&p.path).unwrap();
        for cut in [whole.len() - 1, whole.len() - 40, HEADER_LEN + 10] {
            fs::write(&p.path, &whole[..cut]).unwrap();
            let got = p.load().map(|c| c.offset());
            let want = (cut > HEADER_LEN + 10).then_some(60_000);
            assert_eq!(got, want, "cut at {cut}");
        }
        let mut flipped = whole.clone();
        let at = whole.len() - 100;
        flipped[at] ^= 1;
        fs::write(&p.path, &flipped).unwrap();
        assert_eq!(p.load().unwrap().offset(), 60_000, "the damaged block");

        fs::write(&p.path, &whole).unwrap();
        let other = Partial {
            size: p.size + 1,
            ..p.clone()
        };
        assert!(other.load().is_none(), "another size");
        fs::write(&p.path, b"garbage").unwrap();
        assert!(p.load().is_none());
    }

    /// Records untouched for the given age go; younger ones stay.
    #[test]
    fn stale_records_are_swept() {
        let (_d, p, _) = record();
        p.start(None);
        let dir = p.path.parent().unwrap();
        sweep(dir, STALE);
        assert!(p.path.exists());
        std::thread::sleep(std::time::Duration::from_millis(20));
        sweep(dir, std::time::Duration::from_millis(10));
        assert!(!p.path.exists());
        sweep(&dir.join("none"), STALE);
    }

    /// Two mirrors of one file appending at once: blocks that do not
    /// continue the chain are skipped, never joined into a wrong prefix.
    #[test]
    fn interleaved_writers_never_mix() {
        let (_d, p, data) = record();
        p.start(None);
        let a1 = next(&origin(), &data, 3);
        let a2 = next(&a1, &data, 3);
        // The other writer resumed at a1 and cut its pieces differently.
        let b2 = next(&a1, &data, 1);
        let b3 = next(&b2, &data, 4);
        for at in [&a1, &b2, &a2, &b3] {
            p.append(at);
        }
        let got = p.load().unwrap();
        // a1, b2 (continues a1), then a2 starts at a1's end: skipped;
        // b3 continues b2.
        assert_eq!(got.offset(), 160_000);
        let mut sha = got.sha;
        sha.update(&data[160_000..]);
        assert_eq!(sha.finalize(), Sha256::of(&data));
        let want: Vec<ChunkInfo> = [&a1, &b2, &b3]
            .iter()
            .flat_map(|c| c.chunks.clone())
            .collect();
        assert_eq!(got.chunks, want);
    }
}
