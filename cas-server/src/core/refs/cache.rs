//! Commits and parsed trees, kept in memory: both are immutable, so a
//! cached one never goes stale; the bounds only cap memory.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use cas_protocol::repo::{Commit, CommitId};
use cas_protocol::tree::Tree;
use cas_protocol::FileHash;

/// Commits kept parsed in memory.
const COMMIT_CACHE: usize = 16_384;
/// Tree entries kept parsed in memory, over all cached trees (about
/// 40 MB at ~150 bytes per entry; a larger tree is kept alone).
const TREE_CACHE_ENTRIES: usize = 1 << 18;

/// A parsed tree with the set of files it names: what listings and the
/// access check of repository-scoped tokens read.
#[derive(Debug)]
pub struct TreeListing {
    pub tree: Tree,
    pub(super) files: HashSet<FileHash>,
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
    pub(super) fn commit(&self, id: &CommitId) -> Option<Arc<Commit>> {
        self.commits.lock().expect("not poisoned").get(id).cloned()
    }

    pub(super) fn keep_commit(&self, id: CommitId, c: Arc<Commit>) {
        let mut commits = self.commits.lock().expect("not poisoned");
        if commits.len() >= COMMIT_CACHE {
            commits.clear();
        }
        commits.insert(id, c);
    }

    pub(super) fn tree(&self, hash: &FileHash) -> Option<Arc<TreeListing>> {
        self.trees
            .lock()
            .expect("not poisoned")
            .map
            .get(hash)
            .cloned()
    }

    pub(super) fn keep_tree(&self, hash: FileHash, t: Arc<TreeListing>) {
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
