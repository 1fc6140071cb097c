//! A tree: every path checked and everything already there examined
//! before the first byte is fetched, then each content once.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use cas_protocol::tree::{check_path, Tree};
use cas_protocol::{FileHash, Kind};
use futures_util::StreamExt;

use super::batch::{fetch_small, sync_each};
use super::file::{fetch_into, place, Source, JOURNAL_MIN};
use super::target::{decide, examine, Target};
use super::workdir::WorkDir;
use super::{acquire, finish, Outcome};
use crate::error::{Error, Result};
use crate::fetch::{Fetcher, Transfer};
use crate::progress::Stage;

/// Creates the directories leading to `rel` under `root`, refusing to pass
/// through anything that is not a real directory (a symlink planted in the
/// target must not redirect writes outside it). `checked` holds the
/// directories already checked or created by this fetch.
fn prepare_parents(root: &Path, rel: &str, checked: &mut HashSet<PathBuf>) -> Result<PathBuf> {
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
        if checked.contains(&cur) {
            continue;
        }
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
        checked.insert(cur.clone());
    }
    Ok(root.join(rel_path))
}

/// The files of one content a tree holds: where it must be written, and
/// where it already is.
pub(super) struct Group {
    pub hash: FileHash,
    pub size: u64,
    /// A tree path of it, for messages.
    pub name: String,
    pub write: Vec<Target>,
    pub kept: Option<PathBuf>,
}

/// Restores a tree under `dest` (a directory, created if absent): every
/// path is checked and everything already there examined before the first
/// byte is fetched; then each content is fetched once, concurrently, and
/// put at each of its paths: small files in batches first ([`batch`]),
/// then the others (each resumable on its own, [`super::file`]).
pub(crate) async fn fetch_tree(
    fetcher: &Fetcher,
    tree: &Tree,
    dest: &Path,
    force: bool,
    parallel_files: usize,
) -> Result<Outcome> {
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::Input {
                path: dest.to_owned(),
                reason: "exists and is not a directory; a tree goes into a directory".into(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dest).map_err(Error::io(dest))?
        }
        Err(e) => return Err(Error::io(dest)(e)),
    }
    let work = acquire(WorkDir::path_for(dest, true)?, dest).await?;
    let r = restore(fetcher, &work, tree, dest, force, parallel_files).await;
    finish(work, r).await
}

async fn restore(
    fetcher: &Fetcher,
    work: &Arc<WorkDir>,
    tree: &Tree,
    dest: &Path,
    force: bool,
    parallel_files: usize,
) -> Result<Outcome> {
    let (w, t, d) = (work.clone(), tree.clone(), dest.to_owned());
    let (groups, mut outcome) = tokio::task::spawn_blocking(move || examine_all(&w, &t, &d, force))
        .await
        .expect("examining does not panic")?;
    fetcher
        .progress
        .advance(Stage::Download, outcome.kept_bytes);
    // Small files have no journal (a `.part` an earlier run left of one is
    // simply not used), so nothing of theirs is lost by batching them.
    let (small, single): (Vec<Group>, Vec<Group>) = groups
        .into_iter()
        .filter(|g| !g.write.is_empty())
        .partition(|g| g.kept.is_none() && g.size < JOURNAL_MIN);
    // Where the batches rename files to: made durable at the end.
    let renamed: BTreeSet<PathBuf> = small
        .iter()
        .flat_map(|g| &g.write)
        .map(|t| t.dir().to_owned())
        .collect();
    if !small.is_empty() {
        outcome.transfer += fetch_small(fetcher, work, small).await?;
    }
    let jobs = single.into_iter().map(|g| async move {
        if let Some(kept) = g.kept {
            let w = work.clone();
            tokio::task::spawn_blocking(move || place(&w, g.hash, Source::Kept(&kept), &g.write))
                .await
                .expect("placing does not panic")?;
            fetcher.progress.advance(Stage::Download, g.size);
            return Ok((Transfer::default(), 0));
        }
        let info = fetcher.remote.file_info(g.hash).await?;
        if info.size != g.size {
            return Err(Error::BadAnswer {
                what: format!("tree entry {}", g.name),
                reason: format!("tree says {} bytes, the server {}", g.size, info.size),
            });
        }
        fetch_into(fetcher, work, &info, g.write).await
    });
    let mut runs = futures_util::stream::iter(jobs).buffer_unordered(parallel_files.max(1));
    while let Some(r) = runs.next().await {
        let (t, r) = r?;
        outcome.transfer += t;
        outcome.resumed_bytes += r;
    }
    if !renamed.is_empty() {
        // The renames of the batches are durable before the fetch ends.
        let dir = dest.to_owned();
        tokio::task::spawn_blocking(move || sync_each(&renamed, &dir))
            .await
            .expect("syncing does not panic")?;
    }
    Ok(outcome)
}

/// Checks every path of `tree`, creates its directories and examines what
/// is at each file's place, grouping the files by content in tree order.
/// Blocking.
fn examine_all(
    work: &WorkDir,
    tree: &Tree,
    dest: &Path,
    force: bool,
) -> Result<(Vec<Group>, Outcome)> {
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<(FileHash, u64), usize> = HashMap::new();
    let mut outcome = Outcome::default();
    let mut checked = HashSet::new();
    for e in &tree.entries {
        let target = Target {
            path: prepare_parents(dest, &e.path, &mut checked)?,
            mode: Some(e.mode),
        };
        let found = examine(work, &target.path, e.size, e.file, Kind::File)?;
        let write = decide(found, &target, force)?;
        let g = *index.entry((e.file, e.size)).or_insert_with(|| {
            groups.push(Group {
                hash: e.file,
                size: e.size,
                name: e.path.clone(),
                write: Vec::new(),
                kept: None,
            });
            groups.len() - 1
        });
        if write {
            groups[g].write.push(target);
        } else {
            outcome.kept_files += 1;
            outcome.kept_bytes += e.size;
            groups[g].kept = Some(target.path);
        }
    }
    Ok((groups, outcome))
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
        let mut checked = HashSet::new();
        assert_eq!(
            prepare_parents(&root, "a/b/c", &mut checked).unwrap(),
            root.join("a/b/c")
        );
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
                matches!(
                    prepare_parents(&root, bad, &mut checked),
                    Err(Error::UnsafePath { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }
}
