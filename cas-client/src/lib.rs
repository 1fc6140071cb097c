//! The CAS client as a library. So far: local chunking and hashing of files
//! (`cas-client hash`); upload and fetch arrive with the client issue.

use std::fs::File;
use std::path::{Path, PathBuf};

use cas_protocol::chunking::chunk_and_hash_parallel;
use cas_protocol::{FileHash, Sha256, Sha256Hasher};
use serde::Serialize;

/// What hashing a file yields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileDigest {
    pub path: PathBuf,
    pub size: u64,
    pub file_hash: FileHash,
    pub sha256: Sha256,
    pub chunks: usize,
}

/// Errors of the local operations.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a regular file")]
    NotAFile(PathBuf),
}

/// Chunks and hashes one file with all cores: the chunk chain is split
/// across threads while SHA-256 runs beside it.
pub fn hash_file(path: &Path) -> Result<FileDigest, HashError> {
    let io = |source| HashError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(HashError::NotAFile(path.to_owned()));
    }
    // SAFETY: the map is only read, through a shared slice. A file truncated
    // or rewritten by another process while we hash it is the one hazard
    // (as for every mmap-based reader); we accept it for zero-copy hashing.
    let map = if meta.len() == 0 {
        None
    } else {
        Some(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
    };
    let data: &[u8] = map.as_deref().unwrap_or(&[]);
    let (chunks, sha256) = rayon::join(
        || chunk_and_hash_parallel(data),
        || {
            let mut h = Sha256Hasher::new();
            h.update(data);
            h.finalize()
        },
    );
    Ok(FileDigest {
        path: path.to_owned(),
        size: data.len() as u64,
        file_hash: FileHash::from_chunks(&chunks),
        sha256,
        chunks: chunks.len(),
    })
}
