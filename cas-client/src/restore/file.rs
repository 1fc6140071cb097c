//! One file: positioned writes into `NAME.part`, checkpoints of verified
//! terms in `NAME.part.journal`, the final check, then the rename.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cas_protocol::ByteRange;

use crate::error::{Error, Result};
use crate::fetch::{Fetcher, FileSink, Sink, TermDone, Transfer};
use crate::progress::Stage;
use crate::remote::FileInfo;

use super::digest::InOrder;
use super::journal::Journal;

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(suffix);
    path.with_file_name(name)
}

/// Fails unless `path` is absent, or a regular file and `force` is set.
pub(super) fn check_target(path: &Path, force: bool) -> Result<()> {
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
    let mut digest = InOrder::default();
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

#[cfg(test)]
mod tests {
    use super::*;

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
