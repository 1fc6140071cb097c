//! Repositories, branches, tags and commits. Everything lives in the object
//! store, so an index rebuild (or another node on the same bucket) sees it:
//! - `repos/<type>/<org>/<name>`: the repository's record (JSON: creation
//!   time, default branch), created once;
//! - `commits/<id>`: a commit's binary form, create-if-absent;
//! - `refs/<type>/<org>/<name>/heads|tags/<ref name in key form>`: the id
//!   of the commit a branch or tag names (40 hex digits).
//!
//! Heads move only by compare-and-swap. Crash ordering: a repository's
//! record is durable before any of its refs, and a commit before a ref
//! names it, so a ref never names something missing.
//!
//! All repositories share one commit namespace, but a revision (branch,
//! tag, commit id or unique prefix) resolves only to commits reachable from
//! the repository's own refs: a commit of another repository is not found
//! through this one.
//!
//! - `changes`: commits built on the server from changes by path (the
//!   Hub's commit API), new branches;
//! - `cache`: commits and parsed trees, kept in memory (both immutable);
//! - `commits`: storing and reading commits, committing to a branch,
//!   tagging;
//! - `delete`: deleting branches, tags and whole repositories (what they
//!   named is garbage collection's to free);
//! - `resolve`: revisions, reachability, logs;
//! - `trees`: reading, checking and caching a commit's tree, and the
//!   access check of tokens limited to repositories.

mod cache;
mod changes;
mod commits;
mod delete;
mod resolve;
#[cfg(test)]
mod tests;
mod trees;

use bytes::Bytes;
use cas_protocol::repo::{
    CommitId, RefEntry, RefKind, RefName, RepoDetails, RepoId, RepoInfo, RepoType,
};
use serde::{Deserialize, Serialize};

use super::{Core, CoreError};
use crate::index::Index;
use crate::store::{Expect, KeyPrefix, ObjectKey, ObjectStore, RefError, RefVersion};

pub(crate) use cache::Caches;
pub use cache::TreeListing;
pub use changes::{Change, ChangeRequest};
pub use resolve::MAX_LOG_PAGE;

/// A repository's record in the object store.
#[derive(Serialize, Deserialize)]
struct RepoRecord {
    created: u64,
    default_branch: RefName,
}

/// A stored record that does not parse: storage damage, an internal error.
fn corrupt(what: String) -> CoreError {
    CoreError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, what))
}

/// The commit id a ref record holds.
fn parse_head(key: &ObjectKey, bytes: &[u8]) -> Result<CommitId, CoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt(format!("{} does not hold a commit id", key.as_str())))
}

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// Creates a repository (default branch `main`, no refs) unless it
    /// exists; `true` when this call created it.
    pub async fn create_repo(&self, repo: &RepoId) -> Result<(RepoInfo, bool), CoreError> {
        let record = RepoRecord {
            created: crate::auth::now(),
            default_branch: RefName::main(),
        };
        let bytes = Bytes::from(serde_json::to_vec(&record).expect("json"));
        match self
            .objects
            .put_ref(&ObjectKey::repo(repo), bytes, Expect::Absent)
            .await
        {
            Ok(_) => Ok((repo_info(repo, record), true)),
            Err(RefError::Conflict) => Ok((self.repo_info(repo).await?, false)),
            Err(RefError::Io(e)) => Err(e.into()),
        }
    }

    pub async fn repo_info(&self, repo: &RepoId) -> Result<RepoInfo, CoreError> {
        let key = ObjectKey::repo(repo);
        let (bytes, _) = self
            .objects
            .get_ref(&key)
            .await?
            .ok_or_else(|| CoreError::RepoNotFound(repo.clone()))?;
        let record: RepoRecord = serde_json::from_slice(&bytes)
            .map_err(|e| corrupt(format!("{}: {e}", key.as_str())))?;
        Ok(repo_info(repo, record))
    }

    /// The repositories of one type (of both without one), sorted.
    pub async fn list_repos(&self, only: Option<RepoType>) -> Result<Vec<RepoInfo>, CoreError> {
        let mut out = Vec::new();
        for t in RepoType::ALL
            .into_iter()
            .filter(|t| only.is_none_or(|o| o == *t))
        {
            for key in self.objects.list(&KeyPrefix::repos(t)).await? {
                let parts: Vec<&str> = key.as_str().split('/').collect();
                let Some(repo) = (match parts.as_slice() {
                    [_, _, org, name] => RepoId::new(t, org, name).ok(),
                    _ => None,
                }) else {
                    tracing::warn!(key = key.as_str(), "not a repository record; skipped");
                    continue;
                };
                out.push(self.repo_info(&repo).await?);
            }
        }
        Ok(out)
    }

    /// A repository with its branches and tags.
    pub async fn repo_details(&self, repo: &RepoId) -> Result<RepoDetails, CoreError> {
        Ok(RepoDetails {
            info: self.repo_info(repo).await?,
            branches: self.refs(repo, RefKind::Branch).await?,
            tags: self.refs(repo, RefKind::Tag).await?,
        })
    }

    /// A repository's branches or tags, sorted by key.
    pub(crate) async fn refs(
        &self,
        repo: &RepoId,
        kind: RefKind,
    ) -> Result<Vec<RefEntry>, CoreError> {
        let mut out = Vec::new();
        for key in self.objects.list(&KeyPrefix::refs(repo, kind)).await? {
            let Ok(name) = RefName::from_key_segment(key.last_segment()) else {
                tracing::warn!(key = key.as_str(), "not a ref; skipped");
                continue;
            };
            // A ref deleted since the listing is simply not there.
            if let Some((commit, _)) = self.head(&key).await? {
                out.push(RefEntry { name, commit });
            }
        }
        Ok(out)
    }

    /// The commit a ref names, with the record's version.
    pub(crate) async fn head(
        &self,
        key: &ObjectKey,
    ) -> Result<Option<(CommitId, RefVersion)>, CoreError> {
        match self.objects.get_ref(key).await? {
            None => Ok(None),
            Some((bytes, version)) => Ok(Some((parse_head(key, &bytes)?, version))),
        }
    }
}

fn repo_info(repo: &RepoId, record: RepoRecord) -> RepoInfo {
    RepoInfo {
        repo: repo.clone(),
        created: record.created,
        default_branch: record.default_branch,
    }
}
