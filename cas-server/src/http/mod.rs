//! Thin hyper handlers over the storage core: parse the request, bound the
//! body, call the core, map its answer or error to HTTP.
//!
//! - [`v1`]: the CAS API (routes, handlers); errors are JSON
//!   `{"error": "<stable code>", "message": "..."}` ([`error`]);
//! - [`body`]: request bodies, `Range` and `ETag` headers.

pub mod body;
pub mod error;
pub mod v1;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::auth::Access;
use crate::core::Core;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::store::ObjectStore;

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

const BINARY: &str = "application/octet-stream";
const JSON: &str = "application/json";

/// Everything a request handler needs.
pub struct App<O, I> {
    pub core: Core<O, I>,
    pub metrics: Arc<Metrics>,
    /// Base URL put in front of `/v1/xorbs/...` in reconstruction answers;
    /// `None`: the `Host` the client used.
    pub public_url: Option<String>,
    /// Bounds memory: each in-flight xorb upload holds up to 64 MiB.
    pub upload_permits: Semaphore,
    pub access: Access,
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

/// Accepts connections on `listener` and serves them until `shutdown`
/// completes, then lets open requests finish (for at most 10 seconds).
pub async fn serve<O: ObjectStore, I: Index>(
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
        let service = service_fn(move |req| v1::handle(app.clone(), req, peer));
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
