//! The CAS client as a library: upload files and directories with dedup
//! and compression, fetch them back verified (resuming, through a local
//! chunk cache shared by processes and users), read ranges of stored files
//! with an `AsyncRead + AsyncSeek` reader, and hash files locally; commit
//! uploads to repositories and fetch their revisions ([`repo`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), cas_client::Error> {
//! use cas_client::{Client, ClientConfig};
//! let client = Client::new(ClientConfig::new("http://127.0.0.1:8080"))?;
//! let report = client.upload(&["./model".into()]).await?;
//! let tree = report.roots[0].hash;
//! client.fetch(tree, "./model-copy".as_ref(), Default::default()).await?;
//! # Ok(()) }
//! ```

mod cache;
mod digest;
mod error;
mod failover;
mod fetch;
pub mod lfs;
mod lifecycle;
pub mod mirror;
mod progress;
mod reader;
mod remote;
pub mod repo;
mod restore;
mod stamp;
mod tls;
mod upload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use cas_protocol::tree::Tree;
use cas_protocol::{ByteRange, FileHash, Kind, Message};
use tokio::io::{AsyncWrite, AsyncWriteExt};

pub use cache::{ChunkCache, DEFAULT_CACHE_SIZE};
pub use digest::{hash_file, hash_files, FileDigest, HashOptions};
pub use error::{Error, Result};
pub use fetch::Transfer;
pub use mirror::{MirrorOptions, MirrorReport};
pub use progress::{NoProgress, Progress, Stage};
pub use reader::FileReader;
pub use remote::{FileInfo, LfsObject, LfsOperation, RetryPolicy};
pub use repo::{RepoTarget, RepoUpload, RevisionFetch};
pub use restore::FetchReport;
pub use upload::{Layout, Skipped, UploadReport, UploadedFile, UploadedRoot};

/// How to reach a server and how hard to work.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL of the server, e.g. `http://127.0.0.1:8080`, or of
    /// several nodes of it separated by commas (see `failover`).
    pub endpoint: String,
    /// Bearer token sent to the endpoint (never to other hosts).
    pub token: Option<String>,
    /// Local chunk cache; `None` disables it. One that cannot be created
    /// or written is a warning, and the client goes on without it.
    pub cache_dir: Option<PathBuf>,
    pub cache_size: u64,
    /// Concurrent range GETs.
    pub connections: usize,
    /// Concurrent xorb uploads (each holds up to 64 MiB).
    pub upload_concurrency: usize,
    pub retry: RetryPolicy,
}

impl ClientConfig {
    /// Defaults: the default cache directory, 8 connections, 4 uploads.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            token: None,
            cache_dir: ChunkCache::default_dir(),
            cache_size: DEFAULT_CACHE_SIZE,
            connections: 8,
            upload_concurrency: 4,
            retry: RetryPolicy::default(),
        }
    }
}

/// How [`Client::fetch`] treats what is already there and what it fetches.
#[derive(Debug, Clone, Copy, Default)]
pub struct FetchOptions {
    /// Replace existing files that differ from what is fetched (never
    /// directories or symlinks). Without it such a file is an error,
    /// raised before anything is downloaded. Files already right are kept
    /// either way.
    pub force: bool,
    /// Fetch a tree's listing as a plain file instead of restoring it.
    pub raw: bool,
    /// Also compute each file's SHA-256 and compare it with the one
    /// recorded at upload. The file hash, which commits to every byte, is
    /// checked either way; the SHA-256 is the uploader's claim, checked
    /// only when asked (docs/SECURITY.md, "What fetch verifies").
    pub verify_sha256: bool,
}

/// A client of one server. Cheap to clone; clones share connections, the
/// cache and the connection limit.
#[derive(Clone)]
pub struct Client {
    fetcher: fetch::Fetcher,
    connections: usize,
    upload_concurrency: usize,
}

/// Bytes per window when streaming a file out (`cat`).
const CAT_WINDOW: u64 = 64 << 20;

impl Client {
    pub fn new(config: ClientConfig) -> Result<Self> {
        let remote = remote::Remote::new(&config.endpoint, config.token.as_deref(), config.retry)?;
        // A cache that cannot be used is a warning, never a failure.
        let cache = config.cache_dir.and_then(|d| {
            ChunkCache::open(&d, config.cache_size)
                .inspect_err(|e| {
                    tracing::warn!(
                        "cannot use the cache in {} ({e}); continuing without caching",
                        d.display()
                    )
                })
                .ok()
        });
        Ok(Self {
            fetcher: fetch::Fetcher {
                log: cache.as_ref().map(|c| c.locations(&config.endpoint)),
                remote,
                cache,
                connections: Arc::new(tokio::sync::Semaphore::new(config.connections.max(1))),
                progress: Arc::new(NoProgress),
                verify_sha256: false,
            },
            connections: config.connections.max(1),
            upload_concurrency: config.upload_concurrency,
        })
    }

    /// Reports progress of later operations to `progress`.
    pub fn with_progress(mut self, progress: Arc<dyn Progress>) -> Self {
        self.fetcher.progress = progress;
        self
    }

    pub fn cache(&self) -> Option<&ChunkCache> {
        self.fetcher.cache.as_ref()
    }

    /// Uploads files and directories (each directory as a tree) and commits
    /// them; the report's `roots` name each path's hash.
    /// Each root is also made a root on the server, which keeps it from
    /// garbage collection until [`Client::remove_root`].
    pub async fn upload(&self, paths: &[PathBuf]) -> Result<UploadReport> {
        let report = self.upload_as(paths, Layout::PerPath).await?;
        for root in &report.roots {
            self.fetcher.remote.put_root(root.hash).await?;
        }
        Ok(report)
    }

    /// Uploads as [`upload`](Self::upload), with the paths forming roots
    /// as `layout` says.
    pub async fn upload_as(&self, paths: &[PathBuf], layout: Layout) -> Result<UploadReport> {
        let log = self.fetcher.log.clone();
        let hints = match log.clone() {
            Some(l) => tokio::task::spawn_blocking(move || l.load())
                .await
                .expect("loading does not panic"),
            None => Default::default(),
        };
        let used_hints = !hints.is_empty();
        let run = |hints| {
            upload::upload(
                &self.fetcher.remote,
                paths,
                layout,
                self.upload_concurrency,
                self.fetcher.progress.clone(),
                hints,
                log.clone(),
            )
        };
        match run(hints).await {
            // A recipe built from stale or forged local hints: the server
            // caught it. Forget them and plan again from the server alone.
            Err(Error::Server { code, .. })
                if used_hints && (code == "unknown_xorb" || code == "invalid_recipe") =>
            {
                tracing::warn!(
                    "server refused locally known chunk locations ({code}); retrying without them"
                );
                if let Some(l) = &log {
                    l.forget();
                }
                run(Default::default()).await
            }
            r => r,
        }
    }

    /// Size, SHA-256 and layout of a stored file.
    /// What the Git LFS batch API at `lfs_url` says of object `oid`
    /// ([`remote::Remote::lfs_batch`]).
    pub async fn lfs_batch(
        &self,
        lfs_url: &str,
        operation: LfsOperation,
        oid: cas_protocol::Sha256,
        size: u64,
    ) -> Result<LfsObject> {
        self.fetcher
            .remote
            .lfs_batch(lfs_url, operation, oid, size)
            .await
    }

    pub async fn stat(&self, file: FileHash) -> Result<FileInfo> {
        self.fetcher.remote.file_info(file).await
    }

    /// The listing of a tree (`None` for a regular file), as the server
    /// recorded it. A listing that breaks the tree rules (say, a path with
    /// `..`) is an error: restoring it is what its author asked for, and
    /// refusing is the safe answer (`--raw` fetches its bytes).
    pub async fn tree(&self, info: &FileInfo) -> Result<Option<Tree>> {
        if info.kind != Kind::Tree {
            return Ok(None);
        }
        if info.size > cas_protocol::tree::MAX_TREE_BYTES as u64 {
            return Err(Error::BadAnswer {
                what: format!("tree {}", info.hash),
                reason: format!("{} bytes, more than a tree may have", info.size),
            });
        }
        let whole = ByteRange {
            start: 0,
            end: info.size,
        };
        let bytes = self.fetcher.read(info.hash, whole).await?;
        let chunks = cas_protocol::chunking::chunk_and_hash(&bytes);
        let actual = FileHash::of_kind(Kind::Tree, &chunks);
        if actual != info.hash {
            return Err(Error::Mismatch {
                path: info.hash.to_string().into(),
                reason: format!("the tree's bytes hash to {actual}"),
            });
        }
        Tree::from_bytes(&bytes)
            .map(Some)
            .map_err(|e| Error::UnsafePath {
                path: info.hash.to_string(),
                reason: format!("not a valid tree ({e}); fetch it raw for its bytes"),
            })
    }

    /// Fetches a file, or a whole tree as a directory, to `dest`. Fetches
    /// to one destination take turns; run again after an interruption,
    /// the same call finishes the job (see docs/CLIENT.md).
    pub async fn fetch(
        &self,
        file: FileHash,
        dest: &Path,
        options: FetchOptions,
    ) -> Result<FetchReport> {
        let FetchOptions {
            force,
            raw,
            verify_sha256,
        } = options;
        let started = Instant::now();
        let fetcher = &fetch::Fetcher {
            verify_sha256,
            ..self.fetcher.clone()
        };
        let info = self.stat(file).await?;
        let tree = if raw { None } else { self.tree(&info).await? };
        let progress = &fetcher.progress;
        let (outcome, files, bytes) = match &tree {
            Some(t) => {
                let bytes = t.entries.iter().map(|e| e.size).sum();
                progress.start(Stage::Download, Some(bytes));
                let o = restore::fetch_tree(fetcher, t, dest, force, self.connections).await?;
                (o, t.entries.len() as u64, bytes)
            }
            None => {
                progress.start(Stage::Download, Some(info.size));
                let o = restore::fetch_file(fetcher, &info, dest, force).await?;
                (o, 1, info.size)
            }
        };
        progress.finish(Stage::Download);
        self.evict().await;
        Ok(FetchReport {
            hash: file,
            path: dest.to_owned(),
            tree: tree.is_some(),
            files,
            bytes,
            resumed_bytes: outcome.resumed_bytes,
            kept_files: outcome.kept_files,
            kept_bytes: outcome.kept_bytes,
            transfer: outcome.transfer,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Bytes `range` of a file (all of it without one), verified.
    pub async fn read(&self, file: FileHash, range: Option<ByteRange>) -> Result<Vec<u8>> {
        let range = self.range_or_whole(file, range).await?;
        self.fetcher.read(file, range).await
    }

    /// `range`, or all of the file.
    async fn range_or_whole(&self, file: FileHash, range: Option<ByteRange>) -> Result<ByteRange> {
        Ok(match range {
            Some(r) => r,
            None => ByteRange {
                start: 0,
                end: self.stat(file).await?.size,
            },
        })
    }

    /// Streams `range` of a file (all of it without one) to `out`, in
    /// verified windows; returns the bytes written.
    pub async fn cat<W: AsyncWrite + Unpin>(
        &self,
        file: FileHash,
        range: Option<ByteRange>,
        out: &mut W,
    ) -> Result<u64> {
        let range = self.range_or_whole(file, range).await?;
        let mut pos = range.start;
        while pos < range.end {
            let end = (pos + CAT_WINDOW).min(range.end);
            let bytes = self.read(file, Some(ByteRange { start: pos, end })).await?;
            out.write_all(&bytes)
                .await
                .map_err(Error::io("standard output"))?;
            pos = end;
        }
        out.flush().await.map_err(Error::io("standard output"))?;
        self.evict().await;
        Ok(range.len())
    }

    /// A reader over a stored file that fetches only what is read.
    pub async fn open(&self, file: FileHash) -> Result<FileReader> {
        let info = self.stat(file).await?;
        Ok(FileReader::new(self.fetcher.clone(), file, info.size))
    }

    /// Keeps the cache under its cap; a failure is the cache's, not the
    /// operation's.
    async fn evict(&self) {
        if let Some(c) = self.fetcher.cache.clone() {
            tokio::task::spawn_blocking(move || {
                if let Err(e) = c.evict() {
                    c.write_failed(&e);
                }
            })
            .await
            .expect("eviction does not panic");
        }
    }
}
