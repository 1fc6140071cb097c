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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::auth::{Access, SigningKey};
use crate::core::Core;
use crate::http::App;
use crate::index::{Index, IndexError, RocksIndex};
use crate::metrics::Metrics;
use crate::store::FsStore;

pub use cas_protocol as protocol;

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Base URL for xorb reads in reconstruction answers (a CDN or cache);
    /// `None`: the local address the client connected to.
    pub public_url: Option<String>,
    /// Checks bearer tokens when set; without it only loopback clients
    /// are served.
    pub signing_key: Option<SigningKey>,
    pub limits: Limits,
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
    #[error("cannot open index in {path}: {source}")]
    Index { path: PathBuf, source: IndexError },
    #[error("--body-budget of {budget} bytes cannot hold one {largest}-byte request body")]
    BudgetTooSmall { budget: usize, largest: usize },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Opens a data directory's stores: objects in `objects/`, the index in
/// `index/`. The index first: its lock keeps a second process off the
/// directory (a running server, or `gc` and `fsck` run offline) before
/// the object store clears the temp files.
pub fn open_data_dir(data_dir: &Path) -> Result<(FsStore, RocksIndex), StartError> {
    let index_dir = data_dir.join("index");
    let index = RocksIndex::open(&index_dir).map_err(|source| StartError::Index {
        path: index_dir.clone(),
        source,
    })?;
    let objects_dir = data_dir.join("objects");
    let objects = FsStore::open(&objects_dir).map_err(|source| StartError::Objects {
        path: objects_dir.clone(),
        source,
    })?;
    Ok((objects, index))
}

/// The core over a data directory no server is running on (`gc`, `fsck`
/// and `repair` offline).
pub fn open_offline(data_dir: &Path) -> Result<Core<FsStore, RocksIndex>, StartError> {
    let (objects, index) = open_data_dir(data_dir)?;
    Ok(Core::new(objects, index))
}

/// A bound, ready server over the embedded default stores.
pub struct Server {
    listener: TcpListener,
    app: Arc<App<FsStore, RocksIndex>>,
}

impl Server {
    /// Opens the data directory (objects in `objects/`, index in `index/`)
    /// and binds the listening socket.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let limits = config.limits;
        if limits.body_budget < Limits::LARGEST_BODY {
            return Err(StartError::BudgetTooSmall {
                budget: limits.body_budget,
                largest: Limits::LARGEST_BODY,
            });
        }
        let (objects, index) = open_data_dir(&config.data_dir)?;
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
        let mut app = App::new(
            Core::with_metrics(objects, index, metrics.clone()),
            metrics,
            limits,
            match config.signing_key {
                Some(k) => Access::Tokens(k),
                None => Access::LoopbackOnly,
            },
        );
        app.public_url = config.public_url;
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
