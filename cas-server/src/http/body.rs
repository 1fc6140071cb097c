//! Request bodies (bounded in size and time), the `Range`, `ETag` and
//! content-type headers the API reads, and the head and streamed body of
//! answers with immutable objects (xorbs, file contents).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cas_protocol::shard::MAX_SHARD_BYTES;
use cas_protocol::{ByteRange, Encoding};
use futures_util::{Stream, TryStreamExt};
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::response;
use hyper::{Request, Response, StatusCode};
use tokio::time::Instant;

use super::budget::{Budget, BudgetTimeout, Reservation};
use super::error::ApiError;
use super::{empty, Body, BINARY, JSON};
use crate::core::RangeRequest;
use crate::metrics::Metrics;

pub(crate) fn header_contains(headers: &HeaderMap, name: header::HeaderName, needle: &str) -> bool {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(needle))
}

/// The form of a request body: JSON when its Content-Type says so.
pub(crate) fn body_encoding(headers: &HeaderMap) -> Encoding {
    if header_contains(headers, header::CONTENT_TYPE, JSON) {
        Encoding::Json
    } else {
        Encoding::Binary
    }
}

/// Parses a single-range `Range: bytes=...` header.
pub fn parse_range(value: &str) -> Result<RangeRequest, ApiError> {
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_range",
            format!("unsupported Range header {value:?}"),
        )
    };
    let spec = value.trim().strip_prefix("bytes=").ok_or_else(bad)?.trim();
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let num = |s: &str| -> Result<u64, ApiError> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    match (a.trim(), b.trim()) {
        ("", n) => Ok(RangeRequest::Suffix(num(n)?)),
        (s, "") => Ok(RangeRequest::From {
            start: num(s)?,
            end: None,
        }),
        (s, e) => Ok(RangeRequest::From {
            start: num(s)?,
            end: Some(num(e)?),
        }),
    }
}

/// The request's range, if any; an empty `Range` value counts as none.
pub(crate) fn range_header(headers: &HeaderMap) -> Result<Option<RangeRequest>, ApiError> {
    match headers
        .get(header::RANGE)
        .filter(|v| !v.as_bytes().trim_ascii().is_empty())
    {
        None => Ok(None),
        Some(v) => {
            let v = v.to_str().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_range",
                    "non-ASCII Range header",
                )
            })?;
            parse_range(v).map(Some)
        }
    }
}

/// The time bound of a request body: it must deliver `progress_bytes` (or
/// its end) within `timeout`, again and again. A client that trickles a
/// byte a second is cut off as surely as one that sends nothing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyRules {
    pub timeout: Duration,
    pub progress_bytes: usize,
}

/// A request body whose first bytes arrived (or that was empty).
pub(crate) struct Started {
    body: Incoming,
    limit: usize,
    declared: Option<usize>,
    first: Option<Bytes>,
    progress: Progress,
    /// Bytes handed on by [`Started::next_piece`].
    received: usize,
}

/// A request body read whole, with the budget it holds until dropped.
pub(crate) struct Buffered {
    pub bytes: Bytes,
    _reservation: Reservation,
}

/// The body progress rule: each `bytes` must arrive within `timeout`.
struct Progress {
    deadline: Instant,
    got: usize,
    bytes: usize,
    timeout: Duration,
}

impl Progress {
    fn new(rules: BodyRules) -> Self {
        Self {
            deadline: Instant::now() + rules.timeout,
            got: 0,
            bytes: rules.progress_bytes.max(1),
            timeout: rules.timeout,
        }
    }

    /// A new window: time the server made the body wait (for budget or
    /// an upload slot) does not count against the client.
    fn restart(&mut self) {
        self.got = 0;
        self.deadline = Instant::now() + self.timeout;
    }

    fn arrived(&mut self, n: usize) {
        self.got += n;
        if self.got >= self.bytes {
            self.got = 0;
            self.deadline = Instant::now() + self.timeout;
        }
    }

    /// The next frame of `body`, or 408 when progress stalls.
    async fn frame(&mut self, body: &mut Incoming) -> Result<Option<Bytes>, ApiError> {
        loop {
            let frame = tokio::time::timeout_at(self.deadline, body.frame())
                .await
                .map_err(|_| {
                    let mut e = ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "request_timeout",
                        format!(
                            "request body sent less than {} bytes in {:?}",
                            self.bytes, self.timeout
                        ),
                    );
                    e.headers
                        .push((header::CONNECTION, HeaderValue::from_static("close")));
                    e
                })?;
            match frame {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad_body",
                        format!("cannot read request body: {e}"),
                    ))
                }
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.arrived(data.len());
                        if !data.is_empty() {
                            return Ok(Some(data));
                        }
                    }
                }
            }
        }
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("body exceeds {limit} bytes"),
    )
}

/// Waits for the first bytes of a body of at most `limit` bytes (a larger
/// `Content-Length` is refused at once); 408 if none come in time.
pub(crate) async fn start_body(
    req: Request<Incoming>,
    limit: usize,
    rules: BodyRules,
) -> Result<Started, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let mut body = req.into_body();
    let mut progress = Progress::new(rules);
    let first = progress.frame(&mut body).await?;
    Ok(Started {
        body,
        limit,
        declared: declared.map(|n| n as usize),
        first,
        progress,
        received: 0,
    })
}

impl Started {
    /// The body's declared length (Content-Length), if any.
    pub(crate) fn declared(&self) -> Option<usize> {
        self.declared
    }

    /// Reads the rest into one buffer, reserving its bytes from the budget
    /// first: the declared length up front, or as the buffer grows when
    /// the length is not declared. Waits for budget at most the budget's
    /// wait (then 503); 408 when the body stalls.
    pub(crate) async fn finish(
        mut self,
        budget: &Budget,
        metrics: &Metrics,
    ) -> Result<Buffered, ApiError> {
        let busy = |e: BudgetTimeout| busy(e.to_string());
        let mut reservation = budget.empty();
        let Some(first) = self.first.take() else {
            return Ok(Buffered {
                bytes: Bytes::new(),
                _reservation: reservation,
            });
        };
        // One allocation of the whole body when its length is declared:
        // no pieces pinning hyper's read buffers, and freed all at once.
        let initial = self
            .declared
            .unwrap_or_else(|| first.len().max(MIN_GROWTH))
            .min(self.limit);
        reservation.grow(initial).await.map_err(busy)?;
        self.progress.restart();
        let mut buf = BytesMut::with_capacity(initial);
        let mut next = Some(first);
        while let Some(data) = next {
            let needed = buf.len() + data.len();
            if needed > self.limit {
                return Err(too_large(self.limit));
            }
            if needed > buf.capacity() {
                // Only bodies without a declared length grow; the budget
                // holds the new capacity before it is allocated.
                let cap = (buf.capacity() * 2).max(needed).min(self.limit);
                reservation
                    .grow(cap - reservation.len())
                    .await
                    .map_err(busy)?;
                self.progress.restart();
                let mut bigger = BytesMut::with_capacity(cap);
                bigger.extend_from_slice(&buf);
                buf = bigger;
            }
            buf.extend_from_slice(&data);
            next = self.progress.frame(&mut self.body).await?;
        }
        if self.declared.is_some_and(|n| n != buf.len()) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "request body ended before its Content-Length",
            ));
        }
        Metrics::add(&metrics.bytes_in, buf.len() as u64);
        Ok(Buffered {
            bytes: buf.freeze(),
            _reservation: reservation,
        })
    }
}

impl Started {
    /// The next piece of the body as it arrives (`None` at its end), for
    /// a consumer that bounds its own memory (an object ingested while it
    /// streams in): nothing is buffered or reserved here. The limit, a
    /// declared length and the progress rule hold as in
    /// [`Started::finish`].
    pub(crate) async fn next_piece(
        &mut self,
        metrics: &Metrics,
    ) -> Result<Option<Bytes>, ApiError> {
        let next = match self.first.take() {
            Some(d) => Some(d),
            None => self.progress.frame(&mut self.body).await?,
        };
        let Some(data) = next else {
            if self.declared.is_some_and(|n| n != self.received) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    "request body ended before its Content-Length",
                ));
            }
            return Ok(None);
        };
        self.received += data.len();
        if self.received > self.limit {
            return Err(too_large(self.limit));
        }
        if self.declared.is_some_and(|n| self.received > n) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "request body longer than its Content-Length",
            ));
        }
        Metrics::add(&metrics.bytes_in, data.len() as u64);
        Ok(Some(data))
    }

    /// Reads the rest like [`Started::finish`], but hands the body to
    /// `sink` in pieces of about [`PIECE`] bytes as it arrives, so their
    /// checks overlap the transfer; [`Streamed::join`] then makes the
    /// pieces one buffer again. Only for bodies with a declared length
    /// (`None` otherwise: use `finish`): the budget holds the declared
    /// length, and the progress rule applies, as in `finish`. A sink that
    /// stops taking pieces (a check failed) does not stop the read: the
    /// body is read to its end either way, as `finish` does.
    pub(crate) async fn finish_streaming(
        mut self,
        budget: &Budget,
        metrics: &Metrics,
        sink: std::sync::mpsc::Sender<BytesMut>,
    ) -> Result<Option<Streamed>, ApiError> {
        let Some(declared) = self.declared else {
            return Ok(None);
        };
        let mut reservation = budget.empty();
        reservation
            .grow(declared)
            .await
            .map_err(|e| busy(e.to_string()))?;
        self.progress.restart();
        let mut buf = crate::store::aligned_buffer(declared);
        let mut sent = 0usize;
        let mut next = self.first.take();
        while let Some(data) = next {
            if sent + buf.len() + data.len() > declared {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    "request body longer than its Content-Length",
                ));
            }
            buf.extend_from_slice(&data);
            if buf.len() >= PIECE {
                sent += buf.len();
                let _ = sink.send(buf.split());
            }
            next = self.progress.frame(&mut self.body).await?;
        }
        if sent + buf.len() != declared {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "request body ended before its Content-Length",
            ));
        }
        if !buf.is_empty() {
            let _ = sink.send(buf.split());
        }
        Metrics::add(&metrics.bytes_in, declared as u64);
        Ok(Some(Streamed {
            _reservation: reservation,
        }))
    }
}

/// A body read by [`Started::finish_streaming`], holding its budget until
/// its pieces are joined.
pub(crate) struct Streamed {
    _reservation: Reservation,
}

impl Streamed {
    /// The pieces of the body, in order, as one buffer: they were cut from
    /// one allocation, so joining them copies nothing.
    pub(crate) fn join(self, pieces: Vec<BytesMut>) -> Buffered {
        let mut pieces = pieces.into_iter();
        let mut whole = pieces.next().unwrap_or_default();
        pieces.for_each(|p| whole.unsplit(p));
        Buffered {
            bytes: whole.freeze(),
            _reservation: self._reservation,
        }
    }
}

/// Bytes per piece handed on by [`Started::finish_streaming`].
pub(crate) const PIECE: usize = 1 << 20;

/// First reservation of a body of undeclared length.
const MIN_GROWTH: usize = 64 * 1024;

/// 503: the server is at a bound and the client should retry. The body
/// (if any) is left unread, so the connection closes after the answer.
pub(crate) fn busy(message: String) -> ApiError {
    let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message);
    e.headers
        .push((header::RETRY_AFTER, HeaderValue::from_static("1")));
    e.headers
        .push((header::CONNECTION, HeaderValue::from_static("close")));
    e
}

/// Reads a whole request body of at most `limit` bytes under `rules`,
/// buffered within `budget`.
pub(crate) async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    rules: BodyRules,
    budget: &Budget,
    metrics: &Metrics,
) -> Result<Buffered, ApiError> {
    start_body(req, limit, rules)
        .await?
        .finish(budget, metrics)
        .await
}

/// Reads and drops a refused request's body (at most a shard's worth, for
/// at most 30 s) before answering. A proxy that streams the body upstream
/// (nginx with request buffering off) turns an early answer followed by a
/// closed connection into a 502; draining lets the 401/403 through.
pub(crate) async fn drain(req: Request<Incoming>) {
    let mut body = Limited::new(req.into_body(), MAX_SHARD_BYTES);
    let read_all = async { while let Some(Ok(_)) = body.frame().await {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), read_all).await;
}

fn etag_matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == etag)
}

/// `Cache-Control` of content-addressed answers: their bytes never change.
pub(crate) const CACHE_IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// How to answer a GET or HEAD of an immutable object.
pub(crate) enum ObjectHead {
    /// `If-None-Match` matched: this 304 is the whole answer.
    NotModified(Response<Body>),
    /// Send `range` of the object; the builder holds the status (200 or
    /// 206) and every header but the caller's own.
    Send(response::Builder, ByteRange),
}

/// The head of the answer to a GET or HEAD of an immutable object of
/// `size` bytes named by the strong `etag` (quoted): a strong `ETag`,
/// `Cache-Control: immutable`, `Accept-Ranges`, and then 304 for a
/// matching `If-None-Match`, 206 with `Content-Range` for one `Range`
/// (416 outside the object), else 200; `Content-Length` of what follows.
pub(crate) fn object_head(
    headers: &HeaderMap,
    size: u64,
    etag: &str,
    what: &str,
) -> Result<ObjectHead, ApiError> {
    let mut builder = Response::builder()
        .header(header::ETAG, etag)
        .header(header::CACHE_CONTROL, CACHE_IMMUTABLE)
        .header(header::ACCEPT_RANGES, "bytes");
    if etag_matches(headers, etag) {
        return Ok(ObjectHead::NotModified(
            builder
                .status(StatusCode::NOT_MODIFIED)
                .body(empty())
                .expect("valid response"),
        ));
    }
    let (status, range) = match range_header(headers)? {
        None => (
            StatusCode::OK,
            ByteRange {
                start: 0,
                end: size,
            },
        ),
        Some(r) => {
            let range = r.resolve(size).ok_or_else(|| {
                ApiError::unsatisfiable(size, format!("range outside a {what} of {size} bytes"))
            })?;
            let cr = format!("bytes {}-{}/{size}", range.start, range.end - 1);
            builder = builder.header(header::CONTENT_RANGE, cr);
            (StatusCode::PARTIAL_CONTENT, range)
        }
    };
    Ok(ObjectHead::Send(
        builder
            .status(status)
            .header(header::CONTENT_TYPE, BINARY)
            .header(header::CONTENT_LENGTH, range.len()),
        range,
    ))
}

/// A streamed response body whose bytes count in `bytes_out` and in
/// `counter` as they go.
pub(crate) fn counted_stream(
    stream: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    metrics: Arc<Metrics>,
    counter: fn(&Metrics) -> &AtomicU64,
) -> Body {
    let frames = stream.map_ok(move |chunk| {
        let n = chunk.len() as u64;
        Metrics::add(&metrics.bytes_out, n);
        Metrics::add(counter(&metrics), n);
        Frame::data(chunk)
    });
    BodyExt::boxed_unsync(StreamBody::new(frames))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_header_forms() {
        assert_eq!(
            parse_range("bytes=0-9").unwrap(),
            RangeRequest::From {
                start: 0,
                end: Some(9)
            }
        );
        assert_eq!(
            parse_range("bytes=5-").unwrap(),
            RangeRequest::From {
                start: 5,
                end: None
            }
        );
        assert_eq!(parse_range("bytes=-5").unwrap(), RangeRequest::Suffix(5));
        for bad in [
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "bytes=0-1,2-3",
            "items=0-1",
            "bytes=99999999999999999999-",
        ] {
            assert!(parse_range(bad).is_err(), "{bad}");
        }
    }
}
