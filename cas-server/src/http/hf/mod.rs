//! The Hugging Face Hub–compatible frontend (docs/HUB.md): enough of the
//! Hub's HTTP API that the stock `huggingface_hub` client (2.4, read for
//! its routes, headers and error mapping), `hf download`, `transformers`
//! and plain HTTP tools read our repositories unchanged.
//!
//! - `GET /api/{models|datasets}/{org}/{name}[/revision/{rev}]`: repository
//!   info at a revision (`sha`, `siblings`);
//! - `GET .../tree/{rev}[/{path}]` (`recursive`, paged by a `Link`
//!   header), `GET .../refs`, `GET .../commits/{rev}` (paged), `POST
//!   .../paths-info/{rev}` (a form of `paths`);
//! - `GET`/`HEAD /[datasets/]{org}/{name}/resolve/{rev}/{path}`: a `302`
//!   to the file's immutable content URL (`/v1/content/...`, served by
//!   [`super::v1`]), carrying the headers the client reads
//!   (`X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size`). A name that
//!   moves (a branch) is never cached; the bytes by content always can be.
//!
//! Tokens are our bearer tokens (`HF_TOKEN`), read scope. A repository
//! the token may not see answers exactly like a missing one. Errors carry
//! the Hub's `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`,
//! `EntryNotFound`, `GatedRepo`) and `X-Error-Message`, which the client
//! turns into its typed exceptions.

mod wire;
mod write;

use std::net::SocketAddr;
use std::sync::Arc;

use cas_protocol::repo::{CommitId, CommitInfo, RepoId, RepoType};
use cas_protocol::tree::Node;
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use self::wire::{CommitJson, Lfs, PathInfo, Refs, RepoJson, Sibling};
use super::body::{drain, read_body};
use super::error::ApiError;
use super::v1::{content_url, X_REPO_COMMIT};
use super::{full, json, App, Body, JSON};
use crate::auth::{Denied, Grant, Scope};
use crate::core::refs::{TreeListing, MAX_LOG_PAGE};
use crate::core::CoreError;
use crate::index::Index;
use crate::store::ObjectStore;

/// Tree nodes in one page of a listing (the Hub's page size).
const TREE_PAGE: usize = 1000;
/// Commits in one page of a log unless `limit` says otherwise (the Hub's).
const COMMITS_PAGE: usize = 50;
/// Largest paths-info form.
const MAX_PATHS_BODY: usize = 1 << 20;
/// Most paths one paths-info request may ask about.
const MAX_PATHS: usize = 10_000;

const X_ERROR_CODE: HeaderName = HeaderName::from_static("x-error-code");
const X_ERROR_MESSAGE: HeaderName = HeaderName::from_static("x-error-message");
const X_LINKED_ETAG: HeaderName = HeaderName::from_static("x-linked-etag");
const X_LINKED_SIZE: HeaderName = HeaderName::from_static("x-linked-size");
/// Why a credential was refused, beside the Hub's fixed message.
const X_ERROR_DETAIL: HeaderName = HeaderName::from_static("x-error-detail");

/// The Hub API's operations; `name` is the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Info,
    Tree,
    Refs,
    Commits,
    PathsInfo,
    Resolve,
    RepoCreate,
    Preupload,
    Commit,
    Branch,
    Tag,
    ValidateYaml,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Info => "hf_info",
            Route::Tree => "hf_tree",
            Route::Refs => "hf_refs",
            Route::Commits => "hf_commits",
            Route::PathsInfo => "hf_paths_info",
            Route::Resolve => "hf_resolve",
            Route::RepoCreate => "hf_repo_create",
            Route::Preupload => "hf_preupload",
            Route::Commit => "hf_commit",
            Route::Branch => "hf_branch",
            Route::Tag => "hf_tag",
            Route::ValidateYaml => "hf_validate_yaml",
        }
    }

    /// The token scope the route needs: writes need `write`.
    pub(crate) fn scope(self) -> Scope {
        match self {
            Route::RepoCreate | Route::Preupload | Route::Commit | Route::Branch | Route::Tag => {
                Scope::Write
            }
            _ => Scope::Read,
        }
    }

    fn methods(self) -> &'static [Method] {
        match self {
            Route::PathsInfo
            | Route::RepoCreate
            | Route::Preupload
            | Route::Commit
            | Route::Branch
            | Route::Tag
            | Route::ValidateYaml => &[Method::POST],
            Route::Resolve => &[Method::GET, Method::HEAD],
            _ => &[Method::GET],
        }
    }
}

/// What a Hub path names, its segments still percent-encoded: a
/// repository (`repo_type` is the URL segment, `models` or `datasets`),
/// maybe a revision, and a path inside the repository (`/`-separated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    pub repo_type: &'a str,
    pub org: &'a str,
    pub name: &'a str,
    pub rev: Option<&'a str>,
    pub path: &'a str,
}

/// Why a Hub path matched no operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    NotFound,
    MethodNotAllowed(&'static [Method]),
}

pub type Routed<'a> = Result<(Route, Target<'a>), NoRoute>;

/// The operation a request names, if its path is the Hub API's: anything
/// under `/api/`, and `/{org}/{name}/resolve/...` and
/// `/datasets/{org}/{name}/resolve/...`. `None`: not a Hub path (the v1
/// API's).
pub fn route<'a>(method: &Method, path: &'a str) -> Option<Routed<'a>> {
    let p = path.strip_prefix('/')?;
    let segs: Vec<&str> = p.splitn(6, '/').collect();
    let rest_after = |n: usize| p.splitn(n + 1, '/').nth(n).unwrap_or("");
    let target = |t, org, name, rev, path| Target {
        repo_type: t,
        org,
        name,
        rev,
        path,
    };
    let routed = match segs.as_slice() {
        ["api", t, org, name, tail @ ..] => {
            let tail: Vec<&str> = tail.iter().flat_map(|s| s.splitn(3, '/')).collect();
            match tail.as_slice() {
                [] => Ok((Route::Info, target(t, org, name, None, ""))),
                ["revision", rev] => Ok((Route::Info, target(t, org, name, Some(*rev), ""))),
                ["tree", rev, ..] => {
                    Ok((Route::Tree, target(t, org, name, Some(*rev), rest_after(6))))
                }
                ["refs"] => Ok((Route::Refs, target(t, org, name, None, ""))),
                ["commits", rev] => Ok((Route::Commits, target(t, org, name, Some(*rev), ""))),
                ["paths-info", rev] => Ok((Route::PathsInfo, target(t, org, name, Some(*rev), ""))),
                ["preupload", rev] => Ok((Route::Preupload, target(t, org, name, Some(*rev), ""))),
                ["commit", rev] => Ok((Route::Commit, target(t, org, name, Some(*rev), ""))),
                ["branch", b] => Ok((Route::Branch, target(t, org, name, Some(*b), ""))),
                ["tag", rev] => Ok((Route::Tag, target(t, org, name, Some(*rev), ""))),
                _ => Err(NoRoute::NotFound),
            }
        }
        ["api", "repos", "create"] => Ok((Route::RepoCreate, target("", "", "", None, ""))),
        ["api", "validate-yaml"] => Ok((Route::ValidateYaml, target("", "", "", None, ""))),
        // A repository id without an organisation (`gpt2`): none exists here.
        ["api", t, name] => Ok((Route::Info, target(t, "", name, None, ""))),
        ["api", ..] => Err(NoRoute::NotFound),
        ["datasets", org, name, "resolve", rev, _] => Ok((
            Route::Resolve,
            target("datasets", org, name, Some(*rev), rest_after(5)),
        )),
        [org, name, "resolve", rev, ..] if segs.len() >= 5 => Ok((
            Route::Resolve,
            target("models", org, name, Some(*rev), rest_after(4)),
        )),
        _ => return None,
    };
    Some(routed.and_then(|(r, t)| {
        if r.methods().contains(method) {
            Ok((r, t))
        } else {
            Err(NoRoute::MethodNotAllowed(r.methods()))
        }
    }))
}

/// A Hub API error: a status, the Hub's `X-Error-Code` (if any) and a
/// message, sent as `X-Error-Message` and as `{"error": message}`.
#[derive(Debug)]
pub struct HfError {
    status: StatusCode,
    code: Option<&'static str>,
    message: String,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl HfError {
    fn new(status: StatusCode, code: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            headers: vec![],
        }
    }

    /// 404 `RepoNotFound`: also the answer for a repository the caller
    /// may not see, so a token learns nothing about names it cannot read.
    fn repo_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            Some("RepoNotFound"),
            "Repository not found",
        )
    }

    fn entry_not_found(path: &str, commit: Option<&CommitId>) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            Some("EntryNotFound"),
            format!("Entry not found: {path}"),
        );
        if let Some(c) = commit {
            // The client caches that the file does not exist at this commit.
            e.headers.push((X_REPO_COMMIT, header_value(&c.to_hex())));
        }
        e
    }

    fn bad_request(message: String) -> Self {
        Self::new(StatusCode::BAD_REQUEST, None, message)
    }

    fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({ "error": self.message });
        let mut r = json(self.status, &body);
        let h = r.headers_mut();
        if let Some(code) = self.code {
            h.insert(X_ERROR_CODE, HeaderValue::from_static(code));
        }
        h.insert(X_ERROR_MESSAGE, header_value(&self.message));
        h.extend(self.headers);
        r
    }
}

/// A header value of `s`: printable ASCII kept, anything else `?`, at
/// most 500 characters.
fn header_value(s: &str) -> HeaderValue {
    let clean: String = s
        .chars()
        .take(500)
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&clean).expect("printable ASCII")
}

impl From<Denied> for HfError {
    /// No token: the Hub's answer for a private repository to an anonymous
    /// client (401 `RepoNotFound`), whether the repository exists or not.
    /// A bad or expired token: 401 with the Hub's "Invalid credentials"
    /// message (the client raises a plain HTTP error; why is in
    /// `X-Error-Detail`). A valid token without the read scope: 403
    /// `GatedRepo` (the client raises `GatedRepoError`).
    fn from(d: Denied) -> Self {
        let bearer = (header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        match d {
            Denied::NoToken => {
                let mut e = Self::new(
                    StatusCode::UNAUTHORIZED,
                    Some("RepoNotFound"),
                    "Repository not found: a token is required (set HF_TOKEN)",
                );
                e.headers.push(bearer);
                e
            }
            Denied::Unauthenticated(why) => {
                let mut e = Self::new(
                    StatusCode::UNAUTHORIZED,
                    None,
                    "Invalid credentials in Authorization header",
                );
                e.headers.push((X_ERROR_DETAIL, header_value(&why)));
                e.headers.push(bearer);
                e
            }
            d @ Denied::MissingScope(_) => {
                Self::new(StatusCode::FORBIDDEN, Some("GatedRepo"), d.to_string())
            }
            Denied::Forbidden(m) => Self::new(StatusCode::FORBIDDEN, None, m),
        }
    }
}

impl From<CoreError> for HfError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::RepoNotFound(_) => Self::repo_not_found(),
            CoreError::RevisionNotFound { rev, .. } => Self::new(
                StatusCode::NOT_FOUND,
                Some("RevisionNotFound"),
                format!("Invalid rev id: {rev}"),
            ),
            CoreError::AmbiguousRevision { .. } => Self::bad_request(e.to_string()),
            e => ApiError::from(e).into(),
        }
    }
}

/// The v1 API's errors (limits, timeouts, damage, internal) keep their
/// status and message; they have no Hub error code.
impl From<ApiError> for HfError {
    fn from(e: ApiError) -> Self {
        Self {
            status: e.status,
            code: None,
            message: e.message().to_owned(),
            headers: e.headers,
        }
    }
}

/// Serves one Hub API request; returns the metrics label and the answer.
pub(crate) async fn handle<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    routed: Routed<'_>,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
) -> (&'static str, Response<Body>) {
    let (label, result) = match routed {
        Ok((r, target)) => {
            let result = match super::check_access(app, &req, peer, Some(r.scope())) {
                Err(denied) => {
                    drain(req).await;
                    Err(denied.into())
                }
                Ok(grant) => dispatch(app, r, &target, &grant, req, local).await,
            };
            (r.name(), result)
        }
        Err(NoRoute::MethodNotAllowed(allowed)) => {
            let allow: Vec<&str> = allowed.iter().map(Method::as_str).collect();
            let mut e = HfError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                None,
                format!("allowed: {}", allow.join(", ")),
            );
            e.headers
                .push((header::ALLOW, header_value(&allow.join(", "))));
            ("method_not_allowed", Err(e))
        }
        Err(NoRoute::NotFound) => (
            "unknown",
            Err(HfError::new(
                StatusCode::NOT_FOUND,
                None,
                "this Hub API route does not exist here (docs/HUB.md lists the subset served)",
            )),
        ),
    };
    (label, result.unwrap_or_else(HfError::into_response))
}

/// A percent-decoded path segment (or `/`-separated path).
fn decode(s: &str) -> Result<String, HfError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| HfError::bad_request(format!("{s:?} is not UTF-8 once decoded")))
}

/// The decoded query parameter `name`, if present.
fn query(uri: &Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// A boolean query parameter as Python clients write it.
fn flag(uri: &Uri, name: &str) -> bool {
    matches!(query(uri, name).as_deref(), Some("true" | "True" | "1"))
}

impl Target<'_> {
    /// The repository, if it exists by name and the grant lets the caller
    /// see it; any other case answers like a missing repository.
    fn repo(&self, grant: &Grant) -> Result<RepoId, HfError> {
        let t = RepoType::from_url_segment(self.repo_type).ok_or_else(HfError::repo_not_found)?;
        let repo = RepoId::new(t, &decode(self.org)?, &decode(self.name)?)
            .map_err(|_| HfError::repo_not_found())?;
        if !grant.allows(&repo) {
            return Err(HfError::repo_not_found());
        }
        Ok(repo)
    }

    fn rev(&self) -> Result<String, HfError> {
        decode(self.rev.unwrap_or("main"))
    }

    /// The path inside the repository, without a trailing `/`.
    fn path(&self) -> Result<String, HfError> {
        Ok(decode(self.path)?.trim_end_matches('/').to_owned())
    }
}

/// Characters a path segment keeps unencoded in the links we build.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The base of the API links in `Link` headers: how the client reached
/// the API (`Host`, and `X-Forwarded-Proto: https` from a TLS proxy),
/// since the links go back to the caller only (the answers are never
/// cached); without a `Host`, the address the connection reached.
fn api_base(req: &Request<Incoming>, local: SocketAddr) -> String {
    let h = req.headers();
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        });
    match host {
        Some(host) => {
            let https = h
                .get("x-forwarded-proto")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
            format!("{}://{host}", if https { "https" } else { "http" })
        }
        None => super::origin(local),
    }
}

/// `Link: <url>; rel="next"`.
fn link_next(mut r: Response<Body>, url: &str) -> Response<Body> {
    r.headers_mut().insert(
        header::LINK,
        header_value(&format!("<{url}>; rel=\"next\"")),
    );
    r
}

/// Serves one allowed request.
async fn dispatch<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    route: Route,
    target: &Target<'_>,
    grant: &Grant,
    req: Request<Incoming>,
    local: SocketAddr,
) -> Result<Response<Body>, HfError> {
    match route {
        Route::RepoCreate => return write::create_repo(app, grant, req, local).await,
        Route::ValidateYaml => return write::validate_yaml(app, req).await,
        _ => {}
    }
    let repo = target.repo(grant)?;
    let core = &app.core;
    match route {
        Route::RepoCreate | Route::ValidateYaml => unreachable!("answered above"),
        Route::Preupload => write::preupload(app, req).await,
        Route::Commit => write::commit(app, &repo, target, req, local).await,
        Route::Branch => write::branch(app, &repo, target, req).await,
        Route::Tag => write::tag(app, &repo, target, req).await,
        Route::Info => info(app, &repo, target, req.uri()).await,
        Route::Refs => {
            let details = core.repo_details(&repo).await?;
            Ok(json(
                StatusCode::OK,
                &Refs::new(details.branches, details.tags),
            ))
        }
        Route::Tree => tree(app, &repo, target, &req, local).await,
        Route::Commits => commits(app, &repo, target, &req, local).await,
        Route::PathsInfo => paths_info(app, &repo, target, req).await,
        Route::Resolve => resolve(app, &repo, target, local).await,
    }
}

/// A revision's commit and its tree.
async fn revision<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    repo: &RepoId,
    rev: &str,
) -> Result<(CommitInfo, Arc<TreeListing>), HfError> {
    let commit = app.core.resolve(repo, rev).await?;
    let tree = app.core.tree(commit.commit.tree).await?;
    Ok((commit, tree))
}

/// The LFS descriptions of `entries` (one index pass), in order.
async fn lfs_of<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    files: Vec<cas_protocol::FileHash>,
) -> Result<Vec<Lfs>, HfError> {
    Ok(app
        .core
        .files_info(files)
        .await?
        .into_iter()
        .map(|i| Lfs::new(i.sha256, i.size))
        .collect())
}

/// `model_info` / `dataset_info`: the repository at a revision (without
/// one, at its default branch; a repository without commits has no `sha`
/// and no files).
async fn info<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    repo: &RepoId,
    target: &Target<'_>,
    uri: &Uri,
) -> Result<Response<Body>, HfError> {
    let details = app.core.repo_info(repo).await?;
    let rev = match target.rev {
        Some(_) => target.rev()?,
        None => details.default_branch.to_string(),
    };
    let found = match revision(app, repo, &rev).await {
        Ok(r) => Some(r),
        // A repository without commits yet has no default branch head.
        Err(e) if target.rev.is_none() && e.status == StatusCode::NOT_FOUND => None,
        Err(e) => return Err(e),
    };
    let entries = found.as_ref().map_or(&[][..], |(_, t)| &t.tree.entries[..]);
    let lfs = if flag(uri, "blobs") {
        lfs_of(app, entries.iter().map(|e| e.file).collect()).await?
    } else {
        vec![]
    };
    let siblings = entries
        .iter()
        .enumerate()
        .map(|(i, e)| Sibling::new(e, lfs.get(i)))
        .collect();
    let commit = found.as_ref().map(|(c, _)| (c.id, &c.commit));
    let private = app.access.key().is_some();
    Ok(json(
        StatusCode::OK,
        &RepoJson::new(&details, commit, private, siblings),
    ))
}

/// `list_repo_tree`: a page of a directory's listing (`recursive` for
/// everything below it). The next page's link names the commit, not the
/// revision, so a branch that moves meanwhile does not shift the pages.
async fn tree<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    repo: &RepoId,
    target: &Target<'_>,
    req: &Request<Incoming>,
    local: SocketAddr,
) -> Result<Response<Body>, HfError> {
    let (commit, listing) = revision(app, repo, &target.rev()?).await?;
    let tree = &listing.tree;
    let dir = target.path()?;
    if !dir.is_empty() && tree.under(&dir).is_empty() {
        return Err(HfError::entry_not_found(&dir, Some(&commit.id)));
    }
    let uri = req.uri();
    let recursive = flag(uri, "recursive");
    let cursor = match query(uri, "cursor") {
        None => 0,
        Some(c) => c
            .parse()
            .map_err(|_| HfError::bad_request(format!("cursor {c:?} is not a number")))?,
    };
    let (nodes, next) = tree.list(&dir, recursive, cursor, TREE_PAGE);
    let files: Vec<_> = nodes
        .iter()
        .filter_map(|n| match n {
            Node::File(e) => Some(e.file),
            Node::Dir(_) => None,
        })
        .collect();
    let lfs = lfs_of(app, files).await?;
    let mut lfs = lfs.iter();
    let page: Vec<PathInfo<'_>> = nodes
        .iter()
        .map(|n| match n {
            Node::File(e) => PathInfo::file(e, lfs.next().expect("one per file")),
            Node::Dir(d) => PathInfo::directory(&commit.commit.tree, d),
        })
        .collect();
    let r = json(StatusCode::OK, &page);
    Ok(match next {
        None => r,
        Some(n) => {
            let path: String = dir
                .split('/')
                .filter(|s| !s.is_empty())
                .map(|s| format!("/{}", utf8_percent_encode(s, SEGMENT)))
                .collect();
            let url = format!(
                "{}/api/{}/tree/{}{path}?recursive={recursive}&cursor={n}",
                api_base(req, local),
                repo.url_path(),
                commit.id
            );
            link_next(r, &url)
        }
    })
}

/// `list_repo_commits`: a page of the first-parent history, newest first.
async fn commits<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    repo: &RepoId,
    target: &Target<'_>,
    req: &Request<Incoming>,
    local: SocketAddr,
) -> Result<Response<Body>, HfError> {
    let uri = req.uri();
    let rev = target.rev()?;
    let limit = match query(uri, "limit") {
        None => COMMITS_PAGE,
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| HfError::bad_request(format!("limit {l:?} is not a number")))?
            .clamp(1, MAX_LOG_PAGE),
    };
    let cursor = query(uri, "cursor")
        .map(|c| c.parse::<CommitId>())
        .transpose()
        .map_err(|e| HfError::bad_request(e.to_string()))?;
    let page = app.core.log(repo, &rev, cursor, limit).await?;
    let items: Vec<CommitJson<'_>> = page
        .commits
        .iter()
        .map(|c| CommitJson::new(c.id, &c.commit))
        .collect();
    let r = json(StatusCode::OK, &items);
    Ok(match page.next {
        None => r,
        Some(next) => {
            let url = format!(
                "{}/api/{}/commits/{}?cursor={next}&limit={limit}",
                api_base(req, local),
                repo.url_path(),
                utf8_percent_encode(&rev, SEGMENT)
            );
            link_next(r, &url)
        }
    })
}

/// `get_paths_info`: the files and directories among the form's `paths`
/// (those that do not exist are left out, as the Hub does).
async fn paths_info<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    repo: &RepoId,
    target: &Target<'_>,
    req: Request<Incoming>,
) -> Result<Response<Body>, HfError> {
    let rev = target.rev()?;
    let body = read_body(
        req,
        MAX_PATHS_BODY,
        app.body_rules(),
        &app.budget,
        &app.metrics,
    )
    .await?;
    let mut paths: Vec<String> = Vec::new();
    for (k, v) in form_urlencoded::parse(&body.bytes) {
        if k == "paths" {
            let p = v.trim_end_matches('/').to_owned();
            if !paths.contains(&p) {
                paths.push(p);
            }
        }
        if paths.len() > MAX_PATHS {
            return Err(HfError::bad_request(format!(
                "more than {MAX_PATHS} paths in one request"
            )));
        }
    }
    drop(body);
    let (commit, listing) = revision(app, repo, &rev).await?;
    let tree = &listing.tree;
    let found: Vec<(&str, Option<&cas_protocol::tree::TreeEntry>)> = paths
        .iter()
        .filter_map(|p| match tree.get(p) {
            Some(e) => Some((p.as_str(), Some(e))),
            None if !p.is_empty() && !tree.under(p).is_empty() => Some((p.as_str(), None)),
            None => None,
        })
        .collect();
    let lfs = lfs_of(
        app,
        found
            .iter()
            .filter_map(|(_, e)| e.map(|e| e.file))
            .collect(),
    )
    .await?;
    let mut lfs = lfs.iter();
    let out: Vec<PathInfo<'_>> = found
        .iter()
        .map(|(p, e)| match e {
            Some(e) => PathInfo::file(e, lfs.next().expect("one per file")),
            None => PathInfo::directory(&commit.commit.tree, p),
        })
        .collect();
    Ok(json(StatusCode::OK, &out))
}

/// `/resolve/{rev}/{path}`: a redirect to the file's content URL. The
/// answer names the commit the revision resolved to and the file's
/// SHA-256 and size (what `huggingface_hub` reads from it), and is never
/// cached: a branch moves. The content URL's answer is cacheable forever.
async fn resolve<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    repo: &RepoId,
    target: &Target<'_>,
    local: SocketAddr,
) -> Result<Response<Body>, HfError> {
    let path = target.path()?;
    let (commit, listing) = revision(app, repo, &target.rev()?).await?;
    let entry = listing
        .tree
        .get(&path)
        .ok_or_else(|| HfError::entry_not_found(&path, Some(&commit.id)))?;
    let info = app.core.file_info(entry.file).await?;
    let etag = format!("\"{}\"", info.sha256);
    let location = content_url(
        app,
        &super::read_base(app, local),
        &entry.file,
        Some(&commit.id),
    );
    let mut r = full(StatusCode::FOUND, JSON, "");
    let h = r.headers_mut();
    h.remove(header::CONTENT_TYPE);
    h.insert(header::LOCATION, header_value(&location));
    h.insert(X_REPO_COMMIT, header_value(&commit.id.to_hex()));
    h.insert(X_LINKED_ETAG, header_value(&etag));
    h.insert(X_LINKED_SIZE, HeaderValue::from(info.size));
    h.insert(header::ETAG, header_value(&etag));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<'a>(ty: &'a str, rev: Option<&'a str>, path: &'a str) -> Target<'a> {
        Target {
            repo_type: ty,
            org: "org",
            name: "m",
            rev,
            path,
        }
    }

    #[test]
    fn hub_paths_route() {
        let get = |p| route(&Method::GET, p);
        assert_eq!(
            get("/api/models/org/m"),
            Some(Ok((Route::Info, t("models", None, ""))))
        );
        assert_eq!(
            get("/api/datasets/org/m/revision/refs%2Fpr%2F1"),
            Some(Ok((Route::Info, t("datasets", Some("refs%2Fpr%2F1"), ""))))
        );
        assert_eq!(
            get("/api/models/org/m/tree/main"),
            Some(Ok((Route::Tree, t("models", Some("main"), ""))))
        );
        assert_eq!(
            get("/api/models/org/m/tree/v1/a%2Fb/c"),
            Some(Ok((Route::Tree, t("models", Some("v1"), "a%2Fb/c"))))
        );
        assert_eq!(
            get("/api/models/org/m/refs"),
            Some(Ok((Route::Refs, t("models", None, ""))))
        );
        assert_eq!(
            get("/api/models/org/m/commits/main"),
            Some(Ok((Route::Commits, t("models", Some("main"), ""))))
        );
        assert_eq!(
            route(&Method::POST, "/api/models/org/m/paths-info/main"),
            Some(Ok((Route::PathsInfo, t("models", Some("main"), ""))))
        );
        assert_eq!(
            get("/api/models/org/m/paths-info/main"),
            Some(Err(NoRoute::MethodNotAllowed(&[Method::POST])))
        );
        assert_eq!(
            route(&Method::HEAD, "/org/m/resolve/main/dir/w.safetensors"),
            Some(Ok((
                Route::Resolve,
                t("models", Some("main"), "dir/w.safetensors")
            )))
        );
        assert_eq!(
            get("/datasets/org/m/resolve/0123/data/x.csv"),
            Some(Ok((
                Route::Resolve,
                t("datasets", Some("0123"), "data/x.csv")
            )))
        );
        assert_eq!(
            route(&Method::PUT, "/org/m/resolve/main/x"),
            Some(Err(NoRoute::MethodNotAllowed(&[Method::GET, Method::HEAD])))
        );
        assert_eq!(
            get("/api/models/gpt2").map(|r| r.map(|(r, _)| r)),
            Some(Ok(Route::Info))
        );
        let post = |p| route(&Method::POST, p).map(|r| r.map(|(r, t)| (r, t.rev)));
        assert_eq!(
            post("/api/repos/create"),
            Some(Ok((Route::RepoCreate, None)))
        );
        assert_eq!(
            post("/api/models/org/m/preupload/main"),
            Some(Ok((Route::Preupload, Some("main"))))
        );
        assert_eq!(
            post("/api/datasets/org/m/commit/dev%2Fx"),
            Some(Ok((Route::Commit, Some("dev%2Fx"))))
        );
        assert_eq!(
            post("/api/models/org/m/branch/dev"),
            Some(Ok((Route::Branch, Some("dev"))))
        );
        assert_eq!(
            post("/api/models/org/m/tag/main"),
            Some(Ok((Route::Tag, Some("main"))))
        );
        assert_eq!(
            post("/api/validate-yaml"),
            Some(Ok((Route::ValidateYaml, None)))
        );
        assert_eq!(Route::Commit.scope(), Scope::Write);
        assert_eq!(Route::Tree.scope(), Scope::Read);
        assert_eq!(get("/api/spaces"), Some(Err(NoRoute::NotFound)));
        assert_eq!(
            get("/api/models/org/m/nothing"),
            Some(Err(NoRoute::NotFound))
        );
        // Not the Hub's: the v1 API and anything else.
        for p in [
            "/v1/xorbs/abc",
            "/healthz",
            "/org/m/resolve/main",
            "/datasets/org/m/resolve/main",
            "/org/m/blob/main/x",
            "",
        ] {
            assert_eq!(get(p), None, "{p}");
        }
    }

    #[test]
    fn errors_carry_the_hub_codes() {
        let r =
            HfError::entry_not_found("a/b", Some(&CommitId::from_bytes([1; 20]))).into_response();
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["x-error-code"], "EntryNotFound");
        assert_eq!(r.headers()["x-repo-commit"], "01".repeat(20));
        let d: HfError = Denied::MissingScope(Scope::Read).into();
        assert_eq!(
            (d.status, d.code),
            (StatusCode::FORBIDDEN, Some("GatedRepo"))
        );
        let anon: HfError = Denied::NoToken.into();
        assert_eq!(
            (anon.status, anon.code),
            (StatusCode::UNAUTHORIZED, Some("RepoNotFound"))
        );
        let bad: HfError = Denied::Unauthenticated("invalid token".into()).into();
        assert_eq!((bad.status, bad.code), (StatusCode::UNAUTHORIZED, None));
        assert_eq!(bad.message, "Invalid credentials in Authorization header");
        assert_eq!(header_value("a\u{e9}\nb"), "a??b");
    }
}
