//! Commits the server builds from changes to a branch's tree (files put
//! or deleted by path), as the Hub's commit API sends them, and new
//! branches.
//!
//! The new tree is built from the head it is based on, and the branch
//! moves by compare-and-swap from exactly that head (or from nothing, for
//! a new branch). A commit that loses a race is rebuilt from the winner's
//! tree and tried again, so racing commits (also the first ones of a new
//! repository) all keep their files. With an expected parent a race is a
//! conflict instead.

use std::collections::BTreeMap;

use bytes::Bytes;
use cas_protocol::repo::{Commit, CommitId, CommitInfo, RefEntry, RefKind, RefName, RepoId};
use cas_protocol::tree::{check_path, Tree, TreeEntry};
use cas_protocol::{FileHash, Kind, Message};

use super::commits::COMMIT_ATTEMPTS;
use crate::core::lease::{LeaseGuard, Leased};
use crate::core::{Core, CoreError};
use crate::index::Index;
use crate::store::{Expect, ObjectKey, ObjectStore, RefError};

/// Mode of the files a change puts.
const FILE_MODE: u32 = 0o644;

/// One change to a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Puts a stored regular file at `path` (replacing one there).
    Put {
        path: String,
        file: FileHash,
        size: u64,
    },
    /// Removes the file at `path`, which must exist.
    Delete { path: String },
    /// Removes every file under directory `path`; there must be one.
    DeleteDir { path: String },
}

/// "Apply `changes` to `branch`'s tree and commit the result."
#[derive(Debug, Clone)]
pub struct ChangeRequest {
    pub branch: RefName,
    pub changes: Vec<Change>,
    pub message: String,
    pub author: String,
    /// The head the branch must still have (`None`: whatever it is).
    pub parent: Option<CommitId>,
}

/// The tree after `changes`.
pub fn apply(entries: &[TreeEntry], changes: &[Change]) -> Result<Tree, CoreError> {
    let mut files: BTreeMap<String, TreeEntry> = entries
        .iter()
        .map(|e| (e.path.clone(), e.clone()))
        .collect();
    let invalid = |s: String| CoreError::InvalidChange(s);
    for c in changes {
        match c {
            Change::Put { path, file, size } => {
                check_path(path).map_err(|e| invalid(format!("path {path:?}: {e}")))?;
                files.insert(
                    path.clone(),
                    TreeEntry {
                        path: path.clone(),
                        mode: FILE_MODE,
                        size: *size,
                        file: *file,
                    },
                );
            }
            Change::Delete { path } => {
                if files.remove(path).is_none() {
                    return Err(invalid(format!(
                        "cannot delete {path:?}: a file with this name doesn't exist"
                    )));
                }
            }
            Change::DeleteDir { path } => {
                let dir = format!("{}/", path.trim_end_matches('/'));
                let before = files.len();
                files.retain(|p, _| !p.starts_with(&dir));
                if files.len() == before {
                    return Err(invalid(format!(
                        "cannot delete folder {path:?}: no file is under it"
                    )));
                }
            }
        }
    }
    let tree = Tree::new(files.into_values().collect());
    tree.validate()
        .map_err(|reason| invalid(format!("the new tree is not valid: {reason}")))?;
    Ok(tree)
}

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// Applies `req.changes` to the tree of `req.branch` of an existing
    /// repository (an empty tree for a new branch) and commits the result
    /// on top of the head it was built from; see the module docs for
    /// races. Every file put must be stored (the caller found it).
    pub async fn commit_changes(
        &self,
        repo: &RepoId,
        req: ChangeRequest,
    ) -> Result<CommitInfo, CoreError> {
        self.repo_info(repo).await?;
        let hold = self.hold_put_files(&req.changes).await?;
        let key = ObjectKey::git_ref(repo, RefKind::Branch, &req.branch);
        let branch = &req.branch;
        for attempt in 0..COMMIT_ATTEMPTS {
            let head = self.head(&key).await?;
            if let Some(p) = req.parent {
                if head.as_ref().map(|(h, _)| *h) != Some(p) {
                    return Err(CoreError::Conflict(format!(
                        "branch {branch} of {repo} is not at the expected parent {p}"
                    )));
                }
            }
            let base = match &head {
                Some((h, _)) => {
                    let tree = self.read_commit(*h).await?.tree;
                    self.tree(tree).await?.tree.entries.clone()
                }
                None => vec![],
            };
            let tree = apply(&base, &req.changes)?;
            let tree = self
                .put_object_bytes(Kind::Tree, Bytes::from(tree.to_bytes()))
                .await?
                .file;
            let commit = Commit {
                parents: head.iter().map(|(h, _)| *h).collect(),
                tree,
                message: req.message.clone(),
                author: req.author.clone(),
                time: crate::auth::now(),
                extra: vec![],
            };
            commit.validate().map_err(CoreError::InvalidChange)?;
            let info = self.store_commit(commit).await?;
            let expect = head.map_or(Expect::Absent, |(_, v)| Expect::Version(v));
            let value = Bytes::from(info.id.to_hex());
            match self.objects.put_ref(&key, value, expect).await {
                Ok(_) => {
                    hold.keep();
                    return Ok(info);
                }
                Err(RefError::Conflict) if req.parent.is_none() => {
                    tracing::debug!(%repo, %branch, attempt, "branch moved; rebuilding the tree on its new head");
                }
                Err(RefError::Conflict) => {
                    return Err(CoreError::Conflict(format!(
                        "branch {branch} of {repo} moved while committing"
                    )))
                }
                Err(RefError::Io(e)) => return Err(e.into()),
            }
        }
        Err(CoreError::Conflict(format!(
            "branch {branch} of {repo} moved {COMMIT_ATTEMPTS} times while this commit was being made; try again"
        )))
    }

    /// Holds the files `changes` put (see `core::lease`) and checks they
    /// are stored: a garbage collection run may have taken an unrooted
    /// file out of the index since the caller found it.
    async fn hold_put_files(&self, changes: &[Change]) -> Result<LeaseGuard, CoreError> {
        let files: Vec<FileHash> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Put { file, .. } => Some(*file),
                _ => None,
            })
            .collect();
        let hold = self
            .leases
            .hold(files.iter().map(|f| Leased::File(*f)))
            .await;
        self.catch_up_for(&files).await?;
        self.with_index(move |i| {
            for f in files {
                if i.file(&f)?.is_none() {
                    return Err(CoreError::InvalidChange(format!(
                        "file {f} is not stored (garbage collection may have removed it: upload it again)"
                    )));
                }
            }
            Ok(())
        })
        .await?;
        Ok(hold)
    }

    /// Creates branch `name` at revision `rev` (without one, the default
    /// branch's head). An existing branch is a conflict.
    pub async fn create_branch(
        &self,
        repo: &RepoId,
        name: &RefName,
        rev: Option<&str>,
    ) -> Result<RefEntry, CoreError> {
        let info = self.repo_info(repo).await?;
        let rev = rev.map_or_else(|| info.default_branch.to_string(), str::to_owned);
        let target = self.resolve(repo, &rev).await?.id;
        let key = ObjectKey::git_ref(repo, RefKind::Branch, name);
        match self
            .objects
            .put_ref(&key, Bytes::from(target.to_hex()), Expect::Absent)
            .await
        {
            Ok(_) => Ok(RefEntry {
                name: name.clone(),
                commit: target,
            }),
            Err(RefError::Conflict) => Err(CoreError::Conflict(format!(
                "branch {name} of {repo} already exists"
            ))),
            Err(RefError::Io(e)) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, n: u8) -> TreeEntry {
        TreeEntry {
            path: path.into(),
            mode: FILE_MODE,
            size: u64::from(n),
            file: FileHash::from_bytes([n; 32]),
        }
    }

    fn put(path: &str, n: u8) -> Change {
        Change::Put {
            path: path.into(),
            file: FileHash::from_bytes([n; 32]),
            size: u64::from(n),
        }
    }

    #[test]
    fn changes_apply_to_a_tree() {
        let base = [entry("a/x", 1), entry("a/y", 2), entry("b", 3)];
        let t = apply(&base, &[put("c", 4), put("b", 5)]).unwrap();
        let paths: Vec<_> = t
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e.size))
            .collect();
        assert_eq!(paths, [("a/x", 1), ("a/y", 2), ("b", 5), ("c", 4)]);
        let t = apply(
            &base,
            &[
                Change::DeleteDir { path: "a/".into() },
                Change::Delete { path: "b".into() },
            ],
        )
        .unwrap();
        assert!(t.entries.is_empty());
        for bad in [
            vec![Change::Delete { path: "a".into() }],
            vec![Change::DeleteDir { path: "b".into() }],
            vec![put("../x", 1)],
            vec![put("/x", 1)],
        ] {
            assert!(
                matches!(apply(&base, &bad), Err(CoreError::InvalidChange(_))),
                "{bad:?}"
            );
        }
    }

    /// Racing commits to a new repository's first branch (and to its
    /// head afterwards) all keep their files: each loser is rebuilt on
    /// the winner's tree.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_commits_keep_every_file() {
        use crate::index::MemIndex;
        use crate::store::MemStore;
        use cas_protocol::repo::RepoType;
        let core = Core::new(MemStore::default(), MemIndex::default());
        let repo = RepoId::new(RepoType::Model, "org", "race").unwrap();
        core.create_repo(&repo).await.unwrap();
        let n = 8;
        let runs: Vec<_> = (0..n)
            .map(|i| {
                let (core, repo) = (core.clone(), repo.clone());
                tokio::spawn(async move {
                    let body = Bytes::from(format!("file {i}"));
                    let put = core.put_object_bytes(Kind::File, body).await.unwrap();
                    let req = ChangeRequest {
                        branch: RefName::main(),
                        changes: vec![Change::Put {
                            path: format!("f{i}"),
                            file: put.file,
                            size: put.size,
                        }],
                        message: format!("add f{i}"),
                        author: "test".into(),
                        parent: None,
                    };
                    core.commit_changes(&repo, req).await.unwrap()
                })
            })
            .collect();
        for r in runs {
            r.await.unwrap();
        }
        let head = core.resolve(&repo, "main").await.unwrap();
        let tree = core.tree(head.commit.tree).await.unwrap();
        assert_eq!(tree.tree.entries.len(), n);
        let log = core.log(&repo, "main", None, 100).await.unwrap();
        assert_eq!(log.commits.len(), n);
        // With an expected parent that is no longer the head: a conflict.
        let stale = ChangeRequest {
            branch: RefName::main(),
            changes: vec![Change::Delete { path: "f0".into() }],
            message: "stale".into(),
            author: "test".into(),
            parent: Some(log.commits[1].id),
        };
        assert!(matches!(
            core.commit_changes(&repo, stale).await,
            Err(CoreError::Conflict(_))
        ));
    }
}
