//! The digest of a fetched file, computed as its verified terms come in.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use cas_protocol::chunking::chunk_and_hash;
use cas_protocol::{ChunkInfo, FileHash, FileHasher, Kind, Sha256, Sha256Hasher};

use crate::error::{Error, Result};

/// File hash (and, when asked, SHA-256) of a fetched file, computed in
/// file order as verified terms come in. The file hash needs only the
/// terms' chunk lists; the SHA-256 reads each term back once (from the
/// page cache) instead of a second pass over the whole file at the end.
/// Terms an earlier run verified come without their chunk list; their
/// bytes are read and chunked again, which yields the same chunks because
/// terms start and end at chunk boundaries.
pub(crate) struct InOrder {
    next: u64,
    waiting: BTreeMap<u64, (u64, Option<Vec<ChunkInfo>>)>,
    file_hash: FileHasher,
    sha: Option<Sha256Hasher>,
    buf: Vec<u8>,
}

impl InOrder {
    /// A digest of a file of `kind` (the kind selects the file hash), with
    /// its SHA-256 if `sha256`.
    pub fn new(kind: Kind, sha256: bool) -> Self {
        Self {
            next: 0,
            waiting: BTreeMap::new(),
            file_hash: FileHasher::new(kind),
            sha: sha256.then(Sha256Hasher::new),
            buf: Vec::new(),
        }
    }

    pub fn add(&mut self, offset: u64, len: u64, chunks: Option<Vec<ChunkInfo>>) {
        self.waiting.insert(offset, (len, chunks));
    }

    /// Hashes every waiting term that continues the hashed prefix.
    pub fn advance(&mut self, file: &fs::File, path: &Path) -> Result<()> {
        const PIECE: u64 = 4 << 20;
        while let Some((len, chunks)) = self.waiting.remove(&self.next) {
            let end = self.next + len;
            // A term to chunk again is read whole (a term lies in one xorb:
            // at most 64 MiB); for the SHA-256 alone, in pieces.
            let step = if chunks.is_some() { PIECE } else { len };
            let mut pos = self.next;
            while pos < end && (chunks.is_none() || self.sha.is_some()) {
                let n = step.min(end - pos) as usize;
                self.buf.resize(n, 0);
                file.read_exact_at(&mut self.buf, pos)
                    .map_err(Error::io(path))?;
                if let Some(sha) = &mut self.sha {
                    sha.update(&self.buf);
                }
                pos += n as u64;
            }
            let chunks = chunks.unwrap_or_else(|| chunk_and_hash(&self.buf));
            chunks.iter().for_each(|c| self.file_hash.push(c));
            self.next = end;
        }
        Ok(())
    }

    /// The digest, if the terms covered exactly `size` bytes.
    pub fn finish(self, size: u64) -> Option<(FileHash, Option<Sha256>)> {
        (self.next == size && self.waiting.is_empty())
            .then(|| (self.file_hash.finish(), self.sha.map(|s| s.finalize())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Terms arriving out of order, some without chunk lists (resumed),
    /// give the digest of the whole file.
    #[test]
    fn in_order_digest_matches_the_file() {
        let data: Vec<u8> = (0..3_000_000u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 57) as u8)
            .collect();
        let chunks = chunk_and_hash(&data);
        assert!(chunks.len() > 10);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, &data).unwrap();
        let file = fs::File::open(&path).unwrap();
        // Terms of 3 chunks each.
        let mut terms = Vec::new();
        let mut offset = 0;
        for group in chunks.chunks(3) {
            let len: u64 = group.iter().map(|c| u64::from(c.len)).sum();
            terms.push((offset, len, group.to_vec()));
            offset += len;
        }
        for sha256 in [true, false] {
            let mut d = InOrder::new(Kind::File, sha256);
            for (i, (offset, len, group)) in terms.iter().enumerate().rev() {
                d.add(*offset, *len, (i % 2 == 0).then(|| group.clone()));
                d.advance(&file, &path).unwrap();
            }
            let want = (
                FileHash::from_chunks(&chunks),
                sha256.then(|| Sha256::of(&data)),
            );
            assert_eq!(d.finish(data.len() as u64), Some(want));
        }
        let mut partial = InOrder::new(Kind::File, true);
        partial.add(0, terms[0].1, None);
        partial.advance(&file, &path).unwrap();
        assert_eq!(partial.finish(data.len() as u64), None);
    }
}
