//! Repositories: commit an upload to a branch, resolve revisions, read
//! logs, list repositories, tag commits, and fetch a revision. A fetch of
//! a revision names the repository and the resolved commit on each of its
//! file and reconstruction requests, which a token limited to repositories
//! needs to read files by their hashes.

use std::path::{Path, PathBuf};

use cas_protocol::repo::{
    CommitId, CommitInfo, CommitRequest, LogPage, NameError, RefEntry, RefName, RepoDetails,
    RepoId, RepoInfo, RepoList, RepoType, TagRequest,
};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use reqwest::header::CONTENT_TYPE;
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::remote::{read_limited, Remote};
use crate::{Client, FetchOptions, FetchReport, Layout, UploadReport};

/// Largest JSON answer of a repository route (a log page of 100 commits
/// with long messages is a few MiB).
const MAX_ANSWER: usize = 64 << 20;
/// Commits asked for per log page.
const LOG_PAGE: usize = 100;

/// Parses `ORG/NAME[@REV]`, `models/ORG/NAME[@REV]` or
/// `datasets/ORG/NAME[@REV]` (`ORG/NAME` being of `default_type`).
pub fn parse_spec(s: &str, default_type: RepoType) -> Result<(RepoId, Option<String>), NameError> {
    match s.split_once('@') {
        Some((repo, rev)) => Ok((RepoId::parse(repo, default_type)?, Some(rev.to_owned()))),
        None => Ok((RepoId::parse(s, default_type)?, None)),
    }
}

/// Where [`Client::upload_to`] commits.
#[derive(Debug, Clone)]
pub struct RepoTarget {
    pub repo: RepoId,
    pub branch: RefName,
    pub message: String,
    pub author: String,
    /// Commit only if the branch's head is still this commit (a new
    /// branch starts at it).
    pub parent: Option<CommitId>,
}

/// What [`Client::upload_to`] did.
#[derive(Debug, Clone, Serialize)]
pub struct RepoUpload {
    #[serde(flatten)]
    pub report: UploadReport,
    pub repo: RepoId,
    pub branch: RefName,
    pub commit: CommitInfo,
}

/// What [`Client::fetch_revision`] did.
#[derive(Debug, Clone, Serialize)]
pub struct RevisionFetch {
    #[serde(flatten)]
    pub report: FetchReport,
    pub repo: RepoId,
    pub commit: CommitInfo,
}

/// A path segment or query value, percent-encoded.
pub(crate) fn encode(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

impl Remote {
    pub(crate) fn repo_url(&self, repo: &RepoId, tail: &str) -> String {
        format!("{}/v1/repos/{}{tail}", self.endpoint(), repo.url_path())
    }

    /// Sends a request built by `build` (with a JSON body, if any) and
    /// parses the JSON answer; retried when `idempotent`.
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        what: &str,
        method: Method,
        url: &str,
        body: Option<Vec<u8>>,
        idempotent: bool,
    ) -> Result<T> {
        let once = || async {
            let mut rb = self.request(method.clone(), url);
            if let Some(b) = &body {
                rb = rb.header(CONTENT_TYPE, "application/json").body(b.clone());
            }
            let resp = self.send(what, url, rb).await?;
            let bytes = read_limited(what, url, resp, MAX_ANSWER).await?;
            serde_json::from_slice(&bytes).map_err(|e| Error::BadAnswer {
                what: what.into(),
                reason: e.to_string(),
            })
        };
        if idempotent {
            self.retry().run(once).await
        } else {
            once().await
        }
    }

    async fn repos(&self) -> Result<Vec<RepoInfo>> {
        let url = format!("{}/v1/repos", self.endpoint());
        let list: RepoList = self
            .call("listing of repositories", Method::GET, &url, None, true)
            .await?;
        Ok(list.repos)
    }

    async fn repo_details(&self, repo: &RepoId) -> Result<RepoDetails> {
        let url = self.repo_url(repo, "");
        self.call(&format!("lookup of {repo}"), Method::GET, &url, None, true)
            .await
    }

    async fn resolve(&self, repo: &RepoId, rev: &str) -> Result<CommitInfo> {
        let url = self.repo_url(repo, &format!("/revisions/{}", encode(rev)));
        self.call(
            &format!("lookup of {repo}@{rev}"),
            Method::GET,
            &url,
            None,
            true,
        )
        .await
    }

    async fn log_page(
        &self,
        repo: &RepoId,
        rev: &str,
        cursor: Option<CommitId>,
    ) -> Result<LogPage> {
        let mut url = self.repo_url(repo, &format!("/commits/{}?limit={LOG_PAGE}", encode(rev)));
        if let Some(c) = cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        self.call(
            &format!("log of {repo}@{rev}"),
            Method::GET,
            &url,
            None,
            true,
        )
        .await
    }

    /// One try: a commit whose answer was lost would be made twice if it
    /// were sent again.
    pub(crate) async fn commit(&self, repo: &RepoId, req: &CommitRequest) -> Result<CommitInfo> {
        let url = self.repo_url(repo, "/commits");
        let body = serde_json::to_vec(req).expect("json");
        let what = format!("commit to {repo}@{}", req.branch);
        self.call(&what, Method::POST, &url, Some(body), false)
            .await
    }

    async fn tag(&self, repo: &RepoId, tag: &RefName, rev: &str) -> Result<RefEntry> {
        let url = self.repo_url(repo, &format!("/tags/{}", encode(tag.as_str())));
        let body = serde_json::to_vec(&TagRequest {
            revision: rev.to_owned(),
        })
        .expect("json");
        // Tagging the same commit again is a no-op: safe to retry.
        self.call(
            &format!("tag {tag} of {repo}"),
            Method::PUT,
            &url,
            Some(body),
            true,
        )
        .await
    }
}

impl Client {
    pub(crate) fn remote(&self) -> &Remote {
        &self.fetcher.remote
    }

    /// Uploads `paths` as one tree (see [`Layout::Merged`]) and commits it
    /// to `target`, creating the repository on first use. With a parent,
    /// a branch that has moved fails before anything is uploaded (and the
    /// server checks again, atomically, when it commits).
    pub async fn upload_to(&self, paths: &[PathBuf], target: &RepoTarget) -> Result<RepoUpload> {
        let RepoTarget {
            repo,
            branch,
            message,
            author,
            parent,
        } = target;
        if let Some(p) = parent {
            let details = match self.remote().repo_details(repo).await {
                Err(Error::Server { status: 404, .. }) => None,
                r => Some(r?),
            };
            let head = details.and_then(|d| d.branches.into_iter().find(|b| b.name == *branch));
            if let Some(h) = head.filter(|h| h.commit != *p) {
                return Err(Error::Conflict {
                    what: format!("commit to {repo}@{branch}"),
                    message: format!(
                        "branch {branch} of {repo} has moved: its head is {}, not the expected parent {p}; nothing was uploaded",
                        h.commit
                    ),
                });
            }
        }
        let report = self.upload_as(paths, Layout::Merged).await?;
        let tree = report.roots[0].hash;
        let request = CommitRequest {
            branch: branch.clone(),
            tree,
            message: message.clone(),
            author: author.clone(),
            parent: *parent,
        };
        let commit = self.remote().commit(repo, &request).await?;
        Ok(RepoUpload {
            report,
            repo: repo.clone(),
            branch: branch.clone(),
            commit,
        })
    }

    /// The repositories the token may see.
    pub async fn repos(&self) -> Result<Vec<RepoInfo>> {
        self.remote().repos().await
    }

    /// A repository with its branches and tags.
    pub async fn repo(&self, repo: &RepoId) -> Result<RepoDetails> {
        self.remote().repo_details(repo).await
    }

    /// The commit a revision (branch, tag, commit id or unique prefix) names.
    pub async fn resolve(&self, repo: &RepoId, rev: &str) -> Result<CommitInfo> {
        self.remote().resolve(repo, rev).await
    }

    /// The first-parent history from `rev`, newest first, at most `max`
    /// commits.
    pub async fn log(&self, repo: &RepoId, rev: &str, max: usize) -> Result<Vec<CommitInfo>> {
        let mut out = Vec::new();
        let mut cursor = None;
        while out.len() < max {
            let page = self.remote().log_page(repo, rev, cursor).await?;
            out.extend(page.commits);
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        out.truncate(max);
        Ok(out)
    }

    /// Tags revision `rev` (tagging the commit a tag names again is a no-op).
    pub async fn tag(&self, repo: &RepoId, tag: &RefName, rev: &str) -> Result<RefEntry> {
        self.remote().tag(repo, tag, rev).await
    }

    /// Fetches the tree of revision `rev` of `repo` to `dest`. The revision
    /// is resolved once; every file is read through that commit.
    pub async fn fetch_revision(
        &self,
        repo: &RepoId,
        rev: &str,
        dest: &Path,
        options: FetchOptions,
    ) -> Result<RevisionFetch> {
        let commit = self.resolve(repo, rev).await?;
        let mut scoped = self.clone();
        scoped.fetcher.remote = self.remote().with_context(format!(
            "repo={}&rev={}",
            encode(&repo.url_path()),
            commit.id
        ));
        let report = scoped.fetch(commit.commit.tree, dest, options).await?;
        Ok(RevisionFetch {
            report,
            repo: repo.clone(),
            commit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_a_repository_and_maybe_a_revision() {
        let (r, rev) = parse_spec("org/a@main", RepoType::Model).unwrap();
        assert_eq!(
            (r.to_string(), rev.as_deref()),
            ("org/a".into(), Some("main"))
        );
        let (r, rev) = parse_spec("datasets/org/x", RepoType::Model).unwrap();
        assert_eq!((r.repo_type(), rev), (RepoType::Dataset, None));
        let (r, rev) = parse_spec("org/x@feature/y@2", RepoType::Dataset).unwrap();
        assert_eq!(
            (r.repo_type(), rev.as_deref()),
            (RepoType::Dataset, Some("feature/y@2"))
        );
        for bad in ["../x", "a/b/c", "org", "org/a b@main", "@main"] {
            assert!(parse_spec(bad, RepoType::Model).is_err(), "{bad}");
        }
        assert_eq!(encode("feature/x"), "feature%2Fx");
    }
}
