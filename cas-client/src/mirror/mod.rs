//! `mirror`: a revision of a Hugging Face Hub repository into a
//! repository of the store, in one pass and verified.
//!
//! 1. list: the revision's commit sha, then the recursive tree listing
//!    (every file's path, size, git blob id and, for LFS files, SHA-256),
//!    a page of a thousand files per request;
//! 2. reuse what the store has, downloading none of it: files unchanged
//!    since the upstream commit the branch mirrors now (same path and git
//!    blob id in both listings), then files the server finds by SHA-256
//!    (`POST /v1/sha256`): LFS files by their listed SHA-256, small files
//!    by the SHA-256 the [`journal`] learned for their git blob id;
//! 3. download the rest: the files cut into parts (a large file into
//!    ranges of [`part_size`] bytes, a small file whole), fetched
//!    `connections` at a time (up to [`BUNDLE_FILES`] small files taking
//!    one slot) and handed on in order, so about [`WINDOW`] bytes are in
//!    memory;
//! 4. upload: the parts stream into the upload pipeline (chunk, hash,
//!    dedup, pack, upload) in groups of [`GROUP_BYTES`] or [`GROUP_FILES`];
//!    each group's recipes are committed (and its small files journaled)
//!    before the next group's, while the download runs on, so a rerun
//!    after a kill downloads at most the group in flight again. A file
//!    larger than a group keeps a resume record ([`partial`]) of the
//!    point up to which its chunks are stored, so a rerun downloads only
//!    the bytes after it (and the SHA-256 state carried across it still
//!    checks the whole file). Each file's
//!    SHA-256 (LFS) or git blob id (small files) is checked against the
//!    listing before the planner sees its end, so a mismatch commits
//!    nothing of its group and no tree;
//! 5. commit the tree of all files on a branch named like the upstream
//!    revision, the upstream's commit sha in the message. The same sha
//!    again finds that commit and downloads nothing.

mod journal;
mod partial;
mod upstream;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cas_protocol::repo::{CommitInfo, CommitRequest, RefName, RepoId, RepoType};
use cas_protocol::tree::check_path;
use cas_protocol::Sha256;
use futures_util::StreamExt;
use serde::Serialize;
use sha1::Digest;
use tokio::sync::{mpsc, OnceCell};

use crate::digest::Checkpoint;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::progress::Stage;
use crate::upload::{Input, Listed, Pipeline, Scan, Source, Spare};
use crate::{Client, UploadReport};
use cas_protocol::tree::Tree;
use cas_protocol::FileHash;
use journal::Journal;
use partial::Partial;
use upstream::{Entry, Upstream};

/// Downloaded bytes in memory at once, about: the parts of the
/// `connections` requests in flight, which are handed on in order. A part
/// (a ranged request of a large file, the size from which a file is read
/// in several ranges at once, the most a bundle of small files holds) is
/// this divided by the connections, from [`MIN_PART`] to [`PART`].
pub const WINDOW: u64 = 64 << 20;
pub const MIN_PART: u64 = 1 << 20;
pub const PART: u64 = 8 << 20;
/// A group of downloaded files is committed once it holds this many bytes
/// or files (a larger file is a group of its own): what a rerun after a
/// kill may download again.
pub const GROUP_BYTES: u64 = 32 << 20;
pub const GROUP_FILES: usize = 1000;
/// Consecutive small files fetched together as one of the `connections`
/// slots (at most a part's bytes in all): the Hub has no batch download,
/// so a repository of small files gets this many times more requests in
/// flight, for no more memory.
pub const BUNDLE_FILES: usize = 4;

/// What to mirror, from where, to where.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// The upstream Hub's base URL, e.g. `https://huggingface.co`.
    pub endpoint: String,
    /// Sent to `endpoint` only, never to the hosts it redirects to.
    pub token: Option<String>,
    /// `org/name` upstream.
    pub id: String,
    pub repo_type: RepoType,
    /// Branch, tag or commit sha upstream; the branch committed to here.
    pub revision: String,
    /// The repository committed to.
    pub target: RepoId,
    /// Globs (`*` and `?`, as `fnmatch`; a trailing `/` means the whole
    /// directory): only matching files with `include`, none with `exclude`.
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Concurrent requests to the upstream.
    pub connections: usize,
    /// A connection with no progress for this long is abandoned (and the
    /// range retried).
    pub stall: Duration,
    pub author: String,
}

/// What [`Client::mirror`] did.
#[derive(Debug, Clone, Serialize)]
pub struct MirrorReport {
    /// `org/name` or `datasets/org/name` upstream, and its commit sha.
    pub upstream: String,
    pub revision: String,
    pub upstream_commit: String,
    pub repo: RepoId,
    pub branch: RefName,
    pub commit: CommitInfo,
    pub files: u64,
    pub bytes: u64,
    /// Body bytes received from the upstream and its CDN.
    pub downloaded_bytes: u64,
    /// Bytes of large files not downloaded again: an interrupted run
    /// stored them (see its resume records).
    pub resumed_bytes: u64,
    /// Files not downloaded: the store had them (unchanged since the
    /// mirrored revision, or found by SHA-256).
    pub reused_files: u64,
    /// The branch already held this upstream commit: nothing was done.
    pub unchanged: bool,
    /// The upload of the downloaded bytes (absent when unchanged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadReport>,
    pub seconds: f64,
}

/// `fnmatch`-style: `*` any run of characters (`/` included), `?` one.
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

fn matches(patterns: &[String], path: &str) -> bool {
    patterns.iter().any(|p| {
        let p = if p.ends_with('/') {
            format!("{p}*")
        } else {
            p.clone()
        };
        glob(&p, path)
    })
}

/// The line of a mirror commit's message that names the upstream commit.
fn upstream_line(sha: &str) -> String {
    format!("upstream commit {sha}")
}

/// What a file's bytes must hash to.
enum Expect {
    Sha256(String),
    /// Git blob id: SHA-1 of `blob {len}\0` and the bytes.
    Blob(String),
}

impl Expect {
    fn of(e: &Entry) -> Self {
        match &e.lfs {
            Some(l) => Expect::Sha256(l.oid.clone()),
            None => Expect::Blob(e.oid.clone()),
        }
    }
}

/// A file's size: the LFS object's, not its pointer's.
fn size_of(e: &Entry) -> u64 {
    e.lfs.as_ref().map_or(e.size, |l| l.size)
}

/// One request's worth of a file.
struct Part {
    file: usize,
    start: u64,
    end: u64,
    whole: bool,
}

/// The downloaded parts, in order, as the chunker reads them: one
/// `Arrivals` per group, all reading the one download.
struct Arrivals {
    rx: Arc<Mutex<mpsc::Receiver<Result<Bytes>>>>,
    /// The group's files, in order.
    expect: Vec<Expect>,
    /// Per file: where it resumes (its bytes arrive from there) and the
    /// record of its checkpoints (large files only).
    resume: Vec<Option<Checkpoint>>,
    records: Vec<Option<Partial>>,
    /// The download's own error, which the chunker only sees as a failed
    /// read.
    failure: Arc<Mutex<Option<Error>>>,
    host: String,
    /// Where the parts read go, for the download to fill again.
    spare: Spare,
    /// How many [`Arrivals::spare`] keeps.
    keep: usize,
}

/// Reads one file's bytes off [`Arrivals`].
struct Reader<'a> {
    rx: MutexGuard<'a, mpsc::Receiver<Result<Bytes>>>,
    failure: &'a Mutex<Option<Error>>,
    left: u64,
    /// What is left to read of `part`.
    piece: Bytes,
    part: Bytes,
    blob: Option<sha1::Sha1>,
    spare: &'a Spare,
    keep: usize,
}

impl Reader<'_> {
    /// The part read so far is done with: its buffer goes to the spares.
    fn next_part(&mut self, part: Bytes) {
        self.piece = part.clone();
        let done = std::mem::replace(&mut self.part, part);
        self.spare.give(done, self.keep);
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        self.next_part(Bytes::new());
    }
}

impl std::io::Read for Reader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.piece.is_empty() && self.left > 0 {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.next_part(b),
                Some(Err(e)) => {
                    let line = e.to_string();
                    *self.failure.lock().expect("not poisoned") = Some(e);
                    return Err(std::io::Error::other(line));
                }
                None => return Err(std::io::Error::other("the download stopped")),
            }
        }
        let n = buf.len().min(self.piece.len());
        let piece = self.piece.split_to(n);
        buf[..n].copy_from_slice(&piece);
        if let Some(h) = &mut self.blob {
            h.update(&piece);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

impl Source for Arrivals {
    type Reader<'a> = Reader<'a>;

    fn open(&self, i: usize, input: &Input) -> Result<Reader<'_>> {
        let blob = match &self.expect[i] {
            Expect::Blob(_) => {
                let mut h = sha1::Sha1::new();
                h.update(format!("blob {}\0", input.size));
                Some(h)
            }
            Expect::Sha256(_) => None,
        };
        let from = self.resume[i].as_ref();
        if let Some(r) = &self.records[i] {
            r.start(from);
        }
        Ok(Reader {
            rx: self.rx.lock().expect("not poisoned"),
            failure: &self.failure,
            left: input.size - from.map_or(0, Checkpoint::offset),
            piece: Bytes::new(),
            part: Bytes::new(),
            blob,
            spare: &self.spare,
            keep: self.keep,
        })
    }

    fn check(&self, i: usize, input: &Input, mut r: Reader<'_>, sha256: &Sha256) -> Result<()> {
        let (kind, want, got) = match (&self.expect[i], r.blob.take()) {
            (Expect::Sha256(want), _) => ("SHA-256", want, sha256.to_string()),
            (Expect::Blob(want), Some(h)) => ("git blob id", want, hex(&h.finalize())),
            (Expect::Blob(_), None) => unreachable!("a blob id is computed while reading"),
        };
        if got.eq_ignore_ascii_case(want) {
            return Ok(());
        }
        // The bytes before a checkpoint may be the wrong ones.
        if let Some(r) = &self.records[i] {
            r.remove();
        }
        Err(Error::Upstream {
            what: input.path.display().to_string(),
            message: format!(
                "the bytes from {} do not match the listing ({kind} {want} listed, {got} received); nothing was committed",
                self.host
            ),
        })
    }

    fn resume(&self, i: usize) -> Option<&Checkpoint> {
        self.resume[i].as_ref()
    }

    fn checkpoints(&self, i: usize) -> bool {
        self.records[i].is_some()
    }

    fn stored(&self, i: usize, at: &Checkpoint) {
        if let Some(r) = &self.records[i] {
            r.append(at);
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Passes byte counts on, but not the start and end of each group's
/// stages: the mirror shows one bar per stage for all groups.
struct Continuing(Arc<dyn Progress>);

impl Progress for Continuing {
    fn advance(&self, stage: Stage, bytes: u64) {
        self.0.advance(stage, bytes);
    }
}

/// Adds one group's upload to the mirror's.
fn add(total: &mut UploadReport, u: UploadReport) {
    total.files.extend(u.files);
    total.roots = u.roots;
    total.bytes += u.bytes;
    total.chunks += u.chunks;
    total.cache_chunks += u.cache_chunks;
    total.new_chunks += u.new_chunks;
    total.new_bytes += u.new_bytes;
    total.sent_bytes += u.sent_bytes;
    total.xorbs += u.xorbs;
}

/// `parts` in order, as the download's slots take them: a range of a
/// large file alone, consecutive whole files together up to
/// [`BUNDLE_FILES`] and `part` bytes.
fn bundles(parts: Vec<Part>, part: u64) -> Vec<Vec<Part>> {
    let mut out: Vec<Vec<Part>> = Vec::new();
    let mut bytes = 0;
    for p in parts {
        let len = p.end - p.start;
        match out.last_mut() {
            Some(b) if p.whole && b[0].whole && b.len() < BUNDLE_FILES && bytes + len <= part => {
                bytes += len;
                b.push(p);
            }
            _ => {
                bytes = len;
                out.push(vec![p]);
            }
        }
    }
    out
}

/// The bytes of one part with `connections` requests at once (see
/// [`WINDOW`]).
fn part_size(connections: usize) -> u64 {
    (WINDOW / connections.max(1) as u64).clamp(MIN_PART, PART)
}

/// Consecutive runs of `todo` (indexes into `sizes`) of at most
/// [`GROUP_BYTES`] or [`GROUP_FILES`] each (a larger file alone).
fn groups(todo: &[usize], sizes: &[u64]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (k, &i) in todo.iter().enumerate() {
        bytes += sizes[i];
        if bytes >= GROUP_BYTES || k + 1 - start >= GROUP_FILES {
            out.push(start..k + 1);
            (start, bytes) = (k + 1, 0);
        }
    }
    if start < todo.len() {
        out.push(start..todo.len());
    }
    out
}

impl Client {
    /// Per file of `files`: where it resumes and its resume record. Large
    /// LFS files of `todo` get a record (with a cache); one whose record
    /// names chunks the server still stores all resumes at its last
    /// checkpoint.
    async fn resume_records(
        &self,
        files: &[Entry],
        sizes: &[u64],
        todo: &[usize],
    ) -> Result<(Vec<Option<Checkpoint>>, Vec<Option<Partial>>)> {
        let mut resume = vec![None; files.len()];
        let mut records = vec![None; files.len()];
        let Some(cache) = &self.fetcher.cache else {
            return Ok((resume, records));
        };
        let dir = cache.root().join("mirror-partial");
        partial::sweep(&dir, partial::STALE);
        for &i in todo {
            let Some(sha256) = files[i].lfs.as_ref().and_then(|l| l.oid.parse().ok()) else {
                continue;
            };
            if sizes[i] <= GROUP_BYTES {
                continue;
            }
            let record = Partial::new(&dir, sha256, sizes[i]);
            if let Some(at) = record.load() {
                // Asked a slice at a time, so a record of a huge file does
                // not hold every answer at once.
                let mut stored = true;
                for slice in at.chunks.chunks(1 << 16) {
                    let hashes: Vec<_> = slice.iter().map(|c| c.hash).collect();
                    let found = self.fetcher.remote.dedup(&hashes).await?;
                    stored = found.iter().all(Option::is_some);
                    if !stored {
                        break;
                    }
                }
                if stored {
                    resume[i] = Some(at);
                } else {
                    tracing::warn!(
                        "{}: the server no longer stores the chunks an interrupted mirror stored; downloading it whole",
                        files[i].path
                    );
                }
            }
            records[i] = Some(record);
        }
        Ok((resume, records))
    }

    /// Mirrors revision `options.revision` of an upstream Hub repository
    /// into `options.target` (see the module docs and docs/CLIENT.md).
    pub async fn mirror(&self, options: &MirrorOptions) -> Result<MirrorReport> {
        let started = Instant::now();
        let up = Upstream::new(
            &options.endpoint,
            options.token.as_deref(),
            options.repo_type,
            &options.id,
            *self.fetcher.remote.retry(),
            options.stall,
        )?;
        let branch = RefName::new(&options.revision).map_err(|e| Error::Input {
            path: options.revision.clone().into(),
            reason: format!("cannot name a branch after this revision: {e}"),
        })?;
        let sha = up.commit(&options.revision).await?;
        let (name, received) = (up.name(), up.received.clone());
        let report = |commit: CommitInfo,
                      files,
                      bytes,
                      (reused_files, resumed_bytes),
                      upload: Option<UploadReport>| {
            MirrorReport {
                upstream: name.clone(),
                revision: options.revision.clone(),
                upstream_commit: sha.clone(),
                repo: options.target.clone(),
                branch: branch.clone(),
                commit,
                files,
                bytes,
                downloaded_bytes: received.load(Ordering::Relaxed),
                resumed_bytes,
                reused_files,
                unchanged: upload.is_none(),
                upload,
                seconds: started.elapsed().as_secs_f64(),
            }
        };
        // The branch's head: already this upstream commit (nothing to do),
        // or an earlier one whose unchanged files are reused.
        let head = match self.resolve(&options.target, branch.as_str()).await {
            Ok(head) => Some(head),
            Err(Error::Server { status: 404, .. }) => None,
            Err(e) => return Err(e),
        };
        let mirrored = head.as_ref().and_then(|h| {
            h.commit
                .message
                .lines()
                .find_map(|l| l.strip_prefix(&upstream_line("")).map(str::to_owned))
        });
        let head_tree = match &head {
            Some(h) => {
                let info = self.stat(h.commit.tree).await?;
                self.tree(&info).await?.unwrap_or_default()
            }
            None => Tree::default(),
        };
        if let (Some(h), Some(m)) = (&head, &mirrored) {
            if *m == sha {
                let bytes = head_tree.entries.iter().map(|e| e.size).sum();
                return Ok(report(
                    h.clone(),
                    head_tree.entries.len() as u64,
                    bytes,
                    (head_tree.entries.len() as u64, 0),
                    None,
                ));
            }
        }

        let mut files: Vec<Entry> = up
            .files(&sha)
            .await?
            .into_iter()
            .filter(|e| options.include.is_empty() || matches(&options.include, &e.path))
            .filter(|e| !matches(&options.exclude, &e.path))
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        for e in &files {
            check_path(&e.path).map_err(|reason| Error::Upstream {
                what: e.path.clone(),
                message: format!("the upstream lists a path the store cannot hold: {reason}"),
            })?;
        }
        let sizes: Vec<u64> = files.iter().map(size_of).collect();
        let total: u64 = sizes.iter().sum();

        // What the store has already.
        let mut stored: Vec<Option<FileHash>> = vec![None; files.len()];
        if let Some(old) = &mirrored {
            let before: HashMap<String, String> = up
                .files(old)
                .await?
                .into_iter()
                .map(|e| (e.path, e.oid))
                .collect();
            for (i, e) in files.iter().enumerate() {
                if before.get(&e.path) == Some(&e.oid) {
                    stored[i] = head_tree
                        .get(&e.path)
                        .filter(|t| t.size == sizes[i])
                        .map(|t| t.file);
                }
            }
        }
        let journal = self
            .fetcher
            .cache
            .as_ref()
            .map(|c| Journal::new(c.root().join("mirror-blobs")));
        let blobs = journal.as_ref().map(Journal::load).unwrap_or_default();
        let asked: Vec<(usize, Sha256)> = files
            .iter()
            .enumerate()
            .filter(|(i, _)| stored[*i].is_none())
            .filter_map(|(i, e)| {
                let sha256 = match &e.lfs {
                    Some(l) => l.oid.parse().ok()?,
                    None => *blobs.get(&e.oid)?,
                };
                Some((i, sha256))
            })
            .collect();
        if !asked.is_empty() {
            let sha256s: Vec<Sha256> = asked.iter().map(|a| a.1).collect();
            let found = self.fetcher.remote.files_by_sha256(&sha256s).await?;
            for ((i, _), f) in asked.iter().zip(found) {
                stored[*i] = f.filter(|f| f.size == sizes[*i]).map(|f| f.hash);
            }
        }
        let reused = stored.iter().filter(|s| s.is_some()).count() as u64;

        // Download what is left: `connections` parts at once, handed on in
        // order.
        let todo: Vec<usize> = (0..files.len()).filter(|&i| stored[i].is_none()).collect();
        let (mut resume, records) = self.resume_records(&files, &sizes, &todo).await?;
        let offset = |i: usize| resume[i].as_ref().map_or(0, Checkpoint::offset);
        let resumed_bytes: u64 = todo.iter().map(|&i| offset(i)).sum();
        let connections = options.connections.max(1);
        let part = part_size(connections);
        let mut parts = Vec::new();
        for &i in &todo {
            let (size, whole) = (sizes[i], files[i].lfs.is_none() || sizes[i] <= part);
            let mut start = offset(i);
            while start < size {
                let end = if whole {
                    size
                } else {
                    (start + part).min(size)
                };
                parts.push(Part {
                    file: i,
                    start,
                    end,
                    whole,
                });
                start = end;
            }
        }
        let progress = self.fetcher.progress.clone();
        let fetching: u64 = todo.iter().map(|&i| sizes[i]).sum::<u64>() - resumed_bytes;
        progress.start(Stage::Download, Some(fetching));
        progress.start(Stage::Hash, Some(fetching));
        progress.start(Stage::Upload, None);
        let up = Arc::new(up);
        let files = Arc::new(files);
        let locations: Arc<Vec<OnceCell<String>>> =
            Arc::new(files.iter().map(|_| OnceCell::new()).collect());
        let (tx, rx) = mpsc::channel(2);
        // Parts in memory: those in flight, in the channel and being read.
        let (spare, keep) = (Spare::default(), connections + 3);
        let download = {
            let (up, files, sha, progress, spare) = (
                up.clone(),
                files.clone(),
                sha.clone(),
                progress.clone(),
                spare.clone(),
            );
            tokio::spawn(async move {
                let fetch = |p: Part| {
                    let (up, files, sha, locations, progress) = (
                        up.clone(),
                        files.clone(),
                        sha.clone(),
                        locations.clone(),
                        progress.clone(),
                    );
                    let into = spare.take();
                    async move {
                        let path = &files[p.file].path;
                        // A file read in ranges: its CDN URL once.
                        let url = if p.whole {
                            None
                        } else {
                            Some(
                                locations[p.file]
                                    .get_or_try_init(|| up.location(&sha, path))
                                    .await?
                                    .clone(),
                            )
                        };
                        up.read(
                            &sha,
                            path,
                            url.as_deref(),
                            (p.start, p.end),
                            p.whole,
                            &*progress,
                            into,
                        )
                        .await
                    }
                };
                let mut stream = futures_util::stream::iter(bundles(parts, part))
                    .map(|b| futures_util::future::join_all(b.into_iter().map(fetch)))
                    .buffered(connections);
                while let Some(rs) = stream.next().await {
                    for r in rs {
                        let failed = r.is_err();
                        if tx.send(r).await.is_err() || failed {
                            return;
                        }
                    }
                }
            })
        };
        let (rx, failure) = (Arc::new(Mutex::new(rx)), Arc::new(Mutex::new(None)));
        let pipeline = || Pipeline {
            remote: &self.fetcher.remote,
            concurrency: self.upload_concurrency,
            progress: Arc::new(Continuing(progress.clone())),
            hints: Default::default(),
            log: self.fetcher.log.clone(),
        };
        let source = |expect: Vec<Expect>, resume, records| {
            Arc::new(Arrivals {
                rx: rx.clone(),
                expect,
                resume,
                records,
                failure: failure.clone(),
                host: options.endpoint.clone(),
                spare: spare.clone(),
                keep,
            })
        };
        // Each group committed before the next: a kill loses one group.
        let mut uploaded = UploadReport::default();
        let mut groups_done = Ok(());
        for g in groups(&todo, &sizes) {
            let group = &todo[g];
            let scan = Scan::listing(
                group
                    .iter()
                    .map(|&i| Listed {
                        path: files[i].path.clone(),
                        size: sizes[i],
                        stored: None,
                    })
                    .collect(),
                false,
            );
            let expect = group.iter().map(|&i| Expect::of(&files[i])).collect();
            let source = source(
                expect,
                group.iter().map(|&i| resume[i].take()).collect(),
                group.iter().map(|&i| records[i].clone()).collect(),
            );
            let u = match pipeline().run(scan, source, started).await {
                Ok(u) => u,
                Err(e) => {
                    groups_done = Err(e);
                    break;
                }
            };
            let mut learned = Vec::new();
            for (&i, f) in group.iter().zip(&u.files) {
                stored[i] = Some(f.hash);
                if files[i].lfs.is_none() {
                    learned.push((files[i].oid.as_str(), f.sha256));
                }
            }
            if let Some(j) = &journal {
                j.record(&learned);
            }
            for &i in group {
                if let Some(r) = &records[i] {
                    r.remove();
                }
            }
            add(&mut uploaded, u);
        }
        // Stop the download (on a failure it may still run) before its
        // connections go with the runtime.
        download.abort();
        let _ = download.await;
        if let Err(e) = groups_done {
            return Err(failure.lock().expect("not poisoned").take().unwrap_or(e));
        }
        // The tree of every file, all stored now.
        let scan = Scan::listing(
            files
                .iter()
                .zip(&sizes)
                .zip(&stored)
                .map(|((e, &size), s)| Listed {
                    path: e.path.clone(),
                    size,
                    stored: *s,
                })
                .collect(),
            true,
        );
        add(
            &mut uploaded,
            pipeline()
                .run(scan, source(Vec::new(), Vec::new(), Vec::new()), started)
                .await?,
        );
        uploaded.seconds = started.elapsed().as_secs_f64();
        for stage in [Stage::Download, Stage::Hash, Stage::Upload] {
            progress.finish(stage);
        }

        let request = CommitRequest {
            branch: branch.clone(),
            tree: uploaded.roots[0].hash,
            message: format!(
                "Mirror {}@{} from {}\n\n{}",
                name,
                options.revision,
                options.endpoint,
                upstream_line(&sha)
            ),
            author: options.author.clone(),
            parent: None,
        };
        let commit = self
            .fetcher
            .remote
            .commit(&options.target, &request)
            .await?;
        Ok(report(
            commit,
            files.len() as u64,
            total,
            (reused, resumed_bytes),
            Some(uploaded),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_files_are_bundled_and_ranges_are_not() {
        let part = |file, start, end, whole| Part {
            file,
            start,
            end,
            whole,
        };
        let parts = vec![
            part(0, 0, 10, true),
            part(1, 0, 10, true),
            part(2, 0, PART, false),
            part(2, PART, PART + 5, false),
            part(3, 0, 1, true),
            part(4, 0, 1, true),
            part(5, 0, 1, true),
            part(6, 0, 1, true),
            part(7, 0, 1, true),
            part(8, 0, PART, true),
        ];
        let shape: Vec<Vec<usize>> = bundles(parts, PART)
            .iter()
            .map(|b| b.iter().map(|p| p.file).collect())
            .collect();
        assert_eq!(
            shape,
            vec![
                vec![0, 1],
                vec![2],
                vec![2],
                vec![3, 4, 5, 6],
                vec![7],
                vec![8]
            ]
        );
    }

    #[test]
    fn parts_share_the_window() {
        assert_eq!(part_size(16), 4 << 20);
        assert_eq!(part_size(8), PART);
        assert_eq!(part_size(0), PART);
        assert_eq!(part_size(1000), MIN_PART);
    }

    #[test]
    fn groups_close_at_bytes_or_files() {
        let mib = 1 << 20;
        let sizes = [10 * mib, 10 * mib, 20 * mib, 100 * mib, 1, 1];
        let todo: Vec<usize> = (0..sizes.len()).collect();
        assert_eq!(groups(&todo, &sizes), vec![0..3, 3..4, 4..6]);
        let small = vec![1; 2500];
        let todo: Vec<usize> = (0..small.len()).collect();
        assert_eq!(groups(&todo, &small), vec![0..1000, 1000..2000, 2000..2500]);
        assert!(groups(&[], &[]).is_empty());
    }

    #[test]
    fn globs_match_like_fnmatch() {
        assert!(glob("*.json", "config.json"));
        assert!(glob("*.json", "sub/config.json"));
        assert!(!glob("*.json", "model.safetensors"));
        assert!(glob("model-?????-of-*.bin", "model-00001-of-00002.bin"));
        assert!(glob("*", ""));
        assert!(!glob("a", "ab"));
        assert!(matches(&["data/".into()], "data/train/0001.txt"));
        assert!(!matches(&["data/".into()], "readme.md"));
    }
}
