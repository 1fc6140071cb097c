//! An in-memory index for tests of the core.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use cas_protocol::messages::ChunkLocation;
use cas_protocol::shard::FileRecipe;
use cas_protocol::{ChunkHash, FileHash, Kind, Sha256, XorbHash};

use super::{Index, IndexError, Totals, XorbRecord, XorbSummary};

#[derive(Debug, Default)]
pub struct MemIndex {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    xorbs: HashMap<XorbHash, XorbRecord>,
    chunks: HashMap<ChunkHash, ChunkLocation>,
    files: HashMap<FileHash, FileRecipe>,
    by_sha256: HashMap<Sha256, FileHash>,
    damaged: HashSet<XorbHash>,
}

impl MemIndex {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }
}

impl State {
    /// Removes the chunk entries that point at `hash`.
    fn withdraw(&mut self, hash: &XorbHash) {
        let Some(record) = self.xorbs.get(hash) else {
            return;
        };
        for e in &record.entries {
            if self
                .chunks
                .get(&e.info.hash)
                .is_some_and(|l| l.xorb == *hash)
            {
                self.chunks.remove(&e.info.hash);
            }
        }
    }
}

impl Index for MemIndex {
    fn xorb(&self, hash: &XorbHash) -> Result<Option<XorbRecord>, IndexError> {
        Ok(self.state().xorbs.get(hash).cloned())
    }

    fn chunk(&self, hash: &ChunkHash) -> Result<Option<ChunkLocation>, IndexError> {
        Ok(self.state().chunks.get(hash).copied())
    }

    fn file(&self, hash: &FileHash) -> Result<Option<FileRecipe>, IndexError> {
        Ok(self.state().files.get(hash).cloned())
    }

    fn add_xorb(&self, hash: &XorbHash, record: &XorbRecord) -> Result<(), IndexError> {
        let mut s = self.state();
        for (i, e) in record.entries.iter().enumerate() {
            let location = ChunkLocation {
                xorb: *hash,
                index: i as u32,
            };
            s.chunks.insert(e.info.hash, location);
        }
        s.xorbs.insert(*hash, record.clone());
        s.damaged.remove(hash);
        Ok(())
    }

    fn mark_damaged(&self, hash: &XorbHash) -> Result<bool, IndexError> {
        let mut s = self.state();
        if !s.xorbs.contains_key(hash) || !s.damaged.insert(*hash) {
            return Ok(false);
        }
        s.withdraw(hash);
        Ok(true)
    }

    fn is_damaged(&self, hash: &XorbHash) -> Result<bool, IndexError> {
        Ok(self.state().damaged.contains(hash))
    }

    fn add_files(&self, files: &[FileRecipe]) -> Result<(), IndexError> {
        let mut s = self.state();
        for f in files {
            s.files.insert(f.hash, f.clone());
            if f.kind == Kind::File {
                s.by_sha256.insert(f.sha256, f.hash);
            }
        }
        Ok(())
    }

    fn file_by_sha256(&self, sha256: &Sha256) -> Result<Option<FileHash>, IndexError> {
        Ok(self.state().by_sha256.get(sha256).copied())
    }

    fn totals(&self) -> Result<Totals, IndexError> {
        let s = self.state();
        Ok(Totals {
            xorbs: s.xorbs.len() as u64,
            xorb_bytes: s.xorbs.values().map(XorbRecord::object_len).sum(),
            files: s.files.len() as u64,
        })
    }

    fn xorbs(&self) -> Result<Vec<XorbSummary>, IndexError> {
        let s = self.state();
        Ok(s.xorbs
            .iter()
            .map(|(h, r)| XorbSummary::of(*h, r))
            .collect())
    }

    fn file_hashes(&self) -> Result<Vec<FileHash>, IndexError> {
        Ok(self.state().files.keys().copied().collect())
    }

    fn withdraw_xorb(&self, hash: &XorbHash) -> Result<(), IndexError> {
        self.state().withdraw(hash);
        Ok(())
    }

    fn remove(&self, files: &[FileHash], xorbs: &[XorbHash]) -> Result<(), IndexError> {
        let mut s = self.state();
        for f in files {
            s.files.remove(f);
        }
        for x in xorbs {
            s.withdraw(x);
            s.xorbs.remove(x);
            s.damaged.remove(x);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conforms() {
        super::super::conformance::run(&super::MemIndex::default());
    }
}
