//! Everything durable, behind one trait with a filesystem implementation
//! ([`FsStore`], the embedded default), an S3 one ([`S3Store`], the
//! scale-out backend) and an in-memory one ([`MemStore`], for tests).
//! Every implementation passes [`conformance::run`]. A server picks its
//! store at start ([`AnyStore`]) and counts its calls ([`Metered`]).
//!
//! Two sorts of object live here, each kind in its own key namespace:
//! - immutable, content-addressed objects (xorbs, shards, commits): written
//!   once with [`ObjectStore::put`], create-if-absent;
//! - small mutable records (repositories, branch and tag heads): read with
//!   a version ([`ObjectStore::get_ref`]) and changed only by
//!   compare-and-swap against it ([`ObjectStore::put_ref`],
//!   [`ObjectStore::delete_ref`]), the shape S3's `If-None-Match: *` and
//!   `If-Match: <etag>` give.
//!
//! Keys are built by one constructor per kind from validated names and
//! hashes ([`ObjectKey`]); the raw string never comes from a client.

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
mod fs;
#[cfg(any(test, feature = "test-util"))]
mod mem;
mod metered;
mod s3;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use cas_protocol::repo::{CommitId, RefKind, RefName, RepoId, RepoType};
use cas_protocol::{ByteRange, FileHash, XorbHash};
use tokio::io::AsyncRead;

pub use fs::FsStore;

/// Alignment of an object buffer that [`FsStore`] can write without the
/// page cache; [`aligned_buffer`] gives one.
pub const WRITE_ALIGN: usize = 4096;

/// An empty buffer of at least `capacity` bytes whose start is aligned to
/// [`WRITE_ALIGN`], for a body that becomes an object.
pub fn aligned_buffer(capacity: usize) -> bytes::BytesMut {
    let mut buf = bytes::BytesMut::with_capacity(capacity + WRITE_ALIGN - 1);
    let pad = buf.as_ptr().align_offset(WRITE_ALIGN);
    buf.resize(pad, 0);
    drop(buf.split_to(pad));
    buf
}
#[cfg(any(test, feature = "test-util"))]
pub use mem::MemStore;
pub use metered::Metered;
pub use s3::{S3Config, S3Store};

/// What an object is; each kind has its own key namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Xorb,
    Shard,
    Commit,
    /// A repository's record (mutable).
    Repo,
    /// A branch or tag head (mutable).
    Ref,
    /// A file or tree uploaded without a repository: a garbage collection
    /// root until it is removed.
    Root,
    /// A xorb garbage collection found unreferenced, with the time it was
    /// condemned: deleted once the grace period is over, unless it is
    /// referenced again.
    Condemned,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 7] = [
        ObjectKind::Xorb,
        ObjectKind::Shard,
        ObjectKind::Commit,
        ObjectKind::Repo,
        ObjectKind::Ref,
        ObjectKind::Root,
        ObjectKind::Condemned,
    ];

    /// The first key segment.
    pub fn dir(self) -> &'static str {
        match self {
            Self::Xorb => "xorbs",
            Self::Shard => "shards",
            Self::Commit => "commits",
            Self::Repo => "repos",
            Self::Ref => "refs",
            Self::Root => "roots",
            Self::Condemned => "condemned",
        }
    }

    /// Named by one hex hash (the filesystem store fans these out by their
    /// first two digits).
    pub(crate) fn hashed(self) -> bool {
        matches!(
            self,
            Self::Xorb | Self::Shard | Self::Commit | Self::Root | Self::Condemned
        )
    }

    pub(crate) fn from_dir(dir: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.dir() == dir)
    }
}

/// Name of an object: `<kind dir>/<segment>/...`, e.g. `xorbs/<hex>` or
/// `refs/model/org/name/heads/main`. Every segment is non-empty, not `.`
/// or `..`, and free of `/`, NUL and backslash, so a key is also a safe
/// relative path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    kind: ObjectKind,
    key: String,
}

impl ObjectKey {
    fn hashed(kind: ObjectKind, hash: &[u8]) -> Self {
        Self {
            kind,
            key: format!("{}/{}", kind.dir(), hex::encode(hash)),
        }
    }

    pub fn xorb(hash: &XorbHash) -> Self {
        Self::hashed(ObjectKind::Xorb, hash.as_bytes())
    }

    /// A shard, by the BLAKE3 hash of its binary form.
    pub fn shard(id: &[u8; 32]) -> Self {
        Self::hashed(ObjectKind::Shard, id)
    }

    pub fn commit(id: &CommitId) -> Self {
        Self::hashed(ObjectKind::Commit, id.as_bytes())
    }

    /// The root record of a file or tree uploaded without a repository.
    pub fn root(file: &FileHash) -> Self {
        Self::hashed(ObjectKind::Root, file.as_bytes())
    }

    /// The condemned mark of a xorb.
    pub fn condemned(xorb: &XorbHash) -> Self {
        Self::hashed(ObjectKind::Condemned, xorb.as_bytes())
    }

    /// The 32-byte hash a hash-named key carries.
    pub fn hash_bytes(&self) -> Option<[u8; 32]> {
        if !self.kind.hashed() {
            return None;
        }
        hex::decode(self.last_segment()).ok()?.try_into().ok()
    }

    /// `repos/<type>/<org>/<name>`.
    pub fn repo(repo: &RepoId) -> Self {
        Self {
            kind: ObjectKind::Repo,
            key: format!("{}/{}", ObjectKind::Repo.dir(), repo_segments(repo)),
        }
    }

    /// `refs/<type>/<org>/<name>/heads|tags/<name in key form>`.
    pub fn git_ref(repo: &RepoId, kind: RefKind, name: &RefName) -> Self {
        Self {
            kind: ObjectKind::Ref,
            key: format!("{}/{}", KeyPrefix::refs(repo, kind).0, name.key_segment()),
        }
    }

    pub fn kind(&self) -> ObjectKind {
        self.kind
    }

    /// The whole key, kind directory first.
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// The segment after the last `/` (the hash, or a ref name's key form).
    pub fn last_segment(&self) -> &str {
        self.key.rsplit('/').next().expect("keys have segments")
    }

    /// A key a store found while listing, checked like a constructed one.
    pub(crate) fn from_listed(key: &str) -> Option<Self> {
        let mut segments = key.split('/');
        let kind = ObjectKind::from_dir(segments.next()?)?;
        let safe = |s: &str| {
            !s.is_empty() && s != "." && s != ".." && !s.bytes().any(|b| b == 0 || b == b'\\')
        };
        let rest: Vec<&str> = segments.collect();
        if rest.is_empty() || !rest.iter().all(|s| safe(s)) {
            return None;
        }
        if kind.hashed() && (rest.len() != 1 || hex::decode(rest[0]).is_err()) {
            return None;
        }
        Some(Self {
            kind,
            key: key.to_owned(),
        })
    }
}

fn repo_segments(repo: &RepoId) -> String {
    format!(
        "{}/{}/{}",
        repo.repo_type().as_str(),
        repo.org(),
        repo.name()
    )
}

/// Whole leading segments of keys, for listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    /// Every object of a kind.
    pub fn kind(kind: ObjectKind) -> Self {
        Self(kind.dir().to_owned())
    }

    /// The records of every repository of a type.
    pub fn repos(repo_type: RepoType) -> Self {
        Self(format!("{}/{}", ObjectKind::Repo.dir(), repo_type.as_str()))
    }

    /// A repository's branches or tags.
    pub fn refs(repo: &RepoId, kind: RefKind) -> Self {
        Self(format!(
            "{}/{}/{}",
            ObjectKind::Ref.dir(),
            repo_segments(repo),
            kind.dir()
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `key` lies under this prefix.
    pub fn contains(&self, key: &ObjectKey) -> bool {
        key.as_str()
            .strip_prefix(&self.0)
            .is_some_and(|rest| rest.starts_with('/'))
    }
}

/// A mutable record's version, as opaque as an S3 ETag: what
/// [`ObjectStore::get_ref`] returns and a compare-and-swap expects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RefVersion(String);

impl RefVersion {
    /// The version the local stores give a value: a hash of its bytes (an
    /// S3 ETag of a single-part object is one too).
    pub(crate) fn of(bytes: &[u8]) -> Self {
        Self(blake3::hash(bytes).to_hex()[..32].to_owned())
    }
}

/// What a compare-and-swap expects to find.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// No record yet (create).
    Absent,
    /// The record at this version (update).
    Version(RefVersion),
}

/// Why a compare-and-swap failed.
#[derive(Debug, thiserror::Error)]
pub enum RefError {
    /// The record was not what the caller expected: it changed meanwhile.
    #[error("the record changed meanwhile")]
    Conflict,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The store did not answer (or failed) within its retry timeout: an
/// outage, not a missing object. Carried inside the `io::Error` a store
/// call returns; the HTTP layer answers it with 503 `store_unavailable`.
#[derive(Debug, thiserror::Error)]
#[error("object store unavailable: {0}")]
pub struct Unavailable(pub String);

/// Whether `e` is (or wraps) an [`Unavailable`] store.
pub fn is_unavailable(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Unavailable>())
}

/// A streamed read of part of an object.
pub type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

/// Object storage. `put` and `put_ref` are atomic: an object is either
/// whole under its name or absent, whatever happens during the write.
pub trait ObjectStore: Send + Sync + 'static {
    /// Stores an immutable object; `Ok(false)` if it already existed (it is
    /// not rewritten: content addressing makes the bytes equivalent).
    fn put(&self, key: &ObjectKey, bytes: Bytes) -> impl Future<Output = io::Result<bool>> + Send;

    /// The object's length, or `None` if absent.
    fn len(&self, key: &ObjectKey) -> impl Future<Output = io::Result<Option<u64>>> + Send;

    /// Removes an immutable object; removing an absent one is not an error.
    fn delete(&self, key: &ObjectKey) -> impl Future<Output = io::Result<()>> + Send;

    /// Streams `range` of the object (which must lie inside it).
    fn read_range(
        &self,
        key: &ObjectKey,
        range: ByteRange,
    ) -> impl Future<Output = io::Result<ObjectReader>> + Send;

    /// A small immutable object (a commit) whole, or `None` if absent.
    fn get(&self, key: &ObjectKey) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;

    /// Every key under `prefix`, sorted by key. For namespaces of bounded
    /// size (a type's repositories, a repository's refs).
    fn list(&self, prefix: &KeyPrefix) -> impl Future<Output = io::Result<Vec<ObjectKey>>> + Send;

    /// A mutable record and its version, or `None` if absent.
    fn get_ref(
        &self,
        key: &ObjectKey,
    ) -> impl Future<Output = io::Result<Option<(Bytes, RefVersion)>>> + Send;

    /// Writes a mutable record if it is as `expect` says (compare-and-swap);
    /// otherwise [`RefError::Conflict`] and nothing changes. Returns the
    /// new version.
    fn put_ref(
        &self,
        key: &ObjectKey,
        bytes: Bytes,
        expect: Expect,
    ) -> impl Future<Output = Result<RefVersion, RefError>> + Send;

    /// Removes a mutable record if it is still at `version`.
    fn delete_ref(
        &self,
        key: &ObjectKey,
        version: &RefVersion,
    ) -> impl Future<Output = Result<(), RefError>> + Send;

    /// A URL that reads the object without credentials for `ttl` (an S3
    /// presigned GET), or `None` if this store cannot make one.
    fn presign(
        &self,
        key: &ObjectKey,
        ttl: Duration,
    ) -> impl Future<Output = io::Result<Option<String>>> + Send {
        let _ = (key, ttl);
        async { Ok(None) }
    }
}

/// The store a server runs on, chosen at start.
#[derive(Debug, Clone)]
pub enum AnyStore {
    Fs(FsStore),
    S3(S3Store),
}

/// Runs the same call on whichever store `self` is.
macro_rules! each {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Fs($s) => $call,
            AnyStore::S3($s) => $call,
        }
    };
}

impl ObjectStore for AnyStore {
    async fn put(&self, key: &ObjectKey, bytes: Bytes) -> io::Result<bool> {
        each!(self, s => s.put(key, bytes).await)
    }

    async fn len(&self, key: &ObjectKey) -> io::Result<Option<u64>> {
        each!(self, s => s.len(key).await)
    }

    async fn delete(&self, key: &ObjectKey) -> io::Result<()> {
        each!(self, s => s.delete(key).await)
    }

    async fn read_range(&self, key: &ObjectKey, range: ByteRange) -> io::Result<ObjectReader> {
        each!(self, s => s.read_range(key, range).await)
    }

    async fn get(&self, key: &ObjectKey) -> io::Result<Option<Bytes>> {
        each!(self, s => s.get(key).await)
    }

    async fn list(&self, prefix: &KeyPrefix) -> io::Result<Vec<ObjectKey>> {
        each!(self, s => s.list(prefix).await)
    }

    async fn get_ref(&self, key: &ObjectKey) -> io::Result<Option<(Bytes, RefVersion)>> {
        each!(self, s => s.get_ref(key).await)
    }

    async fn put_ref(
        &self,
        key: &ObjectKey,
        bytes: Bytes,
        expect: Expect,
    ) -> Result<RefVersion, RefError> {
        each!(self, s => s.put_ref(key, bytes, expect).await)
    }

    async fn delete_ref(&self, key: &ObjectKey, version: &RefVersion) -> Result<(), RefError> {
        each!(self, s => s.delete_ref(key, version).await)
    }

    async fn presign(&self, key: &ObjectKey, ttl: Duration) -> io::Result<Option<String>> {
        each!(self, s => s.presign(key, ttl).await)
    }
}
