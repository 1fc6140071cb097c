//! Streaming chunk + hash of a file: content-defined chunks with their
//! BLAKE3 hashes (split across cores), the file hash and SHA-256, in one
//! pass over bounded buffers. Upload, fetch verification and
//! `cas-client hash` all use it, so they agree by construction.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cas_protocol::chunking::chunk_and_hash_parallel;
use cas_protocol::{ChunkInfo, FileHash, FileHasher, Kind, Sha256, Sha256Hasher};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::progress::{Progress, Stage};

/// Bytes read per step; memory per stream is about twice this.
const SEGMENT: usize = 16 << 20;

/// What hashing a file yields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileDigest {
    pub path: PathBuf,
    pub size: u64,
    pub file_hash: FileHash,
    pub sha256: Sha256,
    pub chunks: usize,
}

/// Reads `src` to the end in segments. Each segment is chunked on all
/// cores while SHA-256 runs over its new bytes; all chunks but the last
/// (whose end may not be a cut point yet) go to `on_piece` with their
/// bytes, and the last is carried into the next segment.
///
/// `size_hint` (the expected length) sizes the buffers: pieces keep their
/// segment's allocation alive until they are packed, so a small file must
/// not sit in a 16 MiB buffer. `kind` selects the hash (a tree listing
/// hashes apart from a file with the same bytes).
pub(crate) fn digest_stream(
    path: &Path,
    src: &mut dyn Read,
    size_hint: u64,
    kind: Kind,
    progress: &dyn Progress,
    on_piece: &mut dyn FnMut(Bytes, Vec<ChunkInfo>) -> Result<()>,
) -> Result<FileDigest> {
    let mut carry: Vec<u8> = Vec::new();
    let mut sha = Sha256Hasher::new();
    let mut file_hash = FileHasher::new(kind);
    let (mut size, mut count) = (0u64, 0usize);
    loop {
        let mut buf = std::mem::take(&mut carry);
        let start = buf.len();
        let left = size_hint.saturating_sub(size).min(SEGMENT as u64) as usize;
        // One byte more than expected, so reaching the end needs no regrowth.
        buf.reserve_exact(left + 1);
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
        let (mut chunks, ()) = rayon::join(
            || chunk_and_hash_parallel(&buf),
            || sha.update(&buf[start..]),
        );
        let data = Bytes::from(buf);
        let cut = if eof {
            data.len()
        } else {
            let last = chunks.pop().expect("a segment holds several chunks");
            data.len() - last.len as usize
        };
        carry = data[cut..].to_vec();
        chunks.iter().for_each(|c| file_hash.push(c));
        count += chunks.len();
        if !chunks.is_empty() {
            on_piece(data.slice(..cut), chunks)?;
        }
        if eof {
            return Ok(FileDigest {
                path: path.to_owned(),
                size,
                file_hash: file_hash.finish(),
                sha256: sha.finalize(),
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
    let mut file = File::open(path).map_err(Error::io(path))?;
    let meta = file.metadata().map_err(Error::io(path))?;
    if !meta.is_file() {
        return Err(Error::Input {
            path: path.to_owned(),
            reason: "not a regular file".into(),
        });
    }
    digest_stream(path, &mut file, meta.len(), kind, progress, &mut |_, _| {
        Ok(())
    })
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
            &NoProgress,
            &mut |b, c| {
                pieces.push((b, c));
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
        assert_eq!(d.sha256, Sha256::of(&data));
        assert_eq!((d.size, d.chunks), (data.len() as u64, expected.len()));
    }
}
