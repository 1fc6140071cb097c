//! The Git LFS frontend (docs/GIT-LFS.md): the batch API and the `basic`
//! transfer of git-lfs's `docs/api/batch.md` and `basic-transfers.md`,
//! for a repository path `/[datasets/]{org}/{name}.git/info/lfs`, which is
//! both where git-lfs looks for a remote `http://server/org/name` and
//! where `huggingface_hub` sends its LFS uploads.
//!
//! - `POST .../objects/batch`: per object, an upload action (a URL that
//!   carries its own capability, so the stock PUT needs no credentials)
//!   plus a verify action, or none when the store has the object; a
//!   download action (the file's content URL) or a per-object 404;
//! - `PUT .../objects/{oid}?size=&exp=&mac=`: the object's bytes, ingested
//!   while they stream in ([`crate::core::objects`]) and recorded only if
//!   they hash to `oid`;
//! - `POST .../objects/verify`: whether the object is stored.
//!
//! Objects are content: one stored object serves every repository. The
//! batch needs a token that may see the repository (read to download,
//! write to upload, which creates the repository when it is new), sent as
//! `Authorization: Bearer` or as git's `Basic` with the token as the
//! password. Errors are `{"message": ...}` as
//! `application/vnd.git-lfs+json`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use cas_protocol::repo::{RepoId, RepoType};
use cas_protocol::{Kind, Sha256};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::body::{drain, read_body, start_body};
use super::error::ApiError;
use super::v1::content_url;
use super::{full, App, Body};
use crate::auth::{Grant, Scope};
use crate::core::objects::ObjectSlot;
use crate::core::CoreError;
use crate::index::Index;
use crate::store::ObjectStore;

const LFS_JSON: &str = "application/vnd.git-lfs+json";
/// Largest batch request body.
const MAX_BATCH_BODY: usize = 1 << 20;
/// Most objects in one batch (git-lfs sends 100).
const MAX_BATCH_OBJECTS: usize = 1000;
/// Largest verify request body.
const MAX_VERIFY_BODY: usize = 4096;
/// Largest object one PUT may carry.
pub const MAX_OBJECT_BYTES: usize = 1 << 40;
/// How long an upload URL stays valid (checked when its PUT starts).
const UPLOAD_URL_SECS: u64 = 24 * 3600;
/// The purpose of upload URL MACs ([`crate::auth::SigningKey::url_mac`]).
const UPLOAD_MAC: &str = "lfs-upload";

/// The Git LFS operations; `name` is the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Batch,
    Verify,
    Upload,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Batch => "lfs_batch",
            Route::Verify => "lfs_verify",
            Route::Upload => "lfs_upload",
        }
    }

    fn method(self) -> Method {
        match self {
            Route::Batch | Route::Verify => Method::POST,
            Route::Upload => Method::PUT,
        }
    }

    /// The token scope the route needs (`write` too for a batch that
    /// uploads): none for an upload, whose URL is its capability.
    pub(crate) fn scope(self) -> Option<Scope> {
        match self {
            Route::Batch | Route::Verify => Some(Scope::Read),
            Route::Upload => None,
        }
    }
}

/// What an LFS path names (segments still percent-encoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    pub repo_type: RepoType,
    pub org: &'a str,
    pub name: &'a str,
    /// The object id of an upload.
    pub oid: &'a str,
}

/// The operation an LFS path names: `None` when the path is not under a
/// `.../{name}.git/info/lfs/` (another frontend's); `Some(Err(allowed))`
/// for a known path and another method; `Some(Ok(None))` for an unknown
/// path under it (the locking API, which is not served).
#[allow(clippy::type_complexity)]
pub fn route<'a>(
    method: &Method,
    path: &'a str,
) -> Option<Result<Option<(Route, Target<'a>)>, Method>> {
    let p = path.strip_prefix('/')?;
    let (repo_type, p) = match p.strip_prefix("datasets/") {
        Some(rest) => (RepoType::Dataset, rest),
        None => (RepoType::Model, p),
    };
    let segs: Vec<&str> = p.split('/').collect();
    let [org, name_git, "info", "lfs", rest @ ..] = segs.as_slice() else {
        return None;
    };
    let name = name_git.strip_suffix(".git")?;
    let t = |oid| Target {
        repo_type,
        org,
        name,
        oid,
    };
    let (r, target) = match rest {
        ["objects", "batch"] => (Route::Batch, t("")),
        ["objects", "verify"] => (Route::Verify, t("")),
        ["objects", oid] => (Route::Upload, t(oid)),
        _ => return Some(Ok(None)),
    };
    if *method != r.method() {
        return Some(Err(r.method()));
    }
    Some(Ok(Some((r, target))))
}

/// An error as git-lfs reads it: a status and `{"message": ...}`.
struct LfsError {
    status: StatusCode,
    message: String,
    headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl LfsError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            headers: vec![],
        }
    }

    fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "Repository or object not found")
    }

    /// git-lfs (3.x) takes a 422 answer to an upload PUT for a server
    /// that dislikes its `Content-Type`, prints a hint and carries on as if
    /// the object were stored: the push succeeds without it. A refused
    /// object is a 400, which fails the push.
    fn fatal_to_git_lfs(mut self) -> Self {
        if self.status == StatusCode::UNPROCESSABLE_ENTITY {
            self.status = StatusCode::BAD_REQUEST;
        }
        self
    }

    fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({ "message": self.message });
        let mut r = full(
            self.status,
            LFS_JSON,
            serde_json::to_vec(&body).expect("json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            // git-lfs asks git's credential helpers after this header.
            r.headers_mut().insert(
                "lfs-authenticate",
                HeaderValue::from_static("Basic realm=\"cas-server\""),
            );
        }
        r.headers_mut().extend(self.headers);
        r
    }
}

impl From<ApiError> for LfsError {
    fn from(e: ApiError) -> Self {
        Self {
            status: e.status,
            message: e.message().to_owned(),
            headers: e.headers,
        }
    }
}

impl From<CoreError> for LfsError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::RepoNotFound(_) => Self::not_found(),
            e => ApiError::from(e).into(),
        }
    }
}

impl From<crate::auth::Denied> for LfsError {
    fn from(d: crate::auth::Denied) -> Self {
        ApiError::from(d).into()
    }
}

/// Serves one Git LFS request; returns the metrics label and the answer.
pub(crate) async fn handle<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    routed: Result<Option<(Route, Target<'_>)>, Method>,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
) -> (&'static str, Response<Body>) {
    let (label, result) = match routed {
        Ok(Some((r, target))) => (r.name(), serve(app, r, &target, req, peer, local).await),
        Ok(None) => {
            drain(req).await;
            (
                "unknown",
                Err(LfsError::new(
                    StatusCode::NOT_FOUND,
                    "not served here: only the batch API and the basic transfer (docs/GIT-LFS.md)",
                )),
            )
        }
        Err(allowed) => {
            drain(req).await;
            let mut e = LfsError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("allowed: {allowed}"),
            );
            e.headers.push((
                header::ALLOW,
                HeaderValue::from_str(allowed.as_str()).expect("ascii"),
            ));
            ("method_not_allowed", Err(e))
        }
    };
    (label, result.unwrap_or_else(LfsError::into_response))
}

async fn serve<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    route: Route,
    target: &Target<'_>,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<Response<Body>, LfsError> {
    let Some(scope) = route.scope() else {
        return upload(app, target, req, peer)
            .await
            .map_err(LfsError::fatal_to_git_lfs);
    };
    let grant = super::check_access(app, &req, peer, Some(scope))?;
    let repo = target.repo(&grant)?;
    match route {
        Route::Batch => batch(app, &repo, req, peer, local).await,
        Route::Verify => verify(app, req).await,
        Route::Upload => unreachable!("answered above"),
    }
}

impl Target<'_> {
    /// The repository, if the grant lets the caller see it; otherwise it
    /// answers like a missing one.
    fn repo(&self, grant: &Grant) -> Result<RepoId, LfsError> {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| LfsError::not_found())
        };
        let repo = RepoId::new(self.repo_type, &decode(self.org)?, &decode(self.name)?)
            .map_err(|_| LfsError::not_found())?;
        if !grant.allows(&repo) {
            return Err(LfsError::not_found());
        }
        Ok(repo)
    }
}

#[derive(Debug, Deserialize)]
struct BatchRequest {
    operation: String,
    #[serde(default)]
    transfers: Vec<String>,
    objects: Vec<ObjectSpec>,
    #[serde(default)]
    hash_algo: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ObjectSpec {
    oid: String,
    size: u64,
}

#[derive(Serialize)]
struct BatchAnswer {
    transfer: &'static str,
    objects: Vec<ObjectAnswer>,
    hash_algo: &'static str,
}

#[derive(Serialize)]
struct ObjectAnswer {
    oid: String,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    authenticated: Option<bool>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    actions: BTreeMap<&'static str, Action>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ObjectError>,
}

#[derive(Serialize)]
struct Action {
    href: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    header: BTreeMap<&'static str, String>,
    expires_in: u64,
}

#[derive(Serialize)]
struct ObjectError {
    code: u16,
    message: String,
}

impl ObjectAnswer {
    fn new(spec: ObjectSpec) -> Self {
        Self {
            oid: spec.oid,
            size: spec.size,
            authenticated: None,
            actions: BTreeMap::new(),
            error: None,
        }
    }

    fn error(mut self, code: StatusCode, message: impl Into<String>) -> Self {
        self.error = Some(ObjectError {
            code: code.as_u16(),
            message: message.into(),
        });
        self
    }
}

fn bad_request(message: impl Into<String>) -> LfsError {
    LfsError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
}

/// `POST .../objects/batch`.
async fn batch<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    repo: &RepoId,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<Response<Body>, LfsError> {
    let uploading_grant = super::check_access(app, &req, peer, Some(Scope::Write));
    let authorization = req.headers().get(header::AUTHORIZATION).cloned();
    let body = read_body(
        req,
        MAX_BATCH_BODY,
        app.body_rules(),
        &app.budget,
        &app.metrics,
    )
    .await?;
    let request: BatchRequest = serde_json::from_slice(&body.bytes)
        .map_err(|e| bad_request(format!("not a batch request: {e}")))?;
    drop(body);
    if request.hash_algo.as_deref().is_some_and(|a| a != "sha256") {
        return Err(LfsError::new(
            StatusCode::CONFLICT,
            "only the sha256 hash algorithm is supported",
        ));
    }
    if request.objects.len() > MAX_BATCH_OBJECTS {
        return Err(bad_request(format!(
            "more than {MAX_BATCH_OBJECTS} objects in one batch"
        )));
    }
    if !request.transfers.is_empty() && !request.transfers.iter().any(|t| t == "basic") {
        return Err(bad_request("only the basic transfer is served"));
    }
    let upload = match request.operation.as_str() {
        "upload" => true,
        "download" => false,
        other => return Err(bad_request(format!("unknown operation {other:?}"))),
    };
    if upload {
        uploading_grant?;
        app.core.create_repo(repo).await?;
    } else {
        app.core.repo_info(repo).await?;
    }
    let base = super::read_base(app, local);
    let target_path = {
        let prefix = match repo.repo_type() {
            RepoType::Model => "",
            RepoType::Dataset => "datasets/",
        };
        format!("{base}/{prefix}{}/{}.git/info/lfs", repo.org(), repo.name())
    };
    let mut objects = Vec::with_capacity(request.objects.len());
    for spec in request.objects {
        let answer = ObjectAnswer::new(spec.clone());
        let Ok(oid) = spec.oid.parse::<Sha256>() else {
            objects.push(answer.error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "the object id is not 64 lowercase hex digits",
            ));
            continue;
        };
        let stored = app.core.object_by_sha256(oid).await?;
        objects.push(match (upload, stored) {
            (true, Some(s)) if s.size == spec.size => answer,
            (true, Some(s)) => answer.error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "object {oid} is stored with {} bytes, not {}",
                    s.size, spec.size
                ),
            ),
            (true, None) => upload_actions(app, answer, &target_path, authorization.as_ref()),
            (false, Some(s)) if s.size == spec.size => {
                let mut a = answer;
                a.authenticated = Some(true);
                a.actions.insert(
                    "download",
                    Action {
                        href: content_url(app, &base, &s.file, None),
                        header: BTreeMap::new(),
                        expires_in: UPLOAD_URL_SECS,
                    },
                );
                a
            }
            (false, _) => answer.error(StatusCode::NOT_FOUND, "Object does not exist"),
        });
    }
    let answer = BatchAnswer {
        transfer: "basic",
        objects,
        hash_algo: "sha256",
    };
    Ok(full(
        StatusCode::OK,
        LFS_JSON,
        serde_json::to_vec(&answer).expect("json"),
    ))
}

/// The upload and verify actions of an object the store lacks.
fn upload_actions<O, I>(
    app: &App<O, I>,
    mut answer: ObjectAnswer,
    lfs_url: &str,
    authorization: Option<&HeaderValue>,
) -> ObjectAnswer {
    let exp = crate::auth::now() + UPLOAD_URL_SECS;
    let mut href = format!(
        "{lfs_url}/objects/{}?size={}&exp={exp}",
        answer.oid, answer.size
    );
    if let Some(key) = app.access.key() {
        let subject = upload_subject(&answer.oid, answer.size, exp);
        href.push_str(&format!("&mac={}", key.url_mac(UPLOAD_MAC, &subject)));
    }
    let mut verify_header = BTreeMap::new();
    if let Some(a) = authorization.and_then(|a| a.to_str().ok()) {
        verify_header.insert("Authorization", a.to_owned());
    }
    answer.authenticated = Some(true);
    answer.actions.insert(
        "upload",
        Action {
            href,
            header: BTreeMap::new(),
            expires_in: UPLOAD_URL_SECS,
        },
    );
    answer.actions.insert(
        "verify",
        Action {
            href: format!("{lfs_url}/objects/verify"),
            header: verify_header,
            expires_in: UPLOAD_URL_SECS,
        },
    );
    answer
}

/// What an upload URL's MAC covers: the object, its size and the URL's
/// expiry.
fn upload_subject(oid: &str, size: u64, exp: u64) -> String {
    format!("{oid}:{size}:{exp}")
}

/// `PUT .../objects/{oid}`: the URL is the capability (checked before the
/// body is read); the body is ingested as it arrives and recorded only if
/// it is `size` bytes hashing to `oid`.
async fn upload<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    target: &Target<'_>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, LfsError> {
    let refuse = || LfsError::new(StatusCode::FORBIDDEN, "not a valid upload URL");
    // Loopback-only servers check the peer here; keyed ones the MAC.
    if let Err(d) = super::check_access(app, &req, peer, None) {
        drain(req).await;
        return Err(d.into());
    }
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let number = |k: &str| query.get(k).and_then(|v| v.parse::<u64>().ok());
    let (Some(size), Some(exp)) = (number("size"), number("exp")) else {
        drain(req).await;
        return Err(refuse());
    };
    let oid: Result<Sha256, _> = target.oid.parse();
    let allowed = match (app.access.key(), query.get("mac")) {
        (Some(key), Some(mac)) => {
            key.verify_url_mac(UPLOAD_MAC, &upload_subject(target.oid, size, exp), mac)
        }
        (None, _) => true,
        (Some(_), None) => false,
    };
    let (true, Ok(oid)) = (allowed && exp > crate::auth::now(), oid) else {
        drain(req).await;
        return Err(refuse());
    };
    let mut started = start_body(req, MAX_OBJECT_BYTES, app.body_rules()).await?;
    let mut writer = match app.core.begin_object(Kind::File, Some(oid)).await? {
        ObjectSlot::Stored(put) => {
            while started.next_piece(&app.metrics).await?.is_some() {}
            return Ok(super::json(StatusCode::OK, &put));
        }
        ObjectSlot::Write(w) => w,
    };
    let mut received = 0u64;
    while let Some(data) = started.next_piece(&app.metrics).await? {
        received += data.len() as u64;
        if received > size {
            return Err(bad_request(format!(
                "object {oid} is larger than its declared {size} bytes"
            )));
        }
        writer.write(data).await?;
    }
    if received != size {
        return Err(bad_request(format!(
            "object {oid}: {received} bytes received, {size} declared"
        )));
    }
    let put = writer.finish().await?;
    tracing::info!(%oid, size, stored = put.bytes_stored, "LFS object ingested");
    Ok(super::json(StatusCode::OK, &put))
}

/// `POST .../objects/verify`: 200 when the object is stored with that
/// size, 404 otherwise.
async fn verify<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, LfsError> {
    let body = read_body(
        req,
        MAX_VERIFY_BODY,
        app.body_rules(),
        &app.budget,
        &app.metrics,
    )
    .await?;
    let spec: ObjectSpec = serde_json::from_slice(&body.bytes)
        .map_err(|e| bad_request(format!("not a verify request: {e}")))?;
    let oid: Sha256 = spec
        .oid
        .parse()
        .map_err(|_| bad_request("the object id is not 64 lowercase hex digits"))?;
    match app.core.object_by_sha256(oid).await? {
        Some(s) if s.size == spec.size => Ok(full(StatusCode::OK, LFS_JSON, "{}")),
        _ => Err(LfsError::new(
            StatusCode::NOT_FOUND,
            format!("object {oid} of {} bytes is not stored", spec.size),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lfs_paths_route() {
        let post = |p| route(&Method::POST, p);
        let t = |repo_type, oid| Target {
            repo_type,
            org: "org",
            name: "m",
            oid,
        };
        assert_eq!(
            post("/org/m.git/info/lfs/objects/batch"),
            Some(Ok(Some((Route::Batch, t(RepoType::Model, "")))))
        );
        assert_eq!(
            post("/datasets/org/m.git/info/lfs/objects/verify"),
            Some(Ok(Some((Route::Verify, t(RepoType::Dataset, "")))))
        );
        assert_eq!(
            route(&Method::PUT, "/org/m.git/info/lfs/objects/abc"),
            Some(Ok(Some((Route::Upload, t(RepoType::Model, "abc")))))
        );
        assert_eq!(
            route(&Method::GET, "/org/m.git/info/lfs/objects/batch"),
            Some(Err(Method::POST))
        );
        assert_eq!(post("/org/m.git/info/lfs/locks/verify"), Some(Ok(None)));
        for p in [
            "/org/m/info/lfs/objects/batch",
            "/v1/xorbs/abc",
            "/api/models/org/m",
            "/org/m/resolve/main/x",
            "/",
        ] {
            assert_eq!(post(p), None, "{p}");
        }
    }
}
