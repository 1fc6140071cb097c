//! Reading: file info, reconstruction plans (which xorb byte ranges
//! rebuild a byte range of a file) and xorb reads.

use std::collections::HashMap;

use cas_protocol::messages::{
    FetchRange, FileReconstruction, Reconstruction, ReconstructionBatch, ReconstructionTerm,
    XorbFetch, BATCH_ANSWER_TARGET,
};
use cas_protocol::shard::FileRecipe;
use cas_protocol::xorb::{FrameOffsets, XorbError};
use cas_protocol::{ByteRange, ChunkRange, Encoding, FileHash, Message, RangeHash, XorbHash};

use super::{load_recipe, Core, CoreError, FileInfo, Records};
use crate::index::{Index, IndexError};
use crate::store::{ObjectKey, ObjectReader, ObjectStore};

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

fn info_of(recipe: &FileRecipe) -> FileInfo {
    FileInfo {
        hash: recipe.hash,
        kind: recipe.kind,
        size: recipe.size,
        sha256: recipe.sha256,
        chunks: recipe.terms.iter().map(|t| u64::from(t.chunks.len())).sum(),
        terms: recipe.terms.len(),
    }
}

impl<O: ObjectStore, I: Index> Core<O, I> {
    pub async fn file_info(&self, hash: FileHash) -> Result<FileInfo, CoreError> {
        Ok(info_of(&*self.recipe(hash).await?))
    }

    /// The info of many stored files (a page of a listing), read in one
    /// blocking pass over the index; in order.
    pub async fn files_info(&self, hashes: Vec<FileHash>) -> Result<Vec<FileInfo>, CoreError> {
        self.catch_up_for(&hashes).await?;
        self.with_index(move |i| {
            hashes
                .into_iter()
                .map(|h| load_recipe(i, h).map(|r| info_of(&r)))
                .collect()
        })
        .await
    }

    /// The terms and xorb byte ranges that rebuild `range` of a file (the
    /// whole file without one). `grain` says how the fetch entries are cut
    /// and `url` names where the bytes `range` of a xorb are fetched (the
    /// whole xorb, or one merged range: [`FetchGrain`]).
    pub async fn reconstruct(
        &self,
        hash: FileHash,
        range: Option<RangeRequest>,
        grain: FetchGrain,
        url: impl Fn(&XorbHash, ByteRange) -> String + Send + 'static,
    ) -> Result<Reconstruction, CoreError> {
        self.catch_up_for(&[hash]).await?;
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
            plan(&mut Records::new(i), &recipe, range, grain, &url)
        })
        .await
    }

    /// Whole-file reconstructions of the first of `files` (in order), as
    /// many as fit [`BATCH_ANSWER_TARGET`] bytes in `encoding`, at least
    /// one. Xorb records are read once for the whole batch.
    pub async fn reconstruct_batch(
        &self,
        files: Vec<FileHash>,
        encoding: Encoding,
        grain: FetchGrain,
        url: impl Fn(&XorbHash, ByteRange) -> String + Send + 'static,
    ) -> Result<ReconstructionBatch, CoreError> {
        self.with_index(move |i| {
            let mut records = Records::new(i);
            let mut batch = ReconstructionBatch::default();
            let mut bytes = 0;
            for hash in files {
                let recipe = load_recipe(i, hash)?;
                let whole = ByteRange {
                    start: 0,
                    end: recipe.size,
                };
                let reconstruction = plan(&mut records, &recipe, whole, grain, &url)?;
                let file = FileReconstruction {
                    kind: recipe.kind,
                    sha256: recipe.sha256,
                    reconstruction,
                };
                // The encoding of one file alone, plus what the batch adds.
                bytes += match encoding {
                    Encoding::Binary => file.reconstruction.to_bytes().len(),
                    Encoding::Json => file.reconstruction.to_json().len(),
                } + 160;
                if bytes > BATCH_ANSWER_TARGET && !batch.files.is_empty() {
                    break;
                }
                batch.files.push(file);
            }
            Ok(batch)
        })
        .await
    }

    /// A URL that reads the xorb straight from the store for `ttl`, if the
    /// store can make one.
    pub async fn presign_xorb(
        &self,
        hash: XorbHash,
        ttl: std::time::Duration,
    ) -> Result<Option<String>, CoreError> {
        Ok(self.objects.presign(&ObjectKey::xorb(&hash), ttl).await?)
    }

    /// Streams bytes of a stored xorb.
    pub async fn read_xorb(
        &self,
        hash: XorbHash,
        range: ByteRange,
    ) -> Result<ObjectReader, CoreError> {
        self.open_xorb(hash, range).await
    }
}

/// How a reconstruction's fetch entries name the bytes they hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchGrain {
    /// One entry per xorb, under a URL for the whole xorb; its ranges are
    /// offsets in the xorb.
    Xorb,
    /// One entry per merged byte range, under a URL for exactly those
    /// bytes; its one range is offsets in that URL (`0..len`). A reader
    /// learns no URL for bytes its file does not need.
    Range,
}

/// Builds the reconstruction of `range` (already inside the file): the
/// terms overlapping it, trimmed to the chunks that overlap it, and per
/// xorb the merged byte ranges that hold those chunks, cut by `grain`.
/// A damaged or missing xorb is reported as the file's.
fn plan<I: Index>(
    records: &mut Records<'_, I>,
    recipe: &FileRecipe,
    range: ByteRange,
    grain: FetchGrain,
    url: &impl Fn(&XorbHash, ByteRange) -> String,
) -> Result<Reconstruction, CoreError> {
    plan_terms(records, recipe, range, grain, url).map_err(|e| match e {
        CoreError::DamagedXorb(xorb) | CoreError::UnknownXorb(xorb) => CoreError::Damaged {
            file: Some(recipe.hash),
            xorb,
        },
        e => e,
    })
}

fn plan_terms<I: Index>(
    records: &mut Records<'_, I>,
    recipe: &FileRecipe,
    range: ByteRange,
    grain: FetchGrain,
    url: &impl Fn(&XorbHash, ByteRange) -> String,
) -> Result<Reconstruction, CoreError> {
    let mut terms = Vec::new();
    let mut offset_into_first_term = 0;
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
        let ranges: Vec<FetchRange> = merged
            .into_iter()
            .map(|chunks| {
                Ok(FetchRange {
                    chunks,
                    bytes: offsets.range(chunks)?,
                })
            })
            .collect::<Result<_, XorbError>>()
            .map_err(IndexError::from)?;
        match grain {
            FetchGrain::Xorb => fetch.push(XorbFetch {
                xorb,
                url: url(
                    &xorb,
                    ByteRange {
                        start: 0,
                        end: offsets.end(),
                    },
                ),
                ranges,
            }),
            FetchGrain::Range => fetch.extend(ranges.into_iter().map(|r| XorbFetch {
                xorb,
                url: url(&xorb, r.bytes),
                ranges: vec![FetchRange {
                    chunks: r.chunks,
                    bytes: ByteRange {
                        start: 0,
                        end: r.bytes.len(),
                    },
                }],
            })),
        }
    }
    // Deterministic order: the order xorbs first appear in the terms (and
    // a xorb's ranges in chunk order).
    let first_use: HashMap<XorbHash, usize> = terms
        .iter()
        .enumerate()
        .rev()
        .map(|(i, t)| (t.xorb, i))
        .collect();
    fetch.sort_by_key(|f| (first_use[&f.xorb], f.ranges[0].chunks.start));
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
