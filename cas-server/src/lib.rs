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
    /// `None`: the host the client connected to.
    pub public_url: Option<String>,
    /// Xorb uploads verified at once (each may hold 64 MiB in memory).
    pub max_concurrent_uploads: usize,
    /// Checks bearer tokens when set; without it only loopback clients
    /// are served.
    pub signing_key: Option<SigningKey>,
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
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
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
        // The index first: its lock keeps a second server off this data
        // dir before the object store clears the temp files.
        let index_dir = config.data_dir.join("index");
        let index = RocksIndex::open(&index_dir).map_err(|source| StartError::Index {
            path: index_dir.clone(),
            source,
        })?;
        let objects_dir = config.data_dir.join("objects");
        let objects = FsStore::open(&objects_dir).map_err(|source| StartError::Objects {
            path: objects_dir.clone(),
            source,
        })?;
        let totals = index.totals().map_err(|source| StartError::Index {
            path: index_dir,
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
        let app = App {
            core: Core::with_metrics(objects, index, metrics.clone()),
            metrics,
            public_url: config.public_url,
            upload_permits: tokio::sync::Semaphore::new(config.max_concurrent_uploads.max(1)),
            access: match config.signing_key {
                Some(k) => Access::Tokens(k),
                None => Access::LoopbackOnly,
            },
        };
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
