//! Thin hyper handlers over the storage core: parse the request, bound the
//! body, call the core, map its answer or error to HTTP. Two frontends
//! share the port, chosen by path ([`handle`]):
//!
//! - [`v1`]: the CAS API (routes, handlers); errors are JSON
//!   `{"error": "<stable code>", "message": "..."}` ([`error`]);
//! - [`hf`]: the Hugging Face Hub–compatible API (`/api/...` and
//!   `.../resolve/...`), with the Hub's error headers;
//! - [`lfs`]: the Git LFS batch API and basic transfer
//!   (`/[datasets/]{org}/{name}.git/info/lfs/...`);
//! - [`repos`]: its repository routes and the access check of tokens
//!   limited to repositories;
//! - [`body`]: request bodies (bounded in size, time and memory), `Range`
//!   and `ETag` headers; [`budget`]: the memory budget of all bodies;
//! - [`conn`]: the connection cap and the idle and header timeouts.

pub mod admin;
pub mod body;
pub mod budget;
pub mod conn;
pub mod error;
pub mod hf;
pub mod lfs;
pub mod repos;
pub mod v1;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use self::budget::Budget;
use self::conn::{Connections, Guarded, RequestGuard, Timeouts};
use crate::auth::{Access, Denied, Grant, Scope};
use crate::core::Core;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::store::ObjectStore;
use crate::Limits;

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Read buffer of one connection.
const MAX_CONNECTION_BUFFER: usize = 64 * 1024;

const BINARY: &str = "application/octet-stream";
const JSON: &str = "application/json";

/// How a node answers xorb reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum XorbReads {
    /// Streams the bytes (from disk or the bucket) itself.
    #[default]
    Stream,
    /// 307 to a presigned URL of the object in the bucket, valid for
    /// [`REDIRECT_TTL`]: the bytes bypass the node. Stores that cannot
    /// presign (the filesystem) stream.
    Redirect,
}

/// How long a presigned xorb URL of [`XorbReads::Redirect`] stays valid.
pub const REDIRECT_TTL: Duration = Duration::from_secs(300);

/// Everything a request handler needs.
pub struct App<O, I> {
    pub core: Core<O, I>,
    pub metrics: Arc<Metrics>,
    /// Base URL put in front of `/v1/xorbs/...` in reconstruction answers;
    /// `None`: the local address the client's connection reached.
    pub public_url: Option<String>,
    /// How `GET /v1/xorbs/<hash>` is answered.
    pub xorb_reads: XorbReads,
    /// Xorb uploads buffered and verified at once (CPU and blocking
    /// threads); taken once a body's first bytes arrived.
    pub upload_permits: Semaphore,
    /// Memory of all request bodies buffered at once.
    pub budget: Budget,
    pub connections: Arc<Connections>,
    pub limits: Limits,
    pub access: Access,
    /// Work that finishes even when its client has gone (a xorb whose body
    /// arrived is stored and indexed); shutdown waits for it.
    pub tasks: TaskTracker,
}

impl<O, I> App<O, I> {
    pub fn new(core: Core<O, I>, metrics: Arc<Metrics>, limits: Limits, access: Access) -> Self {
        Self {
            core,
            metrics,
            public_url: None,
            xorb_reads: XorbReads::Stream,
            upload_permits: Semaphore::new(limits.max_concurrent_uploads.max(1)),
            budget: Budget::new(limits.body_budget, limits.queue_timeout),
            connections: Connections::new(limits.max_connections),
            limits,
            access,
            tasks: TaskTracker::new(),
        }
    }

    pub(crate) fn body_rules(&self) -> body::BodyRules {
        body::BodyRules {
            timeout: self.limits.body_timeout,
            progress_bytes: self.limits.body_progress_bytes,
        }
    }

    /// `/metrics`: the counters plus the gauges of held resources.
    pub(crate) fn render_metrics(&self) -> String {
        let c = &self.connections;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let in_use =
            self.limits.max_concurrent_uploads.max(1) - self.upload_permits.available_permits();
        self.metrics.render(&[
            (
                "cas_open_connections",
                "gauge",
                "Open connections.",
                c.open() as u64,
            ),
            (
                "cas_connections_evicted_total",
                "counter",
                "Idle connections closed to make room at the connection cap.",
                load(&c.evicted),
            ),
            (
                "cas_idle_timeouts_total",
                "counter",
                "Connections closed after the idle timeout.",
                load(&c.idle_timeouts),
            ),
            (
                "cas_header_timeouts_total",
                "counter",
                "Connections closed because a request head took longer than the header timeout.",
                load(&c.header_timeouts),
            ),
            (
                "cas_write_timeouts_total",
                "counter",
                "Connections closed because the client took no bytes of an answer for the body timeout.",
                load(&c.write_timeouts),
            ),
            (
                "cas_body_bytes_reserved",
                "gauge",
                "Bytes of the request body budget held.",
                self.budget.reserved() as u64,
            ),
            (
                "cas_upload_slots_in_use",
                "gauge",
                "Xorb uploads being received or verified.",
                in_use as u64,
            ),
        ])
    }
}

/// A response body that keeps its request's mark on the connection
/// ([`RequestGuard`]) until hyper has sent it and dropped it.
struct Held {
    body: Body,
    _guard: RequestGuard,
}

impl hyper::body::Body for Held {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

pub(crate) fn full_body(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(full_body(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub(crate) fn empty() -> Body {
    full_body(Bytes::new())
}

pub(crate) fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    full(status, JSON, serde_json::to_vec(value).expect("json"))
}

/// Serves one request from `peer` that reached this server at `local`:
/// Git LFS paths go to [`lfs`], the Hub API's to [`hf`], everything else
/// to [`v1`]. Never
/// fails (errors are answers); counts the answer in the metrics.
pub async fn handle<O: ObjectStore, I: Index>(
    app: Arc<App<O, I>>,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let (label, mut response) = if let Some(routed) = lfs::route(&method, &path) {
        lfs::handle(&app, routed, req, peer, local).await
    } else if let Some(routed) = hf::route(&method, &path) {
        hf::handle(&app, routed, req, peer, local).await
    } else {
        v1::handle(&app, req, peer, local).await
    };
    if method == Method::HEAD {
        *response.body_mut() = empty();
    }
    app.metrics.request(label, response.status().as_u16());
    tracing::debug!(%method, %path, status = response.status().as_u16(), "request");
    Ok(response)
}

/// The access check of one request whose route needs `scope`.
pub(crate) fn check_access<O, I>(
    app: &App<O, I>,
    req: &Request<Incoming>,
    peer: SocketAddr,
    scope: Option<Scope>,
) -> Result<Grant, Denied> {
    let authorization = req.headers().get(header::AUTHORIZATION);
    app.access.check(
        peer,
        scope,
        authorization.map(HeaderValue::as_bytes),
        crate::auth::now(),
    )
}

/// The base URL of read URLs (xorbs, file contents) handed to a client
/// that reached this server at `local`: `--public-url`, else that
/// address — never the `Host` header, so a client cannot point the URLs
/// elsewhere.
pub(crate) fn read_base<O, I>(app: &App<O, I>, local: SocketAddr) -> String {
    match &app.public_url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => origin(local),
    }
}

/// `http://ADDR` for a local address (an IPv4 client of a dual-stack
/// socket as IPv4; no IPv6 scope, which URLs cannot carry as is).
fn origin(local: SocketAddr) -> String {
    match local {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => format!("http://{v4}:{}", a.port()),
            None => format!("http://[{}]:{}", a.ip(), a.port()),
        },
        SocketAddr::V4(a) => format!("http://{a}"),
    }
}

/// Accepts connections on `listener` and serves them until `shutdown`
/// completes, then lets open requests finish (for at most 10 seconds).
pub async fn serve<O: ObjectStore, I: Index>(
    listener: TcpListener,
    app: Arc<App<O, I>>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let timeouts = Timeouts {
        header: app.limits.header_timeout,
        idle: app.limits.idle_timeout,
        write: app.limits.body_timeout,
    };
    tokio::pin!(shutdown);
    loop {
        // A connection beyond the cap waits here, accepted, until a slot
        // frees; the ones after it wait in the listen backlog.
        let next = async {
            let (stream, peer) = loop {
                match listener.accept().await {
                    Ok(a) => break a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            };
            (stream, peer, app.connections.admit().await)
        };
        let (stream, peer, slot) = tokio::select! {
            n = next => n,
            () = &mut shutdown => break,
        };
        // Small answers (dedup, reconstruction, the last bytes of a range)
        // must not wait for a delayed ACK on a reused connection (Nagle).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        // The address the client reached: the base of xorb URLs when no
        // --public-url is set (a Host header is the client's to forge).
        let local = match stream.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection without a local address");
                continue;
            }
        };
        let conn = slot.conn();
        let app = app.clone();
        let service = service_fn(move |req| {
            let (app, conn) = (app.clone(), conn.clone());
            async move {
                let Some(guard) = conn.begin_request() else {
                    // Evicted while this request's head was arriving.
                    let r = body::busy("connection closed to make room".into());
                    return Ok::<_, std::convert::Infallible>(r.into_response());
                };
                let r = handle(app, req, peer, local).await?;
                Ok(r.map(|body| {
                    Held {
                        body,
                        _guard: guard,
                    }
                    .boxed_unsync()
                }))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            // Ours, counted from a head's first byte (conn.rs); hyper's
            // would also end every idle connection.
            .header_read_timeout(None)
            // What one connection may buffer of unparsed input (a head, or
            // body bytes not yet handed over): the bodies themselves are
            // in the budget, this bounds the rest (4096 connections: at
            // most 256 MiB, where hyper's default allows 400 KiB each).
            .max_buf_size(MAX_CONNECTION_BUFFER)
            .serve_connection(
                TokioIo::new(Guarded::new(stream, slot.conn(), timeouts)),
                service,
            );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    app.tasks.close();
    let finish = async {
        graceful.shutdown().await;
        app.tasks.wait().await;
    };
    if tokio::time::timeout(Duration::from_secs(10), finish)
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10 s; closing them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_of_local_addresses() {
        for (addr, want) in [
            ("127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("[::1]:9", "http://[::1]:9"),
            ("[::ffff:10.1.2.3]:80", "http://10.1.2.3:80"),
            ("[fe80::1%2]:80", "http://[fe80::1]:80"),
        ] {
            assert_eq!(origin(addr.parse().unwrap()), want);
        }
    }
}
