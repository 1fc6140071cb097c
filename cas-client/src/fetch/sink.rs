//! Where verified bytes go: a file at positions, or memory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Where verified bytes go. Positions are relative to the start of the
/// requested range.
pub(crate) trait Sink: Send + Sync {
    fn write_at(&self, pos: u64, data: &[u8]) -> Result<()>;
}

/// Positioned writes into a file (the `.part` of a fetch).
pub(crate) struct FileSink {
    pub file: File,
    pub path: PathBuf,
}

impl Sink for FileSink {
    fn write_at(&self, pos: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, pos)
            .map_err(Error::io(&self.path))
    }
}

/// A range read into memory.
pub(crate) struct MemSink(pub Mutex<Vec<u8>>);

impl Sink for MemSink {
    fn write_at(&self, pos: u64, data: &[u8]) -> Result<()> {
        let mut v = self.0.lock().expect("not poisoned");
        let pos = pos as usize;
        v[pos..pos + data.len()].copy_from_slice(data);
        Ok(())
    }
}
