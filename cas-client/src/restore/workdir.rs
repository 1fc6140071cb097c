//! The work directory of one destination: everything a fetch writes that
//! is not yet a verified file under its final name lives here, and its
//! lock makes fetches to one destination take turns.
//!
//! Where: a fetch of a file to `DIR/NAME` works in
//! `DIR/.cas-fetch\<16 hex digits of NAME's BLAKE3>`, a fetch of a tree to
//! `DIR` in `DIR/.cas-fetch\tree`. Tree paths cannot hold a backslash, so no
//! tree entry can name a work directory, and the name fits NAME_MAX
//! whatever the destination's. A tree's work directory is inside the
//! destination: on the same filesystem as every file renamed out of it,
//! and writable whenever the destination is, even when that is a mount
//! point or `.`.
//!
//! What: `cas-fetch` (the marker: a directory without it is not ours and
//! is never used or removed), `lock` (the `flock` fetches take turns on),
//! `placed` (a record per file renamed into place), and per file being
//! fetched `<file hash>.part`, `<file hash>.journal` and `<file hash>.copy`.
//!
//! A work directory appears whole (it is built under a temporary name and
//! renamed into place without replacing anything) and goes away whole (it
//! is renamed aside before it is emptied), so another fetch sees either a
//! complete one or none. A fetch that waited for the lock checks that the
//! lock it got is still the directory's: the holder may have removed the
//! directory meanwhile.

use std::collections::HashMap;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cas_protocol::FileHash;
use rustix::fs::{renameat_with, RenameFlags, CWD};

use crate::error::{Error, Result};
use crate::stamp::Stamp;

/// Contents of the marker file.
const MARKER: &[u8] = b"cas-client fetch work directory 1\n";
const MARKER_NAME: &str = "cas-fetch";
const LOCK: &str = "lock";
const PLACED: &str = "placed";
/// Every work directory's name starts with this; tree paths cannot hold
/// its backslash.
const PREFIX: &str = ".cas-fetch\\";

/// What a fetch wrote and locked; see the module docs.
#[derive(Debug)]
pub(crate) struct WorkDir {
    path: PathBuf,
    /// Holds the `flock` for as long as the work directory is in use.
    _lock: File,
    placed: Mutex<File>,
    /// The records of `placed`, by device and inode.
    known: HashMap<(u64, u64), (FileHash, Stamp)>,
}

impl WorkDir {
    /// Where a fetch to `dest` (a tree's directory, or a file) works.
    pub fn path_for(dest: &Path, tree: bool) -> Result<PathBuf> {
        if tree {
            return Ok(dest.join(format!("{PREFIX}tree")));
        }
        let name = dest.file_name().ok_or_else(|| Error::Input {
            path: dest.to_owned(),
            reason: "cannot be the name of a file".into(),
        })?;
        let id = blake3::hash(name.as_encoded_bytes()).to_hex();
        Ok(dest.with_file_name(format!("{PREFIX}{}", &id[..16])))
    }

    /// Opens the work directory at `path`, creating it if there is none,
    /// and takes its lock; `on_wait` is called once if another fetch holds
    /// it (this then blocks until it is released).
    pub fn acquire(path: &Path, mut on_wait: impl FnMut()) -> Result<Self> {
        let mut waited = false;
        loop {
            if !Self::vet(path)? {
                // Ours or another fetch's: looked at again either way.
                Self::create(path)?;
                continue;
            }
            let lock_path = path.join(LOCK);
            let lock = match OpenOptions::new().read(true).write(true).open(&lock_path) {
                Ok(f) => f,
                // Removed by its holder since we looked: look again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&lock_path)(e)),
            };
            match lock.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    if !waited {
                        on_wait();
                        waited = true;
                    }
                    lock.lock().map_err(Error::io(&lock_path))?;
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path)(e)),
            }
            // The holder may have removed the directory while we waited:
            // the lock counts only if it is still the directory's.
            let ours = lock.metadata().map_err(Error::io(&lock_path))?;
            match fs::symlink_metadata(&lock_path) {
                Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => {}
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&lock_path)(e)),
            }
            let placed_path = path.join(PLACED);
            let text = fs::read_to_string(&placed_path).map_err(Error::io(&placed_path))?;
            let placed = OpenOptions::new()
                .append(true)
                .open(&placed_path)
                .map_err(Error::io(&placed_path))?;
            return Ok(Self {
                path: path.to_owned(),
                _lock: lock,
                placed: Mutex::new(placed),
                known: parse_placed(&text),
            });
        }
    }

    /// Whether `path` is one of our work directories (`false`: nothing is
    /// there); anything else there is refused.
    fn vet(path: &Path) -> Result<bool> {
        let not_ours = || Error::Input {
            path: path.to_owned(),
            reason: "exists and is not a cas-client work directory; \
                     refusing to use or remove it"
                .into(),
        };
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(path)(e)),
            Ok(m) if !m.is_dir() => Err(not_ours()),
            Ok(_) => match fs::read(path.join(MARKER_NAME)) {
                Ok(b) if b == MARKER => Ok(true),
                Ok(_) => Err(not_ours()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(not_ours()),
                Err(e) => Err(Error::io(path)(e)),
            },
        }
    }

    /// Builds a work directory under a temporary name and renames it to
    /// `path` unless something is there by then (another fetch's, which
    /// is then used).
    fn create(path: &Path) -> Result<()> {
        let tmp = aside(path);
        fs::create_dir(&tmp).map_err(Error::io(&tmp))?;
        let built = (|| {
            fs::write(tmp.join(MARKER_NAME), MARKER)?;
            File::create(tmp.join(LOCK))?;
            File::create(tmp.join(PLACED))?;
            renameat_with(CWD, &tmp, CWD, path, RenameFlags::NOREPLACE).map_err(io::Error::from)
        })();
        match built {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                match e.kind() {
                    io::ErrorKind::AlreadyExists => Ok(()),
                    _ => Err(Error::io(path)(e)),
                }
            }
        }
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where this fetch keeps a temporary of its own.
    pub fn temp(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Whether `meta` describes a file this work directory renamed into
    /// place with content `hash`, unchanged since.
    pub fn placed(&self, hash: FileHash, meta: &Metadata) -> bool {
        let stamp = Stamp::of(meta);
        self.known.get(&(stamp.dev, stamp.ino)) == Some(&(hash, stamp))
    }

    /// Records that the file `meta` describes, content `hash`, was renamed
    /// into place (after it and its directory were synced). A record lost
    /// in a crash costs a re-hash on the next run, nothing more.
    pub fn record(&self, hash: FileHash, meta: &Metadata) -> Result<()> {
        let line = format!("{hash} {}\n", Stamp::of(meta));
        let mut f = self.placed.lock().expect("not poisoned");
        f.write_all(line.as_bytes())
            .map_err(Error::io(self.path.join(PLACED)))
    }

    /// Removes the work directory once the fetch succeeded. It is renamed
    /// aside first, so no other fetch sees it half-removed.
    pub fn remove(self) -> Result<()> {
        let gone = aside(&self.path);
        renameat_with(CWD, &self.path, CWD, &gone, RenameFlags::NOREPLACE)
            .map_err(|e| Error::io(&self.path)(e.into()))?;
        fs::remove_dir_all(&gone).map_err(Error::io(&gone))
        // The lock goes with `self`, after the directory.
    }

    /// After a failure: removes the work directory if it holds no progress
    /// (a refusal before anything was fetched), keeps it otherwise for the
    /// next run to resume from.
    pub fn close(self) -> Result<()> {
        let progress = fs::read_dir(&self.path)
            .map_err(Error::io(&self.path))?
            .filter_map(|e| e.ok())
            .any(|e| {
                let name = e.file_name();
                match name.to_str() {
                    Some(MARKER_NAME | LOCK) => false,
                    Some(PLACED) => e.metadata().is_ok_and(|m| m.len() > 0),
                    _ => true,
                }
            });
        if progress {
            Ok(())
        } else {
            self.remove()
        }
    }
}

/// A fresh temporary name beside `path`, for building or removing it.
fn aside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{:08x}", rand::random::<u32>()));
    path.with_file_name(name)
}

/// The records of a `placed` file: `<file hash> <stamp>` per line; a torn
/// or damaged line is skipped.
fn parse_placed(text: &str) -> HashMap<(u64, u64), (FileHash, Stamp)> {
    text.lines()
        .filter_map(|l| {
            let (hash, stamp) = l.split_once(' ')?;
            let hash: FileHash = hash.parse().ok()?;
            let stamp: Stamp = stamp.parse().ok()?;
            Some(((stamp.dev, stamp.ino), (hash, stamp)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn acquire(path: &Path) -> WorkDir {
        WorkDir::acquire(path, || panic!("nobody else holds it")).unwrap()
    }

    #[test]
    fn names_fit_and_no_tree_path_can_name_them() {
        let long = "n".repeat(255);
        let dir = tempfile::tempdir().unwrap();
        let file = WorkDir::path_for(&dir.path().join(&long), false).unwrap();
        let name = file.file_name().unwrap().to_str().unwrap();
        assert_eq!(file.parent(), Some(dir.path()));
        assert!(name.len() <= 255 && name.contains('\\'), "{name}");
        assert_ne!(
            file,
            WorkDir::path_for(&dir.path().join("other"), false).unwrap()
        );
        let tree = WorkDir::path_for(dir.path(), true).unwrap();
        assert_eq!(tree.parent(), Some(dir.path()));
        let name = tree.file_name().unwrap().to_str().unwrap();
        assert!(cas_protocol::tree::check_path(name).is_err(), "{name}");
        assert!(WorkDir::path_for(Path::new("/"), false).is_err());
    }

    /// A work directory is created whole, found again, and refused when
    /// what stands at its name is not one.
    #[test]
    fn only_our_own_work_directories_are_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".cas-fetch\\x");
        let w = acquire(&path);
        assert_eq!(fs::read(path.join(MARKER_NAME)).unwrap(), MARKER);
        drop(w);
        acquire(&path).remove().unwrap();
        assert!(!path.exists());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing aside"
        );

        fs::write(&path, b"someone's").unwrap();
        let e = WorkDir::acquire(&path, || {}).unwrap_err().to_string();
        assert!(e.contains("not a cas-client work directory"), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"someone's");
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        fs::write(path.join(LOCK), b"theirs").unwrap();
        assert!(WorkDir::acquire(&path, || {}).is_err());
        assert_eq!(fs::read(path.join(LOCK)).unwrap(), b"theirs");
    }

    /// A fetch waiting for the lock while the holder removes the work
    /// directory ends up holding the lock of a live work directory, not
    /// the removed one's.
    #[test]
    fn a_waiter_never_locks_a_removed_work_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".cas-fetch\\x");
        let held = acquire(&path);
        let (tx, rx) = mpsc::channel();
        let p = path.clone();
        let waiter =
            std::thread::spawn(move || WorkDir::acquire(&p, move || tx.send(()).unwrap()).unwrap());
        // The waiter has the old lock file open and waits on it.
        rx.recv().unwrap();
        held.remove().unwrap();
        let got = waiter.join().unwrap();
        let live = fs::metadata(path.join(LOCK)).unwrap();
        let locked = got._lock.metadata().unwrap();
        assert_eq!((live.dev(), live.ino()), (locked.dev(), locked.ino()));
        let other = File::open(path.join(LOCK)).unwrap();
        assert!(other.try_lock().is_err(), "the live lock is held");
    }

    /// Records find a placed file again until it changes; a failed fetch
    /// keeps its work directory only if it holds progress.
    #[test]
    fn records_and_progress() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".cas-fetch\\x");
        let f = dir.path().join("f");
        fs::write(&f, b"content").unwrap();
        let hash = FileHash::from_bytes([5; 32]);
        let w = acquire(&path);
        w.record(hash, &fs::metadata(&f).unwrap()).unwrap();
        drop(w);
        let w = acquire(&path);
        let meta = fs::metadata(&f).unwrap();
        assert!(w.placed(hash, &meta));
        assert!(!w.placed(FileHash::from_bytes([6; 32]), &meta));
        fs::write(&f, b"changed").unwrap();
        assert!(!w.placed(hash, &fs::metadata(&f).unwrap()));
        w.close().unwrap();
        assert!(path.is_dir(), "records are progress");

        let fresh = dir.path().join(".cas-fetch\\y");
        acquire(&fresh).close().unwrap();
        assert!(!fresh.exists(), "an unused work directory goes");
    }
}
