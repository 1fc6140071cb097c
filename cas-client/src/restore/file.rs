//! One file: positioned writes into `<file hash>.part` in the work
//! directory, checkpoints of verified terms in `<file hash>.journal`, the
//! final check, then the rename to every place the file goes.
//!
//! Crash ordering (what a kill at each step leaves, and what the next run
//! of the same command does with it):
//! 1. Verified bytes go to the `.part` by positioned writes; the `.part` is
//!    synced before the journal names them, so the journal never names
//!    bytes that are not on disk. A kill leaves the `.part` and a journal
//!    of durable, verified terms: the next run fetches only the others.
//! 2. When every term is in, the file hash and SHA-256 of the whole
//!    `.part` are checked (terms an earlier run verified are read back and
//!    hashed again). A kill after the last checkpoint, before the rename,
//!    leaves a complete journal: the next run fetches nothing, checks the
//!    `.part` and renames it.
//! 3. The file is made durable (data and permission bits synced), renamed
//!    to its final name, and its directory synced: from here it survives a
//!    crash. Then its record goes to `placed` in the work directory. A kill
//!    between the rename and the record leaves a complete file the next run
//!    hashes (instead of trusting the record) and keeps.
//! 4. The journal is removed; the work directory goes once every file of
//!    the fetch is in place.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use cas_protocol::{ByteRange, FileHash};

use super::digest::InOrder;
use super::journal::Journal;
use super::target::Target;
use super::workdir::WorkDir;
use crate::digest::hash_file;
use crate::error::{Error, Result};
use crate::fetch::{term_spans, Fetcher, FileSink, Sink, TermDone, Transfer};
use crate::progress::{NoProgress, Stage};
use crate::remote::FileInfo;

/// Fetches the file `info` describes into the work directory, resuming
/// from what an earlier run left there, checks it, and renames it to each
/// of `targets` (copies for all but the first). Returns the transfer and
/// the bytes an earlier run had already verified.
pub(super) async fn fetch_into(
    fetcher: &Fetcher,
    work: &Arc<WorkDir>,
    info: &FileInfo,
    targets: Vec<Target>,
) -> Result<(Transfer, u64)> {
    let part = work.temp(&format!("{}.part", info.hash));
    let journal_path = work.temp(&format!("{}.journal", info.hash));
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
    let sink = Arc::new(FileSink {
        file,
        path: part.clone(),
    });
    let mut transfer = Transfer::default();
    let mut resumed = 0;
    let mut digest = InOrder::new(info.kind, fetcher.verify_sha256);
    if info.size > 0 {
        let whole = ByteRange {
            start: 0,
            end: info.size,
        };
        let rec = fetcher.remote.reconstruct(info.hash, whole).await?;
        if rec.file_size != info.size {
            return Err(Error::BadAnswer {
                what: format!("reconstruction of {}", info.hash),
                reason: format!(
                    "file size {} but the file is {} bytes",
                    rec.file_size, info.size
                ),
            });
        }
        // Only what the journal says about this reconstruction's terms.
        let spans = term_spans(&rec);
        let done: HashSet<(u64, u64)> = journal
            .as_mut()
            .map(|j| std::mem::take(&mut j.done))
            .unwrap_or_default()
            .into_iter()
            .filter(|s| spans.contains(s))
            .collect();
        for &(a, b) in &done {
            digest.add(a, b - a, None);
            resumed += b - a;
        }
        fetcher.progress.advance(Stage::Download, resumed);
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
        Some((_, Some(sha))) if sha != info.sha256 => {
            Some(format!("SHA-256 {sha} instead of {}", info.sha256))
        }
        Some(_) => None,
    };
    if let Some(reason) = mismatch {
        let _ = fs::remove_file(&part);
        let _ = fs::remove_file(&journal_path);
        return Err(Error::Mismatch {
            path: targets[0].path.clone(),
            reason,
        });
    }
    let (work, hash) = (work.clone(), info.hash);
    tokio::task::spawn_blocking(move || {
        let source = Source::Part {
            path: &part,
            file: &sink.file,
        };
        place(&work, hash, source, &targets)?;
        match fs::remove_file(&journal_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&journal_path)(e)),
            _ => Ok(()),
        }
    })
    .await
    .expect("placing does not panic")?;
    Ok((transfer, resumed))
}

/// Where the bytes put in place come from.
pub(super) enum Source<'a> {
    /// The verified `.part` of this fetch.
    Part { path: &'a Path, file: &'a File },
    /// A file already at another target of the same content, checked when
    /// it was examined; each copy of it is hashed again.
    Kept(&'a Path),
}

/// Puts a file of content `hash` at every target: copies of `source`
/// (made under `<hash>.copy`) at all but the first, and the `.part`
/// itself at the first when it is the source. Blocking.
pub(super) fn place(
    work: &WorkDir,
    hash: FileHash,
    source: Source<'_>,
    targets: &[Target],
) -> Result<()> {
    let (from, copies) = match source {
        Source::Part { path, .. } => (path, &targets[1..]),
        Source::Kept(path) => (path, targets),
    };
    for t in copies {
        let copy = work.temp(&format!("{hash}.copy"));
        fs::copy(from, &copy).map_err(Error::io(&copy))?;
        if matches!(source, Source::Kept(_)) && hash_file(&copy, &NoProgress)?.file_hash != hash {
            let _ = fs::remove_file(&copy);
            return Err(Error::Mismatch {
                path: t.path.clone(),
                reason: format!("{} changed while it was copied", from.display()),
            });
        }
        let f = File::open(&copy).map_err(Error::io(&copy))?;
        publish(work, hash, &copy, &f, t)?;
    }
    if let Source::Part { path, file } = source {
        publish(work, hash, path, file, &targets[0])?;
    }
    Ok(())
}

/// Makes a verified temporary durable (data and mode), renames it to its
/// target, syncs the target's directory, then records it.
fn publish(work: &WorkDir, hash: FileHash, tmp: &Path, file: &File, t: &Target) -> Result<()> {
    if let Some(mode) = t.mode {
        file.set_permissions(fs::Permissions::from_mode(mode & 0o777))
            .map_err(Error::io(tmp))?;
    }
    file.sync_all().map_err(Error::io(tmp))?;
    fs::rename(tmp, &t.path).map_err(Error::io(&t.path))?;
    let dir = t.dir();
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(dir))?;
    let meta = fs::symlink_metadata(&t.path).map_err(Error::io(&t.path))?;
    work.record(hash, &meta)
}

/// Files smaller than this are fetched without a journal.
pub(super) const JOURNAL_MIN: u64 = 8 << 20;

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
        // At the end the digest advances even with nothing pending: a
        // fetch whose every term was resumed hashes them here.
        if end
            || (!pending.is_empty() && (bytes >= threshold || last.elapsed() >= CHECKPOINT_EVERY))
        {
            let (sink, (mut j, mut d)) = (sink.clone(), state.take().expect("returned"));
            let terms = std::mem::take(&mut pending);
            let synced = tokio::task::spawn_blocking(move || {
                if let (Some(j), false) = (&mut j, terms.is_empty()) {
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
