//! The CAS server as a library: a storage core ([`core`]) over an
//! [`object_store::ObjectStore`] and an [`index::Index`], behind thin HTTP
//! handlers ([`http`]). Embed it with [`Server::bind`] and [`Server::run`].

pub mod auth;
pub mod core;
pub mod http;
pub mod index;
pub mod metrics;
pub mod object_store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::auth::{Access, SigningKey};
use crate::core::Core;
use crate::http::App;
use crate::index::{Index, IndexError, RocksIndex};
use crate::metrics::Metrics;
use crate::object_store::{FsStore, ObjectStore};

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
        let app = App {
            core: Core::new(objects, index),
            metrics: Arc::new(Metrics::new(totals)),
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
        serve(self.listener, self.app, shutdown).await
    }
}

async fn serve<O: ObjectStore, I: Index>(
    listener: TcpListener,
    app: Arc<App<O, I>>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small answers (dedup, reconstruction, the last bytes of a range)
        // must not wait for a delayed ACK on a reused connection (Nagle).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let app = app.clone();
        let service = service_fn(move |req| http::handle(app.clone(), req, peer));
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10 s; closing them");
    }
    Ok(())
}
