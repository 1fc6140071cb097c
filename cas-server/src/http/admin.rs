//! Operating the store through the API (scope `admin`): garbage
//! collection runs while the server serves (`POST /v1/admin/gc`).

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;

use super::body::read_body;
use super::error::ApiError;
use super::{json, App, Body};
use crate::core::gc::GcOptions;
use crate::core::CoreError;
use crate::index::Index;
use crate::store::ObjectStore;

/// A gc request body is a small JSON object.
const MAX_GC_BODY: usize = 1024;

/// Longest grace period a request may ask for (ten years): longer ones
/// are mistakes.
const MAX_GRACE_SECS: u64 = 3650 * 86_400;

/// `POST /v1/admin/gc` (an empty body takes every default).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GcRequest {
    /// Plan only: report what would be freed, change nothing.
    #[serde(default)]
    dry_run: bool,
    /// How long a condemned xorb waits before it is deleted; default: the
    /// server's grace period (`--gc-grace`).
    grace_secs: Option<u64>,
}

/// Plans a garbage collection run and (unless a dry run) executes it, in a
/// task of its own: a client that hangs up does not cut a run short.
/// Answers `{"plan": ..., "report": ...}` as `cas-server gc --json` prints.
pub(super) async fn gc<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_body(
        req,
        MAX_GC_BODY,
        app.body_rules(),
        &app.budget,
        &app.metrics,
    )
    .await?;
    let request: GcRequest = if body.bytes.iter().all(u8::is_ascii_whitespace) {
        GcRequest::default()
    } else {
        serde_json::from_slice(&body.bytes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_message",
                format!("request body: {e}"),
            )
        })?
    };
    drop(body);
    let grace = match request.grace_secs {
        None => app.core.lease_term(),
        Some(s) if s > MAX_GRACE_SECS => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_message",
                format!("grace_secs {s} is more than {MAX_GRACE_SECS} (ten years)"),
            ))
        }
        Some(s) => Duration::from_secs(s),
    };
    let core = app.core.clone();
    let run = app.tasks.spawn(async move {
        core.gc(&GcOptions::default().with_grace(grace), request.dry_run)
            .await
    });
    let run = run
        .await
        .map_err(|e| CoreError::Io(std::io::Error::other(e)))??;
    Ok(json(StatusCode::OK, &run))
}
