//! Decoding one unit: frames in, verified chunks out to every term that
//! uses them, each term checked against its range hash.

use std::sync::Arc;

use bytes::Bytes;
use cas_protocol::messages::ChunkLocation;
use cas_protocol::xorb::{Frame, Frames};
use cas_protocol::{ChunkHash, ChunkInfo, ChunkRange, RangeHash, XorbHash};

use super::plan::{PlacedTerm, Unit, Window};
use super::sink::Sink;
use crate::cache::EntryWriter;
use crate::error::{Error, Result};

/// A verified term and its chunks (`None` when an earlier, interrupted
/// fetch verified it and only its bytes on disk remain).
#[derive(Debug, Clone)]
pub(crate) struct TermDone {
    pub placed: PlacedTerm,
    pub chunks: Option<Vec<ChunkInfo>>,
}

struct TermProgress {
    placed: PlacedTerm,
    done: u64,
    infos: Vec<ChunkInfo>,
}

/// Decodes the frames of one unit as they arrive, writes each chunk to
/// every term that uses it, and checks each term's range hash when its
/// last chunk is in. Frames outside the unit's chunks (a larger cached
/// range) are skipped undecoded.
pub(super) struct UnitDecoder {
    pub xorb: XorbHash,
    pub origin: String,
    pub want: ChunkRange,
    pub next_index: u32,
    terms: Vec<TermProgress>,
    next_term: usize,
    active: Vec<usize>,
    window: Window,
    sink: Arc<dyn Sink>,
    chunk: Vec<u8>,
    pub tee: Option<EntryWriter>,
    /// Every verified chunk of the unit and where it lives.
    pub located: Vec<(ChunkHash, ChunkLocation)>,
}

impl UnitDecoder {
    pub fn new(
        unit: &Unit,
        first_index: u32,
        origin: String,
        window: Window,
        sink: Arc<dyn Sink>,
    ) -> Self {
        Self {
            xorb: unit.xorb,
            origin,
            want: unit.range.chunks,
            next_index: first_index,
            terms: unit
                .terms
                .iter()
                .map(|p| TermProgress {
                    placed: *p,
                    done: 0,
                    infos: Vec::new(),
                })
                .collect(),
            next_term: 0,
            active: Vec::new(),
            window,
            sink,
            chunk: Vec::new(),
            tee: None,
            located: Vec::new(),
        }
    }

    pub fn corrupt(&self, reason: impl Into<String>) -> Error {
        Error::CorruptXorb {
            xorb: self.xorb,
            reason: reason.into(),
            origin: self.origin.clone(),
        }
    }

    /// Consumes whole frames; returns the window bytes written.
    /// Frames go to the cache entry (`tee`) in pieces right after they are
    /// decoded, while they are still in the CPU's cache: on a machine with
    /// little memory bandwidth, copying a cold 4 MiB batch costs more than
    /// decoding it.
    pub fn feed(&mut self, frames: &[u8]) -> Result<u64> {
        const TEE_PIECE: usize = 256 << 10;
        let mut written = 0;
        let mut teed = 0;
        let mut it = Frames::new(frames, self.next_index as usize);
        while let Some(frame) = it.next() {
            let frame = frame.map_err(|e| self.corrupt(e.to_string()))?;
            let k = self.next_index;
            self.next_index += 1;
            if k >= self.want.start && k < self.want.end {
                written += self.place(k, &frame)?;
            }
            if let Some(t) = &mut self.tee {
                let end = it.consumed();
                if end - teed >= TEE_PIECE {
                    t.write(&frames[teed..end]);
                    teed = end;
                }
            }
        }
        if let Some(t) = &mut self.tee {
            t.write(&frames[teed..]);
        }
        Ok(written)
    }

    /// Decodes chunk `k` and writes it to every term that uses it;
    /// returns the window bytes written.
    fn place(&mut self, k: u32, frame: &Frame<'_>) -> Result<u64> {
        let mut written = 0;
        self.chunk.clear();
        frame
            .decode_into(k as usize, &mut self.chunk)
            .map_err(|e| self.corrupt(e.to_string()))?;
        let info = ChunkInfo {
            hash: ChunkHash::of(&self.chunk),
            len: self.chunk.len() as u32,
        };
        while self
            .terms
            .get(self.next_term)
            .is_some_and(|t| t.placed.term.chunks.start == k)
        {
            self.active.push(self.next_term);
            self.next_term += 1;
        }
        for &i in &self.active {
            let t = &mut self.terms[i];
            let pos = t.placed.offset + t.done;
            written += self.window.put(&*self.sink, pos, &self.chunk)?;
            t.done += u64::from(info.len);
            t.infos.push(info);
            let term = t.placed.term;
            if term.chunks.end == k + 1
                && (t.done != term.len || RangeHash::from_chunks(&t.infos) != term.range_hash)
            {
                return Err(self.corrupt(format!(
                    "chunks {}..{} do not hash to the reconstruction's range hash",
                    term.chunks.start, term.chunks.end
                )));
            }
        }
        self.located.push((
            info.hash,
            ChunkLocation {
                xorb: self.xorb,
                index: k,
            },
        ));
        let terms = &self.terms;
        self.active
            .retain(|&i| terms[i].placed.term.chunks.end > k + 1);
        Ok(written)
    }

    /// Checks that every term is complete and hands back their chunks.
    pub fn finish(&mut self) -> Result<Vec<TermDone>> {
        if self.next_term < self.terms.len() || !self.active.is_empty() {
            return Err(self.corrupt(format!(
                "frames end at chunk {}, before the terms of chunks {}..{} are complete",
                self.next_index, self.want.start, self.want.end
            )));
        }
        Ok(self
            .terms
            .iter_mut()
            .map(|t| TermDone {
                placed: t.placed,
                chunks: Some(std::mem::take(&mut t.infos)),
            })
            .collect())
    }
}

/// Runs a decode step on a blocking thread.
pub(super) async fn feed(mut dec: UnitDecoder, bytes: Bytes) -> Result<(UnitDecoder, u64)> {
    tokio::task::spawn_blocking(move || dec.feed(&bytes).map(|n| (dec, n)))
        .await
        .expect("decoder does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use cas_protocol::compression::Compression;
    use cas_protocol::messages::{FetchRange, Reconstruction, ReconstructionTerm, XorbFetch};
    use cas_protocol::xorb::{whole_frames_len, EncodedChunk, XorbBuilder, XorbView};
    use cas_protocol::ByteRange;

    use crate::fetch::plan::plan;
    use crate::fetch::sink::MemSink;

    /// A xorb of `n` distinct chunks and its chunk infos.
    fn xorb(n: usize) -> (cas_protocol::xorb::BuiltXorb, Vec<Vec<u8>>) {
        let chunks: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; 1000 + i]).collect();
        let mut b = XorbBuilder::new();
        for c in &chunks {
            b.try_push(EncodedChunk::encode(c, Compression::default()).unwrap())
                .unwrap();
        }
        (b.finish().unwrap(), chunks)
    }

    fn term(x: &cas_protocol::xorb::BuiltXorb, s: u32, e: u32) -> ReconstructionTerm {
        let infos = &x.chunks[s as usize..e as usize];
        ReconstructionTerm {
            xorb: x.hash,
            chunks: ChunkRange { start: s, end: e },
            len: infos.iter().map(|c| u64::from(c.len)).sum(),
            range_hash: RangeHash::from_chunks(infos),
        }
    }

    fn frames(x: &cas_protocol::xorb::BuiltXorb, s: u32, e: u32) -> (FetchRange, Vec<u8>) {
        let v = XorbView::parse(&x.bytes).unwrap();
        let chunks = ChunkRange { start: s, end: e };
        let bytes = v.byte_range(chunks).unwrap();
        (
            FetchRange { chunks, bytes },
            x.bytes[bytes.start as usize..bytes.end as usize].to_vec(),
        )
    }

    /// Terms that reuse chunks (a repeated block) out of order, decoded
    /// from one range in small pieces, land at the right positions.
    #[test]
    fn decoder_places_repeated_and_out_of_order_terms() {
        let (x, chunks) = xorb(6);
        let terms = vec![term(&x, 3, 5), term(&x, 1, 4), term(&x, 3, 5)];
        let (fr, body) = frames(&x, 1, 5);
        let rec = Reconstruction {
            file: cas_protocol::FileHash::from_bytes([0; 32]),
            file_size: terms.iter().map(|t| t.len).sum(),
            range: ByteRange {
                start: 0,
                end: terms.iter().map(|t| t.len).sum(),
            },
            offset_into_first_term: 0,
            terms: terms.clone(),
            fetch: vec![XorbFetch {
                xorb: x.hash,
                url: "u".into(),
                ranges: vec![fr],
            }],
        };
        let units = plan(&rec).unwrap();
        assert_eq!(units.len(), 1);
        let sink = Arc::new(MemSink(Mutex::new(vec![0; rec.range.len() as usize])));
        let window = Window {
            skip: 0,
            len: rec.range.len(),
        };
        let mut dec = UnitDecoder::new(&units[0], 1, "test".into(), window, sink.clone());
        let mut fed = 0;
        let mut buf = Vec::new();
        for piece in body.chunks(700) {
            buf.extend_from_slice(piece);
            let n = whole_frames_len(&buf);
            fed += dec.feed(&buf[..n]).unwrap();
            buf.drain(..n);
        }
        dec.finish().unwrap();
        assert_eq!(fed, rec.range.len());
        let expected: Vec<u8> = [3, 4, 1, 2, 3, 3, 4]
            .iter()
            .flat_map(|&i| chunks[i].clone())
            .collect();
        assert_eq!(*sink.0.lock().unwrap(), expected);
    }

    #[test]
    fn decoder_rejects_a_wrong_range_hash_and_short_input() {
        let (x, _) = xorb(3);
        let mut t = term(&x, 0, 3);
        let unit = |t: ReconstructionTerm| Unit {
            xorb: x.hash,
            url: "u".into(),
            range: frames(&x, 0, 3).0,
            terms: vec![PlacedTerm { term: t, offset: 0 }],
        };
        let sink = Arc::new(MemSink(Mutex::new(vec![0; 10_000])));
        let window = Window {
            skip: 0,
            len: 10_000,
        };
        let body = frames(&x, 0, 3).1;
        let mut dec = UnitDecoder::new(&unit(t), 0, "t".into(), window, sink.clone());
        dec.feed(&body).unwrap();
        dec.finish().unwrap();
        t.range_hash = RangeHash::from_bytes([9; 32]);
        let mut dec = UnitDecoder::new(&unit(t), 0, "t".into(), window, sink.clone());
        let e = dec.feed(&body).unwrap_err();
        assert!(
            matches!(e, Error::CorruptXorb { xorb, .. } if xorb == x.hash),
            "{e}"
        );
        let t = term(&x, 0, 3);
        let mut dec = UnitDecoder::new(&unit(t), 0, "t".into(), window, sink.clone());
        let two = frames(&x, 0, 2).1;
        dec.feed(&two).unwrap();
        assert!(dec.finish().is_err());
        let mut flipped = body.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let mut dec = UnitDecoder::new(&unit(t), 0, "t".into(), window, sink);
        assert!(dec.feed(&flipped).is_err());
    }
}
