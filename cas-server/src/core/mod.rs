//! The storage core: verification, dedup, shard commits and reconstruction
//! over an [`ObjectStore`] and an [`Index`]. It knows nothing of HTTP.
//!
//! Ordering is what makes crashes harmless: an object is durable under its
//! final name before any index entry points at it, and a shard's files are
//! indexed in one batch after everything they reference is stored.
//!
//! - [`ingest`]: xorb uploads, dedup queries, shard commits;
//! - [`reconstruct`]: file info, reconstruction plans, xorb reads;
//! - [`stream`]: a stored file's bytes, verified as they are read;
//! - [`health`]: damaged xorbs (missing or corrupt objects), found on
//!   read or on a client's report, leave dedup so the next upload of the
//!   same content repairs them;
//! - [`refs`]: repositories, branches, tags and commits; revisions;
//! - [`roots`]: files and trees uploaded without a repository, kept as
//!   garbage collection roots;
//! - [`lease`]: what a running server's requests build on (dedup answers,
//!   uploads, unrooted commits), which garbage collection leaves alone;
//! - [`gc`]: garbage collection (plan, then execute), fsck and repair;
//! - [`objects`]: whole objects (Git LFS, Hub commits) chunked,
//!   deduplicated and packed on the server, found by SHA-256;
//! - [`catch_up`]: the index as a cache of a bucket other nodes share.

mod catch_up;
pub mod gc;
mod health;
mod ingest;
mod lease;
pub mod objects;
mod reconstruct;
pub mod refs;
mod roots;
mod stream;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cas_protocol::repo::RepoId;
use cas_protocol::shard::{FileRecipe, RecipeError};
use cas_protocol::xorb::XorbError;
use cas_protocol::{FileHash, Kind, MessageError, Sha256, XorbHash};
use serde::Serialize;

use crate::index::{Index, IndexError, XorbRecord};
use crate::metrics::Metrics;
use crate::store::ObjectStore;

pub use catch_up::CatchUp;
pub use health::XorbCheck;
pub use lease::Clock;
pub use reconstruct::{FetchGrain, RangeRequest};

/// Why the core refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("xorb rejected: {0}")]
    InvalidXorb(#[from] XorbError),
    #[error("{0}")]
    InvalidMessage(#[from] MessageError),
    #[error("shard references xorb {0}, which is not stored")]
    UnknownXorb(XorbHash),
    #[error("shard references xorb {0}, which is damaged on the server (missing or corrupt); upload its chunks again")]
    DamagedXorb(XorbHash),
    #[error("file {file}: {source}")]
    InvalidRecipe { file: FileHash, source: RecipeError },
    #[error("file {file} is registered with SHA-256 {stored}, which its bytes have; the shard claims {claimed}")]
    Sha256Mismatch {
        file: FileHash,
        stored: Sha256,
        claimed: Sha256,
    },
    /// A read needs a damaged xorb (for `file`, when a file was read).
    #[error("{}", damaged_message(file.as_ref(), xorb))]
    Damaged {
        file: Option<FileHash>,
        xorb: XorbHash,
    },
    #[error("{0} not found")]
    NotFound(String),
    /// An object's bytes do not hash to the SHA-256 (LFS object id) it
    /// was sent as: nothing was recorded.
    #[error("object {expected}: the {size} bytes received hash to {actual}")]
    ObjectMismatch {
        expected: Sha256,
        actual: Sha256,
        size: u64,
    },
    /// A request to change a repository that cannot be applied (a path
    /// that is not a file of the tree, an LFS object that is not stored).
    #[error("{0}")]
    InvalidChange(String),
    #[error("range not satisfiable for a file of {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("repository {0} not found")]
    RepoNotFound(RepoId),
    #[error("revision {rev:?} not found in {repo}")]
    RevisionNotFound { repo: RepoId, rev: String },
    #[error(
        "revision {rev:?} is ambiguous in {repo}: several commits start with it; give more digits"
    )]
    AmbiguousRevision { repo: RepoId, rev: String },
    /// A branch or tag is not where the request expected it (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    #[error("tree {tree}: {reason}")]
    InvalidTree { tree: FileHash, reason: String },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("object store: {0}")]
    Io(#[from] std::io::Error),
}

fn damaged_message(file: Option<&FileHash>, xorb: &XorbHash) -> String {
    let what = match file {
        Some(f) => format!("file {f} needs xorb {xorb}, which"),
        None => format!("xorb {xorb}"),
    };
    format!("{what} is damaged on the server (missing or corrupt); uploading the content again repairs it")
}

/// Result of a xorb upload.
#[derive(Debug, Clone, Serialize)]
pub struct XorbUpload {
    pub xorb: XorbHash,
    /// False when the xorb was already stored (nothing was written).
    pub created: bool,
    pub chunks: usize,
    pub bytes: u64,
}

/// Result of a shard commit.
#[derive(Debug, Clone, Serialize)]
pub struct ShardCommit {
    pub shard: String,
    /// Files the shard names.
    pub files: usize,
    /// Of those, files the store did not have before.
    pub new_files: usize,
    /// Files whose earlier recipe needed a damaged xorb, now rebuilt from
    /// this shard's (same hash, so the same bytes).
    pub repaired_files: usize,
    /// Files whose recorded SHA-256 was wrong (the server computed it from
    /// the bytes) and is now the shard's.
    pub corrected_files: usize,
    pub xorbs: usize,
}

/// What a client may ask about a stored file without reconstructing it.
#[derive(Debug, Clone, Serialize)]
pub struct FileInfo {
    pub hash: FileHash,
    /// What the hash names, as recorded when it was committed.
    pub kind: Kind,
    pub size: u64,
    pub sha256: Sha256,
    pub chunks: u64,
    pub terms: usize,
}

/// The store: objects plus index, shared by all request handlers. Cheap to
/// clone (a clone shares everything), so streams can own one.
pub struct Core<O, I> {
    objects: Arc<O>,
    index: Arc<I>,
    /// Serialises the decide-and-write step of shard commits, so two
    /// commits of one file cannot both find it absent (first writer wins).
    commits: Arc<tokio::sync::Mutex<()>>,
    health: Arc<health::Health>,
    caches: Arc<refs::Caches>,
    metrics: Arc<Metrics>,
    inflight: Arc<objects::InFlight>,
    catch_up: Arc<catch_up::CatchUpState>,
    leases: Arc<lease::Leases>,
}

impl<O, I> Clone for Core<O, I> {
    fn clone(&self) -> Self {
        Self {
            objects: self.objects.clone(),
            index: self.index.clone(),
            commits: self.commits.clone(),
            health: self.health.clone(),
            caches: self.caches.clone(),
            metrics: self.metrics.clone(),
            inflight: self.inflight.clone(),
            catch_up: self.catch_up.clone(),
            leases: self.leases.clone(),
        }
    }
}

impl<O: ObjectStore, I: Index> Core<O, I> {
    pub fn new(objects: O, index: I) -> Self {
        Self::with_metrics(objects, index, Arc::default())
    }

    /// A core that counts what it does (damaged xorbs found, ...) in
    /// `metrics`.
    pub fn with_metrics(objects: O, index: I, metrics: Arc<Metrics>) -> Self {
        Self {
            objects: Arc::new(objects),
            index: Arc::new(index),
            commits: Arc::default(),
            health: Arc::default(),
            caches: Arc::default(),
            metrics,
            inflight: Arc::default(),
            catch_up: Arc::default(),
            leases: Arc::new(lease::Leases::new(Clock::default(), gc::DEFAULT_GRACE)),
        }
    }

    /// Leases last `term` (the grace period: a client has this long from
    /// a dedup answer or an upload to the commit that roots it), timed by
    /// `clock`.
    pub fn with_leases(mut self, term: Duration, clock: Clock) -> Self {
        self.leases = Arc::new(lease::Leases::new(clock, term));
        self
    }

    /// How long leases last.
    pub fn lease_term(&self) -> Duration {
        self.leases.term()
    }

    /// This core's index caches a store that other nodes write too: a
    /// miss looks in the store (see [`Core::catch_up`]).
    pub fn shared(mut self) -> Self {
        self.catch_up = Arc::new(catch_up::CatchUpState::shared());
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Runs blocking index work off the async threads.
    async fn with_index<T: Send + 'static>(
        &self,
        f: impl FnOnce(&I) -> Result<T, CoreError> + Send + 'static,
    ) -> Result<T, CoreError> {
        let index = self.index.clone();
        blocking(move || f(&index)).await
    }
}

/// Runs blocking work (CPU or index) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CoreError> + Send + 'static,
) -> Result<T, CoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

fn load_recipe(index: &impl Index, hash: FileHash) -> Result<FileRecipe, CoreError> {
    index
        .file(&hash)?
        .ok_or_else(|| CoreError::NotFound(format!("file {hash}")))
}

/// Xorb records of one request, each read from the index once.
struct Records<'a, I> {
    index: &'a I,
    map: HashMap<XorbHash, XorbRecord>,
}

impl<'a, I: Index> Records<'a, I> {
    fn new(index: &'a I) -> Self {
        Self {
            index,
            map: HashMap::new(),
        }
    }

    /// The record of a stored, undamaged xorb.
    fn get(&mut self, h: XorbHash) -> Result<&XorbRecord, CoreError> {
        match self.map.entry(h) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                let record = self.index.xorb(&h)?.ok_or(CoreError::UnknownXorb(h))?;
                if self.index.is_damaged(&h)? {
                    return Err(CoreError::DamagedXorb(h));
                }
                Ok(e.insert(record))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::MemIndex;
    use crate::store::MemStore;
    use cas_protocol::shard::{Shard, Term, XorbChunkTable};
    use cas_protocol::xorb::{Compression, EncodedChunk, XorbBuilder};
    use cas_protocol::{ChunkRange, Encoding, Kind, Message, Sha256};

    /// The core over in-memory stores: a verified xorb and a shard go in,
    /// a reconstruction of a byte range comes out; a shard naming a xorb
    /// that was never stored changes nothing.
    #[tokio::test]
    async fn ingest_then_reconstruct_in_memory() {
        let core = Core::new(MemStore::default(), MemIndex::default());
        let data: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 5000]).collect();
        let mut b = XorbBuilder::new();
        for d in &data {
            b.try_push(EncodedChunk::encode(d, Compression::Auto).unwrap())
                .unwrap();
        }
        let x = b.finish().unwrap();
        let up = core.put_xorb(x.hash, x.bytes.clone().into()).await.unwrap();
        assert!(up.created);
        let recipe = FileRecipe {
            hash: FileHash::from_chunks(&x.chunks),
            sha256: Sha256::of(&data.concat()),
            size: 15_000,
            terms: vec![Term {
                xorb: x.hash,
                chunks: ChunkRange { start: 0, end: 3 },
                len: 15_000,
            }],
            kind: Kind::File,
        };
        let orphan = Shard {
            xorbs: vec![],
            files: vec![FileRecipe {
                terms: vec![Term {
                    xorb: XorbHash::from_bytes([7; 32]),
                    ..recipe.terms[0]
                }],
                ..recipe.clone()
            }],
        };
        let err = core
            .commit_shard(orphan.to_bytes().into(), Encoding::Binary)
            .await
            .unwrap_err();
        assert!(matches!(err, CoreError::UnknownXorb(_)), "{err}");
        assert!(core.file_info(recipe.hash).await.is_err());
        let shard = Shard {
            xorbs: vec![XorbChunkTable::from(&x)],
            files: vec![recipe.clone()],
        };
        core.commit_shard(shard.to_bytes().into(), Encoding::Binary)
            .await
            .unwrap();
        let rec = core
            .reconstruct(
                recipe.hash,
                Some(RangeRequest::From {
                    start: 6000,
                    end: Some(6999),
                }),
                FetchGrain::Xorb,
                |x, r| format!("x/{x}/{}-{}", r.start, r.end),
            )
            .await
            .unwrap();
        assert_eq!(rec.terms.len(), 1);
        assert_eq!(rec.terms[0].chunks, ChunkRange { start: 1, end: 2 });
        assert_eq!(rec.offset_into_first_term, 1000);
        let whole = x.bytes.len();
        assert_eq!(rec.fetch[0].url, format!("x/{}/0-{whole}", x.hash));
        let in_xorb = rec.fetch[0].ranges[0];

        // Cut by range: one entry per merged range, under a URL for
        // exactly its bytes, at offsets relative to that URL.
        let by_range = core
            .reconstruct(
                recipe.hash,
                Some(RangeRequest::From {
                    start: 6000,
                    end: Some(6999),
                }),
                FetchGrain::Range,
                |x, r| format!("x/{x}/{}-{}", r.start, r.end),
            )
            .await
            .unwrap();
        assert_eq!(by_range.terms, rec.terms);
        let [f] = &by_range.fetch[..] else {
            panic!("one range: {:?}", by_range.fetch)
        };
        let b = in_xorb.bytes;
        assert_eq!(f.url, format!("x/{}/{}-{}", x.hash, b.start, b.end));
        assert_eq!(f.ranges[0].chunks, in_xorb.chunks);
        assert_eq!(
            (f.ranges[0].bytes.start, f.ranges[0].bytes.end),
            (0, b.len())
        );
    }
}
