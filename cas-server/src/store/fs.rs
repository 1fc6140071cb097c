//! The filesystem object store.
//!
//! Compare-and-swap of mutable records needs no more than an in-process
//! lock: one process owns a data directory (the server takes RocksDB's
//! lock on `index/` before it opens this store, and a second server on the
//! same directory fails to start), so every writer of these files is in
//! this process. Under the record's lock a swap reads and compares the
//! current bytes, writes the new ones to a temp file, fsyncs it, renames
//! it over the record and fsyncs the directory: a crash leaves the old
//! record or the new one, never a mix.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cas_protocol::ByteRange;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{
    Expect, KeyPrefix, ObjectKey, ObjectKind, ObjectReader, ObjectStore, RefError, RefVersion,
};

/// Locks striping the mutable records: swaps of different records mostly
/// run in parallel, swaps of one record one at a time.
const REF_LOCKS: usize = 64;

/// Objects as files: hash-named kinds under `root/<kind>/<first two hex
/// digits>/<hex>`, others under `root/<key>`; written to `root/tmp`,
/// fsynced, then renamed into place.
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
    ref_locks: Arc<Vec<Mutex<()>>>,
}

impl FsStore {
    /// Opens (creating) a store and removes temp files a crash left behind.
    pub fn open(root: &Path) -> io::Result<Self> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        for kind in ObjectKind::ALL {
            std::fs::create_dir_all(root.join(kind.dir()))?;
        }
        Ok(Self {
            root: root.to_owned(),
            ref_locks: Arc::new((0..REF_LOCKS).map(|_| Mutex::new(())).collect()),
        })
    }

    fn path(&self, key: &ObjectKey) -> PathBuf {
        if key.kind().hashed() {
            let hex = key.last_segment();
            self.root.join(key.kind().dir()).join(&hex[..2]).join(hex)
        } else {
            self.root.join(key.as_str())
        }
    }

    /// The key of a file found under `root` at relative path `rel`.
    fn key_of(rel: &Path) -> Option<ObjectKey> {
        let parts: Vec<&str> = rel.iter().map(|c| c.to_str()).collect::<Option<_>>()?;
        let kind = ObjectKind::from_dir(parts.first()?)?;
        let key = match parts.as_slice() {
            [dir, fan, hex] if kind.hashed() && hex.starts_with(fan) => format!("{dir}/{hex}"),
            _ if kind.hashed() => return None,
            _ => parts.join("/"),
        };
        ObjectKey::from_listed(&key)
    }

    /// Writes `bytes` to `dest` through a synced temp file and a rename;
    /// without `replace`, an existing `dest` is kept and the answer is
    /// `false` (of concurrent writes of one new key, exactly one wins).
    fn write_atomic(&self, dest: &Path, bytes: &[u8], replace: bool) -> io::Result<bool> {
        let dir = dest.parent().expect("object paths have a parent");
        std::fs::create_dir_all(dir)?;
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))?;
        write_file(tmp.as_file(), bytes)?;
        tmp.as_file().sync_all()?;
        let persisted = if replace {
            tmp.persist(dest).map(drop)
        } else {
            tmp.persist_noclobber(dest).map(drop)
        };
        match persisted {
            Ok(()) => {}
            Err(e) if !replace && e.error.kind() == io::ErrorKind::AlreadyExists => {
                return Ok(false)
            }
            Err(e) => return Err(e.error),
        }
        // The rename is durable only once the directory entry is.
        sync_dir(dir)?;
        Ok(true)
    }

    fn put_blocking(&self, key: &ObjectKey, bytes: &[u8]) -> io::Result<bool> {
        let dest = self.path(key);
        if dest.exists() {
            return Ok(false);
        }
        self.write_atomic(&dest, bytes, false)
    }

    fn ref_lock(&self, key: &ObjectKey) -> std::sync::MutexGuard<'_, ()> {
        let h = blake3::hash(key.as_str().as_bytes());
        let i = usize::from(u16::from_le_bytes([h.as_bytes()[0], h.as_bytes()[1]])) % REF_LOCKS;
        self.ref_locks[i].lock().expect("not poisoned")
    }

    /// Checks the record at `path` against `expect` (under its lock).
    fn compare(path: &Path, expect: &Expect) -> Result<(), RefError> {
        let current = read_optional(path)?;
        let matches = match (expect, current) {
            (Expect::Absent, None) => true,
            (Expect::Version(v), Some(bytes)) => RefVersion::of(&bytes) == *v,
            _ => false,
        };
        if matches {
            Ok(())
        } else {
            Err(RefError::Conflict)
        }
    }

    fn put_ref_blocking(
        &self,
        key: &ObjectKey,
        bytes: &[u8],
        expect: &Expect,
    ) -> Result<RefVersion, RefError> {
        let _locked = self.ref_lock(key);
        let path = self.path(key);
        Self::compare(&path, expect)?;
        self.write_atomic(&path, bytes, true)?;
        Ok(RefVersion::of(bytes))
    }

    fn delete_ref_blocking(&self, key: &ObjectKey, version: &RefVersion) -> Result<(), RefError> {
        let _locked = self.ref_lock(key);
        let path = self.path(key);
        Self::compare(&path, &Expect::Version(version.clone()))?;
        std::fs::remove_file(&path)?;
        sync_dir(path.parent().expect("object paths have a parent"))?;
        Ok(())
    }

    fn list_blocking(&self, prefix: &KeyPrefix) -> io::Result<Vec<ObjectKey>> {
        let mut keys = Vec::new();
        let mut dirs = vec![self.root.join(prefix.as_str())];
        while let Some(dir) = dirs.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    dirs.push(path);
                } else if let Some(key) = path
                    .strip_prefix(&self.root)
                    .ok()
                    .and_then(Self::key_of)
                    .filter(|k| prefix.contains(k))
                {
                    keys.push(key);
                } else {
                    tracing::debug!(path = %path.display(), "not an object; skipped in a listing");
                }
            }
        }
        keys.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(keys)
    }

    /// Runs blocking filesystem work off the async threads.
    async fn blocking<T: Send + 'static, E: From<io::Error> + Send + 'static>(
        &self,
        f: impl FnOnce(&Self) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| E::from(io::Error::other(e)))?
    }
}

/// Objects from this size on are written past the page cache when their
/// buffer allows it (see [`write_file`]).
const DIRECT_MIN: usize = 1 << 20;

/// Writes `bytes` to the empty `file`. A large object whose buffer starts
/// on a [`super::WRITE_ALIGN`] boundary (as upload bodies do) has its
/// aligned bulk written with `O_DIRECT`: copying a xorb into the page
/// cache was the server's largest cost of an upload (about 18% of client
/// plus server CPU in `perf`), and the object is about to be synced
/// anyway. The unaligned tail, and everything on a filesystem that refuses
/// direct I/O (tmpfs: `EINVAL`), is written the ordinary way.
fn write_file(file: &std::fs::File, bytes: &[u8]) -> io::Result<()> {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
    use std::os::unix::fs::FileExt;
    let bulk = bytes.len() & !(super::WRITE_ALIGN - 1);
    let mut done = 0;
    if bytes.len() >= DIRECT_MIN && bytes.as_ptr().align_offset(super::WRITE_ALIGN) == 0 {
        let flags = fcntl_getfl(file)?;
        if fcntl_setfl(file, flags | OFlags::DIRECT).is_ok() {
            // A direct write that fails or stops short (the filesystem
            // wants another alignment) is redone from the start, buffered.
            if file.write_all_at(&bytes[..bulk], 0).is_ok() {
                done = bulk;
            }
            fcntl_setfl(file, flags)?;
        }
    }
    file.write_all_at(&bytes[done..], done as u64)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl ObjectStore for FsStore {
    async fn put(&self, key: &ObjectKey, bytes: Bytes) -> io::Result<bool> {
        let key = key.clone();
        self.blocking(move |s| s.put_blocking(&key, &bytes)).await
    }

    async fn len(&self, key: &ObjectKey) -> io::Result<Option<u64>> {
        match tokio::fs::metadata(self.path(key)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn delete(&self, key: &ObjectKey) -> io::Result<()> {
        match tokio::fs::remove_file(self.path(key)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    async fn read_range(&self, key: &ObjectKey, range: ByteRange) -> io::Result<ObjectReader> {
        let mut f = tokio::fs::File::open(self.path(key)).await?;
        f.seek(io::SeekFrom::Start(range.start)).await?;
        Ok(Box::pin(f.take(range.len())))
    }

    async fn get(&self, key: &ObjectKey) -> io::Result<Option<Bytes>> {
        let path = self.path(key);
        self.blocking(move |_| Ok(read_optional(&path)?.map(Bytes::from)))
            .await
    }

    async fn list(&self, prefix: &KeyPrefix) -> io::Result<Vec<ObjectKey>> {
        let prefix = prefix.clone();
        self.blocking(move |s| s.list_blocking(&prefix)).await
    }

    async fn get_ref(&self, key: &ObjectKey) -> io::Result<Option<(Bytes, RefVersion)>> {
        let path = self.path(key);
        self.blocking(move |_| {
            Ok(read_optional(&path)?.map(|b| {
                let v = RefVersion::of(&b);
                (Bytes::from(b), v)
            }))
        })
        .await
    }

    async fn put_ref(
        &self,
        key: &ObjectKey,
        bytes: Bytes,
        expect: Expect,
    ) -> Result<RefVersion, RefError> {
        let key = key.clone();
        self.blocking(move |s| s.put_ref_blocking(&key, &bytes, &expect))
            .await
    }

    async fn delete_ref(&self, key: &ObjectKey, version: &RefVersion) -> Result<(), RefError> {
        let (key, version) = (key.clone(), version.clone());
        self.blocking(move |s| s.delete_ref_blocking(&key, &version))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WRITE_ALIGN;
    use cas_protocol::XorbHash;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn put_is_atomic_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let key = ObjectKey::xorb(&XorbHash::from_bytes([0xab; 32]));
        assert_eq!(store.len(&key).await.unwrap(), None);
        assert!(store
            .put(&key, Bytes::from_static(b"hello world"))
            .await
            .unwrap());
        assert!(!store
            .put(&key, Bytes::from_static(b"hello world"))
            .await
            .unwrap());
        assert_eq!(store.len(&key).await.unwrap(), Some(11));
        let mut out = String::new();
        let mut r = store
            .read_range(&key, ByteRange { start: 6, end: 11 })
            .await
            .unwrap();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "world");
        assert!(dir.path().join("xorbs/ab").join("ab".repeat(32)).is_file());
        super::super::conformance::run(&store).await;
        // Leftover temp files vanish on reopen; stray files are no objects.
        std::fs::write(dir.path().join("tmp/partial"), b"x").unwrap();
        std::fs::write(dir.path().join("xorbs/ab/stray"), b"x").unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        let xorbs = store
            .list(&KeyPrefix::kind(ObjectKind::Xorb))
            .await
            .unwrap();
        assert!(
            xorbs.iter().all(|k| k.last_segment().len() == 64),
            "{xorbs:?}"
        );
    }

    /// Large objects round-trip whatever the buffer's alignment and length
    /// (the direct path, its unaligned tail, the buffered path) and on a
    /// filesystem without direct I/O (tmpfs refuses `O_DIRECT`).
    #[test]
    fn objects_are_written_whole_direct_or_not() {
        let dirs: Vec<tempfile::TempDir> = [None, Some("/dev/shm")]
            .into_iter()
            .filter_map(|d| match d {
                None => tempfile::tempdir().ok(),
                Some(d) => tempfile::tempdir_in(d).ok(),
            })
            .collect();
        for dir in &dirs {
            for (skew, len) in [
                (0, DIRECT_MIN),
                (0, 2 * DIRECT_MIN + 123),
                (0, DIRECT_MIN - 1),
                (1, DIRECT_MIN + WRITE_ALIGN),
                (WRITE_ALIGN, 3 * DIRECT_MIN + 1),
            ] {
                let mut buf = super::super::aligned_buffer(skew + len);
                buf.extend((0..skew + len).map(|i| (i * 7 + i / 4096) as u8));
                let bytes = &buf[skew..];
                let path = dir.path().join(format!("{skew}-{len}"));
                let file = std::fs::File::create(&path).unwrap();
                write_file(&file, bytes).unwrap();
                assert!(std::fs::read(&path).unwrap() == bytes, "{skew} {len}");
            }
        }
    }
}
