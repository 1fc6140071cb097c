//! API errors: one stable code and status per failure, rendered as JSON
//! `{"error": code, "message": ...}`. Internal errors are logged, never
//! shown.

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;

use super::{full, Body, JSON};
use cas_protocol::xorb::XorbError;
use cas_protocol::MessageError;

use crate::auth::Denied;
use crate::core::CoreError;

/// An HTTP error with its stable code.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    code: &'static str,
    message: String,
    pub(crate) headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            headers: vec![],
        }
    }

    /// 416, with the `Content-Range: bytes */SIZE` that HTTP asks for.
    pub(crate) fn unsatisfiable(size: u64, message: String) -> Self {
        let mut err = Self::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "range_not_satisfiable",
            message,
        );
        let value = HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii");
        err.headers.push((header::CONTENT_RANGE, value));
        err
    }

    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn into_response(self) -> Response<Body> {
        #[derive(Serialize)]
        struct E<'a> {
            error: &'a str,
            message: &'a str,
        }
        let body = serde_json::to_vec(&E {
            error: self.code,
            message: &self.message,
        })
        .expect("json");
        let mut r = full(self.status, JSON, body);
        r.headers_mut().extend(self.headers);
        r
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        let message = d.to_string();
        match d {
            Denied::NoToken | Denied::Unauthenticated(_) => {
                let mut e = Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
                e.headers
                    .push((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
                e
            }
            Denied::MissingScope(_) | Denied::Forbidden(_) => {
                Self::new(StatusCode::FORBIDDEN, "forbidden", message)
            }
        }
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        use StatusCode as S;
        let message = e.to_string();
        match e {
            CoreError::InvalidXorb(
                XorbError::ChunkHashMismatch { .. } | XorbError::XorbHashMismatch { .. },
            ) => Self::new(S::BAD_REQUEST, "hash_mismatch", message),
            CoreError::InvalidXorb(_) => Self::new(S::BAD_REQUEST, "invalid_xorb", message),
            CoreError::InvalidMessage(MessageError::TooLarge { .. }) => {
                Self::new(S::PAYLOAD_TOO_LARGE, "payload_too_large", message)
            }
            CoreError::InvalidMessage(_) => Self::new(S::BAD_REQUEST, "invalid_message", message),
            // A damaged xorb is "unknown" to a shard: the client sends its
            // chunks again, as for one it never had.
            CoreError::UnknownXorb(_) | CoreError::DamagedXorb(_) => {
                Self::new(S::BAD_REQUEST, "unknown_xorb", message)
            }
            CoreError::Sha256Mismatch { .. } => {
                Self::new(S::BAD_REQUEST, "sha256_mismatch", message)
            }
            CoreError::Damaged { .. } => Self::new(S::GONE, "damaged", message),
            CoreError::InvalidRecipe { .. } => Self::new(S::BAD_REQUEST, "invalid_recipe", message),
            CoreError::NotFound(_) => Self::new(S::NOT_FOUND, "not_found", message),
            CoreError::ObjectMismatch { .. } => {
                Self::new(S::UNPROCESSABLE_ENTITY, "object_mismatch", message)
            }
            CoreError::InvalidChange(_) => Self::new(S::BAD_REQUEST, "invalid_change", message),
            CoreError::RepoNotFound(_) => Self::new(S::NOT_FOUND, "repo_not_found", message),
            CoreError::RevisionNotFound { .. } => {
                Self::new(S::NOT_FOUND, "revision_not_found", message)
            }
            CoreError::AmbiguousRevision { .. } => {
                Self::new(S::BAD_REQUEST, "ambiguous_revision", message)
            }
            CoreError::Conflict(_) => Self::new(S::CONFLICT, "conflict", message),
            CoreError::InvalidTree { .. } => Self::new(S::BAD_REQUEST, "invalid_tree", message),
            CoreError::RangeNotSatisfiable { size } => Self::unsatisfiable(size, message),
            CoreError::Io(e) if crate::store::is_unavailable(&e) => {
                tracing::error!(error = %e, "object store unavailable");
                let mut err = Self::new(
                    S::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the object store is unavailable; try again later",
                );
                err.headers
                    .push((header::RETRY_AFTER, HeaderValue::from_static("5")));
                err
            }
            CoreError::Index(_) | CoreError::Io(_) => {
                tracing::error!(error = %e, "internal error");
                Self::new(
                    S::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the server log",
                )
            }
        }
    }
}
