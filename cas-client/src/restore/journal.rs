//! The journal of a file fetch: which terms are verified and on disk, so
//! an interrupted fetch resumes where it stopped.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fetch::PlacedTerm;

/// Records which terms of a file fetch are verified and on disk, so an
/// interrupted fetch resumes where it stopped. Text, one `start end` line
/// per term after a header naming the file; a torn last line is ignored.
pub(crate) struct Journal {
    file: File,
    path: PathBuf,
    pub done: HashSet<(u64, u64)>,
}

impl Journal {
    pub fn open(path: &Path, file: cas_protocol::FileHash, size: u64) -> Result<Self> {
        let header = format!("cas-fetch 1 {file} {size}\n");
        let mut done = HashSet::new();
        let text = match std::fs::read(path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(path)(e)),
        };
        let resume = text.starts_with(&header);
        if resume {
            for line in text[header.len()..].split_inclusive('\n') {
                let parsed = line
                    .strip_suffix('\n')
                    .and_then(|l| l.split_once(' '))
                    .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
                match parsed {
                    Some((a, b)) if a < b && b <= size => done.insert((a, b)),
                    _ => break,
                };
            }
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.create(true).append(true);
        if !resume {
            opts.truncate(false);
        }
        let mut f = opts.open(path).map_err(Error::io(path))?;
        if !resume {
            f.set_len(0).map_err(Error::io(path))?;
            std::io::Write::write_all(&mut f, header.as_bytes()).map_err(Error::io(path))?;
        }
        Ok(Self {
            file: f,
            path: path.to_owned(),
            done,
        })
    }

    pub fn record<'a>(&mut self, terms: impl IntoIterator<Item = &'a PlacedTerm>) -> Result<()> {
        let mut lines = String::new();
        for p in terms {
            lines.push_str(&format!("{} {}\n", p.offset, p.offset + p.term.len));
        }
        std::io::Write::write_all(&mut self.file, lines.as_bytes()).map_err(Error::io(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cas_protocol::messages::ReconstructionTerm;
    use cas_protocol::{ChunkRange, RangeHash, XorbHash};

    /// A term of `len` bytes; the journal looks at nothing else.
    fn term(len: u64) -> ReconstructionTerm {
        ReconstructionTerm {
            xorb: XorbHash::from_bytes([7; 32]),
            chunks: ChunkRange { start: 0, end: 1 },
            len,
            range_hash: RangeHash::from_bytes([0; 32]),
        }
    }

    #[test]
    fn journal_resumes_only_for_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let f = cas_protocol::FileHash::from_bytes([1; 32]);
        let len = 1001;
        let placed = |o| PlacedTerm {
            term: term(len),
            offset: o,
        };
        let mut j = Journal::open(&p, f, 1 << 20).unwrap();
        assert!(j.done.is_empty());
        j.record(&[placed(0), placed(5000)]).unwrap();
        drop(j);
        // A torn line after the good ones is ignored.
        let mut raw = std::fs::read(&p).unwrap();
        raw.extend_from_slice(b"7000 80");
        std::fs::write(&p, &raw).unwrap();
        let j = Journal::open(&p, f, 1 << 20).unwrap();
        assert_eq!(j.done, HashSet::from([(0, len), (5000, 5000 + len)]));
        let other =
            Journal::open(&p, cas_protocol::FileHash::from_bytes([2; 32]), 1 << 20).unwrap();
        assert!(other.done.is_empty());
        let j = Journal::open(&p, f, 1 << 20).unwrap();
        assert!(j.done.is_empty(), "the other file's header replaced it");
    }
}
