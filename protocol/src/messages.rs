//! Query messages: the dedup query and its answer, and the reconstruction
//! answer that tells a client which xorb byte ranges rebuild a file.

use serde::{Deserialize, Serialize};

use crate::codec::impl_message;
use crate::hash::{ChunkHash, FileHash, Kind, RangeHash, Sha256, XorbHash};
use crate::range::{ByteRange, ChunkRange};
use crate::xorb::MAX_XORB_CHUNKS;

/// Most chunk hashes in one dedup query.
pub const MAX_DEDUP_BATCH: usize = 16 * 1024;
/// Largest encoded reconstruction answer.
pub const MAX_RECONSTRUCTION_BYTES: usize = 128 * 1024 * 1024;
/// Most files one batched reconstruction query names.
pub const MAX_BATCH_FILES: usize = 1024;
/// A batched reconstruction answer stops adding files once its encoding
/// passes this size (it always holds at least one file), so a client
/// reading a tree of small files never holds a huge answer.
pub const BATCH_ANSWER_TARGET: usize = 8 * 1024 * 1024;
/// Largest encoded batched answer: the target plus one whole answer.
pub const MAX_BATCH_ANSWER_BYTES: usize = BATCH_ANSWER_TARGET + MAX_RECONSTRUCTION_BYTES;
/// Longest fetch URL.
pub const MAX_URL_LEN: usize = 8 * 1024;

/// Most SHA-256s one lookup of stored files names (`POST /v1/sha256`).
pub const MAX_SHA256_LOOKUP: usize = 1024;

/// "Which stored files have these SHA-256s?" (`POST /v1/sha256`, JSON): a
/// downloader asks before it fetches a file whose SHA-256 it knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sha256Query {
    pub sha256: Vec<Sha256>,
}

/// A stored regular file, found by its SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    pub hash: FileHash,
    pub size: u64,
}

/// One answer per queried SHA-256, in query order; `None`: no readable
/// file has it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sha256Answer {
    pub files: Vec<Option<StoredFile>>,
}

/// "Which of these chunks do you have?"
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
pub struct DedupQuery {
    pub chunks: Vec<ChunkHash>,
}

/// Where a stored chunk lives: enough to reference it in a file recipe.
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
pub struct ChunkLocation {
    pub xorb: XorbHash,
    pub index: u32,
}

/// One answer per queried hash, in query order; `None` means "send it".
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
pub struct DedupAnswer {
    pub found: Vec<Option<ChunkLocation>>,
}

const DEDUP_MAX_BYTES: usize = 16 + MAX_DEDUP_BATCH * 40;
impl_message!(DedupQuery, "dedup query", b"CDDQ", DEDUP_MAX_BYTES);
impl_message!(DedupAnswer, "dedup answer", b"CDDA", DEDUP_MAX_BYTES);

impl DedupQuery {
    fn check(&self) -> Result<(), String> {
        if self.chunks.len() > MAX_DEDUP_BATCH {
            return Err(format!(
                "{} hashes, at most {MAX_DEDUP_BATCH}",
                self.chunks.len()
            ));
        }
        Ok(())
    }
}

impl DedupAnswer {
    fn check(&self) -> Result<(), String> {
        if self.found.len() > MAX_DEDUP_BATCH {
            return Err(format!(
                "{} answers, at most {MAX_DEDUP_BATCH}",
                self.found.len()
            ));
        }
        match self
            .found
            .iter()
            .flatten()
            .find(|l| l.index as usize >= MAX_XORB_CHUNKS)
        {
            Some(l) => Err(format!("chunk index {} out of range", l.index)),
            None => Ok(()),
        }
    }
}

/// One term of a reconstruction: chunks of a xorb, their uncompressed
/// length, and the hash a client checks those chunks against.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
pub struct ReconstructionTerm {
    pub xorb: XorbHash,
    pub chunks: ChunkRange,
    pub len: u64,
    pub range_hash: RangeHash,
}

/// A byte range of a xorb URL that holds the frames of `chunks`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
pub struct FetchRange {
    pub chunks: ChunkRange,
    pub bytes: ByteRange,
}

/// Where to GET one xorb's frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct XorbFetch {
    pub xorb: XorbHash,
    pub url: String,
    pub ranges: Vec<FetchRange>,
}

/// The answer to "how do I rebuild bytes `range` of `file`": the terms to
/// concatenate (skipping `offset_into_first_term` bytes of the first, and
/// stopping after `range.len()` bytes), and where to fetch their frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct Reconstruction {
    pub file: FileHash,
    pub file_size: u64,
    pub range: ByteRange,
    pub offset_into_first_term: u64,
    pub terms: Vec<ReconstructionTerm>,
    pub fetch: Vec<XorbFetch>,
}

impl_message!(
    Reconstruction,
    "reconstruction",
    b"CREC",
    MAX_RECONSTRUCTION_BYTES
);

impl Reconstruction {
    fn check(&self) -> Result<(), String> {
        if self.range.end < self.range.start || self.range.end > self.file_size {
            return Err(format!(
                "range {}..{} outside a file of {} bytes",
                self.range.start, self.range.end, self.file_size
            ));
        }
        let mut total = 0u64;
        for (i, t) in self.terms.iter().enumerate() {
            if t.chunks.is_empty() || t.len == 0 || t.chunks.end as usize > MAX_XORB_CHUNKS {
                return Err(format!("term {i} is empty or out of range"));
            }
            total = total.checked_add(t.len).ok_or("term lengths overflow")?;
            if self.fetch_range(t).is_none() {
                return Err(format!("term {i}: no fetch range covers its chunks"));
            }
        }
        let needed = self.offset_into_first_term.checked_add(self.range.len());
        if needed.is_none_or(|n| n > total)
            || self
                .terms
                .first()
                .is_some_and(|t| self.offset_into_first_term >= t.len)
        {
            return Err("terms do not cover the requested range".into());
        }
        for f in &self.fetch {
            if f.url.is_empty() || f.url.len() > MAX_URL_LEN {
                return Err(format!(
                    "xorb {}: URL length {} out of range",
                    f.xorb,
                    f.url.len()
                ));
            }
            if f.ranges
                .iter()
                .any(|r| r.chunks.is_empty() || r.bytes.is_empty())
            {
                return Err(format!("xorb {}: empty fetch range", f.xorb));
            }
        }
        Ok(())
    }

    /// The fetch entry and range that cover `term`'s chunks.
    pub fn fetch_range(&self, term: &ReconstructionTerm) -> Option<(&XorbFetch, &FetchRange)> {
        self.fetch
            .iter()
            .filter(|f| f.xorb == term.xorb)
            .find_map(|f| {
                f.ranges
                    .iter()
                    .find(|r| {
                        r.chunks.start <= term.chunks.start && term.chunks.end <= r.chunks.end
                    })
                    .map(|r| (f, r))
            })
    }
}

/// "How do I rebuild each of these whole files?": one request for many
/// files of a tree.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
pub struct ReconstructionQuery {
    pub files: Vec<FileHash>,
}

/// One file of a batched answer: what `GET /v1/files/{hash}` says of it
/// (its kind and SHA-256; its size is the reconstruction's `file_size`)
/// and the reconstruction of all of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct FileReconstruction {
    pub kind: Kind,
    pub sha256: Sha256,
    pub reconstruction: Reconstruction,
}

/// The answer to a [`ReconstructionQuery`]: the first files of the query,
/// in its order, as many as fit [`BATCH_ANSWER_TARGET`] (at least one); a
/// client asks again for the rest.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
pub struct ReconstructionBatch {
    pub files: Vec<FileReconstruction>,
}

impl_message!(
    ReconstructionQuery,
    "reconstruction query",
    b"CRQB",
    64 + MAX_BATCH_FILES * 70
);
impl_message!(
    ReconstructionBatch,
    "reconstruction batch",
    b"CRCB",
    MAX_BATCH_ANSWER_BYTES
);

impl ReconstructionQuery {
    fn check(&self) -> Result<(), String> {
        if self.files.is_empty() || self.files.len() > MAX_BATCH_FILES {
            return Err(format!(
                "{} files, 1 to {MAX_BATCH_FILES} allowed",
                self.files.len()
            ));
        }
        Ok(())
    }
}

impl ReconstructionBatch {
    fn check(&self) -> Result<(), String> {
        if self.files.len() > MAX_BATCH_FILES {
            return Err(format!(
                "{} files, at most {MAX_BATCH_FILES}",
                self.files.len()
            ));
        }
        for f in &self.files {
            let r = &f.reconstruction;
            if r.range.start != 0 || r.range.end != r.file_size {
                return Err(format!("file {}: not a whole-file reconstruction", r.file));
            }
            r.check().map_err(|e| format!("file {}: {e}", r.file))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Message, MessageError};

    fn sample() -> Reconstruction {
        let xorb = XorbHash::from_bytes([7; 32]);
        Reconstruction {
            file: FileHash::from_bytes([1; 32]),
            file_size: 300,
            range: ByteRange {
                start: 50,
                end: 250,
            },
            offset_into_first_term: 50,
            terms: vec![
                ReconstructionTerm {
                    xorb,
                    chunks: ChunkRange { start: 0, end: 2 },
                    len: 200,
                    range_hash: RangeHash::from_bytes([2; 32]),
                },
                ReconstructionTerm {
                    xorb,
                    chunks: ChunkRange { start: 3, end: 4 },
                    len: 100,
                    range_hash: RangeHash::from_bytes([3; 32]),
                },
            ],
            fetch: vec![XorbFetch {
                xorb,
                url: format!("http://127.0.0.1:8080/v1/xorbs/{xorb}"),
                ranges: vec![FetchRange {
                    chunks: ChunkRange { start: 0, end: 4 },
                    bytes: ByteRange {
                        start: 176,
                        end: 400,
                    },
                }],
            }],
        }
    }

    #[test]
    fn reconstruction_round_trip_and_checks() {
        let r = sample();
        assert_eq!(Reconstruction::from_bytes(&r.to_bytes()).unwrap(), r);
        assert_eq!(
            Reconstruction::from_json(r.to_json().as_bytes()).unwrap(),
            r
        );
        let mut bad = r.clone();
        bad.fetch[0].ranges[0].chunks.end = 3;
        assert!(matches!(
            Reconstruction::from_bytes(&bad.to_bytes()),
            Err(MessageError::Invalid { .. })
        ));
        let mut bad = r.clone();
        bad.range.end = 301;
        assert!(Reconstruction::from_bytes(&bad.to_bytes()).is_err());
        let mut bad = r.clone();
        bad.offset_into_first_term = 200;
        assert!(Reconstruction::from_bytes(&bad.to_bytes()).is_err());
    }

    #[test]
    fn dedup_round_trip_and_limits() {
        let q = DedupQuery {
            chunks: vec![ChunkHash::of(b"a"), ChunkHash::of(b"b")],
        };
        assert_eq!(DedupQuery::from_bytes(&q.to_bytes()).unwrap(), q);
        let a = DedupAnswer {
            found: vec![
                None,
                Some(ChunkLocation {
                    xorb: XorbHash::from_bytes([9; 32]),
                    index: 3,
                }),
            ],
        };
        assert_eq!(DedupAnswer::from_json(a.to_json().as_bytes()).unwrap(), a);
        let big = DedupQuery {
            chunks: vec![ChunkHash::of(b"a"); MAX_DEDUP_BATCH + 1],
        };
        assert!(DedupQuery::from_bytes(&big.to_bytes()).is_err());
        assert!(matches!(
            DedupQuery::from_bytes(&Shard::default().to_bytes()),
            Err(MessageError::WrongTag { .. })
        ));
    }

    #[test]
    fn batch_round_trip_and_checks() {
        let mut whole = sample();
        whole.range = ByteRange { start: 0, end: 300 };
        whole.offset_into_first_term = 0;
        let b = ReconstructionBatch {
            files: vec![FileReconstruction {
                kind: Kind::File,
                sha256: Sha256::from_bytes([4; 32]),
                reconstruction: whole,
            }],
        };
        assert_eq!(ReconstructionBatch::from_bytes(&b.to_bytes()).unwrap(), b);
        assert_eq!(
            ReconstructionBatch::from_json(b.to_json().as_bytes()).unwrap(),
            b
        );
        // Each file must be whole and sound.
        let mut part = b.clone();
        part.files[0].reconstruction = sample();
        assert!(ReconstructionBatch::from_bytes(&part.to_bytes()).is_err());
        let mut bad = b.clone();
        bad.files[0].reconstruction.fetch[0].ranges[0].chunks.end = 3;
        assert!(ReconstructionBatch::from_bytes(&bad.to_bytes()).is_err());

        let q = ReconstructionQuery {
            files: vec![FileHash::from_bytes([1; 32]); 3],
        };
        assert_eq!(ReconstructionQuery::from_bytes(&q.to_bytes()).unwrap(), q);
        for n in [0, MAX_BATCH_FILES + 1] {
            let q = ReconstructionQuery {
                files: vec![FileHash::from_bytes([1; 32]); n],
            };
            assert!(ReconstructionQuery::from_json(q.to_json().as_bytes()).is_err());
        }
    }

    use crate::shard::Shard;
}
