//! The Hub API's writes, as `huggingface_hub` 2.4 makes them with
//! `HF_HUB_DISABLE_XET=1` (`hf_api.py`, `_commit_api.py`, `lfs.py`):
//!
//! - `POST /api/repos/create` `{"name", "organization", "type"}`: 409 when
//!   the repository exists (the client's `exist_ok` reads that);
//! - `POST /api/{type}s/{org}/{name}/preupload/{rev}`: small files go
//!   inline in the commit (`regular`), the rest as LFS objects through
//!   the batch API of [`crate::http::lfs`];
//! - `POST .../commit/{branch}`: NDJSON, a `header` (`summary`,
//!   `description`, `parentCommit`) then `file` (base64), `lfsFile` (an
//!   uploaded object by SHA-256), `deletedFile` and `deletedFolder`
//!   lines, applied to the branch's tree as one commit of ours;
//! - `POST /api/validate-yaml` (sent before a `README.md` is committed):
//!   always valid, the card's metadata is not checked;
//! - `POST .../branch/{name}` `{"startingPoint"}`, `POST .../tag/{rev}`
//!   `{"tag", "message"}`: 409 when the name exists.

use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use cas_protocol::repo::{CommitId, RefName, RepoId, RepoType};
use cas_protocol::Kind;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{api_base, HfError, Target};
use crate::auth::Grant;
use crate::core::refs::{Change, ChangeRequest};
use crate::core::CoreError;
use crate::http::body::read_body;
use crate::http::{full_body, json, App, Body};
use crate::index::Index;
use crate::store::ObjectStore;

/// Largest body of a small JSON request (create, preupload, branch, tag).
const MAX_REQUEST_BODY: usize = 4 << 20;
/// Largest commit body (NDJSON, with the inline files in base64).
const MAX_COMMIT_BODY: usize = 256 << 20;
/// Largest file the preupload answer sends inline in the commit; larger
/// ones go as LFS objects (streamed, never buffered whole).
const MAX_REGULAR_FILE: u64 = 64 << 10;
/// Most operations in one commit.
const MAX_COMMIT_OPERATIONS: usize = 1 << 20;
/// The author of commits made through the Hub API.
const AUTHOR: &str = "huggingface_hub";

async fn body_json<T: for<'de> Deserialize<'de>, O: ObjectStore, I: Index>(
    app: &App<O, I>,
    req: Request<Incoming>,
    what: &str,
) -> Result<T, HfError> {
    let body = read_body(
        req,
        MAX_REQUEST_BODY,
        app.body_rules(),
        &app.budget,
        &app.metrics,
    )
    .await?;
    let bytes = if body.bytes.is_empty() {
        &b"{}"[..]
    } else {
        &body.bytes[..]
    };
    serde_json::from_slice(bytes)
        .map_err(|e| HfError::bad_request(format!("not a {what} request: {e}")))
}

fn conflict(message: String) -> HfError {
    HfError::new(StatusCode::CONFLICT, None, message)
}

/// The repository's URL as the Hub writes it (`{base}/{org}/{name}`,
/// `{base}/datasets/{org}/{name}`).
fn repo_url(base: &str, repo: &RepoId) -> String {
    match repo.repo_type() {
        RepoType::Model => format!("{base}/{}/{}", repo.org(), repo.name()),
        RepoType::Dataset => format!("{base}/datasets/{}/{}", repo.org(), repo.name()),
    }
}

#[derive(Deserialize)]
struct CreateRepo {
    name: String,
    organization: Option<String>,
    #[serde(rename = "type")]
    repo_type: Option<String>,
}

/// `create_repo`: visibility is ignored (access is by token scope).
pub(super) async fn create_repo<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    grant: &Grant,
    req: Request<Incoming>,
    local: std::net::SocketAddr,
) -> Result<Response<Body>, HfError> {
    let base = api_base(&req, local);
    let r: CreateRepo = body_json(app, req, "create_repo").await?;
    let repo_type = match r.repo_type.as_deref() {
        None | Some("model") => RepoType::Model,
        Some("dataset") => RepoType::Dataset,
        Some(other) => {
            return Err(HfError::bad_request(format!(
                "repository type {other:?} is not served (model or dataset)"
            )))
        }
    };
    let org = r.organization.ok_or_else(|| {
        HfError::bad_request("a repository id needs an organisation here: org/name".into())
    })?;
    let repo =
        RepoId::new(repo_type, &org, &r.name).map_err(|e| HfError::bad_request(e.to_string()))?;
    if !grant.allows(&repo) {
        return Err(HfError::new(
            StatusCode::FORBIDDEN,
            None,
            format!("this token may not create {repo}"),
        ));
    }
    let (_, created) = app.core.create_repo(&repo).await?;
    let url = repo_url(&base, &repo);
    if !created {
        // The client reads `url` from this answer too (`exist_ok`).
        let message = format!("You already created this {repo_type} repo: {url}");
        let mut r = conflict(message.clone()).into_response();
        let body = json!({ "error": message, "url": url });
        *r.body_mut() = full_body(serde_json::to_vec(&body).expect("json").into());
        return Ok(r);
    }
    Ok(json(
        StatusCode::OK,
        &json!({ "url": url, "name": format!("{}/{}", repo.org(), repo.name()) }),
    ))
}

/// `validate-yaml`: the model card's metadata is not checked here.
pub(super) async fn validate_yaml<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, HfError> {
    let _: Value = body_json(app, req, "validate-yaml").await?;
    Ok(json(
        StatusCode::OK,
        &json!({ "errors": [], "warnings": [] }),
    ))
}

#[derive(Deserialize)]
struct Preupload {
    files: Vec<PreuploadFile>,
}

#[derive(Deserialize)]
struct PreuploadFile {
    path: String,
    size: u64,
}

/// `preupload`: which files go inline and which as LFS objects.
pub(super) async fn preupload<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, HfError> {
    let r: Preupload = body_json(app, req, "preupload").await?;
    let files: Vec<Value> = r
        .files
        .iter()
        .map(|f| {
            let mode = if f.size <= MAX_REGULAR_FILE {
                "regular"
            } else {
                "lfs"
            };
            json!({ "path": f.path, "uploadMode": mode, "shouldIgnore": false })
        })
        .collect();
    Ok(json(StatusCode::OK, &json!({ "files": files })))
}

/// One line of a commit body.
#[derive(Deserialize)]
struct Line {
    key: String,
    value: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    summary: String,
    #[serde(default)]
    description: String,
    parent_commit: Option<String>,
}

#[derive(Deserialize)]
struct InlineFile {
    path: String,
    content: String,
    #[serde(default)]
    encoding: Option<String>,
}

#[derive(Deserialize)]
struct LfsFile {
    path: String,
    oid: String,
    size: Option<u64>,
}

#[derive(Deserialize)]
struct PathOnly {
    path: String,
}

fn field<T: for<'de> Deserialize<'de>>(line: usize, v: Value) -> Result<T, HfError> {
    serde_json::from_value(v).map_err(|e| HfError::bad_request(format!("commit line {line}: {e}")))
}

/// `create_commit`: the operations become one commit on the branch.
pub(super) async fn commit<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    repo: &RepoId,
    target: &Target<'_>,
    req: Request<Incoming>,
    local: std::net::SocketAddr,
) -> Result<Response<Body>, HfError> {
    let branch = RefName::new(&target.rev()?).map_err(|e| HfError::bad_request(e.to_string()))?;
    if super::flag(req.uri(), "create_pr") {
        return Err(HfError::bad_request(
            "pull requests are not served; commit to a branch".into(),
        ));
    }
    let base = api_base(&req, local);
    let body = read_body(
        req,
        MAX_COMMIT_BODY,
        app.body_rules(),
        &app.budget,
        &app.metrics,
    )
    .await?;
    let mut header: Option<Header> = None;
    let mut changes = Vec::new();
    for (n, raw) in body.bytes.split(|&b| b == b'\n').enumerate() {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if changes.len() >= MAX_COMMIT_OPERATIONS {
            return Err(HfError::bad_request(format!(
                "more than {MAX_COMMIT_OPERATIONS} operations in one commit"
            )));
        }
        let line: Line = serde_json::from_slice(raw)
            .map_err(|e| HfError::bad_request(format!("commit line {n}: {e}")))?;
        match line.key.as_str() {
            "header" => header = Some(field(n, line.value)?),
            "file" => {
                let f: InlineFile = field(n, line.value)?;
                let bytes = match f.encoding.as_deref() {
                    Some("base64") => base64::engine::general_purpose::STANDARD
                        .decode(f.content.as_bytes())
                        .map_err(|e| HfError::bad_request(format!("{}: {e}", f.path)))?,
                    None | Some("utf-8") => f.content.into_bytes(),
                    Some(other) => {
                        return Err(HfError::bad_request(format!(
                            "{}: unknown encoding {other:?}",
                            f.path
                        )))
                    }
                };
                let put = app
                    .core
                    .put_object_bytes(Kind::File, Bytes::from(bytes))
                    .await?;
                changes.push(Change::Put {
                    path: f.path,
                    file: put.file,
                    size: put.size,
                });
            }
            "lfsFile" => {
                let f: LfsFile = field(n, line.value)?;
                let oid = f
                    .oid
                    .parse()
                    .map_err(|_| HfError::bad_request(format!("{}: bad oid", f.path)))?;
                let stored = app.core.object_by_sha256(oid).await?;
                let Some(put) = stored.filter(|p| f.size.is_none_or(|s| s == p.size)) else {
                    return Err(HfError::bad_request(format!(
                        "{}: LFS object {oid} was not uploaded",
                        f.path
                    )));
                };
                changes.push(Change::Put {
                    path: f.path,
                    file: put.file,
                    size: put.size,
                });
            }
            "deletedFile" => {
                let p: PathOnly = field(n, line.value)?;
                changes.push(Change::Delete { path: p.path });
            }
            "deletedFolder" => {
                let p: PathOnly = field(n, line.value)?;
                changes.push(Change::DeleteDir { path: p.path });
            }
            other => {
                return Err(HfError::bad_request(format!(
                    "commit line {n}: operation {other:?} is not served"
                )))
            }
        }
    }
    drop(body);
    let header = header.ok_or_else(|| HfError::bad_request("the commit has no header".into()))?;
    let parent = header
        .parent_commit
        .map(|p| p.parse::<CommitId>())
        .transpose()
        .map_err(|e| HfError::bad_request(e.to_string()))?;
    let message = if header.description.is_empty() {
        header.summary
    } else {
        format!("{}\n\n{}", header.summary, header.description)
    };
    let req = ChangeRequest {
        branch,
        changes,
        message,
        author: AUTHOR.into(),
        parent,
    };
    let info = app
        .core
        .commit_changes(repo, req)
        .await
        .map_err(|e| match e {
            CoreError::InvalidChange(m) if m.contains("doesn't exist") => {
                HfError::new(StatusCode::NOT_FOUND, Some("EntryNotFound"), m)
            }
            CoreError::Conflict(m) => HfError::new(StatusCode::PRECONDITION_FAILED, None, m),
            e => e.into(),
        })?;
    Ok(json(
        StatusCode::OK,
        &json!({
            "commitUrl": format!("{}/commit/{}", repo_url(&base, repo), info.id),
            "commitOid": info.id.to_string(),
            "pullRequestUrl": null,
        }),
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Branch {
    starting_point: Option<String>,
}

/// `create_branch`.
pub(super) async fn branch<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    repo: &RepoId,
    target: &Target<'_>,
    req: Request<Incoming>,
) -> Result<Response<Body>, HfError> {
    let name = RefName::new(&target.rev()?).map_err(|e| HfError::bad_request(e.to_string()))?;
    let r: Branch = body_json(app, req, "create_branch").await?;
    let made = app
        .core
        .create_branch(repo, &name, r.starting_point.as_deref())
        .await
        .map_err(|e| match e {
            CoreError::Conflict(m) => conflict(m),
            e => e.into(),
        })?;
    Ok(json(
        StatusCode::OK,
        &json!({ "name": made.name.as_str(), "commit": made.commit.to_string() }),
    ))
}

#[derive(Deserialize)]
struct Tag {
    tag: String,
}

/// `create_tag`: the tag message is not kept.
pub(super) async fn tag<O: ObjectStore, I: Index>(
    app: &Arc<App<O, I>>,
    repo: &RepoId,
    target: &Target<'_>,
    req: Request<Incoming>,
) -> Result<Response<Body>, HfError> {
    let rev = target.rev()?;
    let r: Tag = body_json(app, req, "create_tag").await?;
    let name = RefName::new(&r.tag).map_err(|e| HfError::bad_request(e.to_string()))?;
    let (entry, created) = app.core.create_tag(repo, &name, &rev).await?;
    if !created {
        return Err(conflict(format!("tag {name} of {repo} already exists")));
    }
    Ok(json(
        StatusCode::OK,
        &json!({ "name": entry.name.as_str(), "commit": entry.commit.to_string() }),
    ))
}
