//! A commit's tree: read through [`Core::file_stream`] (every chunk
//! verified), checked against its tree hash, parsed and cached; a new
//! commit's tree must name only stored files.

use std::sync::Arc;

use bytes::Bytes;
use cas_protocol::chunking::chunk_and_hash;
use cas_protocol::repo::RepoId;
use cas_protocol::tree::{Tree, MAX_TREE_BYTES};
use cas_protocol::{ByteRange, FileHash, Kind, Message};
use futures_util::TryStreamExt;

use super::{corrupt, TreeListing};
use crate::core::lease::{LeaseGuard, Leased};
use crate::core::{blocking, Core, CoreError};
use crate::index::Index;
use crate::store::ObjectStore;

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// The tree must be stored as a tree, and each of its entries as a
    /// regular file of the entry's size. The tree and its files are held
    /// from before the check (a garbage collection run that took one out
    /// of the index first makes the check fail); the caller keeps the
    /// hold once its commit is durable.
    pub(super) async fn check_tree(&self, tree: FileHash) -> Result<LeaseGuard, CoreError> {
        let tree_hold = self.leases.hold([Leased::File(tree)]).await;
        let listing = self.tree(tree).await?;
        let files: Vec<FileHash> = listing.tree.entries.iter().map(|e| e.file).collect();
        let hold = self
            .leases
            .hold(files.iter().copied().chain([tree]).map(Leased::File))
            .await;
        drop(tree_hold);
        self.catch_up_for(&files).await?;
        self.with_index(move |i| {
            // The listing may come from the cache: the tree must still be
            // in the index too.
            if i.file(&tree)?.is_none() {
                return Err(CoreError::NotFound(format!("tree {tree}")));
            }
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
        .await?;
        Ok(hold)
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

    /// The first of `files` that is neither the tree of revision `rev` of
    /// `repo` nor one of its entries (what a token limited to repositories
    /// may read), if any. The revision is resolved once.
    pub async fn not_in_revision(
        &self,
        repo: &RepoId,
        rev: &str,
        files: &[FileHash],
    ) -> Result<Option<FileHash>, CoreError> {
        let tree = self.resolve(repo, rev).await?.commit.tree;
        let listing = self.tree(tree).await?;
        Ok(files
            .iter()
            .find(|&&f| f != tree && !listing.names(&f))
            .copied())
    }
}
