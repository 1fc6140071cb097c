//! The small files of a tree, in batches: one reconstruction request
//! answers up to [`MAX_BATCH_FILES`] files, their ranges are joined per
//! xorb into a few GETs, every byte is verified in memory (range hashes per
//! term, then file hash per file, and SHA-256 if asked), and the files are written in
//! parallel. Durability is one `syncfs` per batch instead of two syncs per
//! file (a batch of a few files syncs each: see [`sync_each`]).
//!
//! Crash ordering (what a kill or a power loss at each step leaves, and
//! what the next run of the same command does with it):
//! 1. Nothing reaches the disk before the whole batch is verified in
//!    memory; a crash before that loses the batch's transfer only.
//! 2. Each file of the batch is written to `<file hash>.<n>.small` in the
//!    work directory, with its permission bits. A crash leaves temporaries
//!    that the next run overwrites.
//! 3. One `syncfs` (a sync of each, for a few) makes the temporaries
//!    durable; then each is renamed to
//!    its final name and recorded in `placed`. A crash here leaves some
//!    files under their names, complete (their data was durable before the
//!    rename): the next run keeps them (after hashing them when their
//!    record is missing) and fetches the rest. A power loss may undo
//!    renames that were not yet durable: those files are fetched again.
//!    It never leaves a partial file under a final name.
//! 4. The tree fetch ends with one more `syncfs` (or a sync of each
//!    directory renamed into, for a few), so every rename is durable
//!    before the work directory goes and the command succeeds.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cas_protocol::messages::{FileReconstruction, MAX_BATCH_FILES};
use cas_protocol::{ChunkInfo, FileHasher, Sha256};
use futures_util::StreamExt;
use rayon::prelude::*;

use super::target::Target;
use super::tree::Group;
use super::workdir::WorkDir;
use crate::error::{Error, Result};
use crate::fetch::{plan_batch, Fetcher, MemSink, Transfer, Window};

/// File bytes of one batch, held in memory until they are verified and
/// written.
const BATCH_BYTES: u64 = 32 << 20;
/// Batches in flight at once: one downloads while another is written.
const BATCHES_IN_FLIGHT: usize = 2;

/// Fetches `groups` (each smaller than [`super::file::JOURNAL_MIN`]) in
/// batches and puts each at its targets.
pub(super) async fn fetch_small(
    fetcher: &Fetcher,
    work: &Arc<WorkDir>,
    groups: Vec<Group>,
) -> Result<Transfer> {
    let mut batches: Vec<Vec<Group>> = Vec::new();
    let mut bytes = 0;
    for g in groups {
        match batches.last_mut() {
            Some(b) if b.len() < MAX_BATCH_FILES && bytes + g.size <= BATCH_BYTES => {
                bytes += g.size;
                b.push(g);
            }
            _ => {
                bytes = g.size;
                batches.push(vec![g]);
            }
        }
    }
    let mut runs = futures_util::stream::iter(batches)
        .map(|b| fetch_batch(fetcher, work, b))
        .buffer_unordered(BATCHES_IN_FLIGHT);
    let mut total = Transfer::default();
    while let Some(t) = runs.next().await {
        total += t?;
    }
    Ok(total)
}

async fn fetch_batch(
    fetcher: &Fetcher,
    work: &Arc<WorkDir>,
    groups: Vec<Group>,
) -> Result<Transfer> {
    let hashes: Vec<_> = groups.iter().map(|g| g.hash).collect();
    let files = fetcher.remote.reconstruct_batch(&hashes).await?;
    let mut bases = Vec::with_capacity(groups.len());
    let mut total = 0u64;
    for (g, f) in groups.iter().zip(&files) {
        let size = f.reconstruction.file_size;
        if size != g.size {
            return Err(Error::BadAnswer {
                what: format!("tree entry {}", g.name),
                reason: format!("tree says {} bytes, the server {size}", g.size),
            });
        }
        bases.push(total);
        total += size;
    }
    let laid: Vec<_> = bases
        .iter()
        .zip(&files)
        .map(|(&b, f)| (b, &f.reconstruction))
        .collect();
    let units = plan_batch(&laid)?;
    let sink = Arc::new(MemSink(Mutex::new(vec![0; total as usize])));
    let window = Window {
        skip: 0,
        len: total,
    };
    let mut chunks: Vec<(u64, Vec<ChunkInfo>)> = Vec::new();
    let transfer = fetcher
        .run_units(units, sink.clone(), window, |terms| {
            for t in terms {
                chunks.push((t.placed.offset, t.chunks.unwrap_or_default()));
            }
            Ok(())
        })
        .await?;
    chunks.sort_unstable_by_key(|c| c.0);
    let bytes = std::mem::take(&mut *sink.0.lock().expect("not poisoned"));
    let (work, sha256) = (work.clone(), fetcher.verify_sha256);
    tokio::task::spawn_blocking(move || {
        let temps = write_verified(&work, &groups, &files, &bases, &bytes, &chunks, sha256)?;
        drop(bytes);
        sync_each(temps.iter().flatten(), work.path())?;
        for (g, temps) in groups.iter().zip(temps) {
            for (temp, t) in temps.iter().zip(&g.write) {
                fs::rename(temp, &t.path).map_err(Error::io(&t.path))?;
                let meta = fs::symlink_metadata(&t.path).map_err(Error::io(&t.path))?;
                work.record(g.hash, &meta)?;
            }
        }
        Ok(transfer)
    })
    .await
    .expect("writing does not panic")
}

/// Checks every file of the batch against its hash (and SHA-256 if
/// `sha256`) and writes it to a temporary per target, in parallel; returns
/// the temporaries.
fn write_verified(
    work: &WorkDir,
    groups: &[Group],
    files: &[FileReconstruction],
    bases: &[u64],
    bytes: &[u8],
    chunks: &[(u64, Vec<ChunkInfo>)],
    sha256: bool,
) -> Result<Vec<Vec<PathBuf>>> {
    groups
        .par_iter()
        .zip(files)
        .zip(bases)
        .map(|((g, f), &base)| {
            let data = &bytes[base as usize..(base + g.size) as usize];
            let mut hasher = FileHasher::new(f.kind);
            // The verified terms of this file, in order; they cover it
            // exactly (the plan placed each term at its offset).
            let first = chunks.partition_point(|c| c.0 < base);
            let mut covered = base;
            for (offset, infos) in chunks[first..].iter().take_while(|c| c.0 < base + g.size) {
                if *offset != covered {
                    break;
                }
                infos.iter().for_each(|c| hasher.push(c));
                covered += infos.iter().map(|c| u64::from(c.len)).sum::<u64>();
            }
            let h = hasher.finish();
            let s = sha256.then(|| Sha256::of(data));
            let reason = if covered != base + g.size {
                Some("the reconstruction does not cover the file".to_owned())
            } else if h != g.hash {
                Some(format!("file hash {h} instead of {}", g.hash))
            } else {
                s.filter(|s| *s != f.sha256)
                    .map(|s| format!("SHA-256 {s} instead of {}", f.sha256))
            };
            if let Some(reason) = reason {
                return Err(Error::Mismatch {
                    path: g.write[0].path.clone(),
                    reason,
                });
            }
            g.write
                .iter()
                .enumerate()
                .map(|(n, t)| write_temp(&work.temp(&format!("{}.{n}.small", g.hash)), t, data))
                .collect()
        })
        .collect()
}

/// Writes `data` to `temp` with the target's permission bits (not synced:
/// the batch is synced at once).
fn write_temp(temp: &Path, t: &Target, data: &[u8]) -> Result<PathBuf> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(temp)
        .map_err(Error::io(temp))?;
    f.write_all(data).map_err(Error::io(temp))?;
    if let Some(mode) = t.mode {
        f.set_permissions(fs::Permissions::from_mode(mode & 0o777))
            .map_err(Error::io(temp))?;
    }
    Ok(temp.to_owned())
}

/// Up to this many files or directories, syncing each is cheaper than one
/// `syncfs`, which also flushes everything else dirty on the filesystem:
/// other programs' writes, the chunk cache's unsynced entries, the large
/// files of the same fetch.
const SYNC_EACH_MAX: usize = 64;

/// Makes `paths` (files or directories on the filesystem holding `dir`)
/// durable: each synced when they are few, else the whole filesystem.
pub(super) fn sync_each<'a>(
    paths: impl IntoIterator<Item = &'a PathBuf>,
    dir: &Path,
) -> Result<()> {
    let paths: Vec<&PathBuf> = paths.into_iter().collect();
    if paths.len() <= SYNC_EACH_MAX {
        return paths.par_iter().try_for_each(|p| {
            File::open(p)
                .and_then(|f| f.sync_all())
                .map_err(Error::io(p))
        });
    }
    let d = File::open(dir).map_err(Error::io(dir))?;
    rustix::fs::syncfs(&d).map_err(|e| Error::io(dir)(e.into()))
}
