//! The refs core over the in-memory stores: concurrent commits, strict
//! parents, resolution rules, repositories kept apart, logs, tags, trees.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use cas_protocol::chunking::chunk_and_hash;
use cas_protocol::repo::{
    Commit, CommitId, CommitInfo, CommitRequest, RefEntry, RefKind, RefName, RepoId, RepoType,
};
use cas_protocol::tree::Tree;
use cas_protocol::{ByteRange, FileHash, Kind, Message};

use super::MAX_LOG_PAGE;
use crate::core::{Core, CoreError};
use crate::index::MemIndex;
use crate::store::MemStore;
use crate::store::{Expect, KeyPrefix, ObjectKey, ObjectStore, RefError, RefVersion};
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

fn request(branch: &str, tree: FileHash, message: &str, parent: Option<CommitId>) -> CommitRequest {
    CommitRequest {
        branch: name(branch),
        tree,
        message: message.into(),
        author: "test".into(),
        parent,
    }
}

/// A commit that must succeed.
async fn commit(
    core: &TestCore,
    r: &RepoId,
    branch: &str,
    tree: FileHash,
    message: &str,
    parent: Option<CommitId>,
) -> CommitInfo {
    core.commit(r, request(branch, tree, message, parent))
        .await
        .unwrap()
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
    let c1 = commit(&core, &r, "main", tree, "one", None).await;
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
    let foreign = commit(&core, &other, "main", tree, "x", None).await;
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
    let c1 = commit(&core, &r, "main", tree, "one", None).await;
    let c2 = commit(&core, &r, "main", tree, "two", None).await;
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
    let m = commit(&core, &mine, "main", tree, "m", None).await;
    let t = commit(&core, &theirs, "main", tree, "t", None).await;
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
    let outside = |files: Vec<FileHash>| {
        let (core, mine) = (&core, &mine);
        async move { core.not_in_revision(mine, "main", &files).await.unwrap() }
    };
    assert_eq!(outside(vec![tree, files[0]]).await, None);
    let (other_tree, other_files) = store_tree(&core, &[("b", b"b")]).await;
    assert_eq!(outside(vec![other_tree]).await, Some(other_tree));
    assert_eq!(
        outside(vec![tree, other_files[0], files[0]]).await,
        Some(other_files[0])
    );
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

    let c1 = commit(&core, &r, "main", tree, "one", None).await;
    let c2 = commit(&core, &r, "main", tree, "two", None).await;
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
