//! Trees: a directory listing stored as an ordinary file, so one file hash
//! names a whole model directory. Entries are kept sorted by path bytes, so
//! the same directory always encodes to the same bytes and the same hash.
//!
//! Paths are untrusted input that a client will turn into filesystem paths,
//! so the rules are strict: relative, `/`-separated, no empty, `.` or `..`
//! components, no NUL or backslash.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::codec::impl_message;
use crate::hash::FileHash;

/// Largest encoded tree.
pub const MAX_TREE_BYTES: usize = 256 * 1024 * 1024;
/// Most entries in one tree.
pub const MAX_TREE_ENTRIES: usize = 4 * 1024 * 1024;
/// Longest path, in bytes (Linux PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest path component, in bytes (Linux NAME_MAX).
pub const MAX_COMPONENT_LEN: usize = 255;
/// The only mode bits a tree may carry: permissions, never setuid/setgid/sticky.
pub const MODE_MASK: u32 = 0o777;

/// One regular file of a tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct TreeEntry {
    pub path: String,
    pub mode: u32,
    pub size: u64,
    pub file: FileHash,
}

/// A directory listing: regular files only (empty directories and symlinks
/// are not recorded).
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
pub struct Tree {
    pub entries: Vec<TreeEntry>,
}

impl_message!(Tree, "tree", b"CTRE", MAX_TREE_BYTES);

/// A node of a tree listing ([`Tree::list`]): a file, or a directory
/// (named by its path; directories are implied by the files' paths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node<'a> {
    File(&'a TreeEntry),
    Dir(&'a str),
}

/// Why a path may not appear in a tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("path longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    #[error("absolute path")]
    Absolute,
    #[error("empty path component")]
    EmptyComponent,
    #[error("`.` or `..` component")]
    DotComponent,
    #[error("component longer than {MAX_COMPONENT_LEN} bytes")]
    ComponentTooLong,
    #[error("NUL or backslash in path")]
    ForbiddenByte,
}

/// Checks one tree path against the rules above.
pub fn check_path(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    if path.bytes().any(|b| b == 0 || b == b'\\') {
        return Err(PathError::ForbiddenByte);
    }
    for c in path.split('/') {
        match c {
            "" => return Err(PathError::EmptyComponent),
            "." | ".." => return Err(PathError::DotComponent),
            c if c.len() > MAX_COMPONENT_LEN => return Err(PathError::ComponentTooLong),
            _ => {}
        }
    }
    Ok(())
}

impl Tree {
    /// A tree of these entries in canonical (sorted) order; validity is
    /// checked when it is encoded and decoded.
    pub fn new(mut entries: Vec<TreeEntry>) -> Self {
        entries.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        Self { entries }
    }

    /// The entry at `path`, found by binary search (entries are sorted).
    pub fn get(&self, path: &str) -> Option<&TreeEntry> {
        self.entries
            .binary_search_by(|e| e.path.as_bytes().cmp(path.as_bytes()))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// The entries under directory `dir` (`""`: all of them). Paths with a
    /// common prefix sort together, so they are one contiguous run.
    pub fn under(&self, dir: &str) -> &[TreeEntry] {
        if dir.is_empty() {
            return &self.entries;
        }
        let prefix = format!("{dir}/");
        let start = self
            .entries
            .partition_point(|e| e.path.as_bytes() < prefix.as_bytes());
        let len = self.entries[start..].partition_point(|e| e.path.starts_with(&prefix));
        &self.entries[start..start + len]
    }

    /// One page of the listing of directory `dir` (`""`: the root): its
    /// files and directories, and with `recursive` everything below them,
    /// each directory before its contents. The page starts at entry
    /// `cursor` of [`under(dir)`](Self::under) and ends after the entry
    /// that brings it to at least `limit` nodes; the next page's cursor
    /// comes back with it (`None` after the last page).
    pub fn list(
        &self,
        dir: &str,
        recursive: bool,
        cursor: usize,
        limit: usize,
    ) -> (Vec<Node<'_>>, Option<usize>) {
        let run = self.under(dir);
        let base = if dir.is_empty() { 0 } else { dir.len() + 1 };
        let mut out = Vec::new();
        let mut i = cursor;
        while i < run.len() && out.len() < limit.max(1) {
            let path = run[i].path.as_str();
            let rest = &path[base..];
            if !recursive {
                match rest.find('/') {
                    None => {
                        out.push(Node::File(&run[i]));
                        i += 1;
                    }
                    Some(k) => {
                        // One node for the subdirectory, then past all of it.
                        let sub = &path[..base + k];
                        out.push(Node::Dir(sub));
                        i += self.under(sub).len();
                    }
                }
                continue;
            }
            // The directories this entry opens: those not shared with the
            // entry before it (a directory's entries are contiguous).
            let before = if i > 0 {
                Some(run[i - 1].path.as_str())
            } else {
                None
            };
            for (k, _) in rest.match_indices('/') {
                let sub = &path[..base + k];
                let shared = before.is_some_and(|b| {
                    b.len() > sub.len() && b.starts_with(sub) && b.as_bytes()[sub.len()] == b'/'
                });
                if !shared {
                    out.push(Node::Dir(sub));
                }
            }
            out.push(Node::File(&run[i]));
            i += 1;
        }
        (out, (i < run.len()).then_some(i))
    }

    fn check(&self) -> Result<(), String> {
        if self.entries.len() > MAX_TREE_ENTRIES {
            return Err(format!(
                "{} entries, at most {MAX_TREE_ENTRIES}",
                self.entries.len()
            ));
        }
        let mut dirs = HashSet::new();
        for (i, e) in self.entries.iter().enumerate() {
            check_path(&e.path).map_err(|err| format!("path {:?}: {err}", e.path))?;
            if e.mode & !MODE_MASK != 0 {
                return Err(format!(
                    "path {:?}: mode {:o} has bits beyond {MODE_MASK:o}",
                    e.path, e.mode
                ));
            }
            if i > 0 && self.entries[i - 1].path.as_bytes() >= e.path.as_bytes() {
                return Err(format!("path {:?} is out of order or repeated", e.path));
            }
            let mut end = 0;
            while let Some(p) = e.path[end..].find('/') {
                end += p;
                dirs.insert(&e.path[..end]);
                end += 1;
            }
        }
        match self.entries.iter().find(|e| dirs.contains(e.path.as_str())) {
            Some(e) => Err(format!("path {:?} is both a file and a directory", e.path)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Message;
    use proptest::prelude::*;

    fn entry(path: &str) -> TreeEntry {
        TreeEntry {
            path: path.into(),
            mode: 0o644,
            size: 1,
            file: FileHash::from_bytes([4; 32]),
        }
    }

    #[test]
    fn path_rules() {
        for ok in [
            "a",
            "a/b",
            "model-00001-of-00002.safetensors",
            "dir/.hidden",
            "a..b",
            "é/ü",
        ] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for (bad, err) in [
            ("", PathError::Empty),
            ("/etc/passwd", PathError::Absolute),
            ("a//b", PathError::EmptyComponent),
            ("a/", PathError::EmptyComponent),
            ("..", PathError::DotComponent),
            ("a/../../b", PathError::DotComponent),
            ("./a", PathError::DotComponent),
            ("a\0b", PathError::ForbiddenByte),
            ("a\\..\\b", PathError::ForbiddenByte),
        ] {
            assert_eq!(check_path(bad), Err(err), "{bad:?}");
        }
        assert_eq!(
            check_path(&"a".repeat(256)),
            Err(PathError::ComponentTooLong)
        );
        assert_eq!(check_path(&"a/".repeat(2049)), Err(PathError::TooLong));
    }

    #[test]
    fn canonical_order_and_conflicts() {
        let t = Tree::new(vec![entry("b"), entry("a/c"), entry("a.txt")]);
        assert_eq!(
            t.entries
                .iter()
                .map(|e| e.path.as_str())
                .collect::<Vec<_>>(),
            ["a.txt", "a/c", "b"]
        );
        assert_eq!(Tree::from_bytes(&t.to_bytes()).unwrap(), t);
        let unsorted = Tree {
            entries: vec![entry("b"), entry("a")],
        };
        assert!(Tree::from_bytes(&unsorted.to_bytes()).is_err());
        let dup = Tree {
            entries: vec![entry("a"), entry("a")],
        };
        assert!(Tree::from_bytes(&dup.to_bytes()).is_err());
        let conflict = Tree::new(vec![entry("a"), entry("a/b")]);
        assert!(Tree::from_bytes(&conflict.to_bytes()).is_err());
        let mut suid = entry("x");
        suid.mode = 0o4755;
        assert!(Tree::from_json(Tree::new(vec![suid]).to_json().as_bytes()).is_err());
        let abs = Tree::new(vec![entry("/x")]);
        assert!(Tree::from_json(abs.to_json().as_bytes()).is_err());
    }

    #[test]
    fn lookups_and_listings() {
        let t = Tree::new(
            ["a-b/x", "a.txt", "a/c", "a/d/e", "a/d/f", "b", "z/y/x"]
                .map(entry)
                .to_vec(),
        );
        assert_eq!(t.get("a/d/e").unwrap().path, "a/d/e");
        assert!(t.get("a/d").is_none() && t.get("a").is_none() && t.get("").is_none());
        let paths = |es: &[TreeEntry]| es.iter().map(|e| e.path.clone()).collect::<Vec<_>>();
        assert_eq!(paths(t.under("a")), ["a/c", "a/d/e", "a/d/f"]);
        assert_eq!(paths(t.under("a/d")), ["a/d/e", "a/d/f"]);
        assert!(t.under("a/c").is_empty() && t.under("q").is_empty());
        assert_eq!(t.under("").len(), 7);
        let show = |nodes: Vec<Node<'_>>| {
            nodes
                .iter()
                .map(|n| match n {
                    Node::File(e) => e.path.clone(),
                    Node::Dir(d) => format!("{d}/"),
                })
                .collect::<Vec<_>>()
        };
        let (top, next) = t.list("", false, 0, 100);
        assert_eq!(show(top), ["a-b/", "a.txt", "a/", "b", "z/"]);
        assert_eq!(next, None);
        let (all, _) = t.list("", true, 0, 100);
        let want = [
            "a-b/", "a-b/x", "a.txt", "a/", "a/c", "a/d/", "a/d/e", "a/d/f", "b", "z/", "z/y/",
            "z/y/x",
        ];
        assert_eq!(show(all), want);
        assert_eq!(show(t.list("a", false, 0, 100).0), ["a/c", "a/d/"]);
        assert_eq!(
            show(t.list("a", true, 0, 100).0),
            ["a/c", "a/d/", "a/d/e", "a/d/f"]
        );
        // Pages of every size concatenate to the whole listing, each
        // directory once.
        for limit in 1..=13 {
            for recursive in [false, true] {
                let mut got = Vec::new();
                let mut cursor = Some(0);
                while let Some(c) = cursor {
                    let (page, next) = t.list("", recursive, c, limit);
                    assert!(!page.is_empty());
                    got.extend(show(page));
                    cursor = next;
                }
                assert_eq!(got, show(t.list("", recursive, 0, 100).0), "{limit}");
            }
        }
    }

    proptest! {
        #[test]
        fn valid_trees_round_trip(names in proptest::collection::btree_set("[a-z0-9_.-]{1,12}(/[a-z0-9_]{1,8}){0,3}", 0..40)) {
            let entries: Vec<_> = names.iter()
                .filter(|n| check_path(n).is_ok())
                .map(|n| entry(&format!("f/{n}")))
                .collect();
            let t = Tree::new(entries);
            if let Ok(back) = Tree::from_bytes(&t.to_bytes()) {
                prop_assert_eq!(&back, &t);
                prop_assert_eq!(Tree::from_json(t.to_json().as_bytes()).unwrap(), back);
            } else {
                // Only a file/directory conflict may make a generated tree invalid.
                let conflict = t.entries.iter().any(|a| {
                    let dir = format!("{}/", a.path);
                    t.entries.iter().any(|b| b.path.starts_with(&dir))
                });
                prop_assert!(conflict);
            }
        }
    }
}
