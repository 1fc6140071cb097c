//! Upload: a pipeline of bounded stages so memory stays flat and both
//! cores stay busy whatever the input size.
//!
//! 1. scan: walk the inputs (directories become trees), refuse what cannot
//!    be uploaded before anything is sent;
//! 2. chunker thread: read 16 MiB segments, chunk and BLAKE3 them across
//!    cores while SHA-256 runs beside, group pieces of many files into
//!    batches (so 20,000 small files make a few dedup queries, not 20,000);
//! 3. planner thread: per batch one dedup query for chunks not seen in this
//!    upload, compress the new chunks in parallel, pack them into xorbs,
//!    build each file's terms;
//! 4. uploader (async): PUT xorbs concurrently, retried; a xorb is only
//!    built when an upload slot is free, which bounds memory;
//! 5. commit: shards of recipes once every xorb is stored, so no file is
//!    ever visible with missing data.
//!
//! A [`Source`] may ask for checkpoints of a file (a `mirror` of a large
//! one): each piece's end is a cut point with the SHA-256 state after it,
//! reported once every xorb its chunks are in is stored (such a file's
//! xorbs are shipped per batch, not filled); and may start a file after
//! one, its earlier chunks passing through without bytes.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use cas_protocol::compression::Compression;
use cas_protocol::messages::ChunkLocation;
use cas_protocol::shard::{FileRecipe, Shard, Term, XorbChunkTable};
use cas_protocol::tree::{check_path, Tree, TreeEntry};
use cas_protocol::xorb::{BuiltXorb, EncodedChunk, XorbBuilder};
use cas_protocol::{
    ChunkHash, ChunkInfo, ChunkRange, FileHash, Kind, Message, Sha256, Sha256Hasher, XorbHash,
};
use rayon::prelude::*;
use serde::Serialize;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::cache::LocationLog;
use crate::digest::{digest_stream, Buffers, Checkpoint, HashOptions};
use crate::error::{Error, Result};
use crate::progress::{Progress, Stage};
use crate::remote::Remote;
use crate::stamp::Stamp;

/// A batch closes at this many bytes or chunks.
const BATCH_BYTES: usize = 16 << 20;
const BATCH_CHUNKS: usize = 4096;
/// Entries of the in-upload chunk map before it is cleared (~80 MiB);
/// later repeats are then found by the server's dedup answer instead.
const MAX_KNOWN: usize = 1 << 20;
/// Recipes and chunk tables per shard, by estimated encoded size.
const SHARD_BUDGET: usize = 32 << 20;

/// One named thing given to `upload`.
#[derive(Debug, Clone, Serialize)]
pub struct UploadedRoot {
    pub path: PathBuf,
    pub hash: FileHash,
    /// Whether `hash` names a tree (the path was a directory).
    pub tree: bool,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct UploadedFile {
    pub path: PathBuf,
    pub hash: FileHash,
    pub sha256: Sha256,
    pub size: u64,
}

/// Something inside an uploaded directory that its tree cannot hold.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: &'static str,
}

/// What an upload did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UploadReport {
    pub roots: Vec<UploadedRoot>,
    pub files: Vec<UploadedFile>,
    /// Symlinks, special files and empty directories inside directories:
    /// trees hold regular files only.
    pub skipped: Vec<Skipped>,
    /// Input bytes (tree listings included).
    pub bytes: u64,
    pub chunks: u64,
    /// Distinct chunks found in the local location log (no server query).
    pub cache_chunks: u64,
    /// Chunks and bytes the server did not have and this upload sent.
    pub new_chunks: u64,
    pub new_bytes: u64,
    /// Xorb bytes sent (after compression) and xorbs PUT.
    pub sent_bytes: u64,
    pub xorbs: u64,
    pub seconds: f64,
}

impl UploadReport {
    /// Share of the input that did not need sending.
    pub fn dedup_ratio(&self) -> f64 {
        ratio(self.bytes - self.new_bytes, self.bytes)
    }

    /// Bytes sent per new byte (below 1 when compression paid).
    pub fn compression_ratio(&self) -> f64 {
        ratio(self.sent_bytes, self.new_bytes)
    }

    pub fn throughput(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-9)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// A file to read: a regular file, or (see [`Source`]) bytes arriving
/// from elsewhere under this name.
pub(crate) struct Input {
    pub path: PathBuf,
    pub size: u64,
    /// As scanned: reading must not see it change.
    stamp: Stamp,
    /// The server has it already: named by this hash, never read.
    stored: Option<FileHash>,
}

enum RootKind {
    File(usize),
    /// Tree entries: relative path, mode, input index.
    Dir(Vec<(String, u32, usize)>),
}

struct Root {
    path: PathBuf,
    kind: RootKind,
}

pub(crate) struct Scan {
    inputs: Vec<Input>,
    roots: Vec<Root>,
    skipped: Vec<Skipped>,
}

/// A file of a [`Scan::listing`]: its path in the tree and size, and its
/// hash when the server already stores it (it is then not read).
pub(crate) struct Listed {
    pub path: String,
    pub size: u64,
    pub stored: Option<FileHash>,
}

impl Scan {
    /// Files that are not on disk (their bytes come from a [`Source`]),
    /// read in this order; with `tree`, one tree of all of them is the
    /// root (a listing of stored files only uploads that tree).
    pub(crate) fn listing(files: Vec<Listed>, tree: bool) -> Self {
        let mut inputs = Vec::with_capacity(files.len());
        let mut entries = Vec::with_capacity(files.len());
        for (i, f) in files.into_iter().enumerate() {
            inputs.push(Input {
                path: PathBuf::from(&f.path),
                size: f.size,
                stamp: Stamp::default(),
                stored: f.stored,
            });
            entries.push((f.path, 0o644, i));
        }
        let roots = if tree {
            vec![Root {
                path: PathBuf::from("."),
                kind: RootKind::Dir(entries),
            }]
        } else {
            Vec::new()
        };
        Self {
            inputs,
            roots,
            skipped: Vec::new(),
        }
    }
}

/// Where the chunker gets the bytes of each input, in order, and what it
/// checks once an input was read whole, before the planner sees its end
/// (a refusal stops the upload before anything is committed).
pub(crate) trait Source: Send + Sync + 'static {
    type Reader<'a>: Read
    where
        Self: 'a;
    fn open(&self, i: usize, input: &Input) -> Result<Self::Reader<'_>>;
    fn check(
        &self,
        i: usize,
        input: &Input,
        reader: Self::Reader<'_>,
        sha256: &Sha256,
    ) -> Result<()>;
    /// Where reading input `i` starts: at its first byte (`None`), or
    /// after a checkpoint of an earlier run whose chunks the server stores
    /// ([`Source::open`] then gives the bytes after it).
    fn resume(&self, _i: usize) -> Option<&Checkpoint> {
        None
    }
    /// Whether input `i` reports its checkpoints to [`Source::stored`].
    fn checkpoints(&self, _i: usize) -> bool {
        false
    }
    /// Every chunk of input `i` before `at` is stored on the server
    /// (`at.chunks` are those since the previous checkpoint, or since where
    /// reading started): a point a later run may resume from. Called in
    /// order, from the upload's threads.
    fn stored(&self, _i: usize, _at: &Checkpoint) {}
}

/// The regular files a scan found, each checked unchanged since the scan.
pub(crate) struct Files;

impl Source for Files {
    type Reader<'a> = File;

    fn open(&self, _: usize, input: &Input) -> Result<File> {
        File::open(&input.path).map_err(Error::io(&input.path))
    }

    fn check(&self, _: usize, input: &Input, f: File, _: &Sha256) -> Result<()> {
        let path = &input.path;
        let open = f.metadata().map_err(Error::io(path))?;
        let named = fs::metadata(path).map_err(Error::io(path))?;
        if Stamp::of(&open) != input.stamp || Stamp::of(&named) != input.stamp {
            return Err(changed(
                path,
                "its size, times or inode differ from when the upload started".into(),
            ));
        }
        Ok(())
    }
}

/// How the paths given to an upload become its roots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One root per path: a file, or a directory as a tree.
    PerPath,
    /// One tree of everything (what a repository commit names): each
    /// directory's contents at the tree's root, each file under its own
    /// name. Paths that would land on the same name are refused.
    Merged,
}

/// Walks the inputs; every problem (missing path, unreadable directory,
/// a name that is not UTF-8 or breaks the tree rules, two inputs that
/// would land on one name of a merged tree) stops the upload here, before
/// anything is sent.
fn scan(paths: &[PathBuf], layout: Layout) -> Result<Scan> {
    let mut s = Scan {
        inputs: Vec::new(),
        roots: Vec::new(),
        skipped: Vec::new(),
    };
    let mut merged = Vec::new();
    for path in paths {
        let meta = fs::metadata(path).map_err(Error::io(path))?;
        let kind = if meta.is_dir() {
            let mut entries = Vec::new();
            walk(path, "", &mut s, &mut entries)?;
            RootKind::Dir(entries)
        } else if meta.is_file() {
            s.inputs.push(Input {
                path: path.clone(),
                size: meta.len(),
                stamp: Stamp::of(&meta),
                stored: None,
            });
            RootKind::File(s.inputs.len() - 1)
        } else {
            return Err(Error::Input {
                path: path.clone(),
                reason: "not a regular file or directory".into(),
            });
        };
        match (layout, kind) {
            (Layout::PerPath, kind) => s.roots.push(Root {
                path: path.clone(),
                kind,
            }),
            (Layout::Merged, RootKind::Dir(entries)) => merged.extend(entries),
            (Layout::Merged, RootKind::File(i)) => {
                let name =
                    path.file_name()
                        .and_then(|n| n.to_str())
                        .ok_or_else(|| Error::Input {
                            path: path.clone(),
                            reason: "name is not UTF-8; trees store UTF-8 paths".into(),
                        })?;
                check_path(name).map_err(|e| Error::Input {
                    path: path.clone(),
                    reason: format!("cannot be stored in a tree: {e}"),
                })?;
                merged.push((name.to_owned(), meta.permissions().mode() & 0o777, i));
            }
        }
    }
    if layout == Layout::Merged {
        check_merged(&s, &mut merged)?;
        s.roots.push(Root {
            path: PathBuf::from("."),
            kind: RootKind::Dir(merged),
        });
    }
    Ok(s)
}

/// Refuses a merged tree in which two inputs land on one name, or one
/// input's file is another's directory.
fn check_merged(s: &Scan, entries: &mut [(String, u32, usize)]) -> Result<()> {
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::Input {
            path: s.inputs[w[1].2].path.clone(),
            reason: format!(
                "lands on {:?}, as {} does: the paths of a repository upload share one tree",
                w[1].0,
                s.inputs[w[0].2].path.display()
            ),
        });
    }
    let listing = Tree {
        entries: entries
            .iter()
            .map(|(path, mode, _)| TreeEntry {
                path: path.clone(),
                mode: *mode,
                size: 0,
                file: FileHash::default(),
            })
            .collect(),
    };
    listing.validate().map_err(|reason| Error::Input {
        path: PathBuf::from("."),
        reason: format!("the paths of a repository upload share one tree, and in it {reason}"),
    })
}

fn walk(dir: &Path, rel: &str, s: &mut Scan, out: &mut Vec<(String, u32, usize)>) -> Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(Error::io(dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .map_err(Error::io(dir))?;
    names.sort();
    if names.is_empty() && !rel.is_empty() {
        s.skipped.push(Skipped {
            path: dir.to_owned(),
            reason: "empty directory; trees hold regular files only",
        });
    }
    for name in names {
        let path = dir.join(&name);
        let name = name.to_str().ok_or_else(|| Error::Input {
            path: path.clone(),
            reason: "name is not UTF-8; trees store UTF-8 paths".into(),
        })?;
        let rel = if rel.is_empty() {
            name.to_owned()
        } else {
            format!("{rel}/{name}")
        };
        let meta = fs::symlink_metadata(&path).map_err(Error::io(&path))?;
        if meta.is_dir() {
            walk(&path, &rel, s, out)?;
        } else if meta.is_file() {
            check_path(&rel).map_err(|e| Error::Input {
                path: path.clone(),
                reason: format!("cannot be stored in a tree: {e}"),
            })?;
            s.inputs.push(Input {
                path: path.clone(),
                size: meta.len(),
                stamp: Stamp::of(&meta),
                stored: None,
            });
            out.push((rel, meta.permissions().mode() & 0o777, s.inputs.len() - 1));
        } else {
            let reason = if meta.file_type().is_symlink() {
                "symlink"
            } else {
                "not a regular file"
            };
            s.skipped.push(Skipped { path, reason });
        }
    }
    Ok(())
}

/// What the chunker hands the planner.
enum Item {
    /// Chunks of a file, with their bytes; without (`data` empty) for the
    /// chunks before a resumed file's checkpoint, which the server stores.
    Piece {
        file: usize,
        data: Bytes,
        chunks: Vec<ChunkInfo>,
        /// The SHA-256 state after the piece, for a file whose source
        /// takes checkpoints.
        sha: Option<Sha256Hasher>,
    },
    End {
        file: usize,
        end: FileEnd,
    },
}

/// A file's identities, known once all of it was read.
#[derive(Debug, Clone, Copy)]
struct FileEnd {
    hash: FileHash,
    sha256: Sha256,
    size: u64,
    kind: Kind,
}

#[derive(Default)]
struct Batch {
    items: Vec<Item>,
    bytes: usize,
    chunks: usize,
}

/// Chunks and hashes one source (after `from`, when given), handing its
/// pieces to the planner (with their SHA-256 states, with `checkpoints`);
/// returns the [`Item::End`] that completes it.
#[allow(clippy::too_many_arguments)]
fn chunk_source(
    file: usize,
    path: &Path,
    src: &mut dyn Read,
    expected: u64,
    kind: Kind,
    (from, checkpoints): (Option<&Checkpoint>, bool),
    buffers: &mut Buffers,
    progress: &dyn Progress,
    emit: &mut dyn FnMut(Item) -> Result<()>,
) -> Result<Item> {
    let sha256 = HashOptions { sha256: true };
    let d = digest_stream(
        path,
        src,
        expected,
        kind,
        sha256,
        from,
        buffers,
        progress,
        &mut |data, chunks, sha| {
            emit(Item::Piece {
                file,
                data,
                chunks,
                sha: sha.filter(|_| checkpoints).cloned(),
            })
        },
    )?;
    if d.size != expected {
        return Err(changed(
            path,
            format!("{expected} bytes before, {} now", d.size),
        ));
    }
    Ok(Item::End {
        file,
        end: FileEnd {
            hash: d.file_hash,
            sha256: d.sha256.expect("SHA-256 was asked for"),
            size: d.size,
            kind,
        },
    })
}

/// A file that changed while the upload read it: what was read may mix
/// two versions, so the upload stops before it commits anything.
fn changed(path: &Path, how: String) -> Error {
    Error::Input {
        path: path.to_owned(),
        reason: format!("changed while being read ({how}); nothing was committed"),
    }
}

/// Reads one input from `source`, which checks it before its end goes to
/// the planner.
fn read_input<S: Source>(
    source: &S,
    i: usize,
    input: &Input,
    buffers: &mut Buffers,
    progress: &dyn Progress,
    emit: &mut dyn FnMut(Item) -> Result<()>,
) -> Result<()> {
    let from = source.resume(i);
    if let Some(f) = from {
        // The chunks before the checkpoint, without bytes: the planner
        // finds them stored.
        for chunks in f.chunks.chunks(BATCH_CHUNKS) {
            emit(Item::Piece {
                file: i,
                data: Bytes::new(),
                chunks: chunks.to_vec(),
                sha: None,
            })?;
        }
    }
    let mut reader = source.open(i, input)?;
    let end = chunk_source(
        i,
        &input.path,
        &mut reader,
        input.size,
        Kind::File,
        (from, source.checkpoints(i)),
        buffers,
        progress,
        emit,
    )?;
    if let Item::End { end: e, .. } = &end {
        source.check(i, input, reader, &e.sha256)?;
    }
    emit(end)
}

/// Stage 2: reads every input and then the tree listings, sending batches.
fn chunker<S: Source>(
    scan: &Scan,
    source: &S,
    progress: &dyn Progress,
    tx: &std::sync::mpsc::SyncSender<Result<Batch>>,
) -> Result<()> {
    let mut batch = Batch::default();
    let mut buffers = Buffers::default();
    let mut hashes: Vec<Option<FileHash>> = vec![None; scan.inputs.len()];
    let send = |batch: &mut Batch| {
        tx.send(Ok(std::mem::take(batch)))
            .map_err(|_| Error::Cancelled)
    };
    let emit = |item: Item, batch: &mut Batch, hashes: &mut Vec<Option<FileHash>>| {
        match &item {
            Item::Piece { data, chunks, .. } => {
                batch.bytes += data.len();
                batch.chunks += chunks.len();
            }
            Item::End { file, end } => {
                if let Some(h) = hashes.get_mut(*file) {
                    *h = Some(end.hash);
                }
            }
        }
        batch.items.push(item);
        if batch.bytes >= BATCH_BYTES || batch.chunks >= BATCH_CHUNKS {
            send(batch)?;
        }
        Ok(())
    };
    for (i, input) in scan.inputs.iter().enumerate() {
        if input.stored.is_some() {
            hashes[i] = input.stored;
            continue;
        }
        read_input(source, i, input, &mut buffers, progress, &mut |item| {
            emit(item, &mut batch, &mut hashes)
        })?;
    }
    for (k, root) in scan.roots.iter().enumerate() {
        if let RootKind::Dir(entries) = &root.kind {
            let tree = Tree::new(
                entries
                    .iter()
                    .map(|(path, mode, i)| TreeEntry {
                        path: path.clone(),
                        mode: *mode,
                        size: scan.inputs[*i].size,
                        file: hashes[*i].expect("every input was read"),
                    })
                    .collect(),
            );
            let bytes = tree.to_bytes();
            let end = chunk_source(
                scan.inputs.len() + k,
                &root.path,
                &mut &bytes[..],
                bytes.len() as u64,
                Kind::Tree,
                (None, false),
                &mut buffers,
                progress,
                &mut |item| emit(item, &mut batch, &mut hashes),
            )?;
            emit(end, &mut batch, &mut hashes)?;
        }
    }
    if !batch.items.is_empty() {
        send(&mut batch)?;
    }
    Ok(())
}

/// Where a chunk is: a stored xorb, or the n-th xorb this upload builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XorbRef {
    Stored(XorbHash),
    Built(u32),
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    xorb: XorbRef,
    index: u32,
}

#[derive(Debug, Clone, Copy)]
struct RefTerm {
    xorb: XorbRef,
    chunks: ChunkRange,
    len: u64,
}

#[derive(Default)]
struct FilePlan {
    terms: Vec<RefTerm>,
    end: Option<FileEnd>,
    /// The last xorb of this upload that the chunks so far are in.
    needs: Option<u32>,
}

impl FilePlan {
    fn push(&mut self, loc: Loc, len: u32) {
        if let XorbRef::Built(n) = loc.xorb {
            self.needs = self.needs.max(Some(n));
        }
        match self.terms.last_mut() {
            Some(t) if t.xorb == loc.xorb && t.chunks.end == loc.index => {
                t.chunks.end += 1;
                t.len += u64::from(len);
            }
            _ => self.terms.push(RefTerm {
                xorb: loc.xorb,
                chunks: ChunkRange {
                    start: loc.index,
                    end: loc.index + 1,
                },
                len: u64::from(len),
            }),
        }
    }
}

fn plan_of(files: &mut Vec<FilePlan>, i: usize) -> &mut FilePlan {
    if files.len() <= i {
        files.resize_with(i + 1, FilePlan::default);
    }
    &mut files[i]
}

/// A xorb on its way to the server, with the upload slot it holds.
struct Outgoing {
    xorb: BuiltXorb,
    permit: OwnedSemaphorePermit,
}

/// What the planner leaves for the commit.
#[derive(Default)]
struct Plan {
    built: Vec<XorbChunkTable>,
    files: Vec<FilePlan>,
    chunks: u64,
    cache_chunks: u64,
    new_chunks: u64,
    new_bytes: u64,
}

/// Checkpoints of files (see [`Source::checkpoints`]) waiting for the
/// xorbs their chunks are in: each goes to [`Source::stored`] once every
/// xorb of this upload up to the last one its file needs so far is stored.
struct Checkpoints {
    waiting: std::sync::Mutex<Waiting>,
    report: Box<Report>,
}

/// Where [`Checkpoints`] reports: [`Source::stored`].
type Report = dyn Fn(usize, &Checkpoint) + Send + Sync;

#[derive(Default)]
struct Waiting {
    /// The xorbs built by this upload that are stored, by index; all
    /// before `stored` are.
    done: Vec<bool>,
    stored: u32,
    /// File, the xorb it needs, checkpoint; in the order they were taken.
    queue: std::collections::VecDeque<(usize, Option<u32>, Checkpoint)>,
}

impl Checkpoints {
    fn wait(&self, file: usize, needs: Option<u32>, at: Checkpoint) {
        let mut w = self.waiting.lock().expect("not poisoned");
        w.queue.push_back((file, needs, at));
        self.release(&mut w);
    }

    fn xorb_stored(&self, n: u32) {
        let mut w = self.waiting.lock().expect("not poisoned");
        let n = n as usize;
        if w.done.len() <= n {
            w.done.resize(n + 1, false);
        }
        w.done[n] = true;
        while w.done.get(w.stored as usize) == Some(&true) {
            w.stored += 1;
        }
        self.release(&mut w);
    }

    /// Reports, in order and under the lock (so reports are never
    /// reordered), the checkpoints whose xorbs are all stored.
    fn release(&self, w: &mut Waiting) {
        while let Some((file, needs, _)) = w.queue.front() {
            if needs.is_some_and(|n| n >= w.stored) {
                return;
            }
            let file = *file;
            let (_, _, at) = w.queue.pop_front().expect("a front");
            (self.report)(file, &at);
        }
    }
}

struct Planner {
    remote: Remote,
    rt: tokio::runtime::Handle,
    slots: Arc<Semaphore>,
    tx: mpsc::Sender<Outgoing>,
    known: HashMap<ChunkHash, Loc>,
    /// Chunk locations this machine learned earlier (the cache's log).
    hints: HashMap<ChunkHash, ChunkLocation>,
    log: Option<LocationLog>,
    builder: XorbBuilder,
    spare: Spare,
    out: Plan,
    checkpoints: Arc<Checkpoints>,
}

/// Buffers done with, for the next ones to be filled in (of xorbs the
/// server has taken, at most one per upload slot; of a mirror's parts
/// read, at most one per part in memory), so they hold no more memory than
/// those in flight did, and large buffers are not freed and allocated
/// anew all the time (the allocator keeps much of what is freed, and the
/// process grows by it).
#[derive(Clone, Default)]
pub(crate) struct Spare(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl Spare {
    /// A spare buffer (empty, with its capacity), else a new empty one.
    pub(crate) fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .expect("not poisoned")
            .pop()
            .unwrap_or_default()
    }

    /// Keeps the buffer of `sent` (emptied), if nothing else holds it and
    /// fewer than `most` are kept.
    pub(crate) fn give(&self, sent: Bytes, most: usize) {
        if let Ok(mut b) = sent.try_into_mut() {
            let mut spare = self.0.lock().expect("not poisoned");
            if spare.len() < most {
                b.clear();
                spare.push(Vec::from(b));
            }
        }
    }
}

impl Planner {
    fn batch(&mut self, batch: Batch) -> Result<()> {
        // Which chunks are new to this upload, first occurrences in order
        // (with their bytes, when any piece has them).
        let mut fresh: Vec<(ChunkHash, Option<&[u8]>)> = Vec::new();
        let mut seen = HashMap::new();
        for item in &batch.items {
            if let Item::Piece { data, chunks, .. } = item {
                let mut pos = 0;
                for c in chunks {
                    let bytes = data.get(pos..pos + c.len as usize);
                    pos += c.len as usize;
                    if self.known.contains_key(&c.hash) {
                        continue;
                    }
                    if let Some(l) = self.hints.get(&c.hash) {
                        let loc = Loc {
                            xorb: XorbRef::Stored(l.xorb),
                            index: l.index,
                        };
                        self.known.insert(c.hash, loc);
                        self.out.cache_chunks += 1;
                    } else if let Some(&k) = seen.get(&c.hash) {
                        let f: &mut (ChunkHash, Option<&[u8]>) = &mut fresh[k];
                        f.1 = f.1.or(bytes);
                    } else {
                        seen.insert(c.hash, fresh.len());
                        fresh.push((c.hash, bytes));
                    }
                }
            }
        }
        // Ask the server about those.
        if !fresh.is_empty() {
            let hashes: Vec<ChunkHash> = fresh.iter().map(|f| f.0).collect();
            let answers = self.rt.block_on(self.remote.dedup(&hashes))?;
            let found: Vec<(ChunkHash, ChunkLocation)> = hashes
                .iter()
                .zip(answers)
                .filter_map(|(h, a)| Some((*h, a?)))
                .collect();
            if let Some(log) = &self.log {
                log.record(&found);
            }
            for (h, l) in &found {
                let loc = Loc {
                    xorb: XorbRef::Stored(l.xorb),
                    index: l.index,
                };
                self.known.insert(*h, loc);
            }
            fresh.retain(|f| !self.known.contains_key(&f.0));
        }
        // A chunk without bytes must be stored already.
        let fresh: Vec<(ChunkHash, &[u8])> = fresh
            .into_iter()
            .map(|(h, b)| b.map(|b| (h, b)).ok_or(Error::Gone { chunk: h }))
            .collect::<Result<_>>()?;
        // Compress the new ones on all cores, then pack in order.
        let encoded: Vec<EncodedChunk> = fresh
            .par_iter()
            .map(|(h, data)| EncodedChunk::encode_with_hash(data, *h, Compression::default()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Input {
                path: PathBuf::new(),
                reason: format!("chunk encoding failed: {e}"),
            })?;
        for chunk in encoded {
            self.out.new_chunks += 1;
            self.out.new_bytes += u64::from(chunk.info.len);
            let hash = chunk.info.hash;
            if let Err(chunk) = self.builder.try_push(chunk) {
                self.ship()?;
                self.builder
                    .try_push(chunk)
                    .expect("a chunk fits an empty xorb");
            }
            self.known.insert(
                hash,
                Loc {
                    xorb: XorbRef::Built(self.out.built.len() as u32),
                    index: self.builder.len() as u32 - 1,
                },
            );
        }
        // Every chunk now has a place: extend the files' terms.
        let checkpointed = batch
            .items
            .iter()
            .any(|i| matches!(i, Item::Piece { sha: Some(_), .. }));
        for item in batch.items {
            match item {
                Item::Piece {
                    file, chunks, sha, ..
                } => {
                    self.out.chunks += chunks.len() as u64;
                    let plan = plan_of(&mut self.out.files, file);
                    for c in &chunks {
                        plan.push(self.known[&c.hash], c.len);
                    }
                    if let Some(sha) = sha {
                        let needs = plan.needs;
                        self.checkpoints
                            .wait(file, needs, Checkpoint { chunks, sha });
                    }
                }
                Item::End { file, end } => plan_of(&mut self.out.files, file).end = Some(end),
            }
        }
        if self.known.len() > MAX_KNOWN {
            self.known.clear();
        }
        // A checkpoint is of use once its xorb is stored: it is not kept
        // back to fill (so such xorbs hold a batch, not 64 MiB).
        if checkpointed && !self.builder.is_empty() {
            self.ship()?;
        }
        Ok(())
    }

    /// Finishes the current xorb once an upload slot is free (into the
    /// buffer of a xorb already sent, when there is one) and hands it to
    /// the uploader.
    fn ship(&mut self) -> Result<()> {
        let permit = self
            .rt
            .block_on(self.slots.clone().acquire_owned())
            .map_err(|_| Error::Cancelled)?;
        let builder = std::mem::take(&mut self.builder);
        let xorb = builder.finish_into(self.spare.take()).expect("non-empty");
        self.out.built.push(XorbChunkTable::from(&xorb));
        self.tx
            .blocking_send(Outgoing { xorb, permit })
            .map_err(|_| Error::Cancelled)
    }
}

/// Uploads `paths` (files and directories) and commits their recipes.
pub(crate) async fn upload(
    remote: &Remote,
    paths: &[PathBuf],
    layout: Layout,
    concurrency: usize,
    progress: Arc<dyn Progress>,
    hints: HashMap<ChunkHash, ChunkLocation>,
    log: Option<LocationLog>,
) -> Result<UploadReport> {
    let started = Instant::now();
    let scan = {
        let paths = paths.to_vec();
        tokio::task::spawn_blocking(move || scan(&paths, layout))
            .await
            .expect("scan does not panic")?
    };
    let pipeline = Pipeline {
        remote,
        concurrency,
        progress,
        hints,
        log,
    };
    pipeline.run(scan, Arc::new(Files), started).await
}

/// The stages after the scan, and what they need.
pub(crate) struct Pipeline<'a> {
    pub remote: &'a Remote,
    pub concurrency: usize,
    pub progress: Arc<dyn Progress>,
    pub hints: HashMap<ChunkHash, ChunkLocation>,
    pub log: Option<LocationLog>,
}

impl Pipeline<'_> {
    /// Reads the inputs of `scan` from `source`, uploads what is new and
    /// commits the recipes.
    pub(crate) async fn run<S: Source>(
        self,
        scan: Scan,
        source: Arc<S>,
        started: Instant,
    ) -> Result<UploadReport> {
        let Pipeline {
            remote,
            concurrency,
            progress,
            hints,
            log,
        } = self;
        // The bytes to read: not those of stored files, nor those before
        // a resumed file's checkpoint.
        let total: u64 = (scan.inputs.iter().enumerate())
            .filter(|(_, i)| i.stored.is_none())
            .map(|(k, i)| i.size - source.resume(k).map_or(0, Checkpoint::offset))
            .sum();
        progress.start(Stage::Hash, Some(total));
        progress.start(Stage::Upload, None);
        let scan = Arc::new(scan);

        let (batch_tx, batch_rx) = std::sync::mpsc::sync_channel::<Result<Batch>>(1);
        let chunker_thread = {
            let (scan, source) = (scan.clone(), source.clone());
            let progress = progress.clone();
            std::thread::spawn(move || {
                if let Err(e) = chunker(&scan, &*source, &*progress, &batch_tx) {
                    let _ = batch_tx.send(Err(e));
                }
            })
        };
        let checkpoints = Arc::new(Checkpoints {
            waiting: Default::default(),
            report: {
                let source = source.clone();
                Box::new(move |i, at| source.stored(i, at))
            },
        });
        let slots = Arc::new(Semaphore::new(concurrency.max(1)));
        let spare = Spare::default();
        let (xorb_tx, mut xorb_rx) = mpsc::channel::<Outgoing>(1);
        let planner_thread = {
            let mut planner = Planner {
                remote: remote.clone(),
                rt: tokio::runtime::Handle::current(),
                slots: slots.clone(),
                tx: xorb_tx,
                known: HashMap::new(),
                hints,
                log: log.clone(),
                builder: XorbBuilder::new(),
                spare: spare.clone(),
                out: Plan::default(),
                checkpoints: checkpoints.clone(),
            };
            std::thread::spawn(move || -> Result<Plan> {
                for batch in batch_rx {
                    planner.batch(batch?)?;
                }
                if !planner.builder.is_empty() {
                    planner.ship()?;
                }
                // The uploader stops when the xorb channel closes, so the
                // planner's sender must go now, not when the thread is joined.
                Ok(planner.out)
            })
        };

        let mut puts = tokio::task::JoinSet::new();
        let mut sent_bytes = 0u64;
        let mut put_done = |r: std::result::Result<Result<(u64, u32)>, tokio::task::JoinError>| {
            let (n, index) = r.expect("upload task does not panic")?;
            sent_bytes += n;
            progress.advance(Stage::Upload, n);
            checkpoints.xorb_stored(index);
            Ok::<_, Error>(())
        };
        // Xorbs arrive in the order they were built.
        let mut index = 0u32;
        while let Some(out) = xorb_rx.recv().await {
            let n = index;
            index += 1;
            let remote = remote.clone();
            let log = log.clone();
            let spare = spare.clone();
            let most = concurrency.max(1);
            puts.spawn(async move {
                let len = out.xorb.bytes.len() as u64;
                let (hash, chunks) = (out.xorb.hash, out.xorb.chunks);
                let bytes = Bytes::from(out.xorb.bytes);
                remote.put_xorb(hash, bytes.clone()).await?;
                spare.give(bytes, most);
                drop(out.permit);
                if let Some(log) = log {
                    let located: Vec<_> = (0u32..)
                        .zip(&chunks)
                        .map(|(index, c)| (c.hash, ChunkLocation { xorb: hash, index }))
                        .collect();
                    log.record(&located);
                }
                Ok((len, n))
            });
            while let Some(r) = puts.try_join_next() {
                put_done(r)?;
            }
        }
        while let Some(r) = puts.join_next().await {
            put_done(r)?;
        }
        let planner = tokio::task::spawn_blocking(move || {
            let _ = chunker_thread.join();
            planner_thread.join()
        })
        .await
        .expect("join does not panic")
        .expect("planner does not panic")?;
        progress.finish(Stage::Hash);
        progress.finish(Stage::Upload);

        let resolve = |r: XorbRef| match r {
            XorbRef::Stored(h) => h,
            XorbRef::Built(n) => planner.built[n as usize].hash,
        };
        // Indexed like the planner's files: inputs, then one slot per root
        // (a tree listing for directories, nothing for files).
        let recipes: Vec<Option<FileRecipe>> = planner
            .files
            .iter()
            .map(|f| {
                let end = f.end?;
                Some(FileRecipe {
                    hash: end.hash,
                    sha256: end.sha256,
                    size: end.size,
                    kind: end.kind,
                    terms: f
                        .terms
                        .iter()
                        .map(|t| Term {
                            xorb: resolve(t.xorb),
                            chunks: t.chunks,
                            len: t.len,
                        })
                        .collect(),
                })
            })
            .collect();
        let recipe = |i: usize| recipes[i].as_ref().expect("every input and tree was read");
        commit(remote, &planner.built, recipes.iter().flatten()).await?;

        let n = scan.inputs.len();
        let roots = scan
            .roots
            .iter()
            .enumerate()
            .map(|(k, r)| {
                let (i, tree) = match r.kind {
                    RootKind::File(i) => (i, false),
                    RootKind::Dir(_) => (n + k, true),
                };
                UploadedRoot {
                    path: r.path.clone(),
                    hash: recipe(i).hash,
                    tree,
                    size: recipe(i).size,
                }
            })
            .collect();
        // Inputs the server had are not read: they have no new recipe.
        let files = scan
            .inputs
            .iter()
            .zip(&recipes)
            .filter_map(|(i, r)| Some((i, r.as_ref()?)))
            .map(|(i, r)| UploadedFile {
                path: i.path.clone(),
                hash: r.hash,
                sha256: r.sha256,
                size: r.size,
            })
            .collect();
        Ok(UploadReport {
            roots,
            files,
            skipped: scan.skipped.clone(),
            bytes: recipes.iter().flatten().map(|r| r.size).sum(),
            chunks: planner.chunks,
            cache_chunks: planner.cache_chunks,
            new_chunks: planner.new_chunks,
            new_bytes: planner.new_bytes,
            sent_bytes,
            xorbs: planner.built.len() as u64,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// Commits recipes (and the new xorbs' chunk tables) in shards of bounded
/// size. Every xorb is already stored, so each shard is valid on its own.
async fn commit(
    remote: &Remote,
    tables: &[XorbChunkTable],
    recipes: impl Iterator<Item = &FileRecipe>,
) -> Result<()> {
    let mut batch = ShardBatch {
        remote,
        shard: Shard::default(),
        size: 0,
    };
    for t in tables {
        batch.shard.xorbs.push(t.clone());
        batch.grew(40 + 40 * t.chunks.len()).await?;
    }
    for r in recipes {
        batch.shard.files.push(r.clone());
        batch.grew(120 + 56 * r.terms.len()).await?;
    }
    batch.flush().await
}

/// The shard being filled, with its estimated encoded size.
struct ShardBatch<'a> {
    remote: &'a Remote,
    shard: Shard,
    size: usize,
}

impl ShardBatch<'_> {
    /// Accounts for what was just added; commits once over the budget.
    async fn grew(&mut self, bytes: usize) -> Result<()> {
        self.size += bytes;
        if self.size > SHARD_BUDGET {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if !self.shard.xorbs.is_empty() || !self.shard.files.is_empty() {
            self.remote
                .commit_shard(&std::mem::take(&mut self.shard))
                .await?;
        }
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    /// A file rewritten (same size) after the scan is refused by name; an
    /// untouched one is read.
    #[test]
    fn a_file_changed_since_the_scan_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"version one").unwrap();
        // An old mtime, so the rewrite moves it whatever the clock's
        // granularity.
        let f = File::options().write(true).open(&path).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        let s = scan(std::slice::from_ref(&path), Layout::PerPath).unwrap();
        let mut items = 0;
        read_input(
            &Files,
            0,
            &s.inputs[0],
            &mut Buffers::default(),
            &NoProgress,
            &mut |_| {
                items += 1;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(items, 2, "one piece and the end");
        fs::write(&path, b"version two").unwrap();
        let err = read_input(
            &Files,
            0,
            &s.inputs[0],
            &mut Buffers::default(),
            &NoProgress,
            &mut |_| Ok(()),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&*path.to_string_lossy()) && msg.contains("changed while being read"),
            "{msg}"
        );
    }
}
