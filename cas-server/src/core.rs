//! The storage core: verification, dedup, shard commits and reconstruction
//! over an [`ObjectStore`] and an [`Index`]. It knows nothing of HTTP.
//!
//! Ordering is what makes crashes harmless: an object is durable under its
//! final name before any index entry points at it, and a shard's files are
//! indexed in one batch after everything they reference is stored.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use cas_protocol::messages::{
    DedupAnswer, DedupQuery, FetchRange, Reconstruction, ReconstructionTerm, XorbFetch,
};
use cas_protocol::shard::{FileRecipe, RecipeError, Shard};
use cas_protocol::xorb::{FrameOffsets, XorbError, XorbView};
use cas_protocol::{
    ByteRange, ChunkInfo, ChunkRange, Encoding, FileHash, Message, MessageError, RangeHash,
    XorbHash,
};
use serde::Serialize;

use crate::index::{Index, IndexError, XorbRecord};
use crate::object_store::{ObjectKey, ObjectKind, ObjectReader, ObjectStore};

/// Why the core refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("xorb rejected: {0}")]
    InvalidXorb(#[from] XorbError),
    #[error("{0}")]
    InvalidMessage(#[from] MessageError),
    #[error("shard references xorb {0}, which is not stored")]
    UnknownXorb(XorbHash),
    #[error("file {file}: {source}")]
    InvalidRecipe { file: FileHash, source: RecipeError },
    #[error("{0} not found")]
    NotFound(String),
    #[error("range not satisfiable for a file of {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("object store: {0}")]
    Io(#[from] std::io::Error),
}

/// Result of a xorb upload.
#[derive(Debug, Clone, Serialize)]
pub struct XorbUpload {
    pub xorb: XorbHash,
    /// False when the xorb was already stored (nothing was written).
    pub created: bool,
    pub chunks: usize,
    pub bytes: u64,
}

/// Result of a shard commit.
#[derive(Debug, Clone, Serialize)]
pub struct ShardCommit {
    pub shard: String,
    pub files: usize,
    pub xorbs: usize,
}

/// What a client may ask about a stored file without reconstructing it.
#[derive(Debug, Clone, Serialize)]
pub struct FileInfo {
    pub hash: FileHash,
    pub size: u64,
    pub sha256: cas_protocol::Sha256,
    pub chunks: u64,
    pub terms: usize,
}

/// A requested byte range, before it is resolved against a file's size
/// (the forms of an HTTP `Range: bytes=` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// `a-b` (inclusive end) or `a-` (`end: None`).
    From { start: u64, end: Option<u64> },
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

impl RangeRequest {
    /// The bytes this request selects of an object of `size` bytes, or
    /// `None` when nothing can be served (HTTP 416).
    pub fn resolve(self, size: u64) -> Option<ByteRange> {
        match self {
            Self::From { start, end } if start < size => {
                let end = end.map_or(size, |e| e.saturating_add(1).min(size));
                ByteRange::new(start, end)
            }
            Self::Suffix(n) if n > 0 && size > 0 => ByteRange::new(size - n.min(size), size),
            _ => None,
        }
    }
}

/// The store: objects plus index, shared by all request handlers.
pub struct Core<O, I> {
    objects: O,
    index: Arc<I>,
}

impl<O: ObjectStore, I: Index> Core<O, I> {
    pub fn new(objects: O, index: I) -> Self {
        Self {
            objects,
            index: Arc::new(index),
        }
    }

    /// Runs blocking index work off the async threads.
    async fn with_index<T: Send + 'static>(
        &self,
        f: impl FnOnce(&I) -> Result<T, CoreError> + Send + 'static,
    ) -> Result<T, CoreError> {
        let index = self.index.clone();
        blocking(move || f(&index)).await
    }

    /// Verifies a xorb completely (parse, decompress, re-hash every chunk,
    /// check the xorb hash), stores it, then indexes it. A xorb that is
    /// already stored is accepted without being rewritten.
    pub async fn put_xorb(&self, hash: XorbHash, body: Bytes) -> Result<XorbUpload, CoreError> {
        if let Some(r) = self.with_index(move |i| Ok(i.xorb(&hash)?)).await? {
            return Ok(XorbUpload {
                xorb: hash,
                created: false,
                chunks: r.entries.len(),
                bytes: r.object_len(),
            });
        }
        let verify_body = body.clone();
        let record = blocking(move || {
            let view = XorbView::parse(&verify_body)?;
            view.verify(hash)?;
            Ok(XorbRecord {
                entries: view.entries().to_vec(),
            })
        })
        .await?;
        let upload = XorbUpload {
            xorb: hash,
            created: true,
            chunks: record.entries.len(),
            bytes: body.len() as u64,
        };
        self.objects
            .put(&ObjectKey::new(ObjectKind::Xorb, hash.as_bytes()), body)
            .await?;
        self.with_index(move |i| Ok(i.add_xorb(&hash, &record)?))
            .await?;
        Ok(upload)
    }

    /// Which queried chunks are stored, and where.
    pub async fn dedup(&self, query: DedupQuery) -> Result<DedupAnswer, CoreError> {
        self.with_index(move |i| {
            let found = query
                .chunks
                .iter()
                .map(|h| i.chunk(h))
                .collect::<Result<_, _>>()?;
            Ok(DedupAnswer { found })
        })
        .await
    }

    /// Checks a shard (in either encoding) against the stored xorbs and
    /// commits its files atomically; nothing changes if any check fails.
    /// The shard object is always stored in the binary form.
    pub async fn commit_shard(
        &self,
        body: Bytes,
        encoding: Encoding,
    ) -> Result<ShardCommit, CoreError> {
        let (shard, body) = self
            .with_index(move |index| {
                let shard = Shard::decode_as(&body, encoding)?;
                check_shard(index, &shard)?;
                let body = match encoding {
                    Encoding::Binary => body,
                    Encoding::Json => Bytes::from(shard.to_bytes()),
                };
                Ok((shard, body))
            })
            .await?;
        let id = blake3::hash(&body);
        self.objects
            .put(&ObjectKey::new(ObjectKind::Shard, id.as_bytes()), body)
            .await?;
        let commit = ShardCommit {
            shard: id.to_hex().to_string(),
            files: shard.files.len(),
            xorbs: shard.xorbs.len(),
        };
        self.with_index(move |i| Ok(i.add_files(&shard.files)?))
            .await?;
        Ok(commit)
    }

    pub async fn file_info(&self, hash: FileHash) -> Result<FileInfo, CoreError> {
        let recipe = self.recipe(hash).await?;
        Ok(FileInfo {
            hash,
            size: recipe.size,
            sha256: recipe.sha256,
            chunks: recipe.terms.iter().map(|t| u64::from(t.chunks.len())).sum(),
            terms: recipe.terms.len(),
        })
    }

    async fn recipe(&self, hash: FileHash) -> Result<FileRecipe, CoreError> {
        self.with_index(move |i| load_recipe(i, hash)).await
    }

    /// The terms and xorb byte ranges that rebuild `range` of a file (the
    /// whole file without one). `xorb_url` names where a xorb is fetched.
    pub async fn reconstruct(
        &self,
        hash: FileHash,
        range: Option<RangeRequest>,
        xorb_url: impl Fn(&XorbHash) -> String + Send + 'static,
    ) -> Result<Reconstruction, CoreError> {
        self.with_index(move |i| {
            let recipe = load_recipe(i, hash)?;
            let range = match range {
                None => ByteRange {
                    start: 0,
                    end: recipe.size,
                },
                Some(r) => r
                    .resolve(recipe.size)
                    .ok_or(CoreError::RangeNotSatisfiable { size: recipe.size })?,
            };
            plan(i, &recipe, range, &xorb_url)
        })
        .await
    }

    /// Length of a stored xorb, or `None`.
    pub async fn xorb_len(&self, hash: XorbHash) -> Result<Option<u64>, CoreError> {
        Ok(self
            .objects
            .len(&ObjectKey::new(ObjectKind::Xorb, hash.as_bytes()))
            .await?)
    }

    /// Streams bytes of a stored xorb.
    pub async fn read_xorb(
        &self,
        hash: XorbHash,
        range: ByteRange,
    ) -> Result<ObjectReader, CoreError> {
        Ok(self
            .objects
            .read_range(&ObjectKey::new(ObjectKind::Xorb, hash.as_bytes()), range)
            .await?)
    }
}

/// Runs blocking work (CPU or index) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CoreError> + Send + 'static,
) -> Result<T, CoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

fn load_recipe(index: &impl Index, hash: FileHash) -> Result<FileRecipe, CoreError> {
    index
        .file(&hash)?
        .ok_or_else(|| CoreError::NotFound(format!("file {hash}")))
}

/// Xorb records of one request, each read from the index once.
struct Records<'a, I> {
    index: &'a I,
    map: HashMap<XorbHash, XorbRecord>,
}

impl<'a, I: Index> Records<'a, I> {
    fn new(index: &'a I) -> Self {
        Self {
            index,
            map: HashMap::new(),
        }
    }

    fn get(&mut self, h: XorbHash) -> Result<&XorbRecord, CoreError> {
        match self.map.entry(h) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                Ok(e.insert(self.index.xorb(&h)?.ok_or(CoreError::UnknownXorb(h))?))
            }
        }
    }
}

/// Every xorb the shard names is stored (a table's hash was checked against
/// its chunks when the shard decoded, so the stored xorb has exactly those
/// chunks); every recipe's terms lie inside stored xorbs and hash to the
/// recipe's file hash.
fn check_shard(index: &impl Index, shard: &Shard) -> Result<(), CoreError> {
    let mut records = Records::new(index);
    let named = shard.xorbs.iter().map(|t| t.hash);
    for h in named.chain(
        shard
            .files
            .iter()
            .flat_map(|f| f.terms.iter().map(|t| t.xorb)),
    ) {
        records.get(h)?;
    }
    let tables: HashMap<XorbHash, Vec<ChunkInfo>> = records
        .map
        .into_iter()
        .map(|(h, r)| (h, r.entries.iter().map(|e| e.info).collect()))
        .collect();
    for f in &shard.files {
        f.verify(|h| tables.get(h).map(Vec::as_slice))
            .map_err(|source| CoreError::InvalidRecipe {
                file: f.hash,
                source,
            })?;
    }
    Ok(())
}

/// Builds the reconstruction of `range` (already inside the file): the
/// terms overlapping it, trimmed to the chunks that overlap it, and per
/// xorb the merged byte ranges that hold those chunks.
fn plan(
    index: &impl Index,
    recipe: &FileRecipe,
    range: ByteRange,
    xorb_url: &impl Fn(&XorbHash) -> String,
) -> Result<Reconstruction, CoreError> {
    let mut terms = Vec::new();
    let mut offset_into_first_term = 0;
    let mut records = Records::new(index);
    let mut pos = 0u64;
    for t in &recipe.terms {
        let (t_start, t_end) = (pos, pos + t.len);
        pos = t_end;
        if t_end <= range.start || range.is_empty() {
            continue;
        }
        if t_start >= range.end {
            break;
        }
        let entries = &records.get(t.xorb)?.entries[t.chunks.as_usize()];
        // Trim to the chunks overlapping the range.
        let (mut first, mut last) = (0, entries.len());
        let mut chunk_start = t_start;
        let mut skipped = 0;
        for (k, e) in entries.iter().enumerate() {
            let chunk_end = chunk_start + u64::from(e.info.len);
            if chunk_end <= range.start {
                first = k + 1;
                skipped = chunk_end - t_start;
            }
            if chunk_start >= range.end {
                last = k;
                break;
            }
            chunk_start = chunk_end;
        }
        let kept = &entries[first..last];
        if terms.is_empty() {
            offset_into_first_term = range.start.saturating_sub(t_start + skipped);
        }
        terms.push(ReconstructionTerm {
            xorb: t.xorb,
            chunks: ChunkRange {
                start: t.chunks.start + first as u32,
                end: t.chunks.start + last as u32,
            },
            len: kept.iter().map(|e| u64::from(e.info.len)).sum(),
            range_hash: RangeHash::from_chunks(kept.iter().map(|e| &e.info)),
        });
    }
    let mut by_xorb: HashMap<XorbHash, Vec<ChunkRange>> = HashMap::new();
    for t in &terms {
        by_xorb.entry(t.xorb).or_default().push(t.chunks);
    }
    let mut fetch = Vec::with_capacity(by_xorb.len());
    for (xorb, mut ranges) in by_xorb {
        ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<ChunkRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(m) if r.start <= m.end => m.end = m.end.max(r.end),
                _ => merged.push(r),
            }
        }
        let offsets = FrameOffsets::new(&records.map[&xorb].entries);
        let ranges = merged
            .into_iter()
            .map(|chunks| {
                Ok(FetchRange {
                    chunks,
                    bytes: offsets.range(chunks)?,
                })
            })
            .collect::<Result<_, XorbError>>()
            .map_err(IndexError::from)?;
        fetch.push(XorbFetch {
            xorb,
            url: xorb_url(&xorb),
            ranges,
        });
    }
    // Deterministic order: the order xorbs first appear in the terms.
    let first_use: HashMap<XorbHash, usize> = terms
        .iter()
        .enumerate()
        .rev()
        .map(|(i, t)| (t.xorb, i))
        .collect();
    fetch.sort_by_key(|f| first_use[&f.xorb]);
    Ok(Reconstruction {
        file: recipe.hash,
        file_size: recipe.size,
        range,
        offset_into_first_term,
        terms,
        fetch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_requests_resolve_like_http() {
        let from = |start, end| RangeRequest::From { start, end };
        assert_eq!(from(0, Some(9)).resolve(100), ByteRange::new(0, 10));
        assert_eq!(from(90, None).resolve(100), ByteRange::new(90, 100));
        assert_eq!(from(90, Some(1000)).resolve(100), ByteRange::new(90, 100));
        assert_eq!(from(100, None).resolve(100), None);
        assert_eq!(
            RangeRequest::Suffix(10).resolve(100),
            ByteRange::new(90, 100)
        );
        assert_eq!(
            RangeRequest::Suffix(1000).resolve(100),
            ByteRange::new(0, 100)
        );
        assert_eq!(RangeRequest::Suffix(0).resolve(100), None);
        assert_eq!(from(0, None).resolve(0), None);
    }
}
