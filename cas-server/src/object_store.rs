//! Immutable blobs (xorbs, shards) by content hash. The filesystem store is
//! the embedded default; an S3 store is a second implementation of the same
//! trait.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;
use cas_protocol::ByteRange;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};

/// What an object is; each kind has its own namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Xorb,
    Shard,
}

impl ObjectKind {
    fn dir(self) -> &'static str {
        match self {
            Self::Xorb => "xorbs",
            Self::Shard => "shards",
        }
    }
}

/// Name of an object: its kind and the hex of its 32-byte hash (so keys are
/// always safe path components).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectKey {
    kind: ObjectKind,
    hex: String,
}

impl ObjectKey {
    pub fn new(kind: ObjectKind, hash: &[u8; 32]) -> Self {
        Self {
            kind,
            hex: hex::encode(hash),
        }
    }
}

/// A streamed read of part of an object.
pub type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

/// Immutable blob storage. `put` is atomic: an object is either whole under
/// its name or absent, whatever happens during the write.
pub trait ObjectStore: Send + Sync + 'static {
    /// Stores `bytes`; `Ok(false)` if the object already existed (it is not
    /// rewritten: content addressing makes the bytes equivalent).
    fn put(&self, key: &ObjectKey, bytes: Bytes) -> impl Future<Output = io::Result<bool>> + Send;

    /// The object's length, or `None` if absent.
    fn len(&self, key: &ObjectKey) -> impl Future<Output = io::Result<Option<u64>>> + Send;

    /// Streams `range` of the object (which must lie inside it).
    fn read_range(
        &self,
        key: &ObjectKey,
        range: ByteRange,
    ) -> impl Future<Output = io::Result<ObjectReader>> + Send;
}

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
            .join(key.kind.dir())
            .join(&key.hex[..2])
            .join(&key.hex)
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
        tmp.persist(&dest).map_err(|e| e.error)?;
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
        // Leftover temp files vanish on reopen.
        std::fs::write(dir.path().join("tmp/partial"), b"x").unwrap();
        FsStore::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
