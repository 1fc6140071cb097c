//! Writing fetched files and trees to disk. Everything not yet verified
//! lives in the destination's work directory, under names no tree entry
//! and no neighbour can have; a file is renamed to its final name only
//! once its file hash and SHA-256 are checked, so nothing unverified ever
//! stands under a final name. Fetches to one destination take turns on
//! the work directory's lock, and the same command run again after any
//! interruption finishes the job: files already in place and correct are
//! kept (checked, not assumed), partial ones resume from their journal.
//!
//! - [`workdir`]: where temporaries live, the lock, records of placed files;
//! - [`target`]: what already stands where a file goes;
//! - [`file`]: one file, from `.part` and journal to its final names;
//! - [`batch`]: small files of a tree, many per request, verified in
//!   memory and synced together;
//! - [`journal`]: which verified terms are on disk, for resuming;
//! - [`digest`]: file hash and SHA-256 computed in file order as terms
//!   are verified;
//! - [`tree`]: a tree's directories, checked paths, and its files.

mod batch;
mod digest;
mod file;
mod journal;
mod target;
mod tree;
mod workdir;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cas_protocol::FileHash;
use serde::Serialize;

use crate::error::Result;
use crate::fetch::{Fetcher, Transfer};
use crate::progress::Stage;
use crate::remote::FileInfo;

use target::{decide, examine, Target};
use workdir::WorkDir;

pub(crate) use tree::fetch_tree;

/// What a fetch did.
#[derive(Debug, Clone, Serialize)]
pub struct FetchReport {
    pub hash: FileHash,
    pub path: PathBuf,
    /// Whether `hash` named a tree (restored as a directory).
    pub tree: bool,
    pub files: u64,
    /// File bytes in place at the end.
    pub bytes: u64,
    /// File bytes an earlier, interrupted fetch had already verified.
    pub resumed_bytes: u64,
    /// Files that were already in place with the right content (checked)
    /// and were kept, and their bytes.
    pub kept_files: u64,
    pub kept_bytes: u64,
    #[serde(flatten)]
    pub transfer: Transfer,
    pub seconds: f64,
}

/// What writing a file or a tree did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub transfer: Transfer,
    pub resumed_bytes: u64,
    pub kept_files: u64,
    pub kept_bytes: u64,
}

/// Fetches one file to `dest`, keeping it if it is already there.
pub(crate) async fn fetch_file(
    fetcher: &Fetcher,
    info: &FileInfo,
    dest: &Path,
    force: bool,
) -> Result<Outcome> {
    let work = acquire(WorkDir::path_for(dest, false)?, dest).await?;
    let r = async {
        let target = Target {
            path: dest.to_owned(),
            mode: None,
        };
        let (w, t, size, hash, kind) = (
            work.clone(),
            target.clone(),
            info.size,
            info.hash,
            info.kind,
        );
        let write = tokio::task::spawn_blocking(move || {
            decide(examine(&w, &t.path, size, hash, kind)?, &t, force)
        })
        .await
        .expect("examining does not panic")?;
        if !write {
            fetcher.progress.advance(Stage::Download, size);
            return Ok(Outcome {
                kept_files: 1,
                kept_bytes: size,
                ..Outcome::default()
            });
        }
        let (transfer, resumed_bytes) =
            file::fetch_into(fetcher, &work, info, vec![target]).await?;
        Ok(Outcome {
            transfer,
            resumed_bytes,
            ..Outcome::default()
        })
    }
    .await;
    finish(work, r).await
}

/// Takes the work directory at `path` for a fetch to `dest`, saying so
/// when another fetch to `dest` holds it and this one waits.
async fn acquire(path: PathBuf, dest: &Path) -> Result<Arc<WorkDir>> {
    let dest = dest.to_owned();
    tokio::task::spawn_blocking(move || {
        WorkDir::acquire(&path, || {
            tracing::warn!(
                "another fetch is writing {}; waiting for it to finish",
                dest.display()
            )
        })
    })
    .await
    .expect("locking does not panic")
    .map(Arc::new)
}

/// Ends a fetch's use of its work directory: removed after success; after
/// a failure kept for the next run if it holds progress.
async fn finish(work: Arc<WorkDir>, r: Result<Outcome>) -> Result<Outcome> {
    // After a failure a file job may still be in a blocking step, holding
    // the work directory (and its lock) until that step ends: it is left
    // as it is. After success every job has ended.
    let Some(work) = Arc::into_inner(work) else {
        debug_assert!(r.is_err(), "a job outlived a successful fetch");
        return r;
    };
    tokio::task::spawn_blocking(move || match r {
        Ok(outcome) => work.remove().map(|()| outcome),
        Err(e) => {
            let _ = work.close();
            Err(e)
        }
    })
    .await
    .expect("cleaning up does not panic")
}
