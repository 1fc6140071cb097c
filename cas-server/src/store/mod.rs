//! Immutable blobs (xorbs, shards) by content hash, behind one trait with a
//! filesystem implementation ([`FsStore`], the embedded default) and an
//! in-memory one ([`MemStore`], for tests). Every implementation passes
//! [`conformance::run`].

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
mod fs;
#[cfg(any(test, feature = "test-util"))]
mod mem;

use std::future::Future;
use std::io;
use std::pin::Pin;

use bytes::Bytes;
use cas_protocol::ByteRange;
use tokio::io::AsyncRead;

pub use fs::FsStore;
#[cfg(any(test, feature = "test-util"))]
pub use mem::MemStore;

/// What an object is; each kind has its own namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Xorb,
    Shard,
}

impl ObjectKind {
    pub(crate) fn dir(self) -> &'static str {
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

    pub fn kind(&self) -> ObjectKind {
        self.kind
    }

    /// The hash in lowercase hex: always a safe path component.
    pub fn hex(&self) -> &str {
        &self.hex
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

    /// Removes an object; removing an absent one is not an error.
    fn delete(&self, key: &ObjectKey) -> impl Future<Output = io::Result<()>> + Send;

    /// Streams `range` of the object (which must lie inside it).
    fn read_range(
        &self,
        key: &ObjectKey,
        range: ByteRange,
    ) -> impl Future<Output = io::Result<ObjectReader>> + Send;
}
