//! Cross-process fetch locks of xorb ranges: two fetches of the same bytes
//! move them once.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use cas_protocol::{ChunkRange, XorbHash};

use super::{share, ChunkCache};
use crate::error::{Error, Result};

/// Holds the fetch lock (an `flock`) of one xorb range until dropped.
#[derive(Debug)]
pub struct RangeLock {
    _file: File,
    path: PathBuf,
}

impl RangeLock {
    /// Releases the lock and deletes its file once the entry it guarded
    /// is in place, so lock files do not pile up. A process that opened
    /// the file before the unlink still gets its lock, then finds the
    /// entry; one that races the unlink can at worst fetch the range
    /// again, never see a partial entry.
    pub fn release(self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl ChunkCache {
    /// Waits for the cross-process fetch lock of `chunks` of `xorb`.
    pub fn lock(&self, xorb: &XorbHash, chunks: ChunkRange) -> Result<RangeLock> {
        let dir = self.xorb_dir(xorb);
        self.mkdir(&dir)?;
        let path = dir.join(format!("lock.{}-{}", chunks.start, chunks.end));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(self.file_mode())
            .open(&path)
            .or_else(|e| match e.kind() {
                io::ErrorKind::PermissionDenied => File::open(&path),
                _ => Err(e),
            })
            .map_err(Error::io(&path))?;
        if self.shared {
            share(&file);
        }
        file.lock().map_err(Error::io(&path))?;
        Ok(RangeLock { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::xorb;

    #[test]
    fn lock_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let r = ChunkRange { start: 2, end: 9 };
        let held = c.lock(&xorb(3), r).unwrap();
        assert!(c.lookup(&xorb(3), r).is_none(), "a lock is not an entry");
        let path = c.xorb_dir(&xorb(3)).join("lock.2-9");
        let other = File::open(&path).unwrap();
        assert!(other.try_lock().is_err());
        drop(held);
        assert!(other.try_lock().is_ok());
    }
}
