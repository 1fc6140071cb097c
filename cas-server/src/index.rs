//! The index: which xorbs, chunks and files the store holds. RocksDB is the
//! implementation; with objects as the source of truth it is a rebuildable
//! cache of what the xorb headers and shards say.
//!
//! Keys are a one-byte namespace plus a 32-byte hash:
//! - `x` + xorb hash  -> the xorb's header (magic, version, count, index
//!   entries: exactly the bytes at the start of the xorb object);
//! - `c` + chunk hash -> xorb hash (32) || chunk index (u32 LE);
//! - `f` + file hash  -> the recipe, encoded as a one-file shard message.

use std::path::Path;

use cas_protocol::messages::ChunkLocation;
use cas_protocol::shard::{FileRecipe, Shard};
use cas_protocol::xorb::{encode_header, parse_header, serialized_len, IndexEntry, XorbError};
use cas_protocol::{ChunkHash, FileHash, Message, MessageError, XorbHash};

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

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        encode_header(&self.entries, &mut v);
        v
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
    /// Records a stored xorb and makes its chunks visible to dedup, atomically.
    fn add_xorb(&self, hash: &XorbHash, record: &XorbRecord) -> Result<(), IndexError>;
    /// Records files, all or none.
    fn add_files(&self, files: &[FileRecipe]) -> Result<(), IndexError>;
    /// Counts, by a full scan (used once at start).
    fn totals(&self) -> Result<Totals, IndexError>;
}

/// RocksDB index; writes are synced (WAL fsync) before they return.
pub struct RocksIndex {
    db: rocksdb::DB,
}

fn key(ns: u8, hash: &[u8; 32]) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = ns;
    k[1..].copy_from_slice(hash);
    k
}

fn recipe_value(recipe: &FileRecipe) -> Vec<u8> {
    Shard {
        xorbs: vec![],
        files: vec![recipe.clone()],
    }
    .to_bytes()
}

impl RocksIndex {
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        Ok(Self {
            db: rocksdb::DB::open(&opts, path)?,
        })
    }

    fn write(&self, batch: rocksdb::WriteBatch) -> Result<(), IndexError> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        Ok(self.db.write_opt(batch, &wo)?)
    }
}

impl Index for RocksIndex {
    fn xorb(&self, hash: &XorbHash) -> Result<Option<XorbRecord>, IndexError> {
        match self.db.get_pinned(key(b'x', hash.as_bytes()))? {
            None => Ok(None),
            Some(v) => Ok(Some(XorbRecord {
                entries: parse_header(&v)?,
            })),
        }
    }

    fn chunk(&self, hash: &ChunkHash) -> Result<Option<ChunkLocation>, IndexError> {
        let Some(v) = self.db.get_pinned(key(b'c', hash.as_bytes()))? else {
            return Ok(None);
        };
        if v.len() != 36 {
            return Err(IndexError::CorruptChunk);
        }
        Ok(Some(ChunkLocation {
            xorb: XorbHash::from_bytes(v[..32].try_into().expect("32 bytes")),
            index: u32::from_le_bytes(v[32..].try_into().expect("4 bytes")),
        }))
    }

    fn file(&self, hash: &FileHash) -> Result<Option<FileRecipe>, IndexError> {
        let Some(v) = self.db.get_pinned(key(b'f', hash.as_bytes()))? else {
            return Ok(None);
        };
        let shard = Shard::from_bytes(&v)?;
        Ok(shard.files.into_iter().next())
    }

    fn add_xorb(&self, hash: &XorbHash, record: &XorbRecord) -> Result<(), IndexError> {
        let mut batch = rocksdb::WriteBatch::default();
        for (i, e) in record.entries.iter().enumerate() {
            let mut v = [0u8; 36];
            v[..32].copy_from_slice(hash.as_bytes());
            v[32..].copy_from_slice(&(i as u32).to_le_bytes());
            batch.put(key(b'c', e.info.hash.as_bytes()), v);
        }
        batch.put(key(b'x', hash.as_bytes()), record.encode());
        self.write(batch)
    }

    fn add_files(&self, files: &[FileRecipe]) -> Result<(), IndexError> {
        let mut batch = rocksdb::WriteBatch::default();
        for f in files {
            batch.put(key(b'f', f.hash.as_bytes()), recipe_value(f));
        }
        self.write(batch)
    }

    fn totals(&self) -> Result<Totals, IndexError> {
        let mut t = Totals::default();
        for item in self.db.iterator(rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            match k.first() {
                Some(b'x') => {
                    t.xorbs += 1;
                    t.xorb_bytes += XorbRecord {
                        entries: parse_header(&v)?,
                    }
                    .object_len();
                }
                Some(b'f') => t.files += 1,
                _ => {}
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cas_protocol::shard::Term;
    use cas_protocol::xorb::{Compression, EncodedChunk, XorbBuilder};
    use cas_protocol::{ChunkRange, Sha256};

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = XorbBuilder::new();
        for d in [&b"one"[..], b"two"] {
            b.try_push(EncodedChunk::encode(d, Compression::Raw).unwrap())
                .unwrap();
        }
        let x = b.finish().unwrap();
        let record = XorbRecord {
            entries: cas_protocol::xorb::XorbView::parse(&x.bytes)
                .unwrap()
                .entries()
                .to_vec(),
        };
        assert_eq!(record.object_len(), x.bytes.len() as u64);
        let recipe = FileRecipe {
            hash: FileHash::from_chunks(&x.chunks),
            sha256: Sha256::of(b"onetwo"),
            size: 6,
            terms: vec![Term {
                xorb: x.hash,
                chunks: ChunkRange { start: 0, end: 2 },
                len: 6,
            }],
        };
        {
            let idx = RocksIndex::open(dir.path()).unwrap();
            idx.add_xorb(&x.hash, &record).unwrap();
            idx.add_files(std::slice::from_ref(&recipe)).unwrap();
        }
        let idx = RocksIndex::open(dir.path()).unwrap();
        assert_eq!(idx.xorb(&x.hash).unwrap(), Some(record));
        assert_eq!(
            idx.chunk(&x.chunks[1].hash).unwrap(),
            Some(ChunkLocation {
                xorb: x.hash,
                index: 1
            })
        );
        assert_eq!(idx.file(&recipe.hash).unwrap(), Some(recipe));
        assert_eq!(idx.chunk(&ChunkHash::of(b"absent")).unwrap(), None);
        assert_eq!(
            idx.totals().unwrap(),
            Totals {
                xorbs: 1,
                xorb_bytes: x.bytes.len() as u64,
                files: 1
            }
        );
    }
}
