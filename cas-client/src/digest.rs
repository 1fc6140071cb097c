//! Streaming chunk + hash of a file: content-defined chunks with their
//! BLAKE3 hashes (split across cores), the file hash and SHA-256, in one
//! pass over bounded buffers. Upload, fetch verification and
//! `cas-client hash` all use it, so they agree by construction.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cas_protocol::chunking::{chunk_and_hash_parallel, MAX_CHUNK};
use cas_protocol::{ChunkInfo, FileHash, FileHasher, Kind, Sha256, Sha256Hasher};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::progress::{Progress, Stage};

/// Bytes read per step; memory per stream is about twice this.
const SEGMENT: usize = 16 << 20;
/// Segments shorter than this are chunked and digested on the calling
/// thread: handing half of a small file's work to another thread costs
/// more (a wake-up, a context switch) than it saves.
const SPLIT: usize = 1 << 20;
/// Spent segment buffers kept for reuse; a full-size one is only taken
/// back once every piece cut from it has been dropped.
const SPARE_BUFFERS: usize = 4;

/// What hashing a file yields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileDigest {
    pub path: PathBuf,
    pub size: u64,
    pub file_hash: FileHash,
    /// `None` when not asked for ([`HashOptions::sha256`] off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Sha256>,
    pub chunks: usize,
}

/// What `hash_files` computes besides the chunks and the file hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashOptions {
    /// The file's SHA-256 as well (a second pass over every byte, on a core
    /// of its own while the chunking runs).
    pub sha256: bool,
}

impl Default for HashOptions {
    fn default() -> Self {
        Self { sha256: true }
    }
}

/// A point of a file at a chunk boundary, from which chunking and hashing
/// go on without the bytes before it: chunks before it (all of them, or
/// those since the previous checkpoint) and the SHA-256 state after them,
/// which also counts the bytes up to the point ([`Checkpoint::offset`]).
#[derive(Clone)]
pub(crate) struct Checkpoint {
    pub chunks: Vec<ChunkInfo>,
    pub sha: Sha256Hasher,
}

impl Checkpoint {
    pub(crate) fn offset(&self) -> u64 {
        self.sha.len()
    }
}

/// What [`digest_stream`] hands each piece to: its bytes, its chunks and
/// the SHA-256 state after it (when SHA-256 was asked for).
pub(crate) type OnPiece<'a> =
    dyn FnMut(Bytes, Vec<ChunkInfo>, Option<&Sha256Hasher>) -> Result<()> + 'a;

/// Segment buffers of one reader: a segment's allocation is reused once
/// the pieces handed out from it are gone, so a large file is read into a
/// few buffers whose pages are already mapped instead of a fresh 16 MiB
/// allocation (and 4096 page faults) per segment.
#[derive(Default)]
pub(crate) struct Buffers {
    spent: Vec<Bytes>,
}

impl Buffers {
    /// An empty buffer of at least `cap` bytes.
    fn take(&mut self, cap: usize) -> Vec<u8> {
        if cap >= SEGMENT / 2 {
            while let Some(i) = self.spent.iter().position(Bytes::is_unique) {
                if let Ok(b) = self.spent.swap_remove(i).try_into_mut() {
                    let mut v = Vec::from(b);
                    if v.capacity() >= cap {
                        v.clear();
                        return v;
                    }
                }
            }
        }
        Vec::with_capacity(cap)
    }

    /// Keeps a full-size segment buffer for [`Buffers::take`].
    fn give(&mut self, data: Bytes) {
        if data.len() >= SEGMENT / 2 {
            if self.spent.len() == SPARE_BUFFERS {
                self.spent.remove(0);
            }
            self.spent.push(data);
        }
    }
}

/// Reads `src` to the end in segments. Each segment is chunked on all
/// cores while SHA-256 (when asked for) runs over its bytes; all chunks
/// but the last (whose end may not be a cut point yet) go to `on_piece`
/// with their bytes and the SHA-256 state after them, and the last is
/// carried into the next segment.
///
/// With `from`, `src` holds the bytes after that checkpoint (chunking
/// restarts cleanly at a cut point): the digest is the whole file's.
///
/// `size_hint` (the expected length) sizes the buffers: pieces keep their
/// segment's allocation alive until they are packed, so a small file must
/// not sit in a 16 MiB buffer. `kind` selects the hash (a tree listing
/// hashes apart from a file with the same bytes).
#[allow(clippy::too_many_arguments)]
pub(crate) fn digest_stream(
    path: &Path,
    src: &mut dyn Read,
    size_hint: u64,
    kind: Kind,
    options: HashOptions,
    from: Option<&Checkpoint>,
    buffers: &mut Buffers,
    progress: &dyn Progress,
    on_piece: &mut OnPiece<'_>,
) -> Result<FileDigest> {
    let mut carry: Vec<u8> = Vec::new();
    let mut file_hash = FileHasher::new(kind);
    let (mut sha, mut size, mut count) = match from {
        Some(f) => {
            f.chunks.iter().for_each(|c| file_hash.push(c));
            (Some(f.sha.clone()), f.offset(), f.chunks.len())
        }
        None => (options.sha256.then(Sha256Hasher::new), 0, 0),
    };
    loop {
        let left = size_hint.saturating_sub(size).min(SEGMENT as u64) as usize;
        // One byte more than expected, so reaching the end needs no regrowth.
        let mut buf = buffers.take(carry.len() + left + 1);
        buf.extend_from_slice(&carry);
        let start = buf.len();
        src.take(SEGMENT as u64)
            .read_to_end(&mut buf)
            .map_err(Error::io(path))?;
        if buf.capacity() > 2 * buf.len() {
            buf.shrink_to_fit();
        }
        let filled = buf.len();
        let eof = filled < start + SEGMENT;
        size += (filled - start) as u64;
        progress.advance(Stage::Hash, (filled - start) as u64);
        // SHA-256 covers the bytes up to the last cut point (the carried
        // bytes are hashed with the next segment), so its state goes with
        // each piece: all but the last chunk's most bytes beside the
        // chunking, the rest of the piece once the cut is known.
        let early = if eof {
            filled
        } else {
            filled.saturating_sub(MAX_CHUNK)
        };
        let mut chunks = match &mut sha {
            Some(sha) if buf.len() >= SPLIT => {
                rayon::join(
                    || chunk_and_hash_parallel(&buf),
                    || sha.update(&buf[..early]),
                )
                .0
            }
            Some(sha) => {
                sha.update(&buf[..early]);
                chunk_and_hash_parallel(&buf)
            }
            None => chunk_and_hash_parallel(&buf),
        };
        let data = Bytes::from(buf);
        let cut = if eof {
            data.len()
        } else {
            let last = chunks.pop().expect("a segment holds several chunks");
            data.len() - last.len as usize
        };
        if let Some(sha) = &mut sha {
            sha.update(&data[early..cut]);
        }
        carry.clear();
        carry.extend_from_slice(&data[cut..]);
        chunks.iter().for_each(|c| file_hash.push(c));
        count += chunks.len();
        if !chunks.is_empty() {
            on_piece(data.slice(..cut), chunks, sha.as_ref())?;
        }
        buffers.give(data);
        if eof {
            return Ok(FileDigest {
                path: path.to_owned(),
                size,
                file_hash: file_hash.finish(),
                sha256: sha.map(Sha256Hasher::finalize),
                chunks: count,
            });
        }
    }
}

/// Chunks and hashes one regular file with all cores, in bounded memory,
/// reporting bytes read as [`Stage::Hash`].
pub fn hash_file(path: &Path, progress: &dyn Progress) -> Result<FileDigest> {
    hash_file_as(path, Kind::File, progress)
}

/// As [`hash_file`], hashing the file as a `kind` (a tree's listing has a
/// hash of its own).
pub(crate) fn hash_file_as(path: &Path, kind: Kind, progress: &dyn Progress) -> Result<FileDigest> {
    hash_with(path, kind, HashOptions::default(), progress)
}

/// Chunks and hashes files, several at once (one per core, and a large
/// file's chunking split over idle cores); results in the order of
/// `paths`, one per path.
pub fn hash_files(
    paths: &[PathBuf],
    options: HashOptions,
    progress: &dyn Progress,
) -> Vec<Result<FileDigest>> {
    paths
        .par_iter()
        .map(|p| hash_with(p, Kind::File, options, progress))
        .collect()
}

fn hash_with(
    path: &Path,
    kind: Kind,
    options: HashOptions,
    progress: &dyn Progress,
) -> Result<FileDigest> {
    let mut file = File::open(path).map_err(Error::io(path))?;
    let meta = file.metadata().map_err(Error::io(path))?;
    if !meta.is_file() {
        return Err(Error::Input {
            path: path.to_owned(),
            reason: "not a regular file".into(),
        });
    }
    digest_stream(
        path,
        &mut file,
        meta.len(),
        kind,
        options,
        None,
        &mut Buffers::default(),
        progress,
        &mut |_, _, _| Ok(()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use cas_protocol::chunking::chunk_and_hash;

    /// Segment boundaries must not move cut points: the streamed digest
    /// equals the one-shot chunking of the whole input.
    #[test]
    fn streaming_matches_one_shot() {
        let data: Vec<u8> = (0..(SEGMENT * 2 + 12_345) as u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
            .collect();
        let mut pieces = Vec::new();
        let d = digest_stream(
            Path::new("x"),
            &mut &data[..],
            0,
            Kind::File,
            HashOptions::default(),
            None,
            &mut Buffers::default(),
            &NoProgress,
            &mut |b, c, sha| {
                pieces.push((b, c, sha.cloned().unwrap()));
                Ok(())
            },
        )
        .unwrap();
        let expected = chunk_and_hash(&data);
        let streamed: Vec<ChunkInfo> = pieces.iter().flat_map(|p| p.1.clone()).collect();
        assert_eq!(streamed, expected);
        let joined: Vec<u8> = pieces.iter().flat_map(|p| p.0.to_vec()).collect();
        assert_eq!(joined, data);
        assert_eq!(d.file_hash, FileHash::from_chunks(&expected));
        assert_eq!(d.sha256, Some(Sha256::of(&data)));
        assert_eq!((d.size, d.chunks), (data.len() as u64, expected.len()));

        // Each piece ends at a cut point with the SHA-256 state of the
        // bytes before it; chunking the rest from there (what a resumed
        // mirror does) gives the same chunks, file hash and SHA-256.
        let mut before = Vec::new();
        for (_, chunks, sha) in &pieces {
            before.extend_from_slice(chunks);
            let at = sha.len() as usize;
            assert_eq!(sha.clone().finalize(), Sha256::of(&data[..at]));
            let from = Checkpoint {
                chunks: before.clone(),
                sha: sha.clone(),
            };
            let mut after = Vec::new();
            let r = digest_stream(
                Path::new("x"),
                &mut &data[at..],
                data.len() as u64,
                Kind::File,
                HashOptions::default(),
                Some(&from),
                &mut Buffers::default(),
                &NoProgress,
                &mut |_, c, _| {
                    after.extend(c);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(r, d, "resumed at {at}");
            assert_eq!(after[..], expected[before.len()..], "resumed at {at}");
        }
    }
}
