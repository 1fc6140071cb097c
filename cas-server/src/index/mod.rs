//! The index: which xorbs, chunks and files the store holds. RocksDB is the
//! implementation a server runs ([`RocksIndex`]); [`MemIndex`] serves unit
//! tests of the core. With objects as the source of truth the index is a
//! rebuildable cache of what the xorb headers and shards say. Every
//! implementation passes [`conformance::run`].

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
#[cfg(any(test, feature = "test-util"))]
mod mem;
mod rocks;

use cas_protocol::messages::ChunkLocation;
use cas_protocol::shard::FileRecipe;
use cas_protocol::xorb::{encode_header, serialized_len, IndexEntry, XorbError};
use cas_protocol::{ChunkHash, FileHash, MessageError, Sha256, XorbHash};

#[cfg(any(test, feature = "test-util"))]
pub use mem::MemIndex;
pub use rocks::RocksIndex;

/// Index failures: storage errors, or stored values that no longer parse.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index storage: {0}")]
    Storage(#[from] rocksdb::Error),
    #[error("corrupt index entry for xorb: {0}")]
    CorruptXorb(#[from] XorbError),
    #[error("corrupt index entry for file: {0}")]
    CorruptFile(#[from] MessageError),
    #[error("corrupt chunk entry")]
    CorruptChunk,
    #[error("corrupt SHA-256 entry")]
    CorruptSha256,
}

/// A stored xorb as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XorbRecord {
    pub entries: Vec<IndexEntry>,
}

impl XorbRecord {
    /// Serialized length of the xorb object.
    pub fn object_len(&self) -> u64 {
        serialized_len(&self.entries)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        encode_header(&self.entries, &mut v);
        v
    }
}

/// A recorded xorb in a listing ([`Index::xorbs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XorbSummary {
    pub hash: XorbHash,
    /// Serialized length of the object.
    pub bytes: u64,
    pub chunks: u32,
}

impl XorbSummary {
    pub(crate) fn of(hash: XorbHash, record: &XorbRecord) -> Self {
        Self {
            hash,
            bytes: record.object_len(),
            chunks: record.entries.len() as u32,
        }
    }
}

/// Totals for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub xorbs: u64,
    pub xorb_bytes: u64,
    pub files: u64,
}

/// The index operations the storage core needs. Calls block; the core runs
/// them off the async threads.
pub trait Index: Send + Sync + 'static {
    fn xorb(&self, hash: &XorbHash) -> Result<Option<XorbRecord>, IndexError>;
    fn chunk(&self, hash: &ChunkHash) -> Result<Option<ChunkLocation>, IndexError>;
    fn file(&self, hash: &FileHash) -> Result<Option<FileRecipe>, IndexError>;
    /// Records a stored xorb and makes its chunks visible to dedup,
    /// atomically; a damaged mark on it is cleared (its object was
    /// replaced by a verified copy).
    fn add_xorb(&self, hash: &XorbHash, record: &XorbRecord) -> Result<(), IndexError>;
    /// Records files (replacing earlier recipes of the same hashes), all or
    /// none, and makes each regular file ([`cas_protocol::Kind::File`])
    /// findable by its SHA-256 ([`Index::file_by_sha256`]). Which recipes
    /// may be written is the core's decision.
    fn add_files(&self, files: &[FileRecipe]) -> Result<(), IndexError>;
    /// The regular file whose bytes have this SHA-256 (a Git LFS object
    /// id), as recorded by [`Index::add_files`]: rebuildable from the
    /// shards like every other entry.
    fn file_by_sha256(&self, sha256: &Sha256) -> Result<Option<FileHash>, IndexError>;
    /// Marks a recorded xorb damaged (its object is missing or corrupt) and
    /// stops offering its chunks for dedup, atomically. `Ok(false)` when it
    /// is unknown or already marked.
    fn mark_damaged(&self, hash: &XorbHash) -> Result<bool, IndexError>;
    fn is_damaged(&self, hash: &XorbHash) -> Result<bool, IndexError>;
    /// Counts, by a full scan (used once at start).
    fn totals(&self) -> Result<Totals, IndexError>;
    /// Every recorded xorb, by a full scan (garbage collection, fsck).
    fn xorbs(&self) -> Result<Vec<XorbSummary>, IndexError>;
    /// Every recorded file's hash, by a full scan.
    fn file_hashes(&self) -> Result<Vec<FileHash>, IndexError>;
    /// Stops offering a recorded xorb's chunks for dedup (its record
    /// stays; [`Index::add_xorb`] offers them again). Garbage collection
    /// does this to a condemned xorb long before it deletes it.
    fn withdraw_xorb(&self, hash: &XorbHash) -> Result<(), IndexError>;
    /// Forgets files and xorbs (a xorb's record, damaged mark and the
    /// chunk entries that point at it), all or none.
    fn remove(&self, files: &[FileHash], xorbs: &[XorbHash]) -> Result<(), IndexError>;
}
