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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cas_protocol::chunking::chunk_and_hash;
use cas_protocol::repo::{
    is_commit_prefix, Commit, CommitId, CommitInfo, CommitRequest, LogPage, RefEntry, RefKind,
    RefName, RepoDetails, RepoId, RepoInfo, RepoType,
};
use cas_protocol::tree::{Tree, MAX_TREE_BYTES};
use cas_protocol::{ByteRange, FileHash, Kind, Message, MessageError};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

use super::{blocking, Core, CoreError};
use crate::index::Index;
use crate::store::{Expect, KeyPrefix, ObjectKey, ObjectStore, RefError, RefVersion};

/// Tries of a commit without an expected parent, each rebuilt on the head
/// that won the race before it.
const COMMIT_ATTEMPTS: usize = 32;
/// Most commits a search of a repository's history visits (a commit id or
/// prefix further back is not found).
const MAX_WALK: usize = 100_000;
/// Most commits in one page of a log.
pub const MAX_LOG_PAGE: usize = 1000;
/// Commits kept parsed in memory.
const COMMIT_CACHE: usize = 16_384;
/// Tree entries kept parsed in memory, over all cached trees.
const TREE_CACHE_ENTRIES: usize = 1 << 20;

/// A repository's record in the object store.
#[derive(Serialize, Deserialize)]
struct RepoRecord {
    created: u64,
    default_branch: RefName,
}

/// A parsed tree with the set of files it names: what listings and the
/// access check of repository-scoped tokens read.
#[derive(Debug)]
pub struct TreeListing {
    pub tree: Tree,
    files: HashSet<FileHash>,
}

impl TreeListing {
    /// Whether one of the tree's entries is `file`.
    pub fn names(&self, file: &FileHash) -> bool {
        self.files.contains(file)
    }
}

/// Immutable things, parsed once: commits by id, trees by hash.
#[derive(Default)]
pub(crate) struct Caches {
    commits: Mutex<HashMap<CommitId, Arc<Commit>>>,
    trees: Mutex<TreeCache>,
}

/// Trees in insertion order; the oldest go when the entry budget is spent.
#[derive(Default)]
struct TreeCache {
    map: HashMap<FileHash, Arc<TreeListing>>,
    order: VecDeque<FileHash>,
    entries: usize,
}

impl Caches {
    fn commit(&self, id: &CommitId) -> Option<Arc<Commit>> {
        self.commits.lock().expect("not poisoned").get(id).cloned()
    }

    fn keep_commit(&self, id: CommitId, c: Arc<Commit>) {
        let mut commits = self.commits.lock().expect("not poisoned");
        if commits.len() >= COMMIT_CACHE {
            commits.clear();
        }
        commits.insert(id, c);
    }

    fn tree(&self, hash: &FileHash) -> Option<Arc<TreeListing>> {
        self.trees
            .lock()
            .expect("not poisoned")
            .map
            .get(hash)
            .cloned()
    }

    fn keep_tree(&self, hash: FileHash, t: Arc<TreeListing>) {
        let mut c = self.trees.lock().expect("not poisoned");
        let n = t.tree.entries.len();
        while c.entries + n > TREE_CACHE_ENTRIES {
            let Some(old) = c.order.pop_front() else {
                break;
            };
            if let Some(gone) = c.map.remove(&old) {
                c.entries -= gone.tree.entries.len();
            }
        }
        if c.map.insert(hash, t).is_none() {
            c.order.push_back(hash);
            c.entries += n;
        }
    }
}

fn corrupt(what: String) -> CoreError {
    CoreError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, what))
}

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
    async fn refs(&self, repo: &RepoId, kind: RefKind) -> Result<Vec<RefEntry>, CoreError> {
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
    async fn head(&self, key: &ObjectKey) -> Result<Option<(CommitId, RefVersion)>, CoreError> {
        match self.objects.get_ref(key).await? {
            None => Ok(None),
            Some((bytes, version)) => Ok(Some((parse_head(key, &bytes)?, version))),
        }
    }

    /// Stores a commit (once: ids are content addresses). A stored commit
    /// under the same id with other bytes would be an id collision
    /// (docs/PROTOCOL.md §4.5): refused, never merged.
    async fn store_commit(&self, commit: Commit) -> Result<CommitInfo, CoreError> {
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

    async fn commit_info(&self, id: CommitId) -> Result<CommitInfo, CoreError> {
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
        self.check_tree(req.tree).await?;
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
                Ok(_) => return Ok(info),
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

    /// The tree must be stored as a tree, and each of its entries as a
    /// regular file of the entry's size.
    async fn check_tree(&self, tree: FileHash) -> Result<(), CoreError> {
        let listing = self.tree(tree).await?;
        self.with_index(move |i| {
            for e in &listing.tree.entries {
                match i.file(&e.file)? {
                    Some(r) if r.kind == Kind::File && r.size == e.size => {}
                    _ => {
                        return Err(CoreError::InvalidTree {
                            tree,
                            reason: format!(
                                "entry {:?} names file {} of {} bytes, which is not stored",
                                e.path, e.file, e.size
                            ),
                        })
                    }
                }
            }
            Ok(())
        })
        .await
    }

    /// A stored tree, parsed: read through [`Core::file_stream`] (every
    /// chunk verified), checked against its tree hash, and cached.
    pub async fn tree(&self, hash: FileHash) -> Result<Arc<TreeListing>, CoreError> {
        if let Some(t) = self.caches.tree(&hash) {
            return Ok(t);
        }
        let recipe = self.recipe(hash).await?;
        let invalid = |reason: &str| CoreError::InvalidTree {
            tree: hash,
            reason: reason.into(),
        };
        if recipe.kind != Kind::Tree {
            return Err(invalid("it is a regular file, not a tree"));
        }
        if recipe.size > MAX_TREE_BYTES as u64 {
            return Err(invalid("larger than a tree may be"));
        }
        let range = ByteRange {
            start: 0,
            end: recipe.size,
        };
        let parts: Vec<Bytes> = self.file_stream(recipe, range).try_collect().await?;
        let listing = blocking(move || {
            let bytes = parts.concat();
            let actual = FileHash::of_kind(Kind::Tree, &chunk_and_hash(&bytes));
            if actual != hash {
                return Err(corrupt(format!("tree {hash}: its bytes hash to {actual}")));
            }
            let tree = Tree::from_bytes(&bytes).map_err(|e| CoreError::InvalidTree {
                tree: hash,
                reason: e.to_string(),
            })?;
            let files = tree.entries.iter().map(|e| e.file).collect();
            Ok(TreeListing { tree, files })
        })
        .await?;
        let listing = Arc::new(listing);
        self.caches.keep_tree(hash, listing.clone());
        Ok(listing)
    }

    /// Resolves a revision of a repository: a branch, else a tag, else a
    /// full commit id, else a unique prefix (at least 4 hex digits) of a
    /// commit reachable from the repository's refs.
    pub async fn resolve(&self, repo: &RepoId, rev: &str) -> Result<CommitInfo, CoreError> {
        self.repo_info(repo).await?;
        if let Ok(name) = RefName::new(rev) {
            for kind in [RefKind::Branch, RefKind::Tag] {
                let key = ObjectKey::git_ref(repo, kind, &name);
                if let Some((id, _)) = self.head(&key).await? {
                    return self.commit_info(id).await;
                }
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
    async fn resolve_id(&self, repo: &RepoId, id: CommitId) -> Result<CommitInfo, CoreError> {
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

    /// Whether `file` is the tree of revision `rev` of `repo` or one of its
    /// entries: what a token limited to repositories may read.
    pub async fn in_revision(
        &self,
        repo: &RepoId,
        rev: &str,
        file: FileHash,
    ) -> Result<bool, CoreError> {
        let tree = self.resolve(repo, rev).await?.commit.tree;
        Ok(tree == file || self.tree(tree).await?.names(&file))
    }
}

fn repo_info(repo: &RepoId, record: RepoRecord) -> RepoInfo {
    RepoInfo {
        repo: repo.clone(),
        created: record.created,
        default_branch: record.default_branch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::MemIndex;
    use crate::store::MemStore;
    use cas_protocol::shard::{FileRecipe, Shard, Term, XorbChunkTable};
    use cas_protocol::tree::TreeEntry;
    use cas_protocol::xorb::{Compression, EncodedChunk, XorbBuilder};
    use cas_protocol::{ChunkRange, Encoding, Sha256};

    /// A store whose record reads and swaps yield to other tasks first, so
    /// concurrent commits interleave between reading a head and moving it.
    #[derive(Default)]
    struct Yielding(MemStore);

    impl ObjectStore for Yielding {
        async fn put(&self, key: &ObjectKey, bytes: Bytes) -> std::io::Result<bool> {
            self.0.put(key, bytes).await
        }
        async fn len(&self, key: &ObjectKey) -> std::io::Result<Option<u64>> {
            self.0.len(key).await
        }
        async fn delete(&self, key: &ObjectKey) -> std::io::Result<()> {
            self.0.delete(key).await
        }
        async fn read_range(
            &self,
            key: &ObjectKey,
            range: ByteRange,
        ) -> std::io::Result<crate::store::ObjectReader> {
            self.0.read_range(key, range).await
        }
        async fn get(&self, key: &ObjectKey) -> std::io::Result<Option<Bytes>> {
            self.0.get(key).await
        }
        async fn list(&self, prefix: &KeyPrefix) -> std::io::Result<Vec<ObjectKey>> {
            self.0.list(prefix).await
        }
        async fn get_ref(&self, key: &ObjectKey) -> std::io::Result<Option<(Bytes, RefVersion)>> {
            tokio::task::yield_now().await;
            self.0.get_ref(key).await
        }
        async fn put_ref(
            &self,
            key: &ObjectKey,
            bytes: Bytes,
            expect: Expect,
        ) -> Result<RefVersion, RefError> {
            tokio::task::yield_now().await;
            self.0.put_ref(key, bytes, expect).await
        }
        async fn delete_ref(&self, key: &ObjectKey, version: &RefVersion) -> Result<(), RefError> {
            self.0.delete_ref(key, version).await
        }
    }

    type TestCore = Core<Yielding, MemIndex>;

    fn core() -> TestCore {
        Core::new(Yielding::default(), MemIndex::default())
    }

    fn repo(s: &str) -> RepoId {
        RepoId::parse(s, RepoType::Model).unwrap()
    }

    fn name(s: &str) -> RefName {
        RefName::new(s).unwrap()
    }

    /// Stores each blob (at most one chunk) as a file of its kind, all in
    /// one xorb; returns their hashes.
    async fn store_files(core: &TestCore, blobs: &[(&[u8], Kind)]) -> Vec<FileHash> {
        let mut b = XorbBuilder::new();
        for (data, _) in blobs {
            b.try_push(EncodedChunk::encode(data, Compression::Raw).unwrap())
                .unwrap();
        }
        let x = b.finish().unwrap();
        core.put_xorb(x.hash, x.bytes.clone().into()).await.unwrap();
        let files: Vec<FileRecipe> = (0u32..)
            .zip(blobs.iter().zip(&x.chunks))
            .map(|(i, ((data, kind), info))| FileRecipe {
                hash: FileHash::of_kind(*kind, [info]),
                sha256: Sha256::of(data),
                size: u64::from(info.len),
                terms: vec![Term {
                    xorb: x.hash,
                    chunks: ChunkRange {
                        start: i,
                        end: i + 1,
                    },
                    len: u64::from(info.len),
                }],
                kind: *kind,
            })
            .collect();
        let hashes = files.iter().map(|f| f.hash).collect();
        let shard = Shard {
            xorbs: vec![XorbChunkTable::from(&x)],
            files,
        };
        core.commit_shard(shard.to_bytes().into(), Encoding::Binary)
            .await
            .unwrap();
        hashes
    }

    /// Stores `files` (path, bytes) and a tree of them; returns the tree's
    /// hash and the files' hashes.
    async fn store_tree(core: &TestCore, files: &[(&str, &[u8])]) -> (FileHash, Vec<FileHash>) {
        let entries: Vec<TreeEntry> = files
            .iter()
            .map(|(path, data)| TreeEntry {
                path: (*path).into(),
                mode: 0o644,
                size: data.len() as u64,
                file: FileHash::from_chunks(&chunk_and_hash(data)),
            })
            .collect();
        let listing = Tree::new(entries).to_bytes();
        let mut blobs: Vec<(&[u8], Kind)> = files.iter().map(|(_, d)| (*d, Kind::File)).collect();
        blobs.push((&listing, Kind::Tree));
        let mut hashes = store_files(core, &blobs).await;
        let tree = hashes.pop().unwrap();
        (tree, hashes)
    }

    fn request(
        branch: &str,
        tree: FileHash,
        message: &str,
        parent: Option<CommitId>,
    ) -> CommitRequest {
        CommitRequest {
            branch: name(branch),
            tree,
            message: message.into(),
            author: "test".into(),
            parent,
        }
    }

    async fn head(core: &TestCore, r: &RepoId, branch: &str) -> CommitId {
        core.resolve(r, branch).await.unwrap().id
    }

    /// Many tasks commit to one branch at once, each without a parent:
    /// every commit ends up in the branch's first-parent history, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_commits_to_one_branch_lose_nothing() {
        const TASKS: usize = 24;
        let core = core();
        let (tree, _) = store_tree(&core, &[("a", b"a")]).await;
        let r = repo("org/race");
        let tasks: Vec<_> = (0..TASKS)
            .map(|i| {
                let (core, r) = (core.clone(), r.clone());
                tokio::spawn(async move {
                    core.commit(&r, request("main", tree, &format!("c{i}"), None))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut made = HashSet::new();
        for t in tasks {
            made.insert(t.await.unwrap().id);
        }
        let log = core.log(&r, "main", None, MAX_LOG_PAGE).await.unwrap();
        assert_eq!(log.next, None);
        let history: HashSet<CommitId> = log.commits.iter().map(|c| c.id).collect();
        assert_eq!(log.commits.len(), TASKS, "one commit per task");
        assert_eq!(history, made, "each task's answer is in the history");
        let messages: HashSet<&str> = log
            .commits
            .iter()
            .map(|c| c.commit.message.as_str())
            .collect();
        assert_eq!(messages.len(), TASKS);
        assert!(log.commits.last().unwrap().commit.parents.is_empty());
    }

    #[tokio::test]
    async fn a_strict_parent_that_moved_is_a_conflict_naming_the_head() {
        let core = core();
        let (tree, _) = store_tree(&core, &[("a", b"a")]).await;
        let r = repo("org/strict");
        let c1 = core
            .commit(&r, request("main", tree, "one", None))
            .await
            .unwrap();
        assert!(
            c1.commit.parents.is_empty(),
            "a new branch starts an empty history"
        );
        let c2 = core
            .commit(&r, request("main", tree, "two", Some(c1.id)))
            .await
            .unwrap();
        assert_eq!(c2.commit.parents, [c1.id]);
        let err = core
            .commit(&r, request("main", tree, "stale", Some(c1.id)))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CoreError::Conflict(m) if m.contains(&c2.id.to_string())),
            "{err}"
        );
        assert_eq!(head(&core, &r, "main").await, c2.id, "nothing moved");
        // A new branch starts at a commit of this repository...
        let dev = core
            .commit(&r, request("dev", tree, "dev", Some(c1.id)))
            .await
            .unwrap();
        assert_eq!(dev.commit.parents, [c1.id]);
        // ... and not at one of another repository.
        let other = repo("org/other");
        let foreign = core
            .commit(&other, request("main", tree, "x", None))
            .await
            .unwrap();
        let err = core
            .commit(&r, request("feature", tree, "f", Some(foreign.id)))
            .await
            .unwrap_err();
        assert!(matches!(err, CoreError::RevisionNotFound { .. }), "{err}");
        assert!(matches!(
            core.resolve(&r, "feature").await,
            Err(CoreError::RevisionNotFound { .. })
        ));
    }

    /// Two root commits whose ids share their first 4 hex digits.
    fn colliding_pair(tree: FileHash) -> (Commit, Commit) {
        let mut seen: HashMap<String, Commit> = HashMap::new();
        for i in 0.. {
            let c = Commit {
                parents: vec![],
                tree,
                message: format!("m{i}"),
                author: "test".into(),
                time: 0,
                extra: vec![],
            };
            let prefix = c.id().to_hex()[..4].to_owned();
            if let Some(first) = seen.remove(&prefix) {
                return (first, c);
            }
            seen.insert(prefix, c);
        }
        unreachable!()
    }

    #[tokio::test]
    async fn revisions_resolve_by_branch_tag_id_and_unique_prefix() {
        let core = core();
        let (tree, _) = store_tree(&core, &[("a", b"a")]).await;
        let r = repo("org/resolve");
        let c1 = core
            .commit(&r, request("main", tree, "one", None))
            .await
            .unwrap();
        let c2 = core
            .commit(&r, request("main", tree, "two", None))
            .await
            .unwrap();
        core.create_tag(&r, &name("v1"), &c1.id.to_string())
            .await
            .unwrap();
        // A branch named like a tag wins; a 4-hex branch name beats a prefix.
        core.commit(&r, request("v1", tree, "branch v1", Some(c2.id)))
            .await
            .unwrap();
        let hexname = &c1.id.to_hex()[..4];
        core.commit(&r, request(hexname, tree, "hex branch", Some(c2.id)))
            .await
            .unwrap();
        assert_eq!(head(&core, &r, "main").await, c2.id);
        assert_ne!(
            head(&core, &r, "v1").await,
            c1.id,
            "the branch, not the tag"
        );
        assert_ne!(
            head(&core, &r, hexname).await,
            c1.id,
            "the branch, not the prefix"
        );
        assert_eq!(head(&core, &r, &c1.id.to_string()).await, c1.id);
        assert_eq!(head(&core, &r, &c1.id.to_hex()[..7]).await, c1.id);
        for missing in ["nope", "abc", "ABCDEF", "0000", "a..b"] {
            assert!(
                matches!(
                    core.resolve(&r, missing).await,
                    Err(CoreError::RevisionNotFound { .. })
                ),
                "{missing}"
            );
        }
        assert!(matches!(
            core.resolve(&repo("org/none"), "main").await,
            Err(CoreError::RepoNotFound(_))
        ));

        let (a, b) = colliding_pair(tree);
        let (a, b) = (
            core.store_commit(a).await.unwrap(),
            core.store_commit(b).await.unwrap(),
        );
        let prefix = &a.id.to_hex()[..4];
        // Stored but not yet reachable from this repository's refs.
        assert!(matches!(
            core.resolve(&r, prefix).await,
            Err(CoreError::RevisionNotFound { .. })
        ));
        for (tag, c) in [("ta", &a), ("tb", &b)] {
            let key = ObjectKey::git_ref(&r, RefKind::Tag, &name(tag));
            let value = Bytes::from(c.id.to_hex());
            core.objects
                .put_ref(&key, value, Expect::Absent)
                .await
                .unwrap();
        }
        assert!(matches!(
            core.resolve(&r, prefix).await,
            Err(CoreError::AmbiguousRevision { .. })
        ));
        let a_hex = a.id.to_hex();
        let longer = (5..=40)
            .map(|n| &a_hex[..n])
            .find(|p| !b.id.has_prefix(p))
            .unwrap();
        assert_eq!(head(&core, &r, longer).await, a.id);
    }

    #[tokio::test]
    async fn a_commit_of_another_repository_is_not_resolvable_through_this_one() {
        let core = core();
        let (tree, files) = store_tree(&core, &[("a", b"a")]).await;
        let (mine, theirs) = (repo("org/mine"), repo("org/theirs"));
        let m = core
            .commit(&mine, request("main", tree, "m", None))
            .await
            .unwrap();
        let t = core
            .commit(&theirs, request("main", tree, "t", None))
            .await
            .unwrap();
        for rev in [t.id.to_string(), t.id.to_hex()[..8].to_owned()] {
            assert!(
                matches!(
                    core.resolve(&mine, &rev).await,
                    Err(CoreError::RevisionNotFound { .. })
                ),
                "{rev}"
            );
            assert!(core.create_tag(&mine, &name("stolen"), &rev).await.is_err());
        }
        assert!(matches!(
            core.log(&mine, "main", Some(t.id), 10).await,
            Err(CoreError::RevisionNotFound { .. })
        ));
        assert_eq!(head(&core, &theirs, &t.id.to_string()).await, t.id);
        assert_eq!(head(&core, &mine, &m.id.to_string()).await, m.id);
        // The access check of scoped tokens: the tree and its entries only.
        assert!(core.in_revision(&mine, "main", tree).await.unwrap());
        assert!(core.in_revision(&mine, "main", files[0]).await.unwrap());
        let (other_tree, other_files) = store_tree(&core, &[("b", b"b")]).await;
        assert!(!core.in_revision(&mine, "main", other_tree).await.unwrap());
        assert!(!core
            .in_revision(&mine, "main", other_files[0])
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn logs_page_through_the_first_parent_history() {
        let core = core();
        let (tree, _) = store_tree(&core, &[("a", b"a")]).await;
        let r = repo("datasets/org/log");
        let mut made = Vec::new();
        for i in 0..5 {
            made.push(
                core.commit(&r, request("main", tree, &format!("c{i}"), None))
                    .await
                    .unwrap()
                    .id,
            );
        }
        made.reverse();
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = core.log(&r, "main", cursor, 2).await.unwrap();
            assert!(page.commits.len() <= 2);
            seen.extend(page.commits.iter().map(|c| c.id));
            match page.next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, made);
        let from_tag = {
            core.create_tag(&r, &name("mid"), &made[2].to_string())
                .await
                .unwrap();
            core.log(&r, "mid", None, 100).await.unwrap()
        };
        assert_eq!(
            from_tag.commits.iter().map(|c| c.id).collect::<Vec<_>>(),
            made[2..]
        );
    }

    #[tokio::test]
    async fn repositories_tags_and_tree_checks() {
        let core = core();
        let (tree, files) = store_tree(&core, &[("a", b"a"), ("d/b", b"bb")]).await;
        let r = repo("org/repo");
        assert!(core.create_repo(&r).await.unwrap().1, "created");
        assert!(!core.create_repo(&r).await.unwrap().1, "idempotent");
        core.create_repo(&repo("datasets/org/data")).await.unwrap();
        let models: Vec<String> = core
            .list_repos(Some(RepoType::Model))
            .await
            .unwrap()
            .iter()
            .map(|i| i.repo.to_string())
            .collect();
        assert_eq!(models, ["org/repo"]);
        assert_eq!(core.list_repos(None).await.unwrap().len(), 2);
        let info = core.repo_info(&r).await.unwrap();
        assert_eq!(info.default_branch, RefName::main());

        // A tree is required, with every entry stored.
        let err = core
            .commit(&r, request("main", files[0], "f", None))
            .await
            .unwrap_err();
        assert!(matches!(err, CoreError::InvalidTree { .. }), "{err}");
        let unknown = FileHash::from_bytes([9; 32]);
        let err = core
            .commit(&r, request("main", unknown, "u", None))
            .await
            .unwrap_err();
        assert!(matches!(err, CoreError::NotFound(_)), "{err}");
        let mut bad = request("main", tree, "m", None);
        bad.author = "a\nb".into();
        assert!(matches!(
            core.commit(&r, bad).await,
            Err(CoreError::InvalidMessage(_))
        ));
        assert!(
            core.repo_details(&r).await.unwrap().branches.is_empty(),
            "nothing committed"
        );

        let c1 = core
            .commit(&r, request("main", tree, "one", None))
            .await
            .unwrap();
        let c2 = core
            .commit(&r, request("main", tree, "two", None))
            .await
            .unwrap();
        let (t, created) = core.create_tag(&r, &name("v1"), "main").await.unwrap();
        assert!(created && t.commit == c2.id);
        assert!(
            !core
                .create_tag(&r, &name("v1"), &c2.id.to_string())
                .await
                .unwrap()
                .1
        );
        let err = core
            .create_tag(&r, &name("v1"), &c1.id.to_string())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CoreError::Conflict(m) if m.contains(&c2.id.to_string())),
            "{err}"
        );
        let details = core.repo_details(&r).await.unwrap();
        assert_eq!(
            details.branches,
            [RefEntry {
                name: RefName::main(),
                commit: c2.id
            }]
        );
        assert_eq!(
            details.tags,
            [RefEntry {
                name: name("v1"),
                commit: c2.id
            }]
        );

        // A tree that names a file the store lacks is refused.
        let missing = Tree::new(vec![TreeEntry {
            path: "x".into(),
            mode: 0o644,
            size: 3,
            file: FileHash::from_bytes([3; 32]),
        }]);
        let broken = store_files(&core, &[(&missing.to_bytes(), Kind::Tree)]).await[0];
        let err = core
            .commit(&r, request("main", broken, "m", None))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CoreError::InvalidTree { reason, .. } if reason.contains("not stored")),
            "{err}"
        );
        assert_eq!(head(&core, &r, "main").await, c2.id);
    }
}
