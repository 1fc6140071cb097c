//! The RocksDB index. Keys are a one-byte namespace plus a 32-byte hash:
//! - `x` + xorb hash  -> the xorb's header (magic, version, count, index
//!   entries: exactly the bytes at the start of the xorb object);
//! - `c` + chunk hash -> xorb hash (32) || chunk index (u32 LE);
//! - `f` + file hash  -> the recipe, encoded as a one-file shard message;
//! - `d` + xorb hash  -> empty: the xorb is damaged (missing or corrupt);
//! - `s` + SHA-256    -> file hash of the regular file with those bytes.

use std::path::Path;

use cas_protocol::messages::ChunkLocation;
use cas_protocol::shard::{FileRecipe, Shard};
use cas_protocol::xorb::parse_header;
use cas_protocol::{ChunkHash, FileHash, Kind, Message, Sha256, XorbHash};

use super::{Index, IndexError, Totals, XorbRecord, XorbSummary};

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

    /// Adds to `batch` the deletion of the chunk entries that point at
    /// `hash` (none if it is not recorded).
    fn withdraw_into(
        &self,
        batch: &mut rocksdb::WriteBatch,
        hash: &XorbHash,
    ) -> Result<(), IndexError> {
        let Some(record) = self.xorb(hash)? else {
            return Ok(());
        };
        for e in &record.entries {
            if self.chunk(&e.info.hash)?.is_some_and(|l| l.xorb == *hash) {
                batch.delete(key(b'c', e.info.hash.as_bytes()));
            }
        }
        Ok(())
    }

    /// Calls `f` with every key (without its namespace byte) and value of
    /// namespace `ns`, in key order.
    fn scan(
        &self,
        ns: u8,
        mut f: impl FnMut(&[u8; 32], &[u8]) -> Result<(), IndexError>,
    ) -> Result<(), IndexError> {
        let mode = rocksdb::IteratorMode::From(&[ns], rocksdb::Direction::Forward);
        for item in self.db.iterator(mode) {
            let (k, v) = item?;
            if k.first() != Some(&ns) {
                break;
            }
            let hash: &[u8; 32] = k[1..].try_into().map_err(|_| IndexError::CorruptChunk)?;
            f(hash, &v)?;
        }
        Ok(())
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
        batch.delete(key(b'd', hash.as_bytes()));
        self.write(batch)
    }

    fn mark_damaged(&self, hash: &XorbHash) -> Result<bool, IndexError> {
        if self.is_damaged(hash)? || self.xorb(hash)?.is_none() {
            return Ok(false);
        }
        let mut batch = rocksdb::WriteBatch::default();
        self.withdraw_into(&mut batch, hash)?;
        batch.put(key(b'd', hash.as_bytes()), []);
        self.write(batch)?;
        Ok(true)
    }

    fn is_damaged(&self, hash: &XorbHash) -> Result<bool, IndexError> {
        Ok(self.db.get_pinned(key(b'd', hash.as_bytes()))?.is_some())
    }

    fn add_files(&self, files: &[FileRecipe]) -> Result<(), IndexError> {
        let mut batch = rocksdb::WriteBatch::default();
        for f in files {
            batch.put(key(b'f', f.hash.as_bytes()), recipe_value(f));
            if f.kind == Kind::File {
                batch.put(key(b's', f.sha256.as_bytes()), f.hash.as_bytes());
            }
        }
        self.write(batch)
    }

    fn file_by_sha256(&self, sha256: &Sha256) -> Result<Option<FileHash>, IndexError> {
        let Some(v) = self.db.get_pinned(key(b's', sha256.as_bytes()))? else {
            return Ok(None);
        };
        let bytes: [u8; 32] = v[..].try_into().map_err(|_| IndexError::CorruptSha256)?;
        Ok(Some(FileHash::from_bytes(bytes)))
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

    fn xorbs(&self) -> Result<Vec<XorbSummary>, IndexError> {
        let mut out = Vec::new();
        self.scan(b'x', |h, v| {
            let record = XorbRecord {
                entries: parse_header(v)?,
            };
            out.push(XorbSummary::of(XorbHash::from_bytes(*h), &record));
            Ok(())
        })?;
        Ok(out)
    }

    fn file_hashes(&self) -> Result<Vec<FileHash>, IndexError> {
        let mut out = Vec::new();
        self.scan(b'f', |h, _| {
            out.push(FileHash::from_bytes(*h));
            Ok(())
        })?;
        Ok(out)
    }

    fn withdraw_xorb(&self, hash: &XorbHash) -> Result<(), IndexError> {
        let mut batch = rocksdb::WriteBatch::default();
        self.withdraw_into(&mut batch, hash)?;
        self.write(batch)
    }

    fn remove(&self, files: &[FileHash], xorbs: &[XorbHash]) -> Result<(), IndexError> {
        let mut batch = rocksdb::WriteBatch::default();
        for f in files {
            batch.delete(key(b'f', f.as_bytes()));
        }
        for x in xorbs {
            self.withdraw_into(&mut batch, x)?;
            batch.delete(key(b'x', x.as_bytes()));
            batch.delete(key(b'd', x.as_bytes()));
        }
        self.write(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conforms_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let written = {
            let idx = RocksIndex::open(dir.path()).unwrap();
            super::super::conformance::run(&idx)
        };
        let idx = RocksIndex::open(dir.path()).unwrap();
        super::super::conformance::check_written(&idx, &written);
    }
}
