//! Commits: stored once under their ids, read through the cache; a
//! branch moves to a new commit by compare-and-swap; tags are created once.

use std::sync::Arc;

use bytes::Bytes;
use cas_protocol::repo::{
    Commit, CommitId, CommitInfo, CommitRequest, RefEntry, RefKind, RefName, RepoId,
};
use cas_protocol::{Message, MessageError};

use super::corrupt;
use crate::core::{Core, CoreError};
use crate::index::Index;
use crate::store::{Expect, ObjectKey, ObjectStore, RefError};

/// Tries of a commit without an expected parent, each rebuilt on the head
/// that won the race before it.
pub(super) const COMMIT_ATTEMPTS: usize = 32;

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// Stores a commit (once: ids are content addresses). A stored commit
    /// under the same id with other bytes would be an id collision
    /// (docs/PROTOCOL.md §4.5): refused, never merged.
    pub(super) async fn store_commit(&self, commit: Commit) -> Result<CommitInfo, CoreError> {
        let id = commit.id();
        let key = ObjectKey::commit(&id);
        let bytes = Bytes::from(commit.to_bytes());
        if !self.objects.put(&key, bytes.clone()).await?
            && self.objects.get(&key).await?.as_ref() != Some(&bytes)
        {
            return Err(corrupt(format!("commit id collision on {id}")));
        }
        self.caches.keep_commit(id, Arc::new(commit.clone()));
        Ok(CommitInfo { id, commit })
    }

    /// A stored commit.
    pub async fn read_commit(&self, id: CommitId) -> Result<Arc<Commit>, CoreError> {
        if let Some(c) = self.caches.commit(&id) {
            return Ok(c);
        }
        let key = ObjectKey::commit(&id);
        let bytes = self
            .objects
            .get(&key)
            .await?
            .ok_or_else(|| corrupt(format!("commit {id} is named but not stored")))?;
        let commit =
            Commit::from_bytes(&bytes).map_err(|e| corrupt(format!("commit {id}: {e}")))?;
        if commit.id() != id {
            return Err(corrupt(format!("commit {id} hashes to {}", commit.id())));
        }
        let commit = Arc::new(commit);
        self.caches.keep_commit(id, commit.clone());
        Ok(commit)
    }

    pub(super) async fn commit_info(&self, id: CommitId) -> Result<CommitInfo, CoreError> {
        let commit = (*self.read_commit(id).await?).clone();
        Ok(CommitInfo { id, commit })
    }

    /// Commits `req.tree` on `req.branch`, creating the repository if it
    /// is new. The tree must be a stored tree whose entries are all stored.
    ///
    /// Without `req.parent` the commit goes on top of the branch's head
    /// (or starts the branch), and the branch moves by compare-and-swap: a
    /// commit that lost a race is rebuilt on the new head and tried again,
    /// so concurrent commits to one branch all end up in its history, one
    /// after the other. With `req.parent` the head must still be that
    /// commit (or, for a new branch, it must be a commit of this
    /// repository); otherwise [`CoreError::Conflict`] names the head.
    pub async fn commit(&self, repo: &RepoId, req: CommitRequest) -> Result<CommitInfo, CoreError> {
        let template = Commit {
            parents: vec![],
            tree: req.tree,
            message: req.message,
            author: req.author,
            time: crate::auth::now(),
            extra: vec![],
        };
        template
            .validate()
            .map_err(|reason| MessageError::Invalid {
                kind: Commit::KIND,
                reason,
            })?;
        let hold = self.check_tree(req.tree).await?;
        self.create_repo(repo).await?;
        let key = ObjectKey::git_ref(repo, RefKind::Branch, &req.branch);
        let branch = &req.branch;
        for attempt in 0..COMMIT_ATTEMPTS {
            let head = self.head(&key).await?;
            let parents = match (req.parent, &head) {
                (Some(p), Some((h, _))) if p != *h => {
                    return Err(CoreError::Conflict(format!(
                        "branch {branch} of {repo} has moved: its head is {h}, not the expected parent {p}"
                    )))
                }
                (Some(p), None) => {
                    self.resolve_id(repo, p).await?;
                    vec![p]
                }
                (Some(p), Some(_)) => vec![p],
                (None, Some((h, _))) => vec![*h],
                (None, None) => vec![],
            };
            let info = self
                .store_commit(Commit {
                    parents,
                    ..template.clone()
                })
                .await?;
            let expect = head.map_or(Expect::Absent, |(_, v)| Expect::Version(v));
            let value = Bytes::from(info.id.to_hex());
            match self.objects.put_ref(&key, value, expect).await {
                Ok(_) => {
                    hold.keep();
                    return Ok(info);
                }
                Err(RefError::Conflict) if req.parent.is_none() => {
                    tracing::debug!(%repo, %branch, attempt, "branch moved; rebuilding the commit on its new head");
                }
                Err(RefError::Conflict) => {
                    let now = self.head(&key).await?.map(|(h, _)| h.to_string());
                    return Err(CoreError::Conflict(format!(
                        "branch {branch} of {repo} moved while committing: its head is now {}",
                        now.as_deref().unwrap_or("gone")
                    )));
                }
                Err(RefError::Io(e)) => return Err(e.into()),
            }
        }
        Err(CoreError::Conflict(format!(
            "branch {branch} of {repo} moved {COMMIT_ATTEMPTS} times while this commit was being made; try again"
        )))
    }

    /// Tags revision `rev`. Tagging the commit a tag already names is a
    /// no-op (`false`); a tag that names another commit is a conflict.
    pub async fn create_tag(
        &self,
        repo: &RepoId,
        tag: &RefName,
        rev: &str,
    ) -> Result<(RefEntry, bool), CoreError> {
        let target = self.resolve(repo, rev).await?.id;
        let key = ObjectKey::git_ref(repo, RefKind::Tag, tag);
        let entry = RefEntry {
            name: tag.clone(),
            commit: target,
        };
        let value = Bytes::from(target.to_hex());
        match self.objects.put_ref(&key, value, Expect::Absent).await {
            Ok(_) => Ok((entry, true)),
            Err(RefError::Conflict) => match self.head(&key).await? {
                Some((id, _)) if id == target => Ok((entry, false)),
                Some((id, _)) => Err(CoreError::Conflict(format!(
                    "tag {tag} of {repo} exists and names {id}, not {target}"
                ))),
                None => Err(CoreError::Conflict(format!(
                    "tag {tag} of {repo} changed meanwhile; try again"
                ))),
            },
            Err(RefError::Io(e)) => Err(e.into()),
        }
    }
}
