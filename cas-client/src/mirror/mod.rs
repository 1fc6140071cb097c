//! `mirror`: a revision of a Hugging Face Hub repository into a
//! repository of the store, in one pass and verified.
//!
//! 1. list: the revision's commit sha, then the recursive tree listing
//!    (every file's path, size, git blob id and, for LFS files, SHA-256),
//!    a page of a thousand files per request;
//! 2. download: the files cut into parts (a large file into ranges of
//!    [`PART`] bytes, a small file whole), fetched `connections` at a time
//!    and handed on in order, so at most `connections` parts are in memory;
//! 3. upload: the parts stream into the upload pipeline (chunk, hash,
//!    dedup, pack, upload) as one tree; each file's SHA-256 (LFS) or git
//!    blob id (small files) is checked against the listing before the
//!    planner sees its end, so a mismatch commits nothing;
//! 4. commit the tree on a branch named like the upstream revision, the
//!    upstream's commit sha in the message. The same sha again finds that
//!    commit and downloads nothing.

mod upstream;

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

use crate::error::{Error, Result};
use crate::progress::Stage;
use crate::upload::{Input, Pipeline, Scan, Source};
use crate::{Client, UploadReport};
use upstream::{Entry, Upstream};

/// Bytes per ranged request of a large file (and the size from which a
/// file is read in several ranges at once).
pub const PART: u64 = 8 << 20;

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

/// One request's worth of a file.
struct Part {
    file: usize,
    start: u64,
    end: u64,
    whole: bool,
}

/// The downloaded parts, in order, as the chunker reads them.
struct Arrivals {
    rx: Mutex<mpsc::Receiver<Result<Bytes>>>,
    expect: Vec<Expect>,
    /// The download's own error, which the chunker only sees as a failed
    /// read.
    failure: Mutex<Option<Error>>,
    host: String,
}

/// Reads one file's bytes off [`Arrivals`].
struct Reader<'a> {
    rx: MutexGuard<'a, mpsc::Receiver<Result<Bytes>>>,
    failure: &'a Mutex<Option<Error>>,
    left: u64,
    piece: Bytes,
    blob: Option<sha1::Sha1>,
}

impl std::io::Read for Reader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.piece.is_empty() && self.left > 0 {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.piece = b,
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
        Ok(Reader {
            rx: self.rx.lock().expect("not poisoned"),
            failure: &self.failure,
            left: input.size,
            piece: Bytes::new(),
            blob,
        })
    }

    fn check(&self, i: usize, input: &Input, r: Reader<'_>, sha256: &Sha256) -> Result<()> {
        let (kind, want, got) = match (&self.expect[i], r.blob) {
            (Expect::Sha256(want), _) => ("SHA-256", want, sha256.to_string()),
            (Expect::Blob(want), Some(h)) => ("git blob id", want, hex(&h.finalize())),
            (Expect::Blob(_), None) => unreachable!("a blob id is computed while reading"),
        };
        if got.eq_ignore_ascii_case(want) {
            return Ok(());
        }
        Err(Error::Upstream {
            what: input.path.display().to_string(),
            message: format!(
                "the bytes from {} do not match the listing ({kind} {want} listed, {got} received); nothing was committed",
                self.host
            ),
        })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Client {
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
        let report =
            |commit: CommitInfo, files, bytes, upload: Option<UploadReport>| MirrorReport {
                upstream: name.clone(),
                revision: options.revision.clone(),
                upstream_commit: sha.clone(),
                repo: options.target.clone(),
                branch: branch.clone(),
                commit,
                files,
                bytes,
                downloaded_bytes: received.load(Ordering::Relaxed),
                unchanged: upload.is_none(),
                upload,
                seconds: started.elapsed().as_secs_f64(),
            };
        // Already mirrored at this upstream commit: nothing to do.
        match self.resolve(&options.target, branch.as_str()).await {
            Ok(head)
                if head
                    .commit
                    .message
                    .lines()
                    .any(|l| l == upstream_line(&sha)) =>
            {
                let tree = head.commit.tree;
                let info = self.stat(tree).await?;
                let entries = self
                    .tree(&info)
                    .await?
                    .map(|t| t.entries)
                    .unwrap_or_default();
                let bytes = entries.iter().map(|e| e.size).sum();
                return Ok(report(head, entries.len() as u64, bytes, None));
            }
            Ok(_) | Err(Error::Server { status: 404, .. }) => {}
            Err(e) => return Err(e),
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
        let expect: Vec<Expect> = files
            .iter()
            .map(|e| match &e.lfs {
                Some(l) => Expect::Sha256(l.oid.clone()),
                None => Expect::Blob(e.oid.clone()),
            })
            .collect();
        let sizes: Vec<u64> = files
            .iter()
            .map(|e| e.lfs.as_ref().map_or(e.size, |l| l.size))
            .collect();
        let total: u64 = sizes.iter().sum();
        let mut parts = Vec::new();
        for (i, (e, &size)) in files.iter().zip(&sizes).enumerate() {
            let whole = e.lfs.is_none() || size <= PART;
            let mut start = 0;
            while start < size {
                let end = if whole {
                    size
                } else {
                    (start + PART).min(size)
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

        // Download: `connections` parts at once, handed on in order.
        let progress = self.fetcher.progress.clone();
        progress.start(Stage::Download, Some(total));
        let up = Arc::new(up);
        let files = Arc::new(files);
        let locations: Arc<Vec<OnceCell<String>>> =
            Arc::new(files.iter().map(|_| OnceCell::new()).collect());
        let (tx, rx) = mpsc::channel(2);
        let download = {
            let (up, files, sha, progress) =
                (up.clone(), files.clone(), sha.clone(), progress.clone());
            let connections = options.connections.max(1);
            tokio::spawn(async move {
                let fetch = |p: Part| {
                    let (up, files, sha, locations, progress) = (
                        up.clone(),
                        files.clone(),
                        sha.clone(),
                        locations.clone(),
                        progress.clone(),
                    );
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
                        )
                        .await
                    }
                };
                let mut stream = futures_util::stream::iter(parts)
                    .map(fetch)
                    .buffered(connections);
                while let Some(r) = stream.next().await {
                    let failed = r.is_err();
                    if tx.send(r).await.is_err() || failed {
                        return;
                    }
                }
            })
        };
        let arrivals = Arc::new(Arrivals {
            rx: Mutex::new(rx),
            expect,
            failure: Mutex::new(None),
            host: options.endpoint.clone(),
        });
        let scan = Scan::listing(
            files
                .iter()
                .zip(&sizes)
                .map(|(e, &s)| (e.path.clone(), s))
                .collect(),
        );
        let pipeline = Pipeline {
            remote: &self.fetcher.remote,
            concurrency: self.upload_concurrency,
            progress: progress.clone(),
            hints: Default::default(),
            log: self.fetcher.log.clone(),
        };
        let uploaded = pipeline.run(scan, arrivals.clone(), started).await;
        // Stop the download (on a failure it may still run) before its
        // connections go with the runtime.
        download.abort();
        let _ = download.await;
        progress.finish(Stage::Download);
        let uploaded = match uploaded {
            Ok(u) => u,
            Err(e) => {
                return Err(arrivals
                    .failure
                    .lock()
                    .expect("not poisoned")
                    .take()
                    .unwrap_or(e))
            }
        };

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
        Ok(report(commit, files.len() as u64, total, Some(uploaded)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
