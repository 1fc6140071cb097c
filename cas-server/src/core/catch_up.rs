//! The index as a cache of a shared bucket. With S3, several nodes write
//! one bucket and each keeps its own index; what another node committed
//! reaches this one's index here:
//! - [`Core::catch_up`] lists the shards in the bucket and replays those
//!   this process has not seen: each shard's xorbs are indexed from their
//!   stored headers, its files as if committed here (a file already known
//!   keeps its recipe). It runs at start, every `--catch-up-every`, and
//!   after a miss (below).
//! - A miss falls through to the bucket: a file this index does not know
//!   triggers one catch-up before the answer is 404 (concurrent misses
//!   share one), and a shard naming a xorb this index does not know
//!   indexes that xorb from the bucket if it is stored there. So what a
//!   node's answer said is stored can be read and referenced through any
//!   other node at once; only dedup learns of other nodes' chunks with the
//!   delay of the periodic catch-up (correctness never depends on it: a
//!   chunk uploaded again is stored once, by content address).
//! - [`Core::rebuild_index`] also indexes every stored xorb (ones no shard
//!   names yet, too): `cas-server index rebuild`, and a start on an empty
//!   index.
//!
//! The bucket is the truth and was verified on the way in; replay trusts
//! it. Which shards were seen lives in memory: after a restart the first
//! catch-up reads every shard once (their files are known, nothing is
//! written).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use cas_protocol::shard::Shard;
use cas_protocol::xorb::{parse_header, HEADER_FIXED_LEN, INDEX_ENTRY_LEN};
use cas_protocol::{ByteRange, Encoding, FileHash, Message, XorbHash};
use serde::Serialize;
use tokio::io::AsyncReadExt;

use super::{Core, CoreError};
use crate::index::{Index, XorbRecord};
use crate::store::{KeyPrefix, ObjectKey, ObjectKind, ObjectStore};

/// Objects read at once while catching up (each a small GET).
const CONCURRENT_READS: usize = 16;

/// What this process has replayed, and how catch-ups are shared.
#[derive(Default)]
pub(crate) struct CatchUpState {
    /// On for a shared store (S3); off, misses are plain misses.
    enabled: bool,
    seen: Mutex<HashSet<[u8; 32]>>,
    /// One catch-up at a time.
    running: tokio::sync::Mutex<()>,
    /// Catch-ups started / finished so far: a miss that began before a
    /// catch-up started is answered by it and needs no other.
    started: AtomicU64,
}

impl CatchUpState {
    pub(crate) fn shared() -> Self {
        Self {
            enabled: true,
            ..Self::default()
        }
    }

    /// Remembers a shard this process committed itself.
    pub(crate) fn saw(&self, id: [u8; 32]) {
        self.seen.lock().expect("not poisoned").insert(id);
    }

    fn seen(&self, id: &[u8; 32]) -> bool {
        self.seen.lock().expect("not poisoned").contains(id)
    }
}

/// What a catch-up or rebuild did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CatchUp {
    /// Shards read and replayed.
    pub shards: usize,
    /// Xorbs indexed from their stored headers.
    pub xorbs: usize,
    /// Files this index did not know before.
    pub new_files: usize,
}

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// Whether the index is a cache of a store other nodes share.
    pub fn shares_store(&self) -> bool {
        self.catch_up.enabled
    }

    /// Indexes a stored xorb from its header if the index lacks it; false
    /// if the store does not have it either.
    pub(crate) async fn index_stored_xorb(&self, hash: XorbHash) -> Result<bool, CoreError> {
        if self
            .with_index(move |i| Ok(i.xorb(&hash)?))
            .await?
            .is_some()
        {
            return Ok(true);
        }
        let key = ObjectKey::xorb(&hash);
        let Some(len) = self.objects.len(&key).await? else {
            return Ok(false);
        };
        let fixed = HEADER_FIXED_LEN as u64;
        let mut header = self.read_bytes(&key, 0, fixed.min(len)).await?;
        let count = header
            .get(12..16)
            .map_or(0, |c| u32::from_le_bytes(c.try_into().expect("4 bytes")));
        let end = (fixed + u64::from(count) * INDEX_ENTRY_LEN as u64).min(len);
        header.extend(self.read_bytes(&key, fixed.min(len), end).await?);
        let entries = parse_header(&header).map_err(CoreError::InvalidXorb)?;
        let record = XorbRecord { entries };
        if record.object_len() != len {
            // Not a whole xorb: leave it to an upload to repair.
            tracing::warn!(xorb = %hash, len, "stored xorb's length disagrees with its header; not indexed");
            return Ok(false);
        }
        self.with_index(move |i| Ok(i.add_xorb(&hash, &record)?))
            .await?;
        Ok(true)
    }

    async fn read_bytes(
        &self,
        key: &ObjectKey,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, CoreError> {
        let mut buf = Vec::new();
        self.objects
            .read_range(key, ByteRange { start, end })
            .await?
            .read_to_end(&mut buf)
            .await?;
        Ok(buf)
    }

    /// Replays every shard in the store this process has not seen.
    pub async fn catch_up(&self) -> Result<CatchUp, CoreError> {
        let _one = self.catch_up.running.lock().await;
        self.catch_up.started.fetch_add(1, Relaxed);
        let listed = self
            .objects
            .list(&KeyPrefix::kind(ObjectKind::Shard))
            .await?;
        let new: Vec<ObjectKey> = listed
            .into_iter()
            .filter(|k| shard_id(k).is_some_and(|id| !self.catch_up.seen(&id)))
            .collect();
        let mut done = CatchUp::default();
        for batch in new.chunks(CONCURRENT_READS) {
            let replayed =
                futures_util::future::try_join_all(batch.iter().map(|k| self.replay_shard(k)))
                    .await?;
            for (key, one) in batch.iter().zip(replayed) {
                done.shards += 1;
                done.xorbs += one.xorbs;
                done.new_files += one.new_files;
                if let Some(id) = shard_id(key) {
                    self.catch_up.saw(id);
                }
            }
        }
        if done.shards > 0 {
            tracing::info!(?done, "caught up with the store");
        }
        Ok(done)
    }

    /// A file this index does not know: one catch-up (shared with misses
    /// that are waiting already), then the caller looks again.
    pub(crate) async fn catch_up_for(&self, files: &[FileHash]) -> Result<(), CoreError> {
        if !self.catch_up.enabled || files.is_empty() {
            return Ok(());
        }
        let wanted = files.to_vec();
        let missing = self
            .with_index(move |i| {
                for f in &wanted {
                    if i.file(f)?.is_none() {
                        return Ok(true);
                    }
                }
                Ok(false)
            })
            .await?;
        if !missing {
            return Ok(());
        }
        let before = self.catch_up.started.load(Relaxed);
        let _wait = self.catch_up.running.lock().await;
        if self.catch_up.started.load(Relaxed) > before {
            // A whole catch-up started after this miss and has finished.
            return Ok(());
        }
        drop(_wait);
        self.catch_up().await.map(drop)
    }

    async fn replay_shard(&self, key: &ObjectKey) -> Result<CatchUp, CoreError> {
        let Some(bytes) = self.objects.get(key).await? else {
            return Ok(CatchUp::default());
        };
        let shard = match Shard::decode_as(&bytes, Encoding::Binary) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(shard = key.as_str(), error = %e, "unreadable shard in the store; skipped");
                return Ok(CatchUp::default());
            }
        };
        let mut done = CatchUp::default();
        let named: HashSet<XorbHash> = shard.named_xorbs().collect();
        let mut absent = HashSet::new();
        for h in named {
            let known = self.with_index(move |i| Ok(i.xorb(&h)?)).await?.is_some();
            if known {
                continue;
            }
            if self.index_stored_xorb(h).await? {
                done.xorbs += 1;
            } else {
                absent.insert(h);
            }
        }
        let files: Vec<_> = shard
            .files
            .into_iter()
            .filter(|f| {
                let whole = f.terms.iter().all(|t| !absent.contains(&t.xorb));
                if !whole {
                    tracing::warn!(file = %f.hash, "a shard's file needs a xorb the store lacks; not indexed");
                }
                whole
            })
            .collect();
        let _decide = self.commits.lock().await;
        let new = self
            .with_index(move |i| {
                let mut new = Vec::new();
                for f in files {
                    if i.file(&f.hash)?.is_none() {
                        new.push(f);
                    }
                }
                i.add_files(&new)?;
                Ok(new.len())
            })
            .await?;
        self.metrics.files.fetch_add(new as u64, Relaxed);
        done.new_files = new;
        Ok(done)
    }

    /// Indexes a stored xorb the index lacks; whether it did.
    async fn index_new_xorb(&self, h: XorbHash) -> Result<bool, CoreError> {
        let known = self.with_index(move |i| Ok(i.xorb(&h)?)).await?.is_some();
        Ok(!known && self.index_stored_xorb(h).await?)
    }

    /// Indexes every stored xorb, then replays every shard: the index
    /// rebuilt from the store alone.
    pub async fn rebuild_index(&self) -> Result<CatchUp, CoreError> {
        let xorbs = self
            .objects
            .list(&KeyPrefix::kind(ObjectKind::Xorb))
            .await?;
        let hashes: Vec<XorbHash> = xorbs
            .iter()
            .filter_map(|k| k.last_segment().parse().ok())
            .collect();
        let mut indexed = 0;
        for batch in hashes.chunks(CONCURRENT_READS) {
            let added =
                futures_util::future::try_join_all(batch.iter().map(|&h| self.index_new_xorb(h)))
                    .await?;
            indexed += added.into_iter().filter(|&n| n).count();
        }
        let mut done = self.catch_up().await?;
        done.xorbs += indexed;
        Ok(done)
    }
}

fn shard_id(key: &ObjectKey) -> Option<[u8; 32]> {
    hex::decode(key.last_segment()).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use cas_protocol::shard::{FileRecipe, Term, XorbChunkTable};
    use cas_protocol::xorb::{Compression, EncodedChunk, XorbBuilder};
    use cas_protocol::{ChunkRange, Kind, Sha256};
    use object_store::memory::InMemory;

    use super::*;
    use crate::index::MemIndex;
    use crate::store::S3Store;

    /// Two nodes (cores with their own index) on one bucket: what A
    /// committed, B serves on a miss, B's shard may name A's xorb, and a
    /// fresh index rebuilds from the bucket alone.
    #[tokio::test]
    async fn nodes_on_one_bucket_see_each_others_writes() {
        let bucket = S3Store::from_inner(Arc::new(InMemory::new()), "p");
        let node = || Core::new(bucket.clone(), MemIndex::default()).shared();
        let (a, b) = (node(), node());
        let data = vec![7u8; 10_000];
        let mut builder = XorbBuilder::new();
        builder
            .try_push(EncodedChunk::encode(&data, Compression::Auto).unwrap())
            .unwrap();
        let x = builder.finish().unwrap();
        a.put_xorb(x.hash, x.bytes.clone().into()).await.unwrap();
        let file = FileRecipe {
            hash: cas_protocol::FileHash::from_chunks(&x.chunks),
            sha256: Sha256::of(&data),
            size: data.len() as u64,
            terms: vec![Term {
                xorb: x.hash,
                chunks: ChunkRange { start: 0, end: 1 },
                len: data.len() as u64,
            }],
            kind: Kind::File,
        };
        // B commits a shard naming the xorb uploaded through A.
        let shard = Shard {
            xorbs: vec![XorbChunkTable::from(&x)],
            files: vec![file.clone()],
        };
        b.commit_shard(shard.to_bytes().into(), Encoding::Binary)
            .await
            .unwrap();
        // A learns the file on its first miss, without a periodic catch-up.
        assert_eq!(a.file_info(file.hash).await.unwrap().size, 10_000);
        let unknown = cas_protocol::FileHash::from_bytes([9; 32]);
        assert!(matches!(
            a.file_info(unknown).await,
            Err(CoreError::NotFound(_))
        ));
        // A third node rebuilds everything from the bucket.
        let c = node();
        let done = c.rebuild_index().await.unwrap();
        assert_eq!((done.shards, done.xorbs, done.new_files), (1, 1, 1));
        assert!(c.file_info(file.hash).await.is_ok());
        assert!(c.catch_up().await.unwrap().shards == 0, "nothing new");
    }
}
