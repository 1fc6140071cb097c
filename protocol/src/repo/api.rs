//! The JSON shapes of the server's repository routes (docs/API.md).

use serde::{Deserialize, Serialize};

use super::{Commit, CommitId, RefName, RepoId};
use crate::hash::FileHash;

/// A repository as listed: its name, when it was created (Unix seconds)
/// and its default branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoInfo {
    #[serde(flatten)]
    pub repo: RepoId,
    pub created: u64,
    pub default_branch: RefName,
}

/// A branch or tag and the commit it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefEntry {
    pub name: RefName,
    pub commit: CommitId,
}

/// A repository with its branches and tags (sorted by name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoDetails {
    #[serde(flatten)]
    pub info: RepoInfo,
    pub branches: Vec<RefEntry>,
    pub tags: Vec<RefEntry>,
}

/// What deleting a repository removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoDeletion {
    #[serde(flatten)]
    pub repo: RepoId,
    pub branches: Vec<RefEntry>,
    pub tags: Vec<RefEntry>,
}

/// A commit with its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitInfo {
    pub id: CommitId,
    #[serde(flatten)]
    pub commit: Commit,
}

/// "Commit `tree` on `branch`": without `parent` on top of the branch's
/// head, whatever it is when the server gets there; with it only if the
/// head is still `parent` (a new branch starts at `parent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRequest {
    pub branch: RefName,
    pub tree: FileHash,
    pub message: String,
    pub author: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<CommitId>,
}

/// "Tag `revision`" (a branch, tag, commit id or unique prefix).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRequest {
    pub revision: String,
}

/// One page of a first-parent log; `next` continues it (as `cursor`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPage {
    pub commits: Vec<CommitInfo>,
    pub next: Option<CommitId>,
}

/// All repositories a caller may see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoList {
    pub repos: Vec<RepoInfo>,
}
