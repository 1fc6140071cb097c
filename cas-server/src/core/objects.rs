//! Whole objects ingested on the server: a Git LFS object PUT by a stock
//! client, a file of a Hub commit, a tree the server builds. The bytes are
//! streamed through the client's pipeline, run here: chunked, deduplicated
//! against the index (chunks already stored are referenced where they
//! are, never stored again), new chunks compressed and packed into xorbs,
//! then the file is committed as a one-file shard, exactly as a client's
//! upload would be. Nothing is held whole: at most one xorb being built
//! ([`INGEST_XORB_BYTES`]) and [`INGEST_QUEUE`] body pieces.
//!
//! Crash ordering is the shard commit's: each xorb is stored (and
//! indexed) before the shard that names it, and the file (with its SHA-256,
//! which [`Index::file_by_sha256`] finds) is indexed only after its bytes
//! hashed to the expected SHA-256. An upload cut short, or refused for a
//! wrong SHA-256, leaves only the xorbs it already stored: a retry
//! deduplicates against them instead of storing them twice.
//!
//! Uploads of one expected SHA-256 take turns ([`InFlight`]): the second
//! of two concurrent identical PUTs waits, then finds the object stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use cas_protocol::chunking::StreamChunker;
use cas_protocol::hash::Sha256Hasher;
use cas_protocol::messages::ChunkLocation;
use cas_protocol::shard::{FileRecipe, Shard, Term, XorbChunkTable};
use cas_protocol::xorb::{Compression, EncodedChunk, XorbBuilder, XorbView};
use cas_protocol::{
    ChunkHash, ChunkInfo, ChunkRange, Encoding, FileHash, Kind, Message, Sha256, XorbHash,
};
use serde::Serialize;
use tokio::sync::{mpsc, OwnedMutexGuard};

use super::lease::Leased;
use super::{Core, CoreError};
use crate::index::Index;
use crate::store::ObjectStore;

/// Uncompressed bytes of new chunks packed into one server-built xorb
/// before it is stored (the memory one ingest holds, beside its queue).
pub const INGEST_XORB_BYTES: usize = 16 << 20;
/// Body pieces (hyper frames, at most 64 KiB or so each) queued between a
/// connection and its ingest thread.
const INGEST_QUEUE: usize = 64;

/// A stored object, as an ingest left it.
#[derive(Debug, Clone, Serialize)]
pub struct ObjectPut {
    pub file: FileHash,
    pub sha256: Sha256,
    pub size: u64,
    /// False when the store had the file already (nothing new indexed).
    pub created: bool,
    /// Xorbs this ingest stored, and their bytes (the new, compressed
    /// chunks: what deduplication left to store).
    pub xorbs_stored: usize,
    pub bytes_stored: u64,
}

/// What [`Core::begin_object`] found.
pub enum ObjectSlot<O, I> {
    /// The store has an object of the expected SHA-256: send nothing.
    Stored(ObjectPut),
    /// Write the bytes here, then [`ObjectWriter::finish`].
    Write(ObjectWriter<O, I>),
}

/// Uploads in progress, by expected SHA-256: one at a time each.
#[derive(Default)]
pub(crate) struct InFlight {
    locks: Mutex<HashMap<Sha256, Weak<tokio::sync::Mutex<()>>>>,
}

impl InFlight {
    async fn lock(&self, sha256: Sha256) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().expect("not poisoned");
            locks.retain(|_, l| l.strong_count() > 0);
            match locks.get(&sha256).and_then(Weak::upgrade) {
                Some(l) => l,
                None => {
                    let l = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(sha256, Arc::downgrade(&l));
                    l
                }
            }
        };
        lock.lock_owned().await
    }
}

enum Piece {
    Data(Bytes),
    /// The body is complete.
    End,
}

/// The writing end of one ingest; its thread chunks, dedups, packs and
/// stores while bytes arrive. Dropped without [`ObjectWriter::finish`]
/// (the client went away), the ingest stops: what it stored stays as
/// dedup material for a retry, no file is recorded.
pub struct ObjectWriter<O, I> {
    tx: mpsc::Sender<Piece>,
    done: tokio::task::JoinHandle<Result<ObjectPut, CoreError>>,
    _core: std::marker::PhantomData<fn() -> (O, I)>,
}

impl<O: ObjectStore, I: Index> ObjectWriter<O, I> {
    /// Hands on the next bytes (waits while the ingest is behind).
    pub async fn write(&mut self, data: Bytes) -> Result<(), CoreError> {
        if self.tx.send(Piece::Data(data)).await.is_err() {
            // The ingest stopped on an error: that is the answer.
            return Err(self.failure().await);
        }
        Ok(())
    }

    /// Ends the object: its last chunks and xorb are stored, its SHA-256
    /// checked, and the file committed.
    pub async fn finish(mut self) -> Result<ObjectPut, CoreError> {
        if self.tx.send(Piece::End).await.is_err() {
            return Err(self.failure().await);
        }
        (&mut self.done).await.map_err(std::io::Error::other)?
    }

    async fn failure(&mut self) -> CoreError {
        match (&mut self.done).await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => std::io::Error::other("ingest ended before its input").into(),
            Err(e) => std::io::Error::other(e).into(),
        }
    }
}

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// Starts ingesting an object of kind `kind`. With `expect`, the bytes
    /// must hash to that SHA-256 (an LFS object id) or nothing is
    /// recorded; uploads of one expected SHA-256 take turns, and one whose
    /// object the store has (when its turn comes) gets
    /// [`ObjectSlot::Stored`].
    pub async fn begin_object(
        &self,
        kind: Kind,
        expect: Option<Sha256>,
    ) -> Result<ObjectSlot<O, I>, CoreError> {
        let turn = match expect {
            None => None,
            Some(sha256) => {
                let turn = self.inflight.lock(sha256).await;
                if let Some(put) = self.object_by_sha256(sha256).await? {
                    return Ok(ObjectSlot::Stored(put));
                }
                Some(turn)
            }
        };
        let (tx, rx) = mpsc::channel(INGEST_QUEUE);
        let ingest = Ingest::new(self.clone(), kind, tokio::runtime::Handle::current());
        let done = tokio::task::spawn_blocking(move || {
            // The turn ends with the ingest, not with its writer: an upload
            // cut short may still be storing a xorb from its queue, which
            // the next try must find to deduplicate against.
            let _turn = turn;
            ingest.run(rx, expect)
        });
        Ok(ObjectSlot::Write(ObjectWriter {
            tx,
            done,
            _core: std::marker::PhantomData,
        }))
    }

    /// Ingests an object already in memory (a small file of a Hub commit,
    /// a tree).
    pub async fn put_object_bytes(&self, kind: Kind, bytes: Bytes) -> Result<ObjectPut, CoreError> {
        match self.begin_object(kind, None).await? {
            ObjectSlot::Stored(put) => Ok(put),
            ObjectSlot::Write(mut w) => {
                if !bytes.is_empty() {
                    w.write(bytes).await?;
                }
                w.finish().await
            }
        }
    }

    /// The stored regular file whose bytes have this SHA-256, if its
    /// recipe is readable (none of its xorbs damaged).
    pub async fn object_by_sha256(&self, sha256: Sha256) -> Result<Option<ObjectPut>, CoreError> {
        let mut found = self.objects_by_sha256(vec![sha256]).await?;
        Ok(found.pop().flatten())
    }

    /// [`object_by_sha256`](Self::object_by_sha256) of each of `sha256s`,
    /// in order, in one trip to the index. The files found are leased: the
    /// asker may name them in a tree without uploading them.
    pub async fn objects_by_sha256(
        &self,
        sha256s: Vec<Sha256>,
    ) -> Result<Vec<Option<ObjectPut>>, CoreError> {
        let leases = self.leases.clone();
        self.with_index(move |i| {
            // Read and leased in one step, as a dedup answer.
            let _fence = leases.read_fence();
            let readable = |sha256: Sha256| -> Result<Option<ObjectPut>, CoreError> {
                let Some(file) = i.file_by_sha256(&sha256)? else {
                    return Ok(None);
                };
                let Some(recipe) = i.file(&file)? else {
                    return Ok(None);
                };
                for t in &recipe.terms {
                    if i.is_damaged(&t.xorb)? {
                        return Ok(None);
                    }
                }
                Ok(Some(ObjectPut {
                    file,
                    sha256,
                    size: recipe.size,
                    created: false,
                    xorbs_stored: 0,
                    bytes_stored: 0,
                }))
            };
            let found: Vec<Option<ObjectPut>> = sha256s
                .into_iter()
                .map(readable)
                .collect::<Result<_, _>>()?;
            leases.lease(found.iter().flatten().map(|o| Leased::File(o.file)));
            Ok(found)
        })
        .await
    }
}

/// Where a term's chunks are: a stored xorb, or the one being built
/// (numbered by how many this ingest has stored before it).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Stored(XorbHash),
    Building(usize),
}

/// A term whose xorb may not have its hash yet.
struct PendingTerm {
    place: Place,
    chunks: ChunkRange,
    len: u64,
}

/// The xorb being built: its chunks, and where each new chunk sits in it
/// (a chunk repeated within the object is packed once).
#[derive(Default)]
struct Building {
    builder: XorbBuilder,
    at: HashMap<ChunkHash, u32>,
}

/// One object's ingest, run on a blocking thread: sync code that stores
/// each full xorb through the runtime's handle.
struct Ingest<O, I> {
    core: Core<O, I>,
    handle: tokio::runtime::Handle,
    kind: Kind,
    sha256: Sha256Hasher,
    size: u64,
    chunks: Vec<ChunkInfo>,
    terms: Vec<PendingTerm>,
    building: Building,
    /// Xorbs stored so far, in order (`Place::Building(n)` is the n-th).
    stored: Vec<XorbChunkTable>,
    xorbs_stored: usize,
    bytes_stored: u64,
}

impl<O: ObjectStore, I: Index> Ingest<O, I> {
    fn new(core: Core<O, I>, kind: Kind, handle: tokio::runtime::Handle) -> Self {
        Self {
            core,
            handle,
            kind,
            sha256: Sha256Hasher::new(),
            size: 0,
            chunks: Vec::new(),
            terms: Vec::new(),
            building: Building::default(),
            stored: Vec::new(),
            xorbs_stored: 0,
            bytes_stored: 0,
        }
    }

    fn run(
        mut self,
        mut rx: mpsc::Receiver<Piece>,
        expect: Option<Sha256>,
    ) -> Result<ObjectPut, CoreError> {
        let mut chunker = StreamChunker::new();
        let mut failed = None;
        loop {
            match rx.blocking_recv() {
                Some(Piece::Data(data)) => {
                    self.sha256.update(&data);
                    self.size += data.len() as u64;
                    chunker.push(&data, |c| {
                        if failed.is_none() {
                            failed = self.chunk(c).err();
                        }
                    });
                }
                Some(Piece::End) => break,
                // The writer was dropped: the upload was cut short.
                None => return Err(std::io::Error::other("object upload ended early").into()),
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        chunker.finish(|c| {
            if failed.is_none() {
                failed = self.chunk(c).err();
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        if !self.building.builder.is_empty() {
            self.flush()?;
        }
        let sha256 = std::mem::take(&mut self.sha256).finalize();
        if let Some(expected) = expect.filter(|e| *e != sha256) {
            return Err(CoreError::ObjectMismatch {
                expected,
                actual: sha256,
                size: self.size,
            });
        }
        self.commit(sha256)
    }

    /// Records one chunk of the object: referenced where it is stored,
    /// else packed into the xorb being built.
    fn chunk(&mut self, data: &[u8]) -> Result<(), CoreError> {
        let info = ChunkInfo {
            hash: ChunkHash::of(data),
            len: data.len() as u32,
        };
        self.chunks.push(info);
        let building = Place::Building(self.stored.len());
        if let Some(&i) = self.building.at.get(&info.hash) {
            self.add_term(building, i, info.len);
            return Ok(());
        }
        if let Some(loc) = self.stored_chunk(&info.hash)? {
            self.add_term(Place::Stored(loc.xorb), loc.index, info.len);
            return Ok(());
        }
        let len = data.len();
        if !self.building.builder.is_empty()
            && (!self.building.builder.fits(len)
                || self.building.builder.uncompressed_len() + len > INGEST_XORB_BYTES)
        {
            self.flush()?;
        }
        let encoded = EncodedChunk::encode_with_hash(data, info.hash, Compression::Auto)?;
        let i = self.building.builder.len() as u32;
        self.building
            .builder
            .try_push(encoded)
            .map_err(|_| std::io::Error::other("a chunk does not fit an empty xorb"))?;
        self.building.at.insert(info.hash, i);
        self.add_term(Place::Building(self.stored.len()), i, info.len);
        Ok(())
    }

    /// Where a chunk is stored, leasing its xorb (a dedup answer the
    /// object's shard builds on, see `core::lease`).
    fn stored_chunk(&self, hash: &ChunkHash) -> Result<Option<ChunkLocation>, CoreError> {
        let leases = &self.core.leases;
        let _fence = leases.read_fence();
        let loc = self.core.index.chunk(hash)?;
        leases.lease(loc.iter().map(|l| Leased::Xorb(l.xorb)));
        Ok(loc)
    }

    /// Extends the last term when the chunk follows it in the same xorb.
    fn add_term(&mut self, place: Place, index: u32, len: u32) {
        if let Some(t) = self.terms.last_mut() {
            if t.place == place && t.chunks.end == index {
                t.chunks.end += 1;
                t.len += u64::from(len);
                return;
            }
        }
        self.terms.push(PendingTerm {
            place,
            chunks: ChunkRange {
                start: index,
                end: index + 1,
            },
            len: u64::from(len),
        });
    }

    /// Stores (and indexes) the xorb being built.
    fn flush(&mut self) -> Result<(), CoreError> {
        let building = std::mem::take(&mut self.building);
        let built = building.builder.finish()?;
        let entries = XorbView::parse(&built.bytes)?.entries().to_vec();
        let table = XorbChunkTable::from(&built);
        let len = built.bytes.len() as u64;
        let up = self.handle.block_on(self.core.store_verified_xorb(
            built.hash,
            built.bytes.into(),
            entries,
        ))?;
        if up.created {
            self.xorbs_stored += 1;
            self.bytes_stored += len;
        }
        self.stored.push(table);
        Ok(())
    }

    /// Commits the file as a one-file shard naming the xorbs it stored.
    fn commit(self, sha256: Sha256) -> Result<ObjectPut, CoreError> {
        let terms = self
            .terms
            .iter()
            .map(|t| Term {
                xorb: match t.place {
                    Place::Stored(h) => h,
                    Place::Building(n) => self.stored[n].hash,
                },
                chunks: t.chunks,
                len: t.len,
            })
            .collect();
        let recipe = FileRecipe {
            hash: FileHash::of_kind(self.kind, &self.chunks),
            sha256,
            size: self.size,
            terms,
            kind: self.kind,
        };
        let file = recipe.hash;
        let shard = Shard {
            xorbs: self.stored,
            files: vec![recipe],
        };
        let commit = self.handle.block_on(
            self.core
                .commit_shard(Bytes::from(shard.to_bytes()), Encoding::Binary),
        )?;
        Ok(ObjectPut {
            file,
            sha256,
            size: self.size,
            created: commit.new_files > 0,
            xorbs_stored: self.xorbs_stored,
            bytes_stored: self.bytes_stored,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::MemIndex;
    use crate::store::MemStore;
    use futures_util::TryStreamExt;

    type MemCore = Core<MemStore, MemIndex>;

    fn random(seed: u64, len: usize) -> Vec<u8> {
        use rand::{RngCore, SeedableRng};
        let mut v = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    async fn put(
        core: &MemCore,
        data: &[u8],
        expect: Option<Sha256>,
        piece: usize,
    ) -> Result<ObjectPut, CoreError> {
        match core.begin_object(Kind::File, expect).await? {
            ObjectSlot::Stored(p) => Ok(p),
            ObjectSlot::Write(mut w) => {
                for p in data.chunks(piece) {
                    w.write(Bytes::copy_from_slice(p)).await?;
                }
                w.finish().await
            }
        }
    }

    async fn read(core: &MemCore, file: FileHash) -> Vec<u8> {
        let recipe = core.recipe(file).await.unwrap();
        let range = cas_protocol::ByteRange {
            start: 0,
            end: recipe.size,
        };
        let parts: Vec<Bytes> = core.file_stream(recipe, range).try_collect().await.unwrap();
        parts.concat()
    }

    /// An object streamed in odd pieces is stored with the client's file
    /// hash, found by its SHA-256 and read back; its second version
    /// (an edit in the middle) stores only the chunks around the edit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn objects_are_chunked_deduplicated_and_found_by_sha256() {
        let core = MemCore::new(MemStore::default(), MemIndex::default());
        let v1 = random(1, 6 << 20);
        let sha = Sha256::of(&v1);
        let put1 = put(&core, &v1, Some(sha), 77_777).await.unwrap();
        assert!(put1.created);
        let hashes = cas_protocol::chunking::chunk_and_hash(&v1);
        assert_eq!(put1.file, FileHash::from_chunks(&hashes));
        assert_eq!(read(&core, put1.file).await, v1);
        let found = core.object_by_sha256(sha).await.unwrap().unwrap();
        assert_eq!((found.file, found.size), (put1.file, v1.len() as u64));
        // Again: nothing to send.
        assert!(matches!(
            core.begin_object(Kind::File, Some(sha)).await.unwrap(),
            ObjectSlot::Stored(_)
        ));
        let mut v2 = v1.clone();
        v2[3 << 20..(3 << 20) + 1000].fill(7);
        let put2 = put(&core, &v2, Some(Sha256::of(&v2)), 1 << 20)
            .await
            .unwrap();
        assert!(put2.created);
        assert!(
            put2.bytes_stored < 1 << 20,
            "an edit of 1000 bytes stored {} bytes",
            put2.bytes_stored
        );
        assert_eq!(read(&core, put2.file).await, v2);
        // A repeated chunk inside one object is packed once.
        let block = random(3, 1 << 20);
        let twice = [block.clone(), block].concat();
        let p = put(&core, &twice, None, 4096).await.unwrap();
        assert!(p.bytes_stored < (3 << 20) / 2, "{}", p.bytes_stored);
        assert_eq!(read(&core, p.file).await, twice);
        // Empty.
        let e = put(&core, b"", Some(Sha256::of(b"")), 1).await.unwrap();
        assert_eq!(read(&core, e.file).await, b"");
    }

    /// Bytes that do not hash to the expected SHA-256 record no file; a
    /// writer dropped mid-body records nothing either.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_sha256_or_a_cut_upload_records_nothing() {
        let core = MemCore::new(MemStore::default(), MemIndex::default());
        let data = random(5, 1 << 20);
        let claimed = Sha256::of(b"something else");
        let err = put(&core, &data, Some(claimed), 65536).await.unwrap_err();
        assert!(matches!(err, CoreError::ObjectMismatch { .. }), "{err}");
        assert!(core.object_by_sha256(claimed).await.unwrap().is_none());
        let file = FileHash::from_chunks(&cas_protocol::chunking::chunk_and_hash(&data));
        assert!(core.recipe(file).await.is_err());
        let ObjectSlot::Write(mut w) = core.begin_object(Kind::File, None).await.unwrap() else {
            panic!("nothing is stored");
        };
        w.write(Bytes::from(data.clone())).await.unwrap();
        drop(w);
        assert!(core.recipe(file).await.is_err());
    }

    /// Concurrent uploads of one object take turns: the object is
    /// stored once, every upload gets the same file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_identical_uploads_store_once() {
        let core = MemCore::new(MemStore::default(), MemIndex::default());
        let data = Arc::new(random(9, 3 << 20));
        let sha = Sha256::of(&data);
        let runs: Vec<_> = (0..4)
            .map(|_| {
                let (core, data) = (core.clone(), data.clone());
                tokio::spawn(async move { put(&core, &data, Some(sha), 100_000).await })
            })
            .collect();
        let mut stored = 0;
        let mut files = Vec::new();
        for r in runs {
            let p = r.await.unwrap().unwrap();
            stored += p.bytes_stored;
            files.push(p.file);
        }
        files.dedup();
        assert_eq!(files.len(), 1);
        let xorbs = core.index.totals().unwrap().xorb_bytes;
        assert_eq!(stored, xorbs, "every stored byte counted once");
        assert!(xorbs < data.len() as u64 + (64 << 10), "{xorbs}");
    }
}
