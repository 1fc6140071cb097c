//! Roots and deletions: an upload without a repository makes each path's
//! hash a root on the server (kept from garbage collection until removed);
//! removing roots, branches, tags and repositories lets garbage collection
//! free what only they kept (docs/OPERATIONS.md).

use cas_protocol::repo::{RefEntry, RefName, RepoDeletion, RepoId};
use cas_protocol::FileHash;
use reqwest::Method;

use crate::error::Result;
use crate::remote::{FileInfo, Remote};
use crate::repo::encode;
use crate::Client;

impl Remote {
    /// Makes a stored file or tree a root (idempotent).
    pub(crate) async fn put_root(&self, file: FileHash) -> Result<FileInfo> {
        let url = format!("{}/v1/roots/{file}", self.endpoint());
        self.call(&format!("root {file}"), Method::PUT, &url, None, true)
            .await
    }

    async fn delete_root(&self, file: FileHash) -> Result<()> {
        let url = format!("{}/v1/roots/{file}", self.endpoint());
        let what = format!("removal of root {file}");
        let rb = self.request(Method::DELETE, &url);
        self.send(&what, &url, rb).await.map(drop)
    }

    async fn delete_ref(&self, repo: &RepoId, dir: &str, name: &RefName) -> Result<RefEntry> {
        let url = self.repo_url(repo, &format!("/{dir}/{}", encode(name.as_str())));
        let what = format!("deletion of {name} of {repo}");
        self.call(&what, Method::DELETE, &url, None, false).await
    }
}

impl Client {
    /// Removes a root: what it kept is freed by garbage collection unless
    /// something else references it.
    pub async fn remove_root(&self, file: FileHash) -> Result<()> {
        self.remote().delete_root(file).await
    }

    /// Deletes a repository: its branches, tags and record.
    pub async fn delete_repo(&self, repo: &RepoId) -> Result<RepoDeletion> {
        let url = self.remote().repo_url(repo, "");
        let what = format!("deletion of {repo}");
        self.remote()
            .call(&what, Method::DELETE, &url, None, false)
            .await
    }

    /// Deletes a branch; answers the commit it named.
    pub async fn delete_branch(&self, repo: &RepoId, branch: &RefName) -> Result<RefEntry> {
        self.remote().delete_ref(repo, "branches", branch).await
    }

    /// Deletes a tag; answers the commit it named.
    pub async fn delete_tag(&self, repo: &RepoId, tag: &RefName) -> Result<RefEntry> {
        self.remote().delete_ref(repo, "tags", tag).await
    }
}
