//! Roots of files and trees uploaded without a repository: `roots/<hash>`
//! records in the object store. Each keeps its file (and, for a tree,
//! every file the tree names) from garbage collection until it is
//! removed. Repositories root their commits through branches and tags.

use bytes::Bytes;
use cas_protocol::FileHash;
use serde::{Deserialize, Serialize};

use super::lease::Leased;
use super::{Core, CoreError, FileInfo};
use crate::index::Index;
use crate::store::{ObjectKey, ObjectStore};

/// A root record (JSON): when it was made, for operators.
#[derive(Serialize, Deserialize)]
struct RootRecord {
    created: u64,
}

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// Makes a stored file (or tree) a root; `true` when it was not one.
    /// The file is held while it is checked and leased after, so a
    /// garbage collection run planned before the root existed cannot take
    /// it out of the index (one that did so first makes this fail:
    /// [`CoreError::NotFound`]).
    pub async fn put_root(&self, file: FileHash) -> Result<(FileInfo, bool), CoreError> {
        let hold = self.leases.hold([Leased::File(file)]).await;
        let info = self.file_info(file).await?;
        let record = RootRecord {
            created: crate::auth::now(),
        };
        let bytes = Bytes::from(serde_json::to_vec(&record).expect("json"));
        let created = self.objects.put(&ObjectKey::root(&file), bytes).await?;
        hold.keep();
        Ok((info, created))
    }

    /// Removes a root; what it kept is garbage collection's to free unless
    /// something else references it.
    pub async fn delete_root(&self, file: FileHash) -> Result<(), CoreError> {
        let key = ObjectKey::root(&file);
        if self.objects.len(&key).await?.is_none() {
            return Err(CoreError::NotFound(format!("root {file}")));
        }
        Ok(self.objects.delete(&key).await?)
    }
}
