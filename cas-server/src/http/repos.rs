//! The repository routes of the v1 API (docs/API.md): list, create and
//! describe repositories, resolve revisions, page through logs, commit
//! trees to branches and tag commits; and the check that lets a token
//! limited to repositories read a file by its hash.
//!
//! Names from the path are percent-decoded and validated here (400
//! `bad_name`). A token limited to repositories sees only those its
//! patterns match: any other answers exactly like a missing repository
//! (404), so such a token cannot probe for names.

use cas_protocol::repo::{
    commit::MAX_COMMIT_BYTES, CommitId, CommitRequest, RefKind, RefName, RepoId, RepoList,
    RepoType, TagRequest,
};
use cas_protocol::FileHash;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};
use serde::de::DeserializeOwned;

use super::body::read_body;
use super::error::ApiError;
use super::v1::{parse_hash, Route};
use super::{json, App, Body};
use crate::auth::Grant;
use crate::core::CoreError;
use crate::index::Index;
use crate::store::ObjectStore;

/// Largest commit request: a commit's worth of JSON (escapes included).
const MAX_COMMIT_BODY: usize = MAX_COMMIT_BYTES;
/// Largest tag request.
const MAX_TAG_BODY: usize = 4096;
/// Commits in a log page unless `limit` says otherwise.
const DEFAULT_LOG_PAGE: usize = 100;

fn bad_name(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_name", message)
}

fn bad_query(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_query", message)
}

/// A path segment, percent-decoded.
fn segment(s: &str) -> Result<String, ApiError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| bad_name(format!("path segment {s:?} is not UTF-8 once decoded")))
}

/// The repository named by the path segments `type/org/name`, if the
/// grant lets the caller see it.
fn repo_of(params: &[&str], grant: &Grant) -> Result<RepoId, ApiError> {
    let [t, org, name, ..] = params else {
        unreachable!("repository routes capture type, org and name");
    };
    let repo_type = RepoType::from_url_segment(t).ok_or_else(|| {
        bad_name(format!(
            "unknown repository type {:?}: models or datasets",
            segment(t).unwrap_or_default()
        ))
    })?;
    let repo = RepoId::new(repo_type, &segment(org)?, &segment(name)?)
        .map_err(|e| bad_name(e.to_string()))?;
    if !grant.allows(&repo) {
        return Err(CoreError::RepoNotFound(repo).into());
    }
    Ok(repo)
}

/// The decoded query parameter `name`, if present.
fn query(uri: &Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn json_body<T: DeserializeOwned, O: ObjectStore, I: Index>(
    app: &App<O, I>,
    req: Request<Incoming>,
    limit: usize,
) -> Result<T, ApiError> {
    let body = read_body(req, limit, app.body_rules(), &app.budget, &app.metrics).await?;
    serde_json::from_slice(&body.bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_message",
            format!("request body: {e}"),
        )
    })
}

/// 201 for something new, 200 for something that was there.
fn created_or_ok(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

/// Serves one repository route; `params` are the path's captures.
pub(crate) async fn handle<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    route: Route,
    params: &[&str],
    grant: &Grant,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let core = &app.core;
    if route == Route::RepoList {
        let only = query(req.uri(), "type")
            .map(|t| t.parse::<RepoType>().map_err(|e| bad_query(e.to_string())))
            .transpose()?;
        let mut repos = core.list_repos(only).await?;
        repos.retain(|r| grant.allows(&r.repo));
        return Ok(json(StatusCode::OK, &RepoList { repos }));
    }
    let repo = repo_of(params, grant)?;
    match route {
        Route::RepoCreate => {
            let (info, created) = core.create_repo(&repo).await?;
            Ok(json(created_or_ok(created), &info))
        }
        Route::RepoInfo => Ok(json(StatusCode::OK, &core.repo_details(&repo).await?)),
        Route::RepoRevision => {
            let rev = segment(params[3])?;
            Ok(json(StatusCode::OK, &core.resolve(&repo, &rev).await?))
        }
        Route::RepoLog => {
            let rev = segment(params[3])?;
            let limit = match query(req.uri(), "limit") {
                None => DEFAULT_LOG_PAGE,
                Some(l) => l
                    .parse()
                    .map_err(|_| bad_query(format!("limit {l:?} is not a number")))?,
            };
            let cursor = query(req.uri(), "cursor")
                .map(|c| c.parse::<CommitId>().map_err(|e| bad_query(e.to_string())))
                .transpose()?;
            Ok(json(
                StatusCode::OK,
                &core.log(&repo, &rev, cursor, limit).await?,
            ))
        }
        Route::RepoCommit => {
            let request: CommitRequest = json_body(app, req, MAX_COMMIT_BODY).await?;
            Ok(json(
                StatusCode::CREATED,
                &core.commit(&repo, request).await?,
            ))
        }
        Route::RepoTag => {
            let tag = RefName::new(&segment(params[3])?).map_err(|e| bad_name(e.to_string()))?;
            let request: TagRequest = json_body(app, req, MAX_TAG_BODY).await?;
            let (entry, created) = core.create_tag(&repo, &tag, &request.revision).await?;
            Ok(json(created_or_ok(created), &entry))
        }
        Route::RepoDelete => Ok(json(StatusCode::OK, &core.delete_repo(&repo).await?)),
        Route::BranchDelete | Route::TagDelete => {
            let kind = if route == Route::BranchDelete {
                RefKind::Branch
            } else {
                RefKind::Tag
            };
            let name = RefName::new(&segment(params[3])?).map_err(|e| bad_name(e.to_string()))?;
            Ok(json(
                StatusCode::OK,
                &core.delete_ref(&repo, kind, &name).await?,
            ))
        }
        _ => unreachable!("{route:?} is not a repository route"),
    }
}

/// A token limited to repositories reads a file by its hash only through
/// a repository it may read: the request names it (`?repo=TYPE/ORG/NAME`
/// and `&rev=REVISION`, default `main`) and the file must be that
/// revision's tree or one of its entries. Anything else is 403. Other
/// grants pass.
pub(crate) async fn authorize_file<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    grant: &Grant,
    uri: &Uri,
    hash: &str,
) -> Result<(), ApiError> {
    if !grant.is_limited() {
        return Ok(());
    }
    authorize_files(app, grant, uri, &[parse_hash(hash)?]).await
}

/// [`authorize_file`] for every file of a batch: all must be in the
/// named revision.
pub(crate) async fn authorize_files<O: ObjectStore, I: Index>(
    app: &App<O, I>,
    grant: &Grant,
    uri: &Uri,
    files: &[FileHash],
) -> Result<(), ApiError> {
    if !grant.is_limited() {
        return Ok(());
    }
    let forbidden = |m: String| ApiError::new(StatusCode::FORBIDDEN, "forbidden", m);
    let repo = query(uri, "repo").ok_or_else(|| {
        forbidden(
            "this token is limited to repositories: name the one the file is in \
             with ?repo=TYPE/ORG/NAME&rev=REVISION"
                .into(),
        )
    })?;
    let repo = RepoId::parse(&repo, RepoType::Model).map_err(|e| bad_name(e.to_string()))?;
    if !grant.allows(&repo) {
        return Err(forbidden(format!("this token does not grant {repo}")));
    }
    let rev = query(uri, "rev").unwrap_or_else(|| RefName::main().to_string());
    match app.core.not_in_revision(&repo, &rev, files).await? {
        None => Ok(()),
        Some(file) => Err(forbidden(format!("file {file} is not in {repo} at {rev}"))),
    }
}
