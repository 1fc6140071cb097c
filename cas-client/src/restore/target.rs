//! What already stands where a fetched file goes, judged before anything
//! is downloaded: checked, never assumed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cas_protocol::{FileHash, Kind};

use super::workdir::WorkDir;
use crate::digest::hash_file_as;
use crate::error::{Error, Result};
use crate::progress::NoProgress;

/// A place a fetched file goes, with the permission bits a tree gives it.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub path: PathBuf,
    pub mode: Option<u32>,
}

impl Target {
    /// The directory the target is renamed into: what is synced to make
    /// the rename durable.
    pub fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        }
    }
}

/// What is at a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Found {
    Absent,
    /// A regular file with exactly the fetched content.
    Same,
    /// A regular file with other content.
    Differs,
}

/// Compares what is at `path` with a file of `size` bytes and hash
/// `hash`: a different size is different; a file this work directory
/// placed and that has not changed since (same inode, size, mtime, ctime)
/// is the same; anything else is hashed. Symlinks and non-files are
/// errors: they are never replaced.
pub(super) fn examine(
    work: &WorkDir,
    path: &Path,
    size: u64,
    hash: FileHash,
    kind: Kind,
) -> Result<Found> {
    let meta = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Absent),
        Err(e) => return Err(Error::io(path)(e)),
        Ok(m) => m,
    };
    let refuse = |reason: &str| Error::Input {
        path: path.to_owned(),
        reason: reason.into(),
    };
    if meta.file_type().is_symlink() {
        return Err(refuse("is a symlink; refusing to write through it"));
    }
    if !meta.is_file() {
        return Err(refuse(
            "exists and is not a regular file; refusing to replace it",
        ));
    }
    if meta.len() != size {
        return Ok(Found::Differs);
    }
    if work.placed(hash, &meta) || hash_file_as(path, kind, &NoProgress)?.file_hash == hash {
        Ok(Found::Same)
    } else {
        Ok(Found::Differs)
    }
}

/// What to do about a target: `Ok(true)` to write it, `Ok(false)` to keep
/// it; a different file without `force` is an error naming it. A kept
/// file gets the tree's permission bits.
pub(super) fn decide(found: Found, target: &Target, force: bool) -> Result<bool> {
    match found {
        Found::Absent => Ok(true),
        Found::Differs if force => Ok(true),
        Found::Differs => Err(Error::Exists(target.path.clone())),
        Found::Same => {
            if let Some(mode) = target.mode {
                let p = &target.path;
                let now = fs::metadata(p).map_err(Error::io(p))?.permissions().mode();
                if now & 0o777 != mode & 0o777 {
                    fs::set_permissions(p, fs::Permissions::from_mode(mode & 0o777))
                        .map_err(Error::io(p))?;
                }
            }
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_files_are_checked_not_assumed() {
        let dir = tempfile::tempdir().unwrap();
        let work = WorkDir::acquire(&dir.path().join(".cas-fetch\\t"), || {}).unwrap();
        let data = b"the content";
        let hash = FileHash::from_chunks(&cas_protocol::chunking::chunk_and_hash(data));
        let f = dir.path().join("f");
        let size = data.len() as u64;
        assert_eq!(
            examine(&work, &f, size, hash, Kind::File).unwrap(),
            Found::Absent
        );
        fs::write(&f, data).unwrap();
        assert_eq!(
            examine(&work, &f, size, hash, Kind::File).unwrap(),
            Found::Same
        );
        assert_eq!(
            examine(&work, &f, size + 1, hash, Kind::File).unwrap(),
            Found::Differs
        );
        fs::write(&f, b"the CONTENT").unwrap();
        assert_eq!(
            examine(&work, &f, size, hash, Kind::File).unwrap(),
            Found::Differs
        );
        // A record of this work directory vouches for an unchanged file
        // (here one that does not hash right: the record is trusted).
        work.record(hash, &fs::metadata(&f).unwrap()).unwrap();
        drop(work);
        let work = WorkDir::acquire(&dir.path().join(".cas-fetch\\t"), || {}).unwrap();
        assert_eq!(
            examine(&work, &f, size, hash, Kind::File).unwrap(),
            Found::Same
        );

        std::os::unix::fs::symlink(&f, dir.path().join("l")).unwrap();
        assert!(examine(&work, &dir.path().join("l"), size, hash, Kind::File).is_err());
        assert!(examine(&work, dir.path(), size, hash, Kind::File).is_err());

        let t = |mode| Target {
            path: f.clone(),
            mode,
        };
        assert!(decide(Found::Absent, &t(None), false).unwrap());
        assert!(decide(Found::Differs, &t(None), true).unwrap());
        assert!(matches!(
            decide(Found::Differs, &t(None), false),
            Err(Error::Exists(_))
        ));
        assert!(!decide(Found::Same, &t(Some(0o600)), false).unwrap());
        let mode = fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
