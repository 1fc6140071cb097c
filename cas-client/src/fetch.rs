//! Fetching: a reconstruction becomes a plan of units (one per xorb byte
//! range the server named), units run concurrently, every chunk is decoded
//! and every term checked against its range hash before it counts, and the
//! verified bytes go to a [`Sink`] at their positions.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use cas_protocol::messages::{ChunkLocation, FetchRange, Reconstruction, ReconstructionTerm};
use cas_protocol::xorb::{whole_frames_len, Frames, MAX_XORB_SERIALIZED};
use cas_protocol::{ByteRange, ChunkHash, ChunkInfo, ChunkRange, RangeHash, XorbHash};
use futures_util::StreamExt;
use tokio::sync::Semaphore;

use crate::cache::{CacheEntry, ChunkCache, EntryWriter, LocationLog};
use crate::error::{Error, Result};
use crate::progress::{Progress, Stage};
use crate::remote::Remote;

/// Bytes handed to a decode step at once: large enough to amortise the
/// hop to a blocking thread, small enough to keep memory flat.
const DECODE_BATCH: usize = 4 << 20;

/// Where verified bytes go. Positions are relative to the start of the
/// requested range.
pub(crate) trait Sink: Send + Sync {
    fn write_at(&self, pos: u64, data: &[u8]) -> Result<()>;
}

/// Positioned writes into a file (the `.part` of a fetch).
pub(crate) struct FileSink {
    pub file: File,
    pub path: PathBuf,
}

impl Sink for FileSink {
    fn write_at(&self, pos: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, pos)
            .map_err(Error::io(&self.path))
    }
}

/// A range read into memory.
pub(crate) struct MemSink(pub Mutex<Vec<u8>>);

impl Sink for MemSink {
    fn write_at(&self, pos: u64, data: &[u8]) -> Result<()> {
        let mut v = self.0.lock().expect("not poisoned");
        let pos = pos as usize;
        v[pos..pos + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// The part of the concatenated terms that was asked for.
#[derive(Debug, Clone, Copy)]
struct Window {
    skip: u64,
    len: u64,
}

impl Window {
    /// Writes the part of `data` (at stream position `pos`) inside the
    /// window; returns how many bytes that was.
    fn put(&self, sink: &dyn Sink, pos: u64, data: &[u8]) -> Result<u64> {
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

/// Groups the terms of `rec` by the fetch range that serves them.
pub(crate) fn plan(rec: &Reconstruction) -> Result<Vec<Unit>> {
    let mut units: BTreeMap<(XorbHash, u32, u64), Unit> = BTreeMap::new();
    let mut offset = 0u64;
    for t in &rec.terms {
        let (f, r) = rec.fetch_range(t).ok_or_else(|| Error::BadAnswer {
            what: format!("reconstruction of {}", rec.file),
            reason: format!("no fetch range for chunks of xorb {}", t.xorb),
        })?;
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
struct UnitDecoder {
    xorb: XorbHash,
    origin: String,
    want: ChunkRange,
    next_index: u32,
    terms: Vec<TermProgress>,
    next_term: usize,
    active: Vec<usize>,
    window: Window,
    sink: Arc<dyn Sink>,
    chunk: Vec<u8>,
    tee: Option<EntryWriter>,
    /// Every verified chunk of the unit and where it lives.
    located: Vec<(ChunkHash, ChunkLocation)>,
}

impl UnitDecoder {
    fn new(
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

    fn corrupt(&self, reason: impl Into<String>) -> Error {
        Error::CorruptXorb {
            xorb: self.xorb,
            reason: reason.into(),
            origin: self.origin.clone(),
        }
    }

    /// Consumes whole frames; returns the window bytes written.
    fn feed(&mut self, frames: &[u8]) -> Result<u64> {
        if let Some(t) = &mut self.tee {
            t.write(frames)?;
        }
        let mut written = 0;
        for frame in Frames::new(frames, self.next_index as usize) {
            let frame = frame.map_err(|e| self.corrupt(e.to_string()))?;
            let k = self.next_index;
            self.next_index += 1;
            if k < self.want.start || k >= self.want.end {
                continue;
            }
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
        }
        Ok(written)
    }

    /// Checks that every term is complete and hands back their chunks.
    fn finish(&mut self) -> Result<Vec<TermDone>> {
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
async fn feed(mut dec: UnitDecoder, bytes: Bytes) -> Result<(UnitDecoder, u64)> {
    tokio::task::spawn_blocking(move || dec.feed(&bytes).map(|n| (dec, n)))
        .await
        .expect("decoder does not panic")
}

/// What a fetch moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Transfer {
    /// Xorb bytes received from the network.
    pub network_bytes: u64,
    /// Xorb bytes read from the local cache instead.
    pub cache_bytes: u64,
}

impl std::ops::AddAssign for Transfer {
    fn add_assign(&mut self, o: Self) {
        self.network_bytes += o.network_bytes;
        self.cache_bytes += o.cache_bytes;
    }
}

/// Runs plans: shared by file fetches, range reads and the reader.
#[derive(Clone)]
pub(crate) struct Fetcher {
    pub remote: Remote,
    pub cache: Option<ChunkCache>,
    /// Where verified chunks live on this server, for later uploads.
    pub log: Option<LocationLog>,
    /// Bounds concurrent range GETs across everything this client does.
    pub connections: Arc<Semaphore>,
    pub progress: Arc<dyn Progress>,
}

impl Fetcher {
    /// Reads the requested range of `rec` into `sink`, skipping units whose
    /// terms are all in `done` (term `(start, end)` positions in the
    /// concatenation), and hands each verified unit's terms to `unit_done`.
    pub async fn run(
        &self,
        rec: &Reconstruction,
        sink: Arc<dyn Sink>,
        done: &HashSet<(u64, u64)>,
        mut unit_done: impl FnMut(Vec<TermDone>) -> Result<()>,
    ) -> Result<Transfer> {
        let window = Window {
            skip: rec.offset_into_first_term,
            len: rec.range.len(),
        };
        let units: Vec<Unit> = plan(rec)?
            .into_iter()
            .filter(|u| {
                !u.terms
                    .iter()
                    .all(|p| done.contains(&(p.offset, p.offset + p.term.len)))
            })
            .collect();
        let width = self.connections.available_permits().max(1) * 2;
        let mut runs = futures_util::stream::iter(units)
            .map(|u| {
                let sink = sink.clone();
                async move { self.unit(&u, sink, window).await }
            })
            .buffer_unordered(width);
        let mut total = Transfer::default();
        while let Some(r) = runs.next().await {
            let (t, terms) = r?;
            unit_done(terms)?;
            total += t;
        }
        Ok(total)
    }

    /// One unit: from the cache when it holds the range (re-checked under
    /// the xorb's lock, so a concurrent fetch of the same bytes waits and
    /// then reads them locally), else from the network.
    async fn unit(
        &self,
        unit: &Unit,
        sink: Arc<dyn Sink>,
        window: Window,
    ) -> Result<(Transfer, Vec<TermDone>)> {
        let Some(cache) = &self.cache else {
            return self.network(unit, sink, window, None).await;
        };
        if let Some(t) = self.cached(cache, unit, &sink, window).await? {
            return Ok(t);
        }
        let c = cache.clone();
        let (xorb, chunks) = (unit.xorb, unit.range.chunks);
        let lock = tokio::task::spawn_blocking(move || c.lock(&xorb, chunks))
            .await
            .expect("lock does not panic")?;
        if let Some(t) = self.cached(cache, unit, &sink, window).await? {
            lock.release();
            return Ok(t);
        }
        let t = self.network(unit, sink, window, Some(cache)).await?;
        lock.release();
        Ok(t)
    }

    async fn cached(
        &self,
        cache: &ChunkCache,
        unit: &Unit,
        sink: &Arc<dyn Sink>,
        window: Window,
    ) -> Result<Option<(Transfer, Vec<TermDone>)>> {
        let Some(entry) = cache.lookup(&unit.xorb, unit.range.chunks) else {
            return Ok(None);
        };
        let dec = UnitDecoder::new(
            unit,
            entry.chunks.start,
            format!("cache entry {}", entry.path.display()),
            window,
            sink.clone(),
        );
        let progress = self.progress.clone();
        let e = entry.clone();
        let r = tokio::task::spawn_blocking(move || decode_entry(dec, &e, &*progress))
            .await
            .expect("decoder does not panic");
        match r {
            Ok((bytes, terms)) => Ok(Some((
                Transfer {
                    network_bytes: 0,
                    cache_bytes: bytes,
                },
                terms,
            ))),
            Err(e @ Error::CorruptXorb { .. }) => {
                tracing::warn!("{e}; dropping it and fetching again");
                cache.remove(&unit.xorb, &entry);
                Ok(None)
            }
            // Another process evicted it between lookup and open.
            Err(Error::Io {
                ref path,
                ref source,
            }) if *path == entry.path && source.kind() == std::io::ErrorKind::NotFound => {
                cache.forget(&unit.xorb, entry.chunks);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Range GET of the unit, decoded while it streams (and copied into a
    /// new cache entry), retried from the start on transient failures.
    async fn network(
        &self,
        unit: &Unit,
        sink: Arc<dyn Sink>,
        window: Window,
        cache: Option<&ChunkCache>,
    ) -> Result<(Transfer, Vec<TermDone>)> {
        let remote = &self.remote;
        remote
            .retry()
            .run(|| async {
                let _permit = self.connections.acquire().await.expect("never closed");
                let mut dec = UnitDecoder::new(
                    unit,
                    unit.range.chunks.start,
                    unit.url.clone(),
                    window,
                    sink.clone(),
                );
                if let Some(c) = cache {
                    dec.tee = Some(c.writer(&unit.xorb, unit.range.chunks)?);
                }
                let mut resp = remote
                    .get_range(unit.xorb, &unit.url, unit.range.bytes)
                    .await?;
                let expect = unit.range.bytes.len();
                let mut received = 0u64;
                let mut buf = BytesMut::new();
                let what = format!("read of xorb {}", unit.xorb);
                while let Some(piece) = resp
                    .chunk()
                    .await
                    .map_err(|e| crate::remote::transport(&what, &unit.url, &e))?
                {
                    received += piece.len() as u64;
                    if received > expect {
                        return Err(dec.corrupt(format!("more than the {expect} bytes requested")));
                    }
                    buf.extend_from_slice(&piece);
                    if buf.len() >= DECODE_BATCH {
                        let n = whole_frames_len(&buf);
                        let n_written;
                        (dec, n_written) = feed(dec, buf.split_to(n).freeze()).await?;
                        self.progress.advance(Stage::Download, n_written);
                    }
                }
                if received < expect {
                    return Err(Error::Transport {
                        what,
                        url: unit.url.clone(),
                        reason: format!("body ended after {received} of {expect} bytes"),
                        transient: true,
                    });
                }
                let n_written;
                (dec, n_written) = feed(dec, buf.freeze()).await?;
                self.progress.advance(Stage::Download, n_written);
                let terms = dec.finish()?;
                if let (Some(c), Some(w)) = (cache, dec.tee.take()) {
                    w.commit(c)?;
                }
                if let Some(log) = &self.log {
                    log.record(&dec.located);
                }
                let t = Transfer {
                    network_bytes: received,
                    cache_bytes: 0,
                };
                Ok((t, terms))
            })
            .await
    }

    /// Reads `range` of a file (all of it without one) into memory.
    pub async fn read(
        &self,
        file: cas_protocol::FileHash,
        range: Option<ByteRange>,
    ) -> Result<Vec<u8>> {
        let rec = self.remote.reconstruct(file, range).await?;
        let len = usize::try_from(rec.range.len()).map_err(|_| Error::BadAnswer {
            what: format!("read of {file}"),
            reason: "range larger than memory".into(),
        })?;
        let sink = Arc::new(MemSink(Mutex::new(vec![0; len])));
        self.run(&rec, sink.clone(), &HashSet::new(), |_| Ok(()))
            .await?;
        let bytes = std::mem::take(&mut *sink.0.lock().expect("not poisoned"));
        Ok(bytes)
    }
}

/// Streams a cache entry through a decoder; returns the entry's length and
/// the verified terms.
fn decode_entry(
    mut dec: UnitDecoder,
    entry: &CacheEntry,
    progress: &dyn Progress,
) -> Result<(u64, Vec<TermDone>)> {
    let mut f = File::open(&entry.path).map_err(Error::io(&entry.path))?;
    let mut buf = Vec::with_capacity(DECODE_BATCH);
    let mut total = 0;
    loop {
        let start = buf.len();
        buf.resize(start + DECODE_BATCH, 0);
        let n = f.read(&mut buf[start..]).map_err(Error::io(&entry.path))?;
        buf.truncate(start + n);
        total += n as u64;
        let whole = if n == 0 {
            buf.len()
        } else {
            whole_frames_len(&buf)
        };
        progress.advance(Stage::Download, dec.feed(&buf[..whole])?);
        buf.drain(..whole);
        if n == 0 || dec.next_index >= dec.want.end {
            break;
        }
    }
    Ok((total, dec.finish()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cas_protocol::compression::Compression;
    use cas_protocol::messages::XorbFetch;
    use cas_protocol::xorb::{EncodedChunk, XorbBuilder, XorbView};

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

    #[test]
    fn window_clips_to_the_requested_range() {
        let sink = MemSink(Mutex::new(vec![0; 4]));
        let w = Window { skip: 3, len: 4 };
        assert_eq!(w.put(&sink, 0, b"abcde").unwrap(), 2);
        assert_eq!(w.put(&sink, 5, b"fgh").unwrap(), 2);
        assert_eq!(w.put(&sink, 8, b"ij").unwrap(), 0);
        assert_eq!(*sink.0.lock().unwrap(), b"defg");
    }
}
