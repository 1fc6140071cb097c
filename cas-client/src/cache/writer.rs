//! Entries being written: a temp file under `tmp/`, renamed into place
//! whole.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cas_protocol::{ChunkRange, XorbHash};

use super::{entry_name, ChunkCache};
use crate::error::{Error, Result};

impl ChunkCache {
    /// Starts a new entry for `chunks` of `xorb`, written to a temp file;
    /// `None` when the cache is not (or no longer) writable.
    pub fn writer(&self, xorb: &XorbHash, chunks: ChunkRange) -> Option<EntryWriter> {
        if !self.is_writable() {
            return None;
        }
        let (tmp, file) = tempfile_in(&self.root.join("tmp"))
            .map_err(|e| self.write_failed(&e))
            .ok()?;
        let dir = self.xorb_dir(xorb);
        Some(EntryWriter {
            file: Some(file),
            tmp,
            dest: dir.join(entry_name(chunks)),
            dir,
            xorb: *xorb,
            chunks,
            mode: self.file_mode(),
            cache: self.clone(),
        })
    }
}

/// A uniquely named new file in `dir`.
fn tempfile_in(dir: &Path) -> Result<(PathBuf, File)> {
    loop {
        let path = dir.join(format!(".{:016x}", rand::random::<u64>()));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(dir)(e)),
        }
    }
}

/// An entry being written; it appears under its name only on
/// [`commit`](EntryWriter::commit), and the temp file goes away on drop.
/// Writing it never fails its caller: a failure drops the entry and turns
/// the cache's writing off.
#[derive(Debug)]
pub struct EntryWriter {
    /// `None` once committed or failed.
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    dir: PathBuf,
    xorb: XorbHash,
    chunks: ChunkRange,
    mode: u32,
    cache: ChunkCache,
}

impl EntryWriter {
    pub fn write(&mut self, bytes: &[u8]) {
        if let Some(file) = &mut self.file {
            if let Err(e) = file.write_all(bytes) {
                self.abandon(Error::io(&self.tmp)(e));
            }
        }
    }

    /// Publishes the entry. Not fsynced: a cache entry lost in a crash is
    /// refetched, and a torn one fails verification and is replaced.
    pub fn commit(mut self) {
        let Some(file) = self.file.take() else {
            return;
        };
        let published = file
            .set_permissions(fs::Permissions::from_mode(self.mode))
            .map_err(Error::io(&self.tmp))
            .and_then(|()| {
                drop(file);
                self.cache.mkdir(&self.dir)
            })
            .and_then(|()| fs::rename(&self.tmp, &self.dest).map_err(Error::io(&self.dest)));
        if let Err(e) = published {
            let _ = fs::remove_file(&self.tmp);
            self.cache.write_failed(&e);
            return;
        }
        if let Some(v) = self
            .cache
            .listings
            .lock()
            .expect("not poisoned")
            .get_mut(&self.xorb)
        {
            v.push(self.chunks);
        }
    }

    /// Drops the entry after a failed write.
    fn abandon(&mut self, e: Error) {
        self.file = None;
        let _ = fs::remove_file(&self.tmp);
        self.cache.write_failed(&e);
    }
}

impl Drop for EntryWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
