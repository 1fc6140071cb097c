//! Fetching: a reconstruction becomes a plan of units (one per xorb byte
//! range the server named), units run concurrently, every chunk is decoded
//! and every term checked against its range hash before it counts, and the
//! verified bytes go to a [`Sink`] at their positions.
//!
//! - [`plan`]: units, placed terms and the requested window;
//! - [`decode`]: one unit's frames to verified chunks at their places;
//! - [`sink`]: where the bytes go (a file, memory).

mod decode;
mod plan;
mod sink;

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use cas_protocol::messages::Reconstruction;
use cas_protocol::xorb::whole_frames_len;
use cas_protocol::{ByteRange, FileHash};
use futures_util::StreamExt;
use tokio::sync::Semaphore;

use crate::cache::{CacheEntry, ChunkCache, LocationLog};
use crate::error::{Error, Result};
use crate::progress::{Progress, Stage};
use crate::remote::Remote;

pub(crate) use decode::TermDone;
use decode::{feed, UnitDecoder};
use plan::plan;
pub(crate) use plan::{plan_batch, term_spans, PlacedTerm, Unit, Window};
pub(crate) use sink::{FileSink, MemSink, Sink};

/// Bytes handed to a decode step at once: large enough to amortise the
/// hop to a blocking thread, small enough to keep memory flat.
const DECODE_BATCH: usize = 4 << 20;
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
    /// Whether restored files' SHA-256 is computed and checked too
    /// ([`crate::FetchOptions::verify_sha256`]).
    pub verify_sha256: bool,
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
        unit_done: impl FnMut(Vec<TermDone>) -> Result<()>,
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
        self.run_units(units, sink, window, unit_done).await
    }

    /// Runs `units` concurrently into the `window` of `sink`, handing each
    /// verified unit's terms to `unit_done`.
    pub async fn run_units(
        &self,
        units: Vec<Unit>,
        sink: Arc<dyn Sink>,
        window: Window,
        mut unit_done: impl FnMut(Vec<TermDone>) -> Result<()>,
    ) -> Result<Transfer> {
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
            return self
                .reported(self.network(unit, sink, window, None).await)
                .await;
        };
        if let Some(t) = self.cached(cache, unit, &sink, window).await? {
            return Ok(t);
        }
        if !cache.is_writable() {
            return self
                .reported(self.network(unit, sink, window, None).await)
                .await;
        }
        let c = cache.clone();
        let (xorb, chunks) = (unit.xorb, unit.range.chunks);
        let lock = match tokio::task::spawn_blocking(move || c.lock(&xorb, chunks))
            .await
            .expect("lock does not panic")
        {
            Ok(lock) => lock,
            Err(e) => {
                cache.write_failed(&e);
                return self
                    .reported(self.network(unit, sink, window, None).await)
                    .await;
            }
        };
        if let Some(t) = self.cached(cache, unit, &sink, window).await? {
            lock.release();
            return Ok(t);
        }
        let t = self
            .reported(self.network(unit, sink, window, Some(cache)).await)
            .await?;
        lock.release();
        Ok(t)
    }

    /// Bytes from the network that failed verification are reported to the
    /// server, which checks its copy so the next upload can repair it.
    async fn reported<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(Error::CorruptXorb { xorb, .. }) = &r {
            match self.remote.report_corrupt(*xorb).await {
                Ok(status) => tracing::warn!("reported xorb {xorb} to the server: {status}"),
                Err(e) => tracing::debug!("could not report xorb {xorb}: {e}"),
            }
        }
        r
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
            // Another process evicted it between lookup and open, or it
            // cannot be read: a miss, never a failed fetch.
            Err(Error::Io {
                ref path,
                ref source,
            }) if *path == entry.path => {
                if source.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot read cache entry {}: {source}", path.display());
                }
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
                dec.tee = cache.and_then(|c| c.writer(&unit.xorb, unit.range.chunks));
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
                    .map_err(|e| remote.body_failed(&what, &unit.url, &e))?
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
                if let Some(w) = dec.tee.take() {
                    w.commit();
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

    /// Reads bytes `range` of a file into memory. The buffer is sized from
    /// the request, once the answer is known to be for exactly that range,
    /// and a size that does not fit is an error rather than an abort.
    pub async fn read(&self, file: FileHash, range: ByteRange) -> Result<Vec<u8>> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let rec = self.remote.reconstruct(file, range).await?;
        let too_big = || Error::Input {
            path: file.to_string().into(),
            reason: format!("{} bytes do not fit in memory", range.len()),
        };
        let len = usize::try_from(range.len()).map_err(|_| too_big())?;
        let mut buf = Vec::new();
        buf.try_reserve_exact(len).map_err(|_| too_big())?;
        buf.resize(len, 0);
        let sink = Arc::new(MemSink(Mutex::new(buf)));
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
