//! What tells one version of a file on disk from another without reading
//! it: device, inode, size, modification and change times. Writing a file
//! moves its mtime; its ctime moves on every change and cannot be set back
//! (so a write that restores the old mtime still shows); replacing it
//! changes its inode.

use std::fmt;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(crate) struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Stamp {
    pub fn of(m: &Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// `dev ino size mtime mtime_ns ctime ctime_ns`, in decimal.
impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} {} {} {}",
            self.dev, self.ino, self.size, self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1
        )
    }
}

impl FromStr for Stamp {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let mut it = s.split(' ');
        let mut next = || it.next().ok_or(());
        let u = |s: &str| s.parse::<u64>().map_err(drop);
        let i = |s: &str| s.parse::<i64>().map_err(drop);
        let stamp = Self {
            dev: u(next()?)?,
            ino: u(next()?)?,
            size: u(next()?)?,
            mtime: (i(next()?)?, i(next()?)?),
            ctime: (i(next()?)?, i(next()?)?),
        };
        match it.next() {
            None => Ok(stamp),
            Some(_) => Err(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_as_text_and_see_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"one").unwrap();
        // An old mtime, so the rewrite below moves it whatever the clock's
        // granularity.
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        let before = Stamp::of(&std::fs::metadata(&p).unwrap());
        assert_eq!(before.to_string().parse::<Stamp>(), Ok(before));
        assert!("1 2 3".parse::<Stamp>().is_err());
        assert!(format!("{before} 9").parse::<Stamp>().is_err());
        std::fs::write(&p, b"two").unwrap();
        let after = Stamp::of(&std::fs::metadata(&p).unwrap());
        assert_eq!((after.ino, after.size), (before.ino, before.size));
        assert_ne!(after, before);
    }
}
