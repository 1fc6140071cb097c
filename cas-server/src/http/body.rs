//! Request bodies (bounded in size and time) and the `Range`, `ETag` and
//! content-type headers the API reads.

use bytes::Bytes;
use cas_protocol::shard::MAX_SHARD_BYTES;
use cas_protocol::Encoding;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap};
use hyper::{Request, StatusCode};

use super::error::ApiError;
use super::JSON;
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

/// Reads a request body of at most `limit` bytes.
pub(crate) async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    metrics: &Metrics,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("body exceeds {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("cannot read request body: {e}"),
                )
            }
        })?;
    let bytes = body.to_bytes();
    Metrics::add(&metrics.bytes_in, bytes.len() as u64);
    Ok(bytes)
}

/// Reads and drops a refused request's body (at most a shard's worth, for
/// at most 30 s) before answering. A proxy that streams the body upstream
/// (nginx with request buffering off) turns an early answer followed by a
/// closed connection into a 502; draining lets the 401/403 through.
/// Reads and drops a refused request's body (at most a shard's worth, for
/// at most 30 s) before answering. A proxy that streams the body upstream
/// (nginx with request buffering off) turns an early answer followed by a
/// closed connection into a 502; draining lets the 401/403 through.
pub(crate) async fn drain(req: Request<Incoming>) {
    let mut body = Limited::new(req.into_body(), MAX_SHARD_BYTES);
    let read_all = async { while let Some(Ok(_)) = body.frame().await {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), read_all).await;
}

pub(crate) fn etag_matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == etag)
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
