//! Shards: the metadata half of an upload. After its xorbs, a client sends
//! one shard holding the chunk tables of the xorbs it uploaded and the
//! recipes of the files it registers; the server commits it atomically.

use serde::{Deserialize, Serialize};

use crate::chunking::MAX_CHUNK;
use crate::codec::impl_message;
use crate::hash::{ChunkInfo, FileHash, FileHasher, Kind, Sha256, XorbHash};
use crate::range::ChunkRange;
use crate::xorb::{check_chunk_list, MAX_XORB_CHUNKS};

/// Largest encoded shard.
pub const MAX_SHARD_BYTES: usize = 128 * 1024 * 1024;
/// Most files one shard registers.
pub const MAX_SHARD_FILES: usize = 1 << 20;

/// One piece of a file: chunks `[chunks.start, chunks.end)` of `xorb`, which
/// hold `len` uncompressed bytes.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    bincode::Encode,
    bincode::Decode,
)]
pub struct Term {
    pub xorb: XorbHash,
    pub chunks: ChunkRange,
    pub len: u64,
}

/// How to rebuild one file: its terms in order, plus its identities and
/// what it is (the hash was computed for that kind, see [`Kind`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct FileRecipe {
    pub hash: FileHash,
    pub sha256: Sha256,
    pub size: u64,
    pub terms: Vec<Term>,
    pub kind: Kind,
}

/// The chunk table of one xorb, in xorb order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct XorbChunkTable {
    pub hash: XorbHash,
    pub chunks: Vec<ChunkInfo>,
}

/// Upload metadata committed as one unit.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
pub struct Shard {
    pub xorbs: Vec<XorbChunkTable>,
    pub files: Vec<FileRecipe>,
}

// Version 2: recipes record their kind (file or tree).
impl_message!(Shard, "shard", b"CSHD", MAX_SHARD_BYTES, version 2);

impl From<&crate::xorb::BuiltXorb> for XorbChunkTable {
    fn from(x: &crate::xorb::BuiltXorb) -> Self {
        Self {
            hash: x.hash,
            chunks: x.chunks.clone(),
        }
    }
}

/// Why a recipe does not match the chunks it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecipeError {
    #[error("term {term}: xorb {xorb} is unknown")]
    UnknownXorb { term: usize, xorb: XorbHash },
    #[error("term {term}: chunks {start}..{end} outside xorb {xorb} of {count} chunks")]
    RangeOutside {
        term: usize,
        xorb: XorbHash,
        start: u32,
        end: u32,
        count: usize,
    },
    #[error("term {term}: declares {declared} bytes, its chunks hold {actual}")]
    TermLength {
        term: usize,
        declared: u64,
        actual: u64,
    },
    #[error("file hash is {actual}, recipe says {declared}")]
    FileHash {
        declared: FileHash,
        actual: FileHash,
    },
}

impl XorbChunkTable {
    fn check(&self) -> Result<(), String> {
        check_chunk_list(&self.chunks).map_err(|e| format!("xorb {}: {e}", self.hash))?;
        let actual = XorbHash::from_chunks(&self.chunks);
        if actual != self.hash {
            return Err(format!("xorb table hashes to {actual}, not {}", self.hash));
        }
        Ok(())
    }
}

impl FileRecipe {
    fn check(&self) -> Result<(), String> {
        let mut total = 0u64;
        for (i, t) in self.terms.iter().enumerate() {
            if t.chunks.is_empty() || t.len == 0 {
                return Err(format!("file {}: term {i} is empty", self.hash));
            }
            if t.chunks.end as usize > MAX_XORB_CHUNKS {
                return Err(format!(
                    "file {}: term {i} reaches past chunk {MAX_XORB_CHUNKS}",
                    self.hash
                ));
            }
            if t.len > u64::from(t.chunks.len()) * MAX_CHUNK as u64 {
                return Err(format!(
                    "file {}: term {i} is longer than its chunks can be",
                    self.hash
                ));
            }
            total = total.checked_add(t.len).ok_or("file size overflows")?;
        }
        if total != self.size {
            return Err(format!(
                "file {}: terms hold {total} bytes, size says {}",
                self.hash, self.size
            ));
        }
        Ok(())
    }

    /// Recomputes the file hash (for the recipe's kind) from the chunk
    /// tables of the xorbs the terms name (`table` looks one up) and checks
    /// every term's length on the way.
    pub fn verify<'t>(
        &self,
        mut table: impl FnMut(&XorbHash) -> Option<&'t [ChunkInfo]>,
    ) -> Result<(), RecipeError> {
        let mut hasher = FileHasher::new(self.kind);
        for (term, t) in self.terms.iter().enumerate() {
            let chunks = table(&t.xorb).ok_or(RecipeError::UnknownXorb { term, xorb: t.xorb })?;
            let run = chunks
                .get(t.chunks.as_usize())
                .filter(|_| !t.chunks.is_empty())
                .ok_or(RecipeError::RangeOutside {
                    term,
                    xorb: t.xorb,
                    start: t.chunks.start,
                    end: t.chunks.end,
                    count: chunks.len(),
                })?;
            let actual: u64 = run.iter().map(|c| u64::from(c.len)).sum();
            if actual != t.len {
                return Err(RecipeError::TermLength {
                    term,
                    declared: t.len,
                    actual,
                });
            }
            run.iter().for_each(|c| hasher.push(c));
        }
        let actual = hasher.finish();
        if actual != self.hash {
            return Err(RecipeError::FileHash {
                declared: self.hash,
                actual,
            });
        }
        Ok(())
    }
}

impl Shard {
    /// Every xorb the shard names, in its chunk tables and in its recipes'
    /// terms (repeats included): what must be stored before it commits.
    pub fn named_xorbs(&self) -> impl Iterator<Item = XorbHash> + '_ {
        self.xorbs.iter().map(|t| t.hash).chain(
            self.files
                .iter()
                .flat_map(|f| f.terms.iter().map(|t| t.xorb)),
        )
    }

    fn check(&self) -> Result<(), String> {
        if self.files.len() > MAX_SHARD_FILES {
            return Err(format!(
                "{} files, at most {MAX_SHARD_FILES}",
                self.files.len()
            ));
        }
        self.xorbs.iter().try_for_each(XorbChunkTable::check)?;
        self.files.iter().try_for_each(FileRecipe::check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Message, MessageError};
    use crate::hash::ChunkHash;

    pub(crate) fn sample() -> (Shard, Vec<ChunkInfo>) {
        let chunks: Vec<ChunkInfo> = (0..4u32)
            .map(|i| ChunkInfo {
                hash: ChunkHash::of(&i.to_le_bytes()),
                len: 1000 + i,
            })
            .collect();
        let xorb = XorbHash::from_chunks(&chunks);
        let file_chunks = [chunks[1], chunks[2], chunks[0]];
        let recipe = FileRecipe {
            hash: FileHash::from_chunks(&file_chunks),
            sha256: Sha256::of(b"not checked here"),
            size: 1001 + 1002 + 1000,
            terms: vec![
                Term {
                    xorb,
                    chunks: ChunkRange { start: 1, end: 3 },
                    len: 2003,
                },
                Term {
                    xorb,
                    chunks: ChunkRange { start: 0, end: 1 },
                    len: 1000,
                },
            ],
            kind: Kind::File,
        };
        (
            Shard {
                xorbs: vec![XorbChunkTable {
                    hash: xorb,
                    chunks: chunks.clone(),
                }],
                files: vec![recipe],
            },
            chunks,
        )
    }

    #[test]
    fn round_trips_in_both_forms() {
        let (s, _) = sample();
        assert_eq!(Shard::from_bytes(&s.to_bytes()).unwrap(), s);
        assert_eq!(Shard::from_json(s.to_json().as_bytes()).unwrap(), s);
        assert!(s.to_json().contains("\"version\":2"));
        assert!(s.to_json().contains("\"kind\":\"file\""));
    }

    #[test]
    fn recipe_verification() {
        let (s, chunks) = sample();
        let xorb = s.xorbs[0].hash;
        let lookup = |h: &XorbHash| (*h == xorb).then_some(&chunks[..]);
        s.files[0].verify(lookup).unwrap();
        // The kind is part of the hash: the same chunks as a tree are
        // another hash, and a recipe cannot claim the other kind.
        let mut tree = s.files[0].clone();
        tree.kind = Kind::Tree;
        assert!(matches!(
            tree.verify(lookup),
            Err(RecipeError::FileHash { .. })
        ));
        tree.hash = FileHash::of_kind(Kind::Tree, [&chunks[1], &chunks[2], &chunks[0]]);
        assert_ne!(tree.hash, s.files[0].hash);
        tree.verify(lookup).unwrap();
        let mut bad = s.files[0].clone();
        bad.terms.swap(0, 1);
        assert!(matches!(
            bad.verify(lookup),
            Err(RecipeError::FileHash { .. })
        ));
        let mut bad = s.files[0].clone();
        bad.terms[1].chunks.end = 5;
        assert!(matches!(
            bad.verify(lookup),
            Err(RecipeError::RangeOutside { .. })
        ));
        let mut bad = s.files[0].clone();
        bad.terms[1].len = 999;
        assert!(matches!(
            bad.verify(lookup),
            Err(RecipeError::TermLength { .. })
        ));
        assert!(matches!(
            s.files[0].verify(|_| None),
            Err(RecipeError::UnknownXorb { .. })
        ));
    }

    #[test]
    fn semantic_checks_reject_bad_shards() {
        let (s, _) = sample();
        let mut bad = s.clone();
        bad.files[0].size += 1;
        assert!(matches!(
            Shard::from_bytes(&bad.to_bytes()),
            Err(MessageError::Invalid { .. })
        ));
        let mut bad = s.clone();
        bad.xorbs[0].chunks[0].len += 1;
        assert!(matches!(
            Shard::from_bytes(&bad.to_bytes()),
            Err(MessageError::Invalid { .. })
        ));
        let mut bad = s.clone();
        bad.files[0].terms[0].chunks = ChunkRange { start: 2, end: 2 };
        assert!(matches!(
            Shard::from_bytes(&bad.to_bytes()),
            Err(MessageError::Invalid { .. })
        ));
        let mut bytes = s.to_bytes();
        // Version 1 recipes had no kind: refused, not guessed.
        bytes[4] = 1;
        assert!(matches!(
            Shard::from_bytes(&bytes),
            Err(MessageError::UnsupportedVersion { found: 1, .. })
        ));
        bytes[4] = 2;
        bytes.push(0);
        assert!(matches!(
            Shard::from_bytes(&bytes),
            Err(MessageError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn hostile_lengths_are_refused_before_allocation() {
        // Tag, version, then a varint claiming 2^64-1 xorb tables.
        let mut bytes = b"CSHD".to_vec();
        bytes.extend_from_slice(&2u32.to_le_bytes());
        bytes.push(253);
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Shard::from_bytes(&bytes),
            Err(MessageError::Malformed { .. })
        ));
    }
}
