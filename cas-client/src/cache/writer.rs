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
    /// Starts a new entry for `chunks` of `xorb`, written to a temp file.
    pub fn writer(&self, xorb: &XorbHash, chunks: ChunkRange) -> Result<EntryWriter> {
        let tmp_dir = self.root.join("tmp");
        let tmp = tempfile_in(&tmp_dir)?;
        let dir = self.xorb_dir(xorb);
        Ok(EntryWriter {
            file: Some(tmp.1),
            tmp: tmp.0,
            dest: dir.join(entry_name(chunks)),
            dir,
            xorb: *xorb,
            chunks,
            mode: self.file_mode(),
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
#[derive(Debug)]
pub struct EntryWriter {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    dir: PathBuf,
    xorb: XorbHash,
    chunks: ChunkRange,
    mode: u32,
}

impl EntryWriter {
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let file = self.file.as_mut().expect("not committed");
        file.write_all(bytes).map_err(Error::io(&self.tmp))
    }

    /// Publishes the entry. Not fsynced: a cache entry lost in a crash is
    /// refetched, and a torn one fails verification and is replaced.
    pub fn commit(mut self, cache: &ChunkCache) -> Result<()> {
        let file = self.file.take().expect("not committed");
        file.set_permissions(fs::Permissions::from_mode(self.mode))
            .map_err(Error::io(&self.tmp))?;
        drop(file);
        cache.mkdir(&self.dir)?;
        fs::rename(&self.tmp, &self.dest).map_err(Error::io(&self.dest))?;
        if let Some(v) = cache
            .listings
            .lock()
            .expect("not poisoned")
            .get_mut(&self.xorb)
        {
            v.push(self.chunks);
        }
        Ok(())
    }
}

impl Drop for EntryWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
