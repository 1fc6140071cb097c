//! The CAS API, version 1: dedup, xorb upload and read, shard commit,
//! reconstruction and file info, and repositories ([`super::repos`])
//! (docs/API.md, docs/openapi.json).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use cas_protocol::messages::{
    DedupQuery, ReconstructionQuery, Sha256Answer, Sha256Query, StoredFile, MAX_BATCH_FILES,
    MAX_DEDUP_BATCH, MAX_SHA256_LOOKUP,
};
use cas_protocol::repo::CommitId;
use cas_protocol::shard::MAX_SHARD_BYTES;
use cas_protocol::xorb::{StreamVerifier, XorbError, MAX_XORB_SERIALIZED};
use cas_protocol::{ByteRange, Encoding, FileHash, Message, XorbHash};
use futures_util::TryStreamExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::body::{
    body_encoding, busy, counted_stream, drain, header_contains, object_head, range_header,
    read_body, start_body, ObjectHead, Started,
};
use super::error::ApiError;
use super::{empty, full, json, repos, App, Body, XorbReads, BINARY, JSON, REDIRECT_TTL};
use crate::auth::{Grant, Scope, SigningKey};
use crate::core::{CoreError, FetchGrain, XorbUpload};
use crate::index::Index;
use crate::metrics::Metrics;
use crate::store::ObjectStore;

/// Largest dedup query body (binary or JSON).
const MAX_DEDUP_BODY: usize = 64 + MAX_DEDUP_BATCH * 70;
/// Largest SHA-256 lookup body (JSON).
const MAX_SHA256_BODY: usize = 64 + MAX_SHA256_LOOKUP * 70;
/// The purpose of content URL MACs ([`crate::auth::SigningKey::url_mac`]).
const CONTENT_MAC: &str = "content";
/// The purpose of xorb grant MACs: bytes `start..end` of one xorb.
const XORB_RANGE_MAC: &str = "xorb-range";
/// The commit a content URL was handed out for, echoed by its answers
/// (huggingface_hub reads it after following a redirect on one origin).
pub(crate) const X_REPO_COMMIT: HeaderName = HeaderName::from_static("x-repo-commit");

fn message_response<M: Message>(encoding: Encoding, m: &M) -> Response<Body> {
    let content_type = match encoding {
        Encoding::Binary => BINARY,
        Encoding::Json => JSON,
    };
    full(StatusCode::OK, content_type, m.encode_as(encoding))
}

pub(crate) fn parse_hash<T: std::str::FromStr>(s: &str) -> Result<T, ApiError> {
    s.parse().map_err(|_| {
        let shown: String = s.chars().take(80).collect();
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_hash",
            format!("{shown:?} is not 64 lowercase hex digits"),
        )
    })
}

/// The API's operations; `name` is the metrics label and the OpenAPI
/// operationId in docs/openapi.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Metrics,
    Dedup,
    XorbPut,
    XorbGet,
    XorbHead,
    Shard,
    Reconstruction,
    ReconstructionBatch,
    File,
    XorbCheck,
    RepoList,
    RepoCreate,
    RepoInfo,
    RepoRevision,
    RepoLog,
    RepoCommit,
    RepoTag,
    ContentGet,
    ContentHead,
    SignedContentGet,
    SignedContentHead,
    RootPut,
    RootDelete,
    RepoDelete,
    BranchDelete,
    TagDelete,
    XorbGrantGet,
    XorbGrantHead,
    AdminGc,
    FilesBySha256,
}

impl Route {
    pub const ALL: [Route; 31] = [
        Route::Healthz,
        Route::Metrics,
        Route::Dedup,
        Route::XorbPut,
        Route::XorbGet,
        Route::XorbHead,
        Route::Shard,
        Route::Reconstruction,
        Route::ReconstructionBatch,
        Route::File,
        Route::XorbCheck,
        Route::RepoList,
        Route::RepoCreate,
        Route::RepoInfo,
        Route::RepoRevision,
        Route::RepoLog,
        Route::RepoCommit,
        Route::RepoTag,
        Route::ContentGet,
        Route::ContentHead,
        Route::SignedContentGet,
        Route::SignedContentHead,
        Route::RootPut,
        Route::RootDelete,
        Route::RepoDelete,
        Route::BranchDelete,
        Route::TagDelete,
        Route::XorbGrantGet,
        Route::XorbGrantHead,
        Route::AdminGc,
        Route::FilesBySha256,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Route::Healthz => "healthz",
            Route::Metrics => "metrics",
            Route::Dedup => "dedup",
            Route::XorbPut => "xorb_put",
            Route::XorbGet => "xorb_get",
            Route::XorbHead => "xorb_head",
            Route::Shard => "shard",
            Route::Reconstruction => "reconstruction",
            Route::ReconstructionBatch => "reconstruction_batch",
            Route::File => "file",
            Route::XorbCheck => "xorb_check",
            Route::RepoList => "repo_list",
            Route::RepoCreate => "repo_create",
            Route::RepoInfo => "repo_info",
            Route::RepoRevision => "repo_revision",
            Route::RepoLog => "repo_log",
            Route::RepoCommit => "repo_commit",
            Route::RepoTag => "repo_tag",
            Route::ContentGet => "content_get",
            Route::ContentHead => "content_head",
            Route::SignedContentGet => "signed_content_get",
            Route::SignedContentHead => "signed_content_head",
            Route::RootPut => "root_put",
            Route::RootDelete => "root_delete",
            Route::RepoDelete => "repo_delete",
            Route::BranchDelete => "branch_delete",
            Route::TagDelete => "tag_delete",
            Route::XorbGrantGet => "xorb_grant_get",
            Route::XorbGrantHead => "xorb_grant_head",
            Route::AdminGc => "admin_gc",
            Route::FilesBySha256 => "files_by_sha256",
        }
    }
}

/// Why a request matched no operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    NotFound,
    /// The path exists; these methods are allowed on it.
    MethodNotAllowed(Vec<Method>),
}

impl Route {
    /// The token scope a route needs (when the server checks tokens).
    /// Grant and content reads need none: their URLs are capabilities. A
    /// plain xorb read needs a token that is not limited to repositories
    /// (checked in [`dispatch`]).
    pub fn scope(self) -> Option<Scope> {
        match self {
            Route::Dedup
            | Route::XorbPut
            | Route::Shard
            | Route::RepoCreate
            | Route::RepoCommit
            | Route::RepoTag
            | Route::RootPut
            | Route::RootDelete
            | Route::RepoDelete
            | Route::BranchDelete
            | Route::TagDelete
            | Route::FilesBySha256 => Some(Scope::Write),
            Route::AdminGc => Some(Scope::Admin),
            // A reader reports bytes that failed verification.
            Route::Reconstruction
            | Route::ReconstructionBatch
            | Route::File
            | Route::XorbGet
            | Route::XorbHead
            | Route::XorbCheck
            | Route::RepoList
            | Route::RepoInfo
            | Route::RepoRevision
            | Route::RepoLog => Some(Scope::Read),
            Route::Healthz
            | Route::Metrics
            | Route::ContentGet
            | Route::ContentHead
            | Route::SignedContentGet
            | Route::SignedContentHead
            | Route::XorbGrantGet
            | Route::XorbGrantHead => None,
        }
    }
}

/// Matches a request line to an operation and its path parameters (the
/// `{...}` segments of docs/openapi.json, in order, still percent-encoded).
pub fn route<'a>(method: &Method, path: &'a str) -> Result<(Route, Vec<&'a str>), NoRoute> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (candidates, params): (&[(Method, Route)], Vec<&str>) = match segments.as_slice() {
        ["healthz"] => (&[(Method::GET, Route::Healthz)], vec![]),
        ["metrics"] => (&[(Method::GET, Route::Metrics)], vec![]),
        ["v1", "dedup"] => (&[(Method::POST, Route::Dedup)], vec![]),
        ["v1", "sha256"] => (&[(Method::POST, Route::FilesBySha256)], vec![]),
        ["v1", "shards"] => (&[(Method::POST, Route::Shard)], vec![]),
        ["v1", "admin", "gc"] => (&[(Method::POST, Route::AdminGc)], vec![]),
        ["v1", "xorbs", h] => (
            &[
                (Method::PUT, Route::XorbPut),
                (Method::GET, Route::XorbGet),
                (Method::HEAD, Route::XorbHead),
            ],
            vec![*h],
        ),
        ["v1", "reconstructions"] => (&[(Method::POST, Route::ReconstructionBatch)], vec![]),
        ["v1", "reconstructions", h] => (&[(Method::GET, Route::Reconstruction)], vec![*h]),
        ["v1", "files", h] => (&[(Method::GET, Route::File)], vec![*h]),
        ["v1", "xorbs", h, "check"] => (&[(Method::POST, Route::XorbCheck)], vec![*h]),
        ["v1", "xorbs", h, r, m] => (
            &[
                (Method::GET, Route::XorbGrantGet),
                (Method::HEAD, Route::XorbGrantHead),
            ],
            vec![*h, *r, *m],
        ),
        ["v1", "content", h] => (
            &[
                (Method::GET, Route::ContentGet),
                (Method::HEAD, Route::ContentHead),
            ],
            vec![*h],
        ),
        ["v1", "content", h, m] => (
            &[
                (Method::GET, Route::SignedContentGet),
                (Method::HEAD, Route::SignedContentHead),
            ],
            vec![*h, *m],
        ),
        ["v1", "repos"] => (&[(Method::GET, Route::RepoList)], vec![]),
        ["v1", "roots", h] => (
            &[
                (Method::PUT, Route::RootPut),
                (Method::DELETE, Route::RootDelete),
            ],
            vec![*h],
        ),
        ["v1", "repos", t, o, n] => (
            &[
                (Method::PUT, Route::RepoCreate),
                (Method::GET, Route::RepoInfo),
                (Method::DELETE, Route::RepoDelete),
            ],
            vec![*t, *o, *n],
        ),
        ["v1", "repos", t, o, n, "revisions", r] => {
            (&[(Method::GET, Route::RepoRevision)], vec![*t, *o, *n, *r])
        }
        ["v1", "repos", t, o, n, "commits"] => {
            (&[(Method::POST, Route::RepoCommit)], vec![*t, *o, *n])
        }
        ["v1", "repos", t, o, n, "commits", r] => {
            (&[(Method::GET, Route::RepoLog)], vec![*t, *o, *n, *r])
        }
        ["v1", "repos", t, o, n, "tags", g] => (
            &[
                (Method::PUT, Route::RepoTag),
                (Method::DELETE, Route::TagDelete),
            ],
            vec![*t, *o, *n, *g],
        ),
        ["v1", "repos", t, o, n, "branches", b] => (
            &[(Method::DELETE, Route::BranchDelete)],
            vec![*t, *o, *n, *b],
        ),
        _ => return Err(NoRoute::NotFound),
    };
    candidates
        .iter()
        .find(|(m, _)| m == method)
        .map(|(_, r)| (*r, params))
        .ok_or_else(|| {
            NoRoute::MethodNotAllowed(candidates.iter().map(|(m, _)| m.clone()).collect())
        })
}

/// Serves one request of this API from `peer` that reached this server at
/// `local`; returns the metrics label of its route and the answer (errors
/// become JSON answers).
pub(crate) async fn handle<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
) -> (&'static str, Response<Body>) {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let (label, result) = match route(&method, &path) {
        Ok((r, params)) => {
            let result = match super::check_access(app, &req, peer, r.scope()) {
                Err(denied) => {
                    drain(req).await;
                    Err(denied.into())
                }
                Ok(grant) => dispatch(app, r, &params, &grant, req, local).await,
            };
            (r.name(), result)
        }
        Err(NoRoute::MethodNotAllowed(allowed)) => {
            let allow = allowed
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            let mut err = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} not allowed on {path}; allowed: {allow}"),
            );
            err.headers.push((
                header::ALLOW,
                HeaderValue::from_str(&allow).expect("method names are ASCII"),
            ));
            ("method_not_allowed", Err(err))
        }
        Err(NoRoute::NotFound) => (
            "unknown",
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route {path}"),
            )),
        ),
    };
    (label, result.unwrap_or_else(ApiError::into_response))
}

/// Serves one allowed request.
async fn dispatch<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    r: Route,
    params: &[&str],
    grant: &Grant,
    req: Request<Incoming>,
    local: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let h = params.first().copied().unwrap_or_default();
    match r {
        // Up but degraded when the object store fails: requests that need
        // it get 503 store_unavailable, the rest are served.
        Route::Healthz => Ok(match app.metrics.store_degraded() {
            None => full(StatusCode::OK, "text/plain", "ok\n"),
            Some(why) => full(StatusCode::OK, "text/plain", format!("degraded: {why}\n")),
        }),
        Route::Metrics => Ok(full(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            app.render_metrics(),
        )),
        Route::Dedup => dedup(app, req).await,
        Route::FilesBySha256 => files_by_sha256(app, req).await,
        Route::XorbPut => put_xorb(app, h, req).await,
        Route::XorbGet | Route::XorbHead => {
            if grant.is_limited() {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "this token is limited to repositories: it reads xorb bytes only \
                     through the grant URLs of its reconstructions",
                ));
            }
            get_xorb(app, h, None, &req).await
        }
        Route::XorbGrantGet | Route::XorbGrantHead => {
            get_xorb(app, h, Some((params[1], params[2])), &req).await
        }
        Route::Shard => post_shard(app, req).await,
        Route::Reconstruction => {
            repos::authorize_file(app, grant, req.uri(), h).await?;
            reconstruct(app, h, grant, &req, local).await
        }
        Route::ReconstructionBatch => reconstruct_batch(app, grant, req, local).await,
        Route::File => {
            repos::authorize_file(app, grant, req.uri(), h).await?;
            file_info(app, h).await
        }
        Route::XorbCheck => check_xorb(app, h).await,
        Route::RepoList
        | Route::RepoCreate
        | Route::RepoInfo
        | Route::RepoRevision
        | Route::RepoLog
        | Route::RepoCommit
        | Route::RepoTag
        | Route::RepoDelete
        | Route::BranchDelete
        | Route::TagDelete => repos::handle(app, r, params, grant, req).await,
        Route::RootPut => {
            let file: FileHash = parse_hash(h)?;
            let (info, created) = app.core.put_root(file).await?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json(status, &info))
        }
        Route::RootDelete => {
            app.core.delete_root(parse_hash(h)?).await?;
            Ok(full(StatusCode::NO_CONTENT, JSON, ""))
        }
        Route::AdminGc => {
            if grant.is_limited() {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "this token is limited to repositories; garbage collection acts on the whole store",
                ));
            }
            super::admin::gc(app, req).await
        }
        Route::ContentGet | Route::ContentHead => get_content(app, h, None, &req).await,
        Route::SignedContentGet | Route::SignedContentHead => {
            get_content(app, h, params.get(1).copied(), &req).await
        }
    }
}

async fn dedup<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let encoding = body_encoding(req.headers());
    let body = read_body(
        req,
        MAX_DEDUP_BODY,
        app.body_rules(),
        &app.budget,
        &app.metrics,
    )
    .await?;
    let query = DedupQuery::decode_as(&body.bytes, encoding).map_err(CoreError::from)?;
    drop(body);
    Metrics::add(&app.metrics.dedup_queried, query.chunks.len() as u64);
    let answer = app.core.dedup(query).await?;
    Metrics::add(
        &app.metrics.dedup_hits,
        answer.found.iter().flatten().count() as u64,
    );
    Ok(message_response(encoding, &answer))
}

/// Which stored files have these SHA-256s (a mirror asks before it
/// downloads). A writer learns no more than the Git LFS batch of a
/// repository it may read tells it (docs/SECURITY.md).
async fn files_by_sha256<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_body(
        req,
        MAX_SHA256_BODY,
        app.body_rules(),
        &app.budget,
        &app.metrics,
    )
    .await?;
    let query: Sha256Query = serde_json::from_slice(&body.bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_message",
            format!("not a SHA-256 lookup: {e}"),
        )
    })?;
    drop(body);
    if query.sha256.len() > MAX_SHA256_LOOKUP {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_message",
            format!(
                "{} SHA-256s, at most {MAX_SHA256_LOOKUP}",
                query.sha256.len()
            ),
        ));
    }
    let found = app.core.objects_by_sha256(query.sha256).await?;
    let answer = Sha256Answer {
        files: found
            .into_iter()
            .map(|o| {
                o.map(|o| StoredFile {
                    hash: o.file,
                    size: o.size,
                })
            })
            .collect(),
    };
    Ok(json(StatusCode::OK, &answer))
}

async fn put_xorb<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    hash: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let hash: XorbHash = parse_hash(hash)?;
    // A task of its own: hyper drops this handler when the client hangs up,
    // possibly before it has taken the body's last bytes from hyper. The
    // task still reads what arrived and, if the body is whole, stores and
    // indexes the xorb; a body cut short fails verification and stores
    // nothing.
    let task_app = app.clone();
    let upload = app
        .tasks
        .spawn(async move { receive_xorb(&task_app, hash, req).await });
    let up = upload
        .await
        .map_err(|e| CoreError::Io(std::io::Error::other(e)))??;
    let status = if up.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, &up))
}

async fn receive_xorb<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    hash: XorbHash,
    req: Request<Incoming>,
) -> Result<XorbUpload, ApiError> {
    let started = start_body(req, MAX_XORB_SERIALIZED, app.body_rules()).await?;
    // The slot is taken once bytes flow: a client that sends nothing holds
    // none, and one that trickles is cut off by the body timeout.
    let wait = app.limits.queue_timeout;
    let _slot = tokio::time::timeout(wait, app.upload_permits.acquire())
        .await
        .map_err(|_| busy(format!("every xorb upload slot stayed busy for {wait:?}")))?
        .expect("semaphore is never closed");
    let result = receive_verified(app, hash, started).await?;
    let metrics = &app.metrics;
    match &result {
        // `created` is true for exactly one of concurrent uploads of a
        // xorb: each is counted once.
        Ok(up) if up.created => {
            Metrics::add(&metrics.xorbs, 1);
            Metrics::add(&metrics.stored_bytes, up.bytes);
        }
        Err(CoreError::InvalidXorb(_)) => Metrics::add(&metrics.xorbs_rejected, 1),
        _ => {}
    }
    Ok(result?)
}

/// Reads a xorb upload and stores it; the outer error is the body's (too
/// long, too slow, cut short), the inner one the core's. A stored, sound
/// xorb is not verified again (its body is read and dropped); otherwise a
/// body of declared length is verified piece by piece on a blocking thread
/// while it arrives, so little verification is left when its last byte is
/// in.
async fn receive_verified<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    hash: XorbHash,
    started: Started,
) -> Result<Result<XorbUpload, CoreError>, ApiError> {
    match app.core.stored_xorb(hash).await {
        Ok(None) => {}
        known => {
            started.finish(&app.budget, &app.metrics).await?;
            return Ok(known.map(|up| up.expect("matched")));
        }
    }
    if started.declared().is_none() {
        let body = started.finish(&app.budget, &app.metrics).await?;
        return Ok(app.core.put_xorb(hash, body.bytes.clone()).await);
    }
    let (tx, rx) = std::sync::mpsc::channel::<BytesMut>();
    let metrics = app.metrics.clone();
    let checker = tokio::task::spawn_blocking(move || {
        let mut verifier = StreamVerifier::new(hash);
        let mut pieces = Vec::new();
        for piece in rx {
            let before = verifier.verified();
            let pushed = verifier.push(&piece);
            let counted = &metrics.xorb_chunks_verified;
            Metrics::add(counted, (verifier.verified() - before) as u64);
            pushed?;
            pieces.push(piece);
        }
        Ok::<_, XorbError>((pieces, verifier.finish()?))
    });
    let read = started
        .finish_streaming(&app.budget, &app.metrics, tx)
        .await;
    // The sender is gone, so the checker ends once it has seen every piece.
    let checked = checker
        .await
        .map_err(|e| CoreError::Io(std::io::Error::other(e)));
    let streamed = read?.expect("the length is declared");
    let (pieces, entries) = match checked {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => return Ok(Err(e.into())),
        Err(e) => return Ok(Err(e)),
    };
    let body = streamed.join(pieces);
    Ok(app
        .core
        .store_verified_xorb(hash, body.bytes.clone(), entries)
        .await)
}

/// Where a reconstruction for `grant` names the bytes it fetches from a
/// server reached at `local`, and how its fetch entries are cut: with a
/// signing key, grant URLs (a token limited to repositories gets one per
/// range it needs, any other token one per whole xorb); without a key,
/// plain xorb URLs.
pub(crate) fn read_urls<O, I>(
    app: &App<O, I>,
    grant: &Grant,
    local: SocketAddr,
) -> (
    FetchGrain,
    impl Fn(&XorbHash, ByteRange) -> String + Send + 'static,
) {
    let base = super::read_base(app, local);
    let key = app.access.key().cloned();
    let grain = match (&key, grant.is_limited()) {
        (Some(_), true) => FetchGrain::Range,
        _ => FetchGrain::Xorb,
    };
    let url = move |xorb: &XorbHash, bytes: ByteRange| match &key {
        Some(key) => format!(
            "{base}/v1/xorbs/{xorb}/{}/{}",
            grant_segment(bytes),
            key.url_mac(XORB_RANGE_MAC, &grant_subject(xorb, bytes))
        ),
        None => format!("{base}/v1/xorbs/{xorb}"),
    };
    (grain, url)
}

/// A grant URL's range segment: `start-end` (end exclusive), decimal.
fn grant_segment(bytes: ByteRange) -> String {
    format!("{}-{}", bytes.start, bytes.end)
}

/// What a grant's MAC covers: the xorb and the range.
fn grant_subject(xorb: &XorbHash, bytes: ByteRange) -> String {
    format!("{xorb}:{}", grant_segment(bytes))
}

/// The range of a grant URL whose segments are `range` and `mac`, if the
/// MAC is this server's for exactly that xorb and range (written the one
/// way [`read_urls`] writes it, so every grant has one URL and one cache
/// entry).
fn check_grant(key: &SigningKey, xorb: &XorbHash, range: &str, mac: &str) -> Option<ByteRange> {
    let (start, end) = range.split_once('-')?;
    let bytes = ByteRange::new(start.parse().ok()?, end.parse().ok()?)?;
    (grant_segment(bytes) == range
        && !bytes.is_empty()
        && key.verify_url_mac(XORB_RANGE_MAC, &grant_subject(xorb, bytes), mac))
    .then_some(bytes)
}

/// A 404 that says nothing more and is never cached: the answer to an
/// unknown object and to a capability URL that is not one.
fn no_such(what: &str) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such {what}"),
    );
    e.headers
        .push((header::CACHE_CONTROL, HeaderValue::from_static("no-store")));
    e
}

/// A GET or HEAD of a stored xorb: the whole xorb (`grant: None`; the
/// route has checked the token), or the bytes a grant URL's `(range,
/// MAC)` segments name, as an object of its own: `Range` is relative to
/// the grant's start, and nothing outside it is served. A grant that is
/// not valid (wrong MAC, range not written canonically, past the xorb's
/// end, a server without a key) is a 404 like an unknown xorb's.
async fn get_xorb<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    hash: &str,
    grant: Option<(&str, &str)>,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let not_found = |hash: &XorbHash| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("xorb {hash} not found"),
        )
    };
    let (hash, window) = match grant {
        None => {
            let hash: XorbHash = parse_hash(hash)?;
            (hash, None)
        }
        Some((range, mac)) => {
            let hash: XorbHash = parse_hash(hash).map_err(|_| no_such("grant"))?;
            let bytes = app
                .access
                .key()
                .and_then(|key| check_grant(key, &hash, range, mac))
                .ok_or_else(|| no_such("grant"))?;
            (hash, Some(bytes))
        }
    };
    // Redirected to the bucket: a plain read (its token allowed the whole
    // xorb) at once; a grant only when it is the whole xorb, since a
    // presigned URL reads all of it.
    let redirect = app.xorb_reads == XorbReads::Redirect && req.method() == Method::GET;
    if redirect && window.is_none() {
        if let Some(r) = redirect_to_bucket(app, hash).await? {
            return Ok(r);
        }
    }
    let size = app
        .core
        .xorb_len(hash)
        .await?
        .ok_or_else(|| not_found(&hash))?;
    if redirect && window.is_some_and(|w| w.start == 0 && w.end == size) {
        if let Some(r) = redirect_to_bucket(app, hash).await? {
            return Ok(r);
        }
    }
    let (window, etag) = match window {
        None => (
            ByteRange {
                start: 0,
                end: size,
            },
            format!("\"{hash}\""),
        ),
        Some(w) if w.end <= size => (w, format!("\"{}\"", grant_subject(&hash, w))),
        Some(_) => return Err(no_such("grant")),
    };
    let mut resp = match object_head(req.headers(), window.len(), &etag, "xorb")? {
        ObjectHead::NotModified(r) => r,
        ObjectHead::Send(builder, _) if req.method() == Method::HEAD => {
            builder.body(empty()).expect("valid response")
        }
        ObjectHead::Send(builder, range) => {
            let in_xorb = ByteRange {
                start: window.start + range.start,
                end: window.start + range.end,
            };
            let reader = app.core.read_xorb(hash, in_xorb).await?;
            let stream = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024);
            builder
                .body(counted_stream(stream, app.metrics.clone(), |m| {
                    &m.xorb_bytes_out
                }))
                .expect("valid response")
        }
    };
    // A plain read on a server with a key was allowed by the caller's
    // token: no shared cache may keep it for others.
    if grant.is_none() && app.access.key().is_some() {
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, max-age=31536000, immutable"),
        );
    }
    Ok(resp)
}

/// A `307` to a presigned URL of the xorb in the bucket, valid for
/// [`REDIRECT_TTL`], if the store can presign.
async fn redirect_to_bucket<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    hash: XorbHash,
) -> Result<Option<Response<Body>>, ApiError> {
    let Some(url) = app.core.presign_xorb(hash, REDIRECT_TTL).await? else {
        return Ok(None);
    };
    let location =
        HeaderValue::from_str(&url).map_err(|e| CoreError::Io(std::io::Error::other(e)))?;
    Ok(Some(
        Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(header::LOCATION, location)
            // The URL expires: no cache may keep this answer.
            .header(header::CACHE_CONTROL, "no-store")
            .body(empty())
            .expect("valid response"),
    ))
}

/// The URL of a stored file's bytes under `base`: with a signing key a
/// capability (`/v1/content/<hash>/<MAC of the hash>`: unforgeable, and
/// the same for every reader, so caches share it), else `/v1/content/<hash>`
/// (a server without a key serves loopback clients only). `commit`, if
/// any, is echoed as `X-Repo-Commit` by the answer.
pub(crate) fn content_url<O, I>(
    app: &App<O, I>,
    base: &str,
    file: &FileHash,
    commit: Option<&CommitId>,
) -> String {
    let hex = file.to_string();
    let url = match app.access.key() {
        Some(key) => format!("{base}/v1/content/{hex}/{}", key.url_mac(CONTENT_MAC, &hex)),
        None => format!("{base}/v1/content/{hex}"),
    };
    match commit {
        Some(c) => format!("{url}?commit={c}"),
        None => url,
    }
}

/// A stored file's bytes, verified chunk by chunk as they stream (a chunk
/// that fails ends the body early: the client sees a short answer, never
/// wrong bytes). `mac` must be the file's content MAC on a server with a
/// key and absent on one without; anything else is a 404 that says
/// nothing more and is never cached.
async fn get_content<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    hash: &str,
    mac: Option<&str>,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let not_found = || no_such("content");
    let file: FileHash = parse_hash(hash).map_err(|_| not_found())?;
    let allowed = match (app.access.key(), mac) {
        (Some(key), Some(mac)) => key.verify_url_mac(CONTENT_MAC, hash, mac),
        (None, None) => true,
        _ => false,
    };
    if !allowed {
        return Err(not_found());
    }
    let recipe = match app.core.recipe(file).await {
        Ok(r) => r,
        Err(CoreError::NotFound(_)) => return Err(not_found()),
        Err(e) => return Err(e.into()),
    };
    let etag = format!("\"{}\"", recipe.sha256);
    let (mut builder, range) = match object_head(req.headers(), recipe.size, &etag, "file")? {
        ObjectHead::NotModified(r) => return Ok(r),
        ObjectHead::Send(b, range) => (b, range),
    };
    let commit = req
        .uri()
        .query()
        .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "commit"))
        .and_then(|(_, v)| v.parse::<CommitId>().ok());
    if let Some(c) = commit {
        builder = builder.header(X_REPO_COMMIT, c.to_hex());
    }
    if req.method() == Method::HEAD {
        return Ok(builder.body(empty()).expect("valid response"));
    }
    let stream = app.core.file_stream(recipe, range).map_err(move |e| {
        tracing::warn!(%file, error = %e, "content stream ended early");
        std::io::Error::other(e.to_string())
    });
    Ok(builder
        .body(counted_stream(stream, app.metrics.clone(), |m| {
            &m.content_bytes_out
        }))
        .expect("valid response"))
}

async fn post_shard<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let encoding = body_encoding(req.headers());
    let body = read_body(
        req,
        MAX_SHARD_BYTES,
        app.body_rules(),
        &app.budget,
        &app.metrics,
    )
    .await?;
    let commit = app.core.commit_shard(body.bytes.clone(), encoding).await;
    drop(body);
    let commit = commit?;
    Ok(json(StatusCode::OK, &commit))
}

async fn reconstruct<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    hash: &str,
    grant: &Grant,
    req: &Request<Incoming>,
    local: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let hash: FileHash = parse_hash(hash)?;
    let range = range_header(req.headers())?;
    let (grain, url) = read_urls(app, grant, local);
    let r = app.core.reconstruct(hash, range, grain, url).await?;
    let mut resp = message_response(answer_encoding(req.headers()), &r);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Largest batched reconstruction query body (binary or JSON).
const MAX_BATCH_QUERY_BODY: usize = 64 + MAX_BATCH_FILES * 70;

/// Whole-file reconstructions of many files in one answer (as many as fit
/// about 8 MiB; the client asks again for the rest).
async fn reconstruct_batch<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    grant: &Grant,
    req: Request<Incoming>,
    local: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let uri = req.uri().clone();
    let encoding = answer_encoding(req.headers());
    let query_encoding = body_encoding(req.headers());
    let body = read_body(
        req,
        MAX_BATCH_QUERY_BODY,
        app.body_rules(),
        &app.budget,
        &app.metrics,
    )
    .await?;
    let query =
        ReconstructionQuery::decode_as(&body.bytes, query_encoding).map_err(CoreError::from)?;
    drop(body);
    repos::authorize_files(app, grant, &uri, &query.files).await?;
    let (grain, url) = read_urls(app, grant, local);
    let batch = app
        .core
        .reconstruct_batch(query.files, encoding, grain, url)
        .await?;
    let mut resp = message_response(encoding, &batch);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// JSON unless the client asks for the binary form (and not for JSON).
fn answer_encoding(h: &hyper::HeaderMap) -> Encoding {
    if header_contains(h, header::ACCEPT, BINARY) && !header_contains(h, header::ACCEPT, JSON) {
        Encoding::Binary
    } else {
        Encoding::Json
    }
}

async fn file_info<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    hash: &str,
) -> Result<Response<Body>, ApiError> {
    let hash: FileHash = parse_hash(hash)?;
    Ok(json(StatusCode::OK, &app.core.file_info(hash).await?))
}

/// A reader says bytes of this xorb failed verification; the server
/// checks its own copy (and marks it damaged if it fails).
async fn check_xorb<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    hash: &str,
) -> Result<Response<Body>, ApiError> {
    #[derive(serde::Serialize)]
    struct Checked {
        xorb: XorbHash,
        status: crate::core::XorbCheck,
    }
    let xorb: XorbHash = parse_hash(hash)?;
    let status = app.core.check_xorb(xorb).await?;
    Ok(json(StatusCode::OK, &Checked { xorb, status }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/openapi.json and the router describe the same operations, each
    /// path taken by the frontend that takes it in `super::super::serve`
    /// (Git LFS, then the Hub API, then v1).
    #[test]
    fn openapi_matches_router() {
        use super::super::{hf, lfs};
        let spec: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/openapi.json")).expect("valid JSON");
        let mut seen = Vec::new();
        let mut hub = Vec::new();
        let mut git_lfs = Vec::new();
        for (path, ops) in spec["paths"].as_object().expect("paths") {
            let concrete = path
                .replace("{hash}", &"a".repeat(64))
                .replace("{oid}", &"b".repeat(64))
                .replace("{type}", "models")
                .replace("{org}", "org")
                .replace("{name}", "name")
                .replace("{rev}", "main")
                .replace("{path}", "dir/w.safetensors")
                .replace("{tag}", "v1")
                .replace("{branch}", "dev")
                .replace("{range}", "0-1")
                .replace("{mac}", &"0".repeat(32));
            for (method, op) in ops.as_object().expect("operations") {
                if method == "parameters" {
                    continue;
                }
                let m = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
                let what = format!("{method} {path}");
                let (name, scope) = if let Some(routed) = lfs::route(&m, &concrete) {
                    let Ok(Some((r, _))) = routed else {
                        panic!("{what} is no Git LFS operation");
                    };
                    git_lfs.push(r);
                    (r.name(), r.scope())
                } else if let Some(routed) = hf::route(&m, &concrete) {
                    let (r, _) = routed.unwrap_or_else(|e| panic!("{what}: {e:?}"));
                    hub.push(r);
                    (r.name(), Some(r.scope()))
                } else {
                    let (r, _) = route(&m, &concrete).unwrap_or_else(|e| panic!("{what}: {e:?}"));
                    seen.push(r);
                    (r.name(), r.scope())
                };
                assert_eq!(op["operationId"], name, "{what}");
                let scope = scope.map(|s| s.to_string());
                assert_eq!(op["x-scope"].as_str(), scope.as_deref(), "{what}");
                assert_eq!(op["security"].is_array(), scope.is_some(), "{what}");
                assert_eq!(
                    op["responses"]["401"].is_object(),
                    scope.is_some(),
                    "{what}"
                );
                assert!(op["responses"]["403"].is_object(), "{what}");
            }
        }
        for r in Route::ALL {
            assert!(seen.contains(&r), "{r:?} is not in docs/openapi.json");
        }
        for r in [
            hf::Route::Info,
            hf::Route::Tree,
            hf::Route::Refs,
            hf::Route::Commits,
            hf::Route::PathsInfo,
            hf::Route::Resolve,
            hf::Route::RepoCreate,
            hf::Route::Preupload,
            hf::Route::Commit,
            hf::Route::Branch,
            hf::Route::Tag,
            hf::Route::ValidateYaml,
        ] {
            assert!(hub.contains(&r), "{r:?} is not in docs/openapi.json");
        }
        for r in [lfs::Route::Batch, lfs::Route::Verify, lfs::Route::Upload] {
            assert!(git_lfs.contains(&r), "{r:?} is not in docs/openapi.json");
        }
        assert_eq!(
            route(&Method::DELETE, "/v1/xorbs/x"),
            Err(NoRoute::MethodNotAllowed(vec![
                Method::PUT,
                Method::GET,
                Method::HEAD
            ]))
        );
        assert_eq!(route(&Method::GET, "/v1/nothing"), Err(NoRoute::NotFound));
    }

    /// A grant is valid only for the xorb and range its MAC covers, as
    /// written by `read_urls`; every other spelling is refused.
    #[test]
    fn grants_bind_xorb_and_range() {
        let key = SigningKey::generate();
        let x = XorbHash::from_bytes([3; 32]);
        let y = XorbHash::from_bytes([4; 32]);
        let r = ByteRange { start: 10, end: 20 };
        let mac = key.url_mac(XORB_RANGE_MAC, &grant_subject(&x, r));
        assert_eq!(check_grant(&key, &x, "10-20", &mac), Some(r));
        assert_eq!(check_grant(&key, &y, "10-20", &mac), None, "another xorb");
        for range in [
            "10-21", "9-20", "0-20", "010-20", "+10-20", "10-020", "10 -20", "10-20-", "-20",
            "10-", "20-10", "10-10", "",
        ] {
            assert_eq!(check_grant(&key, &x, range, &mac), None, "{range:?}");
        }
        assert_eq!(
            check_grant(&SigningKey::generate(), &x, "10-20", &mac),
            None,
            "another key"
        );
        let content = key.url_mac(CONTENT_MAC, &grant_subject(&x, r));
        assert_eq!(
            check_grant(&key, &x, "10-20", &content),
            None,
            "another purpose"
        );
    }
}
