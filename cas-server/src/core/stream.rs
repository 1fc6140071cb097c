//! A stored file's bytes, read from the object store and verified chunk by
//! chunk as they are decoded, in order: what the server itself needs to
//! compute a file's SHA-256, and to serve a file's bytes over plain HTTP.
//!
//! The file is walked lazily in units of at most [`UNIT_BYTES`] (and
//! [`UNIT_CHUNKS`]) of one xorb, a few read ahead, so memory stays bounded
//! whatever the file's size.

use std::sync::Arc;

use bytes::Bytes;
use cas_protocol::shard::FileRecipe;
use cas_protocol::xorb::{FrameOffsets, Frames};
use cas_protocol::{ByteRange, ChunkHash, ChunkRange, FileHash, Sha256, Sha256Hasher, XorbHash};
use futures_util::stream::{self, Stream, StreamExt, TryStreamExt};
use tokio::io::AsyncReadExt;

use super::{blocking, load_recipe, Core, CoreError};
use crate::index::{Index, XorbRecord};
use crate::store::{ObjectKey, ObjectStore};

/// Most uncompressed bytes one unit decodes at once.
const UNIT_BYTES: u64 = 8 << 20;
/// Most chunks in one unit.
const UNIT_CHUNKS: u32 = 1024;
/// Units read and decoded ahead of the consumer.
const READ_AHEAD: usize = 4;

/// Chunks of one xorb to decode, and the part of their bytes to keep.
struct Unit {
    xorb: XorbHash,
    chunks: ChunkRange,
    frames: ByteRange,
    hashes: Vec<ChunkHash>,
    /// Uncompressed bytes of the unit's chunks.
    len: u64,
    skip: u64,
    take: u64,
}

/// Walks a recipe's terms over `range`, one unit at a time.
struct Planner {
    recipe: Arc<FileRecipe>,
    range: ByteRange,
    term: usize,
    /// File offset of the next chunk to plan, and its index in the term.
    pos: u64,
    chunk: u32,
    record: Option<(XorbHash, Arc<XorbRecord>, FrameOffsets)>,
}

impl Planner {
    fn new(recipe: Arc<FileRecipe>, range: ByteRange) -> Self {
        Self {
            recipe,
            range,
            term: 0,
            pos: 0,
            chunk: 0,
            record: None,
        }
    }

    fn next(&mut self, index: &impl Index) -> Result<Option<Unit>, CoreError> {
        let file = self.recipe.hash;
        while let Some(t) = self.recipe.terms.get(self.term).copied() {
            if self.pos >= self.range.end {
                return Ok(None);
            }
            if self.chunk == 0 && self.pos + t.len <= self.range.start {
                self.pos += t.len;
                self.term += 1;
                continue;
            }
            if self.record.as_ref().is_none_or(|(h, ..)| *h != t.xorb) {
                let r = index.xorb(&t.xorb)?.ok_or(CoreError::Damaged {
                    file: Some(file),
                    xorb: t.xorb,
                })?;
                if index.is_damaged(&t.xorb)? {
                    return Err(CoreError::Damaged {
                        file: Some(file),
                        xorb: t.xorb,
                    });
                }
                let offsets = FrameOffsets::new(&r.entries);
                self.record = Some((t.xorb, Arc::new(r), offsets));
            }
            let (_, record, offsets) = self.record.as_ref().expect("just set");
            let entries = &record.entries[t.chunks.as_usize()];
            let first = self.chunk as usize;
            let (mut n, mut bytes, mut skip) = (0usize, 0u64, 0u64);
            let mut start = self.pos;
            for e in &entries[first..] {
                let len = u64::from(e.info.len);
                let end = start + len;
                if end <= self.range.start && n == 0 {
                    // Wholly before the range: skip the chunk, not decode it.
                    self.chunk += 1;
                    self.pos = end;
                    start = end;
                    continue;
                }
                if n > 0 && (bytes + len > UNIT_BYTES || n as u32 >= UNIT_CHUNKS)
                    || start >= self.range.end
                {
                    break;
                }
                if n == 0 {
                    skip = self.range.start.saturating_sub(start);
                }
                n += 1;
                bytes += len;
                start = end;
            }
            if n == 0 {
                self.term += 1;
                self.chunk = 0;
                continue;
            }
            let first = self.chunk as usize;
            let chunks = ChunkRange {
                start: t.chunks.start + self.chunk,
                end: t.chunks.start + self.chunk + n as u32,
            };
            let frames = offsets
                .range(chunks)
                .map_err(|e| CoreError::Index(e.into()))?;
            let unit_start = self.pos;
            self.pos += bytes;
            self.chunk += n as u32;
            if first + n == entries.len() {
                self.term += 1;
                self.chunk = 0;
            }
            let take = (self.range.end.min(unit_start + bytes) - unit_start) - skip;
            return Ok(Some(Unit {
                xorb: t.xorb,
                chunks,
                frames,
                hashes: entries[first..first + n]
                    .iter()
                    .map(|e| e.info.hash)
                    .collect(),
                len: bytes,
                skip,
                take,
            }));
        }
        Ok(None)
    }
}

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// Streams bytes `range` of a stored file (all of it without one), each
    /// chunk verified against its hash as it is decoded. A chunk that fails
    /// marks its xorb damaged and ends the stream with
    /// [`CoreError::Damaged`]. The range must lie inside the file.
    pub fn file_stream(
        &self,
        recipe: Arc<FileRecipe>,
        range: ByteRange,
    ) -> impl Stream<Item = Result<Bytes, CoreError>> + Send + 'static {
        let planner = Planner::new(recipe.clone(), range);
        let core = self.clone();
        let units = stream::try_unfold((planner, core.clone()), |(mut p, core)| async move {
            let index = core.index.clone();
            let (p, unit) = blocking(move || {
                let unit = p.next(&*index)?;
                Ok((p, unit))
            })
            .await?;
            Ok(unit.map(|u| (u, (p, core))))
        });
        units
            .map_ok(move |u| {
                let core = core.clone();
                let file = recipe.hash;
                async move { core.load(file, u).await }
            })
            .try_buffered(READ_AHEAD)
    }

    /// Reads and decodes one unit, verifying every chunk.
    async fn load(&self, file: FileHash, u: Unit) -> Result<Bytes, CoreError> {
        let damaged = CoreError::Damaged {
            file: Some(file),
            xorb: u.xorb,
        };
        let read = async {
            let mut r = self
                .objects
                .read_range(&ObjectKey::xorb(&u.xorb), u.frames)
                .await?;
            let mut buf = Vec::with_capacity(u.frames.len() as usize);
            r.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        let raw = match read.await {
            Ok(b) if b.len() as u64 == u.frames.len() => b,
            Ok(b) => {
                let why = format!(
                    "object ends {} bytes early",
                    u.frames.len() - b.len() as u64
                );
                self.mark_damaged(u.xorb, &why).await?;
                return Err(damaged);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.mark_damaged(u.xorb, "object missing").await?;
                return Err(damaged);
            }
            Err(e) => return Err(e.into()),
        };
        let decoded = blocking(move || {
            // Sized once: no regrowth (and copy) of a unit's 8 MiB.
            let mut out = Vec::with_capacity(u.len as usize);
            let frames = Frames::new(&raw, u.chunks.start as usize);
            let mut n = 0;
            for (k, frame) in frames.enumerate() {
                let Some(expected) = u.hashes.get(k) else {
                    return Ok(Err(format!("more frames than chunks {}", u.chunks.end)));
                };
                if let Err(e) = frame.and_then(|f| {
                    f.decode_verified(u.chunks.start as usize + k, *expected, &mut out)
                }) {
                    return Ok(Err(e.to_string()));
                }
                n += 1;
            }
            if n != u.hashes.len() {
                return Ok(Err(format!("{n} frames for {} chunks", u.hashes.len())));
            }
            let out = Bytes::from(out);
            Ok(Ok(out.slice(u.skip as usize..(u.skip + u.take) as usize)))
        })
        .await?;
        match decoded {
            Ok(bytes) => Ok(bytes),
            Err(why) => {
                self.mark_damaged(u.xorb, &why).await?;
                Err(damaged)
            }
        }
    }

    /// The SHA-256 of a stored file, computed from its verified bytes.
    pub async fn file_sha256(&self, recipe: Arc<FileRecipe>) -> Result<Sha256, CoreError> {
        let range = ByteRange {
            start: 0,
            end: recipe.size,
        };
        let mut bytes = std::pin::pin!(self.file_stream(recipe, range));
        let mut sha = Sha256Hasher::new();
        while let Some(b) = bytes.next().await {
            let b = b?;
            sha = blocking(move || {
                sha.update(&b);
                Ok(sha)
            })
            .await?;
        }
        Ok(sha.finalize())
    }

    /// The recipe of a stored file.
    pub async fn recipe(&self, hash: FileHash) -> Result<Arc<FileRecipe>, CoreError> {
        self.catch_up_for(&[hash]).await?;
        self.with_index(move |i| load_recipe(i, hash).map(Arc::new))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::MemIndex;
    use crate::store::MemStore;
    use cas_protocol::shard::{Shard, Term, XorbChunkTable};
    use cas_protocol::xorb::{Compression, EncodedChunk, XorbBuilder};
    use cas_protocol::{Encoding, Kind, Message};

    /// A file of two terms in two xorbs, with chunks of distinct bytes.
    async fn stored() -> (Core<MemStore, MemIndex>, Arc<FileRecipe>, Vec<u8>) {
        let core = Core::new(MemStore::default(), MemIndex::default());
        let mut data = Vec::new();
        let mut terms = Vec::new();
        let mut infos = Vec::new();
        let mut tables = Vec::new();
        for x in 0..2u8 {
            let mut b = XorbBuilder::new();
            for c in 0..5u8 {
                let chunk: Vec<u8> = (0..3000u32 + u32::from(c) * 7)
                    .map(|i| (i as u8) ^ (x * 16 + c))
                    .collect();
                data.extend_from_slice(&chunk);
                b.try_push(EncodedChunk::encode(&chunk, Compression::Auto).unwrap())
                    .unwrap();
            }
            let built = b.finish().unwrap();
            core.put_xorb(built.hash, built.bytes.clone().into())
                .await
                .unwrap();
            infos.extend(built.chunks.clone());
            terms.push(Term {
                xorb: built.hash,
                chunks: ChunkRange { start: 0, end: 5 },
                len: built.chunks.iter().map(|c| u64::from(c.len)).sum(),
            });
            tables.push(XorbChunkTable::from(&built));
        }
        let recipe = FileRecipe {
            hash: FileHash::from_chunks(&infos),
            sha256: Sha256::of(&data),
            size: data.len() as u64,
            terms,
            kind: Kind::File,
        };
        let shard = Shard {
            xorbs: tables,
            files: vec![recipe.clone()],
        };
        core.commit_shard(shard.to_bytes().into(), Encoding::Binary)
            .await
            .unwrap();
        (core, Arc::new(recipe), data)
    }

    async fn collect(
        core: &Core<MemStore, MemIndex>,
        recipe: &Arc<FileRecipe>,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, CoreError> {
        let s = core.file_stream(recipe.clone(), ByteRange { start, end });
        let parts: Vec<Bytes> = s.try_collect().await?;
        Ok(parts.concat())
    }

    #[tokio::test]
    async fn every_range_streams_the_right_bytes() {
        let (core, recipe, data) = stored().await;
        let n = data.len() as u64;
        for (a, b) in [
            (0, n),
            (0, 1),
            (n - 1, n),
            (2999, 3001),
            (3000, 3007),
            (14_000, 20_000),
            (100, n - 100),
        ] {
            let got = collect(&core, &recipe, a, b).await.unwrap();
            assert_eq!(got, &data[a as usize..b as usize], "{a}..{b}");
        }
        assert_eq!(core.file_sha256(recipe).await.unwrap(), Sha256::of(&data));
    }

    #[tokio::test]
    async fn a_corrupt_chunk_marks_its_xorb_damaged() {
        let (core, recipe, data) = stored().await;
        let bad = recipe.terms[1].xorb;
        let len = core
            .objects
            .len(&ObjectKey::xorb(&bad))
            .await
            .unwrap()
            .unwrap();
        let mut bytes = core.read_whole(bad, len).await.unwrap().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        core.objects.delete(&ObjectKey::xorb(&bad)).await.unwrap();
        core.objects
            .put(&ObjectKey::xorb(&bad), bytes.into())
            .await
            .unwrap();
        // The first xorb's bytes still stream.
        let half = recipe.terms[0].len;
        assert_eq!(
            collect(&core, &recipe, 0, half).await.unwrap(),
            &data[..half as usize]
        );
        let err = collect(&core, &recipe, 0, data.len() as u64)
            .await
            .unwrap_err();
        assert!(matches!(err, CoreError::Damaged { xorb, .. } if xorb == bad));
        assert!(core.index.is_damaged(&bad).unwrap());
        assert_eq!(
            core.metrics
                .xorbs_damaged
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
}
