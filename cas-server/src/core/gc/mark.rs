//! Mark: from the roots to the live files and the chunks they use.
//!
//! Any root that cannot be read (a ref naming a missing commit, a tree
//! that does not parse) ends the run with an error: a run that does not
//! know all that is live deletes nothing.

use std::collections::{HashMap, HashSet, VecDeque};

use cas_protocol::{ChunkRange, FileHash, Kind, XorbHash};

use super::RootCount;
use crate::core::{Core, CoreError};
use crate::index::Index;
use crate::store::{KeyPrefix, ObjectKind, ObjectStore};

/// What the roots reach.
pub(super) struct Live {
    pub files: HashSet<FileHash>,
    /// Per live xorb, the chunk ranges live files use.
    pub chunks: HashMap<XorbHash, Vec<ChunkRange>>,
    pub roots: RootCount,
}

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// The commits branches and tags name, with all their history.
    pub(super) async fn live_commits(
        &self,
        roots: &mut RootCount,
    ) -> Result<HashSet<cas_protocol::repo::CommitId>, CoreError> {
        let mut queue = VecDeque::new();
        for key in self.objects.list(&KeyPrefix::kind(ObjectKind::Ref)).await? {
            // A ref deleted since the listing names nothing.
            if let Some((id, _)) = self.head(&key).await? {
                roots.refs += 1;
                queue.push_back(id);
            }
        }
        let mut seen = HashSet::new();
        while let Some(id) = queue.pop_front() {
            if seen.insert(id) {
                queue.extend(self.read_commit(id).await?.parents.iter().copied());
            }
        }
        roots.commits = seen.len() as u64;
        Ok(seen)
    }

    /// The files and trees uploaded without a repository that are roots.
    pub(super) async fn root_files(&self) -> Result<Vec<FileHash>, CoreError> {
        let keys = self
            .objects
            .list(&KeyPrefix::kind(ObjectKind::Root))
            .await?;
        Ok(keys
            .iter()
            .filter_map(|k| k.hash_bytes().map(FileHash::from_bytes))
            .collect())
    }

    /// Everything the roots reach.
    pub(super) async fn mark(&self) -> Result<Live, CoreError> {
        let mut roots = RootCount::default();
        let mut trees = HashSet::new();
        for id in self.live_commits(&mut roots).await? {
            trees.insert(self.read_commit(id).await?.tree);
        }
        let root_files = self.root_files().await?;
        roots.roots = root_files.len() as u64;
        let mut files: HashSet<FileHash> = root_files.iter().copied().collect();
        let kinds = self
            .with_index(move |i| {
                let mut out = Vec::new();
                for f in root_files {
                    if let Some(r) = i.file(&f)? {
                        out.push((f, r.kind));
                    }
                }
                Ok(out)
            })
            .await?;
        trees.extend(
            kinds
                .into_iter()
                .filter(|(_, k)| *k == Kind::Tree)
                .map(|(f, _)| f),
        );
        for t in trees {
            files.insert(t);
            let listing = self.tree(t).await?;
            files.extend(listing.tree.entries.iter().map(|e| e.file));
        }
        let list: Vec<FileHash> = files.iter().copied().collect();
        let chunks = self
            .with_index(move |i| {
                let mut chunks: HashMap<XorbHash, Vec<ChunkRange>> = HashMap::new();
                for f in &list {
                    for t in i.file(f)?.map(|r| r.terms).unwrap_or_default() {
                        chunks.entry(t.xorb).or_default().push(t.chunks);
                    }
                }
                Ok(chunks)
            })
            .await?;
        Ok(Live {
            files,
            chunks,
            roots,
        })
    }
}
