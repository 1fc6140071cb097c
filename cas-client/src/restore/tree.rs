//! A tree: every path checked and every target vetted before the first
//! byte is fetched, then the files concurrently.

use std::fs;
use std::path::{Component, Path, PathBuf};

use cas_protocol::tree::{check_path, Tree};
use futures_util::StreamExt;

use crate::error::{Error, Result};
use crate::fetch::{Fetcher, Transfer};

use super::file::{check_target, fetch_file};

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
}
