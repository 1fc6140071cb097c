//! Revisions: a branch, else a tag (also in git's full forms
//! `refs/heads/NAME` and `refs/tags/NAME`), else a full commit id, else a
//! unique prefix of a commit reachable from the repository's refs; and
//! logs.

use std::collections::{HashSet, VecDeque};

use cas_protocol::repo::{
    is_commit_prefix, CommitId, CommitInfo, LogPage, RefKind, RefName, RepoId,
};

use crate::core::{Core, CoreError};
use crate::index::Index;
use crate::store::{ObjectKey, ObjectStore};

/// Most commits a search of a repository's history visits (a commit id or
/// prefix further back is not found).
const MAX_WALK: usize = 100_000;
/// Most commits in one page of a log.
pub const MAX_LOG_PAGE: usize = 1000;

/// The refs a revision may name, in the order they are tried: the name as
/// a branch, then as a tag; then git's full forms (`refs/heads/main` is
/// branch `main`, `refs/tags/v1` tag `v1`), which the Hub's clients send.
fn ref_candidates(rev: &str) -> Vec<(RefKind, RefName)> {
    let mut out = Vec::new();
    if let Ok(name) = RefName::new(rev) {
        out.extend([(RefKind::Branch, name.clone()), (RefKind::Tag, name)]);
    }
    for (prefix, kind) in [
        ("refs/heads/", RefKind::Branch),
        ("refs/tags/", RefKind::Tag),
    ] {
        if let Some(name) = rev.strip_prefix(prefix).and_then(|n| RefName::new(n).ok()) {
            out.push((kind, name));
        }
    }
    out
}

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// Resolves a revision of a repository: a branch, else a tag, else a
    /// full commit id, else a unique prefix (at least 4 hex digits) of a
    /// commit reachable from the repository's refs.
    pub async fn resolve(&self, repo: &RepoId, rev: &str) -> Result<CommitInfo, CoreError> {
        self.repo_info(repo).await?;
        for (kind, name) in ref_candidates(rev) {
            let key = ObjectKey::git_ref(repo, kind, &name);
            if let Some((id, _)) = self.head(&key).await? {
                return self.commit_info(id).await;
            }
        }
        let not_found = || CoreError::RevisionNotFound {
            repo: repo.clone(),
            rev: rev.chars().take(300).collect(),
        };
        if let Ok(id) = rev.parse::<CommitId>() {
            return match self.resolve_id(repo, id).await {
                Err(CoreError::RevisionNotFound { .. }) => Err(not_found()),
                r => r,
            };
        }
        if !is_commit_prefix(rev) {
            return Err(not_found());
        }
        match self.reachable(repo, |id| id.has_prefix(rev), 2).await?[..] {
            [id] => self.commit_info(id).await,
            [] => Err(not_found()),
            _ => Err(CoreError::AmbiguousRevision {
                repo: repo.clone(),
                rev: rev.to_owned(),
            }),
        }
    }

    /// The commit `id` if it is reachable from one of the repository's refs.
    pub(super) async fn resolve_id(
        &self,
        repo: &RepoId,
        id: CommitId,
    ) -> Result<CommitInfo, CoreError> {
        if self.reachable(repo, |c| *c == id, 1).await?.is_empty() {
            return Err(CoreError::RevisionNotFound {
                repo: repo.clone(),
                rev: id.to_string(),
            });
        }
        self.commit_info(id).await
    }

    /// Up to `max` commits matching `wanted` among those reachable from the
    /// repository's branches and tags (all parents followed), searching at
    /// most [`MAX_WALK`] commits.
    async fn reachable(
        &self,
        repo: &RepoId,
        wanted: impl Fn(&CommitId) -> bool,
        max: usize,
    ) -> Result<Vec<CommitId>, CoreError> {
        let mut queue: VecDeque<CommitId> = VecDeque::new();
        for kind in [RefKind::Branch, RefKind::Tag] {
            queue.extend(self.refs(repo, kind).await?.into_iter().map(|r| r.commit));
        }
        let mut seen = HashSet::new();
        let mut found = Vec::new();
        while let Some(id) = queue.pop_front() {
            if !seen.insert(id) {
                continue;
            }
            if seen.len() > MAX_WALK {
                tracing::warn!(%repo, "history longer than {MAX_WALK} commits; search stopped");
                break;
            }
            if wanted(&id) {
                found.push(id);
                if found.len() == max {
                    break;
                }
            }
            queue.extend(self.read_commit(id).await?.parents.iter().copied());
        }
        Ok(found)
    }

    /// A page of the first-parent history from `rev` (or, to continue a
    /// log, from `cursor`, a commit of the repository): at most `limit`
    /// commits (1..=[`MAX_LOG_PAGE`]), and the commit the next page starts at.
    pub async fn log(
        &self,
        repo: &RepoId,
        rev: &str,
        cursor: Option<CommitId>,
        limit: usize,
    ) -> Result<LogPage, CoreError> {
        let start = match cursor {
            Some(c) => self.resolve_id(repo, c).await?,
            None => self.resolve(repo, rev).await?,
        };
        let limit = limit.clamp(1, MAX_LOG_PAGE);
        let mut commits = vec![start];
        while commits.len() < limit {
            let Some(&parent) = commits.last().and_then(|c| c.commit.parents.first()) else {
                break;
            };
            commits.push(self.commit_info(parent).await?);
        }
        let next = commits
            .last()
            .and_then(|c| c.commit.parents.first().copied());
        Ok(LogPage { commits, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_name_refs_as_is_then_in_full_form() {
        let names = |rev: &str| {
            ref_candidates(rev)
                .into_iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(names("main"), ["branch main", "tag main"]);
        assert_eq!(
            names("refs/heads/main"),
            [
                "branch refs/heads/main",
                "tag refs/heads/main",
                "branch main"
            ]
        );
        assert_eq!(
            names("refs/tags/v1"),
            ["branch refs/tags/v1", "tag refs/tags/v1", "tag v1"]
        );
        assert_eq!(names("refs/pr/1"), ["branch refs/pr/1", "tag refs/pr/1"]);
        assert!(names("a..b").is_empty() && names("refs/heads/").is_empty());
    }
}
