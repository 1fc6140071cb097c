//! Writing fetched files and trees to disk: positioned writes into
//! `NAME.part`, a journal of verified terms for resuming, a final check of
//! file hash and SHA-256, then an atomic rename. Nothing unverified ever
//! stands under the final name.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use cas_protocol::chunking::chunk_and_hash;
use cas_protocol::tree::{check_path, Tree};
use cas_protocol::{ChunkInfo, FileHash, FileHasher, Kind, Sha256, Sha256Hasher};
use futures_util::StreamExt;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::fetch::{Fetcher, FileSink, Journal, Sink, TermDone, Transfer};
use crate::progress::Stage;
use crate::remote::FileInfo;

/// What a fetch did.
#[derive(Debug, Clone, Serialize)]
pub struct FetchReport {
    pub hash: FileHash,
    pub path: PathBuf,
    /// Whether `hash` named a tree (restored as a directory).
    pub tree: bool,
    pub files: u64,
    /// File bytes written.
    pub bytes: u64,
    /// File bytes an earlier, interrupted fetch had already verified.
    pub resumed_bytes: u64,
    #[serde(flatten)]
    pub transfer: Transfer,
    pub seconds: f64,
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(suffix);
    path.with_file_name(name)
}

/// Fails unless `path` is absent, or a regular file and `force` is set.
fn check_target(path: &Path, force: bool) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path)(e)),
        Ok(m) if m.is_file() && force => Ok(()),
        Ok(m) if m.file_type().is_symlink() => Err(Error::Input {
            path: path.to_owned(),
            reason: "is a symlink; refusing to write through it".into(),
        }),
        Ok(_) => Err(Error::Exists(path.to_owned())),
    }
}

/// Fetches one file to `dest`, resuming from `dest.part` and its journal.
/// Returns the transfer and the bytes that were already there.
pub(crate) async fn fetch_file(
    fetcher: &Fetcher,
    info: &FileInfo,
    dest: &Path,
    mode: Option<u32>,
    force: bool,
) -> Result<(Transfer, u64)> {
    check_target(dest, force)?;
    let part = sibling(dest, ".part");
    let journal_path = sibling(dest, ".part.journal");
    for p in [&part, &journal_path] {
        if fs::symlink_metadata(p).is_ok_and(|m| !m.is_file()) {
            return Err(Error::Input {
                path: p.clone(),
                reason: "exists and is not a regular file".into(),
            });
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&part)
        .map_err(Error::io(&part))?;
    file.set_len(info.size).map_err(Error::io(&part))?;
    // A small file restarts whole: a journal (and the syncs it needs)
    // would cost more than it saves. One left by an earlier run is used.
    let mut journal = if info.size >= JOURNAL_MIN || journal_path.exists() {
        Some(Journal::open(&journal_path, info.hash, info.size)?)
    } else {
        None
    };
    let resumed: u64 = journal
        .iter()
        .flat_map(|j| &j.done)
        .map(|(a, b)| b - a)
        .sum();
    fetcher.progress.advance(Stage::Download, resumed);
    let sink = Arc::new(FileSink {
        file,
        path: part.clone(),
    });
    let mut transfer = Transfer::default();
    let mut digest = InOrder::new(info.kind);
    if info.size > 0 {
        let rec = fetcher.remote.reconstruct(info.hash, None).await?;
        if rec.file_size != info.size {
            return Err(Error::BadAnswer {
                what: format!("reconstruction of {}", info.hash),
                reason: format!(
                    "file size {} but the file is {} bytes",
                    rec.file_size, info.size
                ),
            });
        }
        let done = journal
            .as_mut()
            .map(|j| std::mem::take(&mut j.done))
            .unwrap_or_default();
        for &(a, b) in &done {
            digest.add(a, b - a, None);
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let journaling = tokio::spawn(checkpoints(rx, sink.clone(), journal, digest, info.size));
        let s: Arc<dyn Sink> = sink.clone();
        let fetched = fetcher
            .run(&rec, s, &done, |terms| {
                let _ = tx.send(terms);
                Ok(())
            })
            .await;
        drop(tx);
        let journaled = journaling.await.expect("journaling does not panic");
        transfer = fetched?;
        digest = journaled?;
    }
    let mismatch = match digest.finish(info.size) {
        None => Some("the reconstruction does not cover the file".to_owned()),
        Some((h, _)) if h != info.hash => Some(format!("file hash {h} instead of {}", info.hash)),
        Some((_, sha)) if sha != info.sha256 => {
            Some(format!("SHA-256 {sha} instead of {}", info.sha256))
        }
        Some(_) => None,
    };
    if let Some(reason) = mismatch {
        let _ = fs::remove_file(&part);
        let _ = fs::remove_file(&journal_path);
        return Err(Error::Mismatch {
            path: dest.to_owned(),
            reason,
        });
    }
    if let Some(mode) = mode {
        sink.file
            .set_permissions(fs::Permissions::from_mode(mode & 0o777))
            .map_err(Error::io(&part))?;
    }
    sink.file.sync_all().map_err(Error::io(&part))?;
    fs::rename(&part, dest).map_err(Error::io(dest))?;
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(dir))?;
    match fs::remove_file(&journal_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io(&journal_path)(e))
        }
        _ => {}
    }
    Ok((transfer, resumed))
}

/// Files smaller than this are fetched without a journal.
const JOURNAL_MIN: u64 = 8 << 20;

/// Most verified bytes, and longest time, between journal checkpoints.
const CHECKPOINT_BYTES: u64 = 256 << 20;
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Journals verified units beside the download: the `.part` is synced
/// before the journal names its data, at most every [`CHECKPOINT_BYTES`]
/// (an eighth of a smaller file) or [`CHECKPOINT_EVERY`], and when the
/// fetch ends (even when it failed). So the download never waits for the
/// disk and a kill loses at most one checkpoint of progress.
/// The checkpoints also advance the file's digest over the verified
/// prefix, which the fetch returns when it ends.
async fn checkpoints(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<TermDone>>,
    sink: Arc<FileSink>,
    journal: Option<Journal>,
    digest: InOrder,
    size: u64,
) -> Result<InOrder> {
    let threshold = CHECKPOINT_BYTES.min(size / 8);
    let mut last = std::time::Instant::now();
    let mut state = Some((journal, digest));
    let mut pending: Vec<TermDone> = Vec::new();
    let mut bytes = 0u64;
    loop {
        let msg = rx.recv().await;
        let end = msg.is_none();
        if let Some(terms) = msg {
            bytes += terms.iter().map(|t| t.placed.term.len).sum::<u64>();
            pending.extend(terms);
        }
        if !pending.is_empty() && (end || bytes >= threshold || last.elapsed() >= CHECKPOINT_EVERY)
        {
            let (sink, (mut j, mut d)) = (sink.clone(), state.take().expect("returned"));
            let terms = std::mem::take(&mut pending);
            let synced = tokio::task::spawn_blocking(move || {
                if let Some(j) = &mut j {
                    sink.file.sync_data().map_err(Error::io(&sink.path))?;
                    j.record(terms.iter().map(|t| &t.placed))?;
                }
                for t in terms {
                    d.add(t.placed.offset, t.placed.term.len, t.chunks);
                }
                d.advance(&sink.file, &sink.path)?;
                Ok::<_, Error>((j, d))
            });
            state = Some(synced.await.expect("journaling does not panic")?);
            bytes = 0;
            last = std::time::Instant::now();
        }
        if end {
            return Ok(state.expect("returned").1);
        }
    }
}

/// File hash and SHA-256 of a fetched file, computed in file order as
/// verified terms come in, reading each term back once (from the page
/// cache) instead of a second pass over the whole file at the end. Terms
/// an earlier run verified come without their chunk list; their bytes are
/// chunked again, which yields the same chunks because terms start and end
/// at chunk boundaries.
pub(crate) struct InOrder {
    next: u64,
    waiting: BTreeMap<u64, (u64, Option<Vec<ChunkInfo>>)>,
    file_hash: FileHasher,
    sha: Sha256Hasher,
    buf: Vec<u8>,
}

impl InOrder {
    /// A digest of a file of `kind` (the kind selects the file hash).
    pub fn new(kind: Kind) -> Self {
        Self {
            next: 0,
            waiting: BTreeMap::new(),
            file_hash: FileHasher::new(kind),
            sha: Sha256Hasher::new(),
            buf: Vec::new(),
        }
    }

    pub fn add(&mut self, offset: u64, len: u64, chunks: Option<Vec<ChunkInfo>>) {
        self.waiting.insert(offset, (len, chunks));
    }

    /// Hashes every waiting term that continues the hashed prefix.
    pub fn advance(&mut self, file: &fs::File, path: &Path) -> Result<()> {
        const PIECE: u64 = 4 << 20;
        while let Some((len, chunks)) = self.waiting.remove(&self.next) {
            let end = self.next + len;
            // A term to chunk again is read whole (a term lies in one xorb:
            // at most 64 MiB); otherwise in pieces.
            let step = if chunks.is_some() { PIECE } else { len };
            let mut pos = self.next;
            while pos < end {
                let n = step.min(end - pos) as usize;
                self.buf.resize(n, 0);
                file.read_exact_at(&mut self.buf, pos)
                    .map_err(Error::io(path))?;
                self.sha.update(&self.buf);
                pos += n as u64;
            }
            let chunks = chunks.unwrap_or_else(|| chunk_and_hash(&self.buf));
            chunks.iter().for_each(|c| self.file_hash.push(c));
            self.next = end;
        }
        Ok(())
    }

    /// The digest, if the terms covered exactly `size` bytes.
    pub fn finish(self, size: u64) -> Option<(FileHash, Sha256)> {
        (self.next == size && self.waiting.is_empty())
            .then(|| (self.file_hash.finish(), self.sha.finalize()))
    }
}

/// Creates the directories leading to `rel` under `root`, refusing to pass
/// through anything that is not a real directory (a symlink planted in the
/// target must not redirect writes outside it).
fn prepare_parents(root: &Path, rel: &str) -> Result<PathBuf> {
    let unsafe_path = |reason: String| Error::UnsafePath {
        path: rel.to_owned(),
        reason,
    };
    check_path(rel).map_err(|e| unsafe_path(e.to_string()))?;
    let rel_path = Path::new(rel);
    if rel_path
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(unsafe_path("not a plain relative path".into()));
    }
    let mut cur = root.to_owned();
    let parts: Vec<_> = rel_path.components().collect();
    for c in &parts[..parts.len() - 1] {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(unsafe_path(format!(
                    "{} exists and is not a directory",
                    cur.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(Error::io(&cur))?
            }
            Err(e) => return Err(Error::io(&cur)(e)),
        }
    }
    Ok(root.join(rel_path))
}

/// Restores a tree under `dest`: every path is checked and every target
/// vetted before the first byte is fetched; files then run concurrently.
pub(crate) async fn fetch_tree(
    fetcher: &Fetcher,
    tree: &Tree,
    dest: &Path,
    force: bool,
    parallel_files: usize,
) -> Result<(Transfer, u64)> {
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(Error::Exists(dest.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dest).map_err(Error::io(dest))?
        }
        Err(e) => return Err(Error::io(dest)(e)),
    }
    let mut targets = Vec::with_capacity(tree.entries.len());
    for e in &tree.entries {
        let target = prepare_parents(dest, &e.path)?;
        check_target(&target, force)?;
        targets.push(target);
    }
    let jobs = tree
        .entries
        .iter()
        .zip(targets)
        .map(|(e, target)| async move {
            let info = fetcher.remote.file_info(e.file).await?;
            if info.size != e.size {
                return Err(Error::BadAnswer {
                    what: format!("tree entry {}", e.path),
                    reason: format!("tree says {} bytes, the server {}", e.size, info.size),
                });
            }
            fetch_file(fetcher, &info, &target, Some(e.mode), force).await
        });
    let mut runs = futures_util::stream::iter(jobs).buffer_unordered(parallel_files.max(1));
    let mut total = Transfer::default();
    let mut resumed = 0;
    while let Some(r) = runs.next().await {
        let (t, r) = r?;
        total += t;
        resumed += r;
    }
    Ok((total, resumed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_never_pass_through_a_symlink_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        fs::create_dir(&root).unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        fs::write(root.join("file"), b"x").unwrap();
        assert_eq!(prepare_parents(&root, "a/b/c").unwrap(), root.join("a/b/c"));
        assert!(root.join("a/b").is_dir());
        for bad in [
            "link/x",
            "file/x",
            "../x",
            "/etc/passwd",
            "a/../../x",
            "a//b",
            "",
        ] {
            assert!(
                matches!(prepare_parents(&root, bad), Err(Error::UnsafePath { .. })),
                "{bad}"
            );
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    /// Terms arriving out of order, some without chunk lists (resumed),
    /// give the digest of the whole file.
    #[test]
    fn in_order_digest_matches_the_file() {
        let data: Vec<u8> = (0..3_000_000u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 57) as u8)
            .collect();
        let chunks = chunk_and_hash(&data);
        assert!(chunks.len() > 10);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, &data).unwrap();
        let file = fs::File::open(&path).unwrap();
        // Terms of 3 chunks each.
        let mut terms = Vec::new();
        let mut offset = 0;
        for group in chunks.chunks(3) {
            let len: u64 = group.iter().map(|c| u64::from(c.len)).sum();
            terms.push((offset, len, group.to_vec()));
            offset += len;
        }
        let mut d = InOrder::new(Kind::File);
        for (i, (offset, len, group)) in terms.iter().enumerate().rev() {
            d.add(*offset, *len, (i % 2 == 0).then(|| group.clone()));
            d.advance(&file, &path).unwrap();
        }
        let want = (FileHash::from_chunks(&chunks), Sha256::of(&data));
        assert_eq!(d.finish(data.len() as u64), Some(want));
        let mut partial = InOrder::new(Kind::File);
        partial.add(0, terms[0].1, None);
        partial.advance(&file, &path).unwrap();
        assert_eq!(partial.finish(data.len() as u64), None);
    }

    #[test]
    fn targets_are_not_overwritten_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        assert!(check_target(&f, false).is_ok());
        fs::write(&f, b"x").unwrap();
        assert!(matches!(check_target(&f, false), Err(Error::Exists(_))));
        assert!(check_target(&f, true).is_ok());
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("l")).unwrap();
        assert!(check_target(&dir.path().join("l"), true).is_err());
        assert!(check_target(dir.path(), true).is_err());
    }
}
