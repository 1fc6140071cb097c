//! The CAS server as a library: a storage core ([`core`]) over a
//! [`store::ObjectStore`] and an [`index::Index`], behind thin HTTP
//! handlers ([`http`]). Embed it with [`Server::bind`] and [`Server::run`].

pub mod auth;
pub mod core;
pub mod http;
pub mod index;
pub mod metrics;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::auth::{Access, SigningKey};
use crate::core::{CatchUp, Core};
use crate::http::App;
use crate::index::{Index, IndexError, RocksIndex, Totals};
use crate::metrics::Metrics;
use crate::store::{AnyStore, FsStore, Metered, S3Config, S3Store};

pub use cas_protocol as protocol;

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// The index (a cache of the store with S3), and the objects with the
    /// filesystem store.
    pub data_dir: PathBuf,
    /// Where objects live.
    pub store: StoreConfig,
    /// With a shared store (S3): how often the index catches up with
    /// shards other nodes committed (what dedup learns of them late).
    pub catch_up_every: Duration,
    /// How xorb reads are answered (a presigned redirect needs S3).
    pub xorb_reads: http::XorbReads,
    /// Base URL for xorb reads in reconstruction answers (a CDN or cache);
    /// `None`: the local address the client connected to.
    pub public_url: Option<String>,
    /// Checks bearer tokens when set; without it only loopback clients
    /// are served.
    pub signing_key: Option<SigningKey>,
    pub limits: Limits,
    /// How long what requests build on (dedup answers, uploads, commits
    /// not yet rooted) is leased against garbage collection, and the
    /// grace period of the server's own gc runs.
    pub gc_grace: Duration,
    /// Run garbage collection (with `gc_grace`) this often inside the
    /// server; `None`: only when asked (`POST /v1/admin/gc`).
    pub gc_interval: Option<Duration>,
}

/// Where the objects live.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreConfig {
    /// Files under `<data dir>/objects` (one server per data dir: the
    /// index's lock keeps a second one off).
    #[default]
    DataDir,
    /// An S3 bucket (the source of truth several nodes can share).
    S3(S3Config),
}

/// What one client may hold of the server: connections, time, memory and
/// upload slots. docs/API.md ("Limits and timeouts") says which failure
/// each bound prevents.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections; at the cap the longest-idle connection is closed
    /// for a new one, and if none is idle new ones wait in the backlog.
    pub max_connections: usize,
    /// How long a connection may take to send a request's head, counted
    /// from its first byte.
    pub header_timeout: Duration,
    /// How long a connection may stay open with no request on it.
    pub idle_timeout: Duration,
    /// A request body must deliver `body_progress_bytes` (or its end)
    /// within this time, again and again, or it is answered 408; a write
    /// of an answer that the client does not take fails after it.
    pub body_timeout: Duration,
    pub body_progress_bytes: usize,
    /// All request bodies buffered at once, together.
    pub body_budget: usize,
    /// How long a request waits for body budget or an upload slot before
    /// it is answered 503.
    pub queue_timeout: Duration,
    /// Xorb uploads buffered and verified at once; a slot is taken once
    /// the body's first bytes arrived.
    pub max_concurrent_uploads: usize,
}

/// File descriptors kept for everything but connections: RocksDB's files,
/// logs, the listener, the runtime's own (a quarter of the limit, at least
/// this many).
const RESERVED_FDS: u64 = 64;

/// The default connection cap: no more than this, however many file
/// descriptors there are (each connection costs memory too).
const MAX_DEFAULT_CONNECTIONS: u64 = 4096;

impl Limits {
    /// The largest request body (a shard): the budget must hold one.
    pub const LARGEST_BODY: usize = cas_protocol::shard::MAX_SHARD_BYTES;

    /// A connection cap that fits `nofile` descriptors: a quarter (at least
    /// 64) stays for RocksDB and the process, and each connection may hold
    /// its socket and one object file (a xorb read or write).
    pub fn max_connections_for(nofile: u64) -> usize {
        let reserved = (nofile / 4).max(RESERVED_FDS);
        let cap = nofile.saturating_sub(reserved) / 2;
        cap.clamp(1, MAX_DEFAULT_CONNECTIONS) as usize
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(120),
            body_timeout: Duration::from_secs(30),
            body_progress_bytes: 64 * 1024,
            body_budget: 1 << 30,
            queue_timeout: Duration::from_secs(30),
            max_concurrent_uploads: 8,
        }
    }
}

/// Raises the soft limit of open files to the hard limit (capped at 2^20,
/// Linux's usual per-process maximum) and returns the limit in force. The
/// soft limit is often 1024, which a few hundred idle clients exhaust.
pub fn raise_nofile_limit() -> u64 {
    rlimit::increase_nofile_limit(1 << 20).unwrap_or_else(|e| {
        let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
        tracing::warn!(error = %e, soft, "cannot raise the open file limit");
        soft
    })
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open object store in {path}: {source}")]
    Objects {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use S3 bucket {bucket}: {source}")]
    Bucket {
        bucket: String,
        source: std::io::Error,
    },
    #[error("cannot open index in {path}: {source}")]
    Index { path: PathBuf, source: IndexError },
    #[error("index rebuild failed: {0}")]
    Rebuild(String),
    #[error("--body-budget of {budget} bytes cannot hold one {largest}-byte request body")]
    BudgetTooSmall { budget: usize, largest: usize },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn open_store(config: &Config) -> Result<AnyStore, StartError> {
    match &config.store {
        StoreConfig::DataDir => {
            let dir = config.data_dir.join("objects");
            match FsStore::open(&dir) {
                Ok(s) => Ok(AnyStore::Fs(s)),
                Err(source) => Err(StartError::Objects { path: dir, source }),
            }
        }
        StoreConfig::S3(s3) => match S3Store::new(s3) {
            Ok(s) => Ok(AnyStore::S3(s)),
            Err(source) => Err(StartError::Bucket {
                bucket: s3.bucket.clone(),
                source,
            }),
        },
    }
}

/// Keeps the index of a node on a shared store current: a rebuild (an
/// empty index) or a catch-up at start, then a catch-up every `every`.
/// Failures are logged and retried at the next tick; misses catch up on
/// their own meanwhile.
fn spawn_catch_up<O: store::ObjectStore, I: Index>(core: Core<O, I>, empty: bool, every: Duration) {
    tokio::spawn(async move {
        if empty {
            let start = std::time::Instant::now();
            match core.rebuild_index().await {
                Ok(done) => tracing::info!(
                    ?done,
                    secs = start.elapsed().as_secs_f64(),
                    "index rebuilt from the store"
                ),
                Err(e) => tracing::warn!(error = %e, "index rebuild failed; catching up later"),
            }
        }
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = core.catch_up().await {
                tracing::warn!(error = %e, "catch-up with the store failed");
            }
        }
    });
}

/// Runs garbage collection every `every` (the first run after one
/// period), logging what each run did; a failed run is retried at the next.
fn spawn_gc<O: store::ObjectStore, I: Index>(core: Core<O, I>, every: Duration, grace: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let options = core::gc::GcOptions::default().with_grace(grace);
            match core.gc(&options, false).await {
                Ok(run) => {
                    let r = run.report.unwrap_or_default();
                    tracing::info!(
                        files_removed = r.files_removed,
                        condemned = r.condemned.xorbs,
                        recovered = r.recovered.xorbs,
                        deleted = r.deleted.xorbs,
                        bytes_freed = r.deleted.bytes,
                        kept_leased = r.skipped_leased + r.files_leased,
                        "scheduled garbage collection run"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "scheduled garbage collection run failed"),
            }
        }
    });
}

/// `cas-server index rebuild`: the index of `config`'s data dir rebuilt
/// from its store (the server must not run on it: RocksDB's lock).
pub async fn rebuild_index(config: &Config) -> Result<CatchUp, StartError> {
    let index_dir = config.data_dir.join("index");
    let index = RocksIndex::open(&index_dir).map_err(|source| StartError::Index {
        path: index_dir.clone(),
        source,
    })?;
    let objects = open_store(config)?;
    let core = Core::new(objects, index).shared();
    core.rebuild_index()
        .await
        .map_err(|e| StartError::Rebuild(e.to_string()))
}

/// The core over a configuration's index and store when no server runs on
/// them: `gc`, `fsck` and `repair` offline. The index's lock keeps a
/// server off the data dir meanwhile (nodes sharing a bucket must all be
/// stopped: their leases are in their memory).
pub fn open_offline(config: &Config) -> Result<Core<AnyStore, RocksIndex>, StartError> {
    let index_dir = config.data_dir.join("index");
    let index = RocksIndex::open(&index_dir).map_err(|source| StartError::Index {
        path: index_dir.clone(),
        source,
    })?;
    let objects = open_store(config)?;
    Ok(Core::new(objects, index))
}

/// A bound, ready server over the store the configuration names and a
/// RocksDB index.
pub struct Server {
    listener: TcpListener,
    app: Arc<App<Metered<AnyStore>, RocksIndex>>,
}

impl Server {
    /// Opens the data directory (objects in `objects/`, index in `index/`)
    /// and binds the listening socket.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let limits = config.limits.clone();
        if limits.body_budget < Limits::LARGEST_BODY {
            return Err(StartError::BudgetTooSmall {
                budget: limits.body_budget,
                largest: Limits::LARGEST_BODY,
            });
        }
        // The index first: its lock keeps a second server off this data
        // dir before the object store clears the temp files.
        let index_dir = config.data_dir.join("index");
        let index = RocksIndex::open(&index_dir).map_err(|source| StartError::Index {
            path: index_dir.clone(),
            source,
        })?;
        let objects = open_store(&config)?;
        let totals = index.totals().map_err(|source| StartError::Index {
            path: config.data_dir.join("index"),
            source,
        })?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let metrics = Arc::new(Metrics::new(totals));
        if let Some(fsck) = core::gc::FsckRecord::load(&config.data_dir) {
            metrics.fsck(&fsck);
        }
        let objects = Metered::new(objects, metrics.clone());
        let mut core = Core::with_metrics(objects, index, metrics.clone())
            .with_leases(config.gc_grace, core::Clock::default());
        if let StoreConfig::S3(_) = config.store {
            core = core.shared();
            spawn_catch_up(
                core.clone(),
                totals == Totals::default(),
                config.catch_up_every,
            );
        }
        if let Some(every) = config.gc_interval {
            spawn_gc(core.clone(), every, config.gc_grace);
        }
        let mut app = App::new(
            core,
            metrics,
            limits,
            match config.signing_key {
                Some(k) => Access::Tokens(k),
                None => Access::LoopbackOnly,
            },
        );
        app.public_url = config.public_url;
        app.xorb_reads = config.xorb_reads;
        Ok(Self {
            listener,
            app: Arc::new(app),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then lets open requests finish
    /// (for at most 10 seconds).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        http::serve(self.listener, self.app, shutdown).await
    }
}
