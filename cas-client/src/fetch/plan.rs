//! A reconstruction as a plan: which byte range of which xorb serves which
//! terms, and which part of the terms' concatenation was asked for.

use std::collections::{BTreeMap, HashSet};

use cas_protocol::messages::{FetchRange, Reconstruction, ReconstructionTerm};
use cas_protocol::xorb::{MAX_XORB_SERIALIZED, MAX_XORB_UNCOMPRESSED};
use cas_protocol::XorbHash;

use super::sink::Sink;
use crate::error::{Error, Result};

/// The part of the concatenated terms that was asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub skip: u64,
    pub len: u64,
}

impl Window {
    /// Writes the part of `data` (at stream position `pos`) inside the
    /// window; returns how many bytes that was.
    pub fn put(&self, sink: &dyn Sink, pos: u64, data: &[u8]) -> Result<u64> {
        let start = pos.max(self.skip);
        let end = (pos + data.len() as u64).min(self.skip + self.len);
        if start >= end {
            return Ok(0);
        }
        sink.write_at(
            start - self.skip,
            &data[(start - pos) as usize..(end - pos) as usize],
        )?;
        Ok(end - start)
    }
}
/// A term and where its bytes start in the concatenation of all terms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlacedTerm {
    pub term: ReconstructionTerm,
    pub offset: u64,
}

/// One byte range of one xorb and the terms it serves, sorted by first
/// chunk.
#[derive(Debug, Clone)]
pub(crate) struct Unit {
    pub xorb: XorbHash,
    pub url: String,
    pub range: FetchRange,
    pub terms: Vec<PlacedTerm>,
}

/// Where each term of `rec` lies in the concatenation of its terms, as
/// `(start, end)`: what a fetch journal names.
pub(crate) fn term_spans(rec: &Reconstruction) -> HashSet<(u64, u64)> {
    let mut offset = 0;
    rec.terms
        .iter()
        .map(|t| {
            let span = (offset, offset + t.len);
            offset += t.len;
            span
        })
        .collect()
}

/// Groups the terms of `rec` by the fetch range that serves them.
pub(crate) fn plan(rec: &Reconstruction) -> Result<Vec<Unit>> {
    let mut units: BTreeMap<(XorbHash, u32, u64), Unit> = BTreeMap::new();
    let mut offset = 0u64;
    for t in &rec.terms {
        let (f, r) = rec.fetch_range(t).ok_or_else(|| Error::BadAnswer {
            what: format!("reconstruction of {}", rec.file),
            reason: format!("no fetch range for chunks of xorb {}", t.xorb),
        })?;
        // A term lies in one xorb; its length sizes buffers later on
        // (a resumed term is read back whole to be chunked again).
        if t.len > MAX_XORB_UNCOMPRESSED as u64 {
            return Err(Error::BadAnswer {
                what: format!("reconstruction of {}", rec.file),
                reason: format!("term of xorb {} longer than a xorb holds", t.xorb),
            });
        }
        if r.bytes.len() > MAX_XORB_SERIALIZED as u64 {
            return Err(Error::BadAnswer {
                what: format!("reconstruction of {}", rec.file),
                reason: format!("fetch range of xorb {} longer than a xorb", t.xorb),
            });
        }
        units
            .entry((f.xorb, r.chunks.start, r.bytes.start))
            .or_insert_with(|| Unit {
                xorb: f.xorb,
                url: f.url.clone(),
                range: *r,
                terms: Vec::new(),
            })
            .terms
            .push(PlacedTerm { term: *t, offset });
        offset += t.len;
    }
    let mut units: Vec<Unit> = units.into_values().collect();
    for u in &mut units {
        u.terms.sort_by_key(|p| (p.term.chunks.start, p.offset));
    }
    Ok(units)
}

/// Largest xorb byte range one GET of a batch of small files asks for.
const MERGED_MAX: u64 = 4 << 20;

/// The units of many reconstructions whose concatenations are laid out
/// side by side (`(base, rec)`: `rec`'s bytes start at `base`), with the
/// ranges of one xorb joined where they touch or overlap, up to
/// [`MERGED_MAX`] bytes, and only when their URLs are identical (a URL may
/// be a capability of its own). Small files of one upload sit side by side
/// in a xorb, so a tree of them becomes a few GETs instead of one per file.
pub(crate) fn plan_batch(recs: &[(u64, &Reconstruction)]) -> Result<Vec<Unit>> {
    let mut units = Vec::new();
    for &(base, rec) in recs {
        for mut u in plan(rec)? {
            u.terms.iter_mut().for_each(|p| p.offset += base);
            units.push(u);
        }
    }
    units.sort_by(|a, b| {
        (a.xorb, &a.url, a.range.chunks.start).cmp(&(b.xorb, &b.url, b.range.chunks.start))
    });
    let mut merged: Vec<Unit> = Vec::new();
    for u in units {
        if let Some(m) = merged.last_mut() {
            let (a, b) = (&mut m.range, u.range);
            // Adjacent frames, or overlapping ones (both sides agree).
            let touches = (b.chunks.start == a.chunks.end && b.bytes.start == a.bytes.end)
                || (b.chunks.start < a.chunks.end && b.bytes.start < a.bytes.end);
            let end = a.bytes.end.max(b.bytes.end);
            if m.xorb == u.xorb && m.url == u.url && touches && end - a.bytes.start <= MERGED_MAX {
                a.chunks.end = a.chunks.end.max(b.chunks.end);
                a.bytes.end = end;
                m.terms.extend(u.terms);
                continue;
            }
        }
        merged.push(u);
    }
    for u in &mut merged {
        u.terms.sort_by_key(|p| (p.term.chunks.start, p.offset));
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::sink::MemSink;
    use cas_protocol::messages::XorbFetch;
    use cas_protocol::{ByteRange, ChunkRange, FileHash, RangeHash};
    use std::sync::Mutex;

    /// A whole-file reconstruction of chunks `c` of xorb `x` (10 bytes a
    /// chunk, frames of 5 bytes) served from `url`.
    fn one_term(x: u8, c: (u32, u32), url: &str) -> Reconstruction {
        let chunks = ChunkRange {
            start: c.0,
            end: c.1,
        };
        let len = u64::from(c.1 - c.0) * 10;
        let xorb = XorbHash::from_bytes([x; 32]);
        Reconstruction {
            file: FileHash::from_bytes([c.0 as u8; 32]),
            file_size: len,
            range: ByteRange { start: 0, end: len },
            offset_into_first_term: 0,
            terms: vec![ReconstructionTerm {
                xorb,
                chunks,
                len,
                range_hash: RangeHash::from_bytes([3; 32]),
            }],
            fetch: vec![XorbFetch {
                xorb,
                url: url.into(),
                ranges: vec![FetchRange {
                    chunks,
                    bytes: ByteRange {
                        start: u64::from(c.0) * 5,
                        end: u64::from(c.1) * 5,
                    },
                }],
            }],
        }
    }

    /// Adjacent and overlapping ranges of one xorb and URL become one
    /// unit serving every file at its place; another URL, another xorb or
    /// a gap keeps its own.
    #[test]
    fn batches_join_ranges_per_xorb_and_url() {
        let recs = [
            one_term(1, (0, 2), "u"),
            one_term(1, (2, 5), "u"),
            one_term(1, (2, 5), "u"),
            one_term(1, (5, 6), "signed-elsewhere"),
            one_term(1, (7, 8), "u"),
            one_term(2, (5, 6), "u"),
        ];
        let mut base = 0;
        let laid: Vec<(u64, &Reconstruction)> = recs
            .iter()
            .map(|r| {
                let b = base;
                base += r.file_size;
                (b, r)
            })
            .collect();
        let units = plan_batch(&laid).unwrap();
        let shape: Vec<_> = units
            .iter()
            .map(|u| {
                let offsets: Vec<u64> = u.terms.iter().map(|p| p.offset).collect();
                (
                    u.xorb.as_bytes()[0],
                    u.url.as_str(),
                    u.range.chunks.start,
                    u.range.chunks.end,
                    u.range.bytes.end,
                    offsets,
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (1, "signed-elsewhere", 5, 6, 30, vec![80]),
                (1, "u", 0, 5, 25, vec![0, 20, 50]),
                (1, "u", 7, 8, 40, vec![90]),
                (2, "u", 5, 6, 30, vec![100]),
            ]
        );
    }

    #[test]
    fn window_clips_to_the_requested_range() {
        let sink = MemSink(Mutex::new(vec![0; 4]));
        let w = Window { skip: 3, len: 4 };
        assert_eq!(w.put(&sink, 0, b"abcde").unwrap(), 2);
        assert_eq!(w.put(&sink, 5, b"fgh").unwrap(), 2);
        assert_eq!(w.put(&sink, 8, b"ij").unwrap(), 0);
        assert_eq!(*sink.0.lock().unwrap(), b"defg");
    }

    /// A term claiming more bytes than any xorb holds is refused before
    /// anything is sized from it; the same term at its true length plans.
    #[test]
    fn a_term_longer_than_a_xorb_is_refused() {
        use cas_protocol::messages::XorbFetch;
        use cas_protocol::{ByteRange, ChunkRange, FileHash, RangeHash};
        let chunks = ChunkRange { start: 0, end: 4 };
        let rec = |len| Reconstruction {
            file: FileHash::from_bytes([1; 32]),
            file_size: len,
            range: ByteRange { start: 0, end: len },
            offset_into_first_term: 0,
            terms: vec![ReconstructionTerm {
                xorb: XorbHash::from_bytes([2; 32]),
                chunks,
                len,
                range_hash: RangeHash::from_bytes([3; 32]),
            }],
            fetch: vec![XorbFetch {
                xorb: XorbHash::from_bytes([2; 32]),
                url: "u".into(),
                ranges: vec![FetchRange {
                    chunks,
                    bytes: ByteRange {
                        start: 0,
                        end: 1000,
                    },
                }],
            }],
        };
        assert_eq!(plan(&rec(1 << 20)).unwrap().len(), 1);
        let lie = plan(&rec(1 << 40)).unwrap_err();
        assert!(lie.to_string().contains("longer than a xorb"), "{lie}");
    }
}
