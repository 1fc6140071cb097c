//! Deleting branches, tags and repositories. A deletion removes names
//! only: the commits, trees and files they named stay until garbage
//! collection finds them unreachable (see `core::gc`).

use cas_protocol::repo::{RefEntry, RefKind, RefName, RepoDeletion, RepoId};

use crate::core::{Core, CoreError};
use crate::index::Index;
use crate::store::{ObjectKey, ObjectStore, RefError};

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// Deletes a branch or tag; the answer names the commit it named. A
    /// ref that moved meanwhile is a conflict (nothing is deleted).
    pub async fn delete_ref(
        &self,
        repo: &RepoId,
        kind: RefKind,
        name: &RefName,
    ) -> Result<RefEntry, CoreError> {
        self.repo_info(repo).await?;
        let key = ObjectKey::git_ref(repo, kind, name);
        let (commit, version) =
            self.head(&key)
                .await?
                .ok_or_else(|| CoreError::RevisionNotFound {
                    repo: repo.clone(),
                    rev: name.to_string(),
                })?;
        match self.objects.delete_ref(&key, &version).await {
            Ok(()) => Ok(RefEntry {
                name: name.clone(),
                commit,
            }),
            Err(RefError::Conflict) => Err(CoreError::Conflict(format!(
                "{kind} {name} of {repo} changed while it was being deleted; look again"
            ))),
            Err(RefError::Io(e)) => Err(e.into()),
        }
    }

    /// Deletes a repository: its branches and tags, then its record. A
    /// commit racing the deletion may leave a branch behind (it stays a
    /// root and is listed by the next deletion); the record goes last, so
    /// a crash leaves a repository that can be deleted again.
    pub async fn delete_repo(&self, repo: &RepoId) -> Result<RepoDeletion, CoreError> {
        let key = ObjectKey::repo(repo);
        let mut removed = RepoDeletion {
            repo: repo.clone(),
            branches: vec![],
            tags: vec![],
        };
        for kind in [RefKind::Branch, RefKind::Tag] {
            for entry in self.refs(repo, kind).await? {
                let gone = match self.delete_ref(repo, kind, &entry.name).await {
                    Ok(e) => e,
                    // Deleted by someone else meanwhile.
                    Err(CoreError::RevisionNotFound { .. }) => continue,
                    Err(e) => return Err(e),
                };
                match kind {
                    RefKind::Branch => removed.branches.push(gone),
                    RefKind::Tag => removed.tags.push(gone),
                }
            }
        }
        let (_, version) = self
            .objects
            .get_ref(&key)
            .await?
            .ok_or_else(|| CoreError::RepoNotFound(repo.clone()))?;
        match self.objects.delete_ref(&key, &version).await {
            Ok(()) => Ok(removed),
            Err(RefError::Conflict) => Err(CoreError::Conflict(format!(
                "repository {repo} changed while it was being deleted; delete it again"
            ))),
            Err(RefError::Io(e)) => Err(e.into()),
        }
    }
}
