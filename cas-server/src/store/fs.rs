//! The filesystem object store.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cas_protocol::ByteRange;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{ObjectKey, ObjectKind, ObjectReader, ObjectStore};

/// Objects as files under `root/<kind>/<first two hex digits>/<hex>`,
/// written to `root/tmp`, fsynced, then renamed into place.
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// Opens (creating) a store and removes temp files a crash left behind.
    pub fn open(root: &Path) -> io::Result<Self> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        for kind in [ObjectKind::Xorb, ObjectKind::Shard] {
            std::fs::create_dir_all(root.join(kind.dir()))?;
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    fn path(&self, key: &ObjectKey) -> PathBuf {
        self.root
            .join(key.kind().dir())
            .join(&key.hex()[..2])
            .join(key.hex())
    }

    fn put_blocking(&self, key: &ObjectKey, bytes: &[u8]) -> io::Result<bool> {
        use std::io::Write;
        let dest = self.path(key);
        if dest.exists() {
            return Ok(false);
        }
        let dir = dest.parent().expect("object paths have a parent");
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        // No-clobber: of concurrent puts of one key, exactly one wins.
        match tmp.persist_noclobber(&dest) {
            Ok(_) => {}
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(e.error),
        }
        // The rename is durable only once the directory entry is.
        std::fs::File::open(dir)?.sync_all()?;
        Ok(true)
    }
}

impl ObjectStore for FsStore {
    async fn put(&self, key: &ObjectKey, bytes: Bytes) -> io::Result<bool> {
        let (store, key) = (self.clone(), key.clone());
        tokio::task::spawn_blocking(move || store.put_blocking(&key, &bytes))
            .await
            .map_err(io::Error::other)?
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_is_atomic_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let key = ObjectKey::new(ObjectKind::Xorb, &[0xab; 32]);
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
        // Leftover temp files vanish on reopen.
        std::fs::write(dir.path().join("tmp/partial"), b"x").unwrap();
        FsStore::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
