//! What a mirror learned about small files: the SHA-256 of the bytes a git
//! blob id names. The Hub lists small files by git blob id only, and the
//! server finds stored files by SHA-256 (`POST /v1/sha256`), so after a
//! group of files is committed their `blob-id sha256` pairs are appended
//! here; a rerun (after kill -9, or for a newer revision) asks the server
//! for those SHA-256s instead of downloading the files again.
//!
//! A line is a fact about content, true for every server and repository;
//! whether a server still stores the file is asked every time. One append
//! per group (`O_APPEND`); a line cut short by a crash, or anything else
//! that is not `<40 hex> <64 hex>`, is skipped.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use cas_protocol::Sha256;

/// The journal file (in the client's cache directory).
pub struct Journal {
    path: PathBuf,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Journal {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// Git blob id -> SHA-256, as recorded so far (empty when there is no
    /// journal yet or it cannot be read: the mirror then downloads).
    pub fn load(&self) -> HashMap<String, Sha256> {
        let text = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
            Err(e) => {
                tracing::warn!("cannot read {}: {e}", self.path.display());
                return HashMap::new();
            }
        };
        String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| {
                let (blob, sha) = l.split_once(' ')?;
                if !is_hex(blob, 40) || !is_hex(sha, 64) {
                    return None;
                }
                Some((blob.to_owned(), sha.parse().ok()?))
            })
            .collect()
    }

    /// Appends `(git blob id, SHA-256)` pairs of files just committed. A
    /// failure costs only downloads on a later run: it is a warning.
    pub fn record(&self, pairs: &[(&str, Sha256)]) {
        if pairs.is_empty() {
            return;
        }
        let text: String = pairs
            .iter()
            .map(|(blob, sha)| format!("{blob} {sha}\n"))
            .collect();
        let written = (|| {
            if let Some(dir) = self.path.parent() {
                fs::create_dir_all(dir)?;
            }
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?
                .write_all(text.as_bytes())
        })();
        if let Err(e) = written {
            tracing::warn!(
                "cannot record mirrored files in {}: {e}",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pairs survive a reload; a line cut short and garbage are skipped.
    #[test]
    fn pairs_are_kept_and_torn_lines_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path().join("sub/mirror-blobs"));
        assert!(j.load().is_empty());
        let a = Sha256::of(b"a");
        let blob = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391";
        j.record(&[(blob, a)]);
        let mut f = OpenOptions::new().append(true).open(&j.path).unwrap();
        f.write_all(format!("{blob}x {a}\nnot a line\n{}", &blob[..20]).as_bytes())
            .unwrap();
        let m = j.load();
        assert_eq!(m.len(), 1);
        assert_eq!(m[blob], a);
    }
}
