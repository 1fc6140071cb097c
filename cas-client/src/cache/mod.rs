//! The local chunk cache: xorb frame ranges exactly as fetched, shared by
//! every process and user of a machine.
//!
//! Layout under the root: `xorbs/<2 hex>/<xorb hex>/<first>-<end>` holds the
//! frames of chunks `first..end` of that xorb; `.../lock.<first>-<end>`
//! serialises fetches of that range across processes (so two fetches of
//! the same file move its bytes once) and is removed once the entry exists
//! ([`lock`]); `tmp/` holds entries being written ([`writer`]). Entries are
//! immutable and appear by atomic rename, so a reader sees a whole entry or
//! none.
//! Entries are not trusted: every read is verified against the range hashes
//! of a reconstruction like bytes from the network, and a bad entry is
//! deleted and fetched again.
//!
//! `chunks/<endpoint id>.log` ([`locations`]) records where chunks live on one server (as
//! learned from fetches and uploads), so an upload can skip asking about
//! chunks this machine has already seen. Records are hints: the server
//! checks every recipe it is sent, so a stale or forged record makes a
//! commit fail (and the upload retry without hints), never corrupts data.
//!
//! A cache that cannot be written (disk full, quota, read-only, no
//! permission, ...) never fails an operation: the first write that fails
//! turns writing off for the process with one warning ([`Writable`]), and
//! everything goes on from the network; entries already there are still
//! read.
//!
//! Sharing among users: when the root directory is setgid, directories are
//! created `rwxrwsr-x` and entries `rw-rw-r--`, so every member of the group
//! can read, add and evict. Lock files are opened read-only when they are
//! not writable, which `flock` allows.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cas_protocol::{ChunkRange, XorbHash};

use crate::error::{Error, Result};

mod locations;
mod lock;
mod writer;

pub use locations::LocationLog;
pub use writer::EntryWriter;

/// Default size cap: 20 GiB.
pub const DEFAULT_CACHE_SIZE: u64 = 20 << 30;

/// Mode of files in a shared cache, set explicitly after creation (the
/// creator's umask would narrow it).
const SHARED_FILE: u32 = 0o664;
/// Mode of new files in a private cache (narrowed by the umask as usual).
const PRIVATE_FILE: u32 = 0o644;

/// Gives a file of a shared cache the shared mode. Another user may own
/// it (and have shared it already): failing is fine.
fn share(file: &File) {
    if file
        .metadata()
        .is_ok_and(|m| m.permissions().mode() & 0o7777 != SHARED_FILE)
    {
        let _ = file.set_permissions(fs::Permissions::from_mode(SHARED_FILE));
    }
}

/// Whether the cache may still be written, shared by everything that
/// writes it (entries, locks, the location log, eviction).
#[derive(Debug)]
struct Writable {
    root: PathBuf,
    on: AtomicBool,
}

impl Writable {
    /// Turns writing off after `e`, warning the first time only.
    fn failed(&self, e: &Error) {
        if self.on.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "cannot write to the cache in {} ({e}); continuing without caching",
                self.root.display()
            );
        }
    }

    fn get(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }
}

/// Temp files older than this belong to a dead process.
const STALE_TMP: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct ChunkCache {
    root: PathBuf,
    cap: u64,
    shared: bool,
    /// Per xorb, the entries this process knows of: a directory is listed
    /// once, not at every lookup (a tree of small files in one xorb has
    /// thousands of entries). Exact names are always checked on disk
    /// first, so ranges another process adds are still found.
    listings: Arc<Mutex<HashMap<XorbHash, Vec<ChunkRange>>>>,
    writable: Arc<Writable>,
}

fn entry_name(r: ChunkRange) -> String {
    format!("{}-{}", r.start, r.end)
}

/// A cached frame range of one xorb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    pub path: PathBuf,
    pub chunks: ChunkRange,
}

impl ChunkCache {
    /// `$CAS_CACHE_DIR`, else `$XDG_CACHE_HOME/cas`, else `~/.cache/cas`.
    pub fn default_dir() -> Option<PathBuf> {
        let env = |k| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        env("CAS_CACHE_DIR")
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("cas")))
            .or_else(|| env("HOME").map(|d| d.join(".cache").join("cas")))
    }

    /// Opens (creating if needed) a cache at `root` capped at `cap` bytes.
    /// An existing root whose layout cannot be created opens for reading
    /// only (see [`is_writable`](Self::is_writable)).
    pub fn open(root: &Path, cap: u64) -> Result<Self> {
        fs::create_dir_all(root).map_err(Error::io(root))?;
        let mode = fs::metadata(root)
            .map_err(Error::io(root))?
            .permissions()
            .mode();
        let cache = Self {
            root: root.to_owned(),
            cap,
            shared: mode & 0o2000 != 0,
            listings: Arc::default(),
            writable: Arc::new(Writable {
                root: root.to_owned(),
                on: AtomicBool::new(true),
            }),
        };
        for d in ["xorbs", "tmp", "chunks"] {
            if let Err(e) = cache.mkdir(&root.join(d)) {
                cache.write_failed(&e);
                break;
            }
        }
        Ok(cache)
    }

    /// Whether this process still writes to the cache: false once a write
    /// failed.
    pub fn is_writable(&self) -> bool {
        self.writable.get()
    }

    /// Stops writing to the cache after `e` (warning the first time).
    pub(crate) fn write_failed(&self, e: &Error) {
        self.writable.failed(e);
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates a directory (and parents) with the sharing mode. Another
    /// user may own an existing one: failing to chmod it is fine.
    fn mkdir(&self, dir: &Path) -> Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        fs::create_dir_all(dir).map_err(Error::io(dir))?;
        if self.shared {
            let mut d = dir;
            while d != self.root {
                let _ = fs::set_permissions(d, fs::Permissions::from_mode(0o2775));
                d = d.parent().expect("under the root");
            }
        }
        Ok(())
    }

    /// Mode of new files.
    fn file_mode(&self) -> u32 {
        if self.shared {
            SHARED_FILE
        } else {
            PRIVATE_FILE
        }
    }

    fn xorb_dir(&self, xorb: &XorbHash) -> PathBuf {
        let hex = xorb.to_hex();
        self.root.join("xorbs").join(&hex[..2]).join(hex)
    }

    /// The ranges cached for `xorb`, from its directory.
    fn list(&self, xorb: &XorbHash) -> Vec<ChunkRange> {
        let Ok(rd) = fs::read_dir(self.xorb_dir(xorb)) else {
            return Vec::new();
        };
        rd.filter_map(|e| {
            let name = e.ok()?.file_name();
            let (a, b) = name.to_str()?.split_once('-')?;
            Some(ChunkRange {
                start: a.parse().ok()?,
                end: b.parse().ok()?,
            })
        })
        .collect()
    }

    /// The smallest cached range of `xorb` that covers `chunks`.
    pub fn lookup(&self, xorb: &XorbHash, chunks: ChunkRange) -> Option<CacheEntry> {
        let dir = self.xorb_dir(xorb);
        let exact = dir.join(entry_name(chunks));
        let best = if exact.is_file() {
            CacheEntry {
                path: exact,
                chunks,
            }
        } else {
            let mut listings = self.listings.lock().expect("not poisoned");
            let ranges = listings.entry(*xorb).or_insert_with(|| self.list(xorb));
            let r = ranges
                .iter()
                .filter(|r| r.start <= chunks.start && chunks.end <= r.end)
                .min_by_key(|r| r.len())?;
            CacheEntry {
                path: dir.join(entry_name(*r)),
                chunks: *r,
            }
        };
        // Recently used entries are evicted last.
        if let Ok(f) = File::options().append(true).open(&best.path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(best)
    }

    /// Drops an entry that failed verification.
    pub fn remove(&self, xorb: &XorbHash, entry: &CacheEntry) {
        if let Err(e) = fs::remove_file(&entry.path) {
            tracing::warn!(
                "cannot remove bad cache entry {}: {e}",
                entry.path.display()
            );
        }
        self.forget(xorb, entry.chunks);
    }

    /// Stops offering an entry that is gone (evicted by another process).
    pub fn forget(&self, xorb: &XorbHash, chunks: ChunkRange) {
        if let Some(v) = self.listings.lock().expect("not poisoned").get_mut(xorb) {
            v.retain(|r| *r != chunks);
        }
    }

    /// Brings the cache under its cap by deleting the least recently used
    /// entries (down to 90% of the cap), and removes stale temp files.
    /// Returns the bytes removed.
    pub fn evict(&self) -> Result<u64> {
        let now = SystemTime::now();
        let age = |m: &fs::Metadata| {
            now.duration_since(m.modified().unwrap_or(now))
                .unwrap_or_default()
        };
        let mut removed = 0;
        for e in read_dir_or_empty(&self.root.join("tmp"))? {
            if let Ok(m) = e.metadata() {
                if age(&m) > STALE_TMP && fs::remove_file(e.path()).is_ok() {
                    removed += m.len();
                }
            }
        }
        let mut entries = self.entries()?;
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        if total <= self.cap {
            return Ok(removed);
        }
        entries.sort();
        let target = self.cap / 10 * 9;
        for (_, len, path) in entries {
            if total <= target {
                break;
            }
            // Another process may have evicted it first; either way it is gone.
            let _ = fs::remove_file(&path);
            total -= len;
            removed += len;
        }
        Ok(removed)
    }

    /// Bytes held in entries.
    pub fn size(&self) -> Result<u64> {
        Ok(self.entries()?.iter().map(|e| e.1).sum())
    }

    /// Every entry (lock files aside): last use, length, path.
    fn entries(&self) -> Result<Vec<(SystemTime, u64, PathBuf)>> {
        let now = SystemTime::now();
        let mut entries = Vec::new();
        for prefix in read_dir_or_empty(&self.root.join("xorbs"))? {
            for xorb in read_dir_or_empty(&prefix.path())? {
                for e in read_dir_or_empty(&xorb.path())? {
                    if e.file_name().as_encoded_bytes().starts_with(b"lock") {
                        continue;
                    }
                    // Gone meanwhile (another process evicted it): skip.
                    if let Ok(m) = e.metadata() {
                        entries.push((m.modified().unwrap_or(now), m.len(), e.path()));
                    }
                }
            }
        }
        Ok(entries)
    }
}

fn read_dir_or_empty(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(rd) => Ok(rd.filter_map(|e| e.ok()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io(dir)(e)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use cas_protocol::messages::ChunkLocation;
    use cas_protocol::ChunkHash;

    pub fn xorb(n: u8) -> XorbHash {
        XorbHash::from_bytes([n; 32])
    }

    fn put(c: &ChunkCache, x: &XorbHash, start: u32, end: u32, bytes: &[u8]) {
        let mut w = c.writer(x, ChunkRange { start, end }).unwrap();
        w.write(bytes);
        w.commit();
    }

    #[test]
    fn lookup_finds_the_smallest_covering_entry() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let x = xorb(1);
        assert_eq!(c.lookup(&x, ChunkRange { start: 0, end: 1 }), None);
        put(&c, &x, 0, 10, b"big");
        put(&c, &x, 2, 5, b"small");
        let hit = |s, e| {
            c.lookup(&x, ChunkRange { start: s, end: e })
                .map(|e| e.chunks)
        };
        assert_eq!(hit(3, 4), Some(ChunkRange { start: 2, end: 5 }));
        assert_eq!(hit(1, 4), Some(ChunkRange { start: 0, end: 10 }));
        assert_eq!(hit(9, 11), None);
        assert_eq!(c.lookup(&xorb(2), ChunkRange { start: 0, end: 1 }), None);
        assert_eq!(
            fs::read(c.lookup(&x, ChunkRange { start: 3, end: 4 }).unwrap().path).unwrap(),
            b"small"
        );
    }

    #[test]
    fn an_uncommitted_entry_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let mut w = c.writer(&xorb(1), ChunkRange { start: 0, end: 1 }).unwrap();
        w.write(b"partial");
        drop(w);
        assert_eq!(c.lookup(&xorb(1), ChunkRange { start: 0, end: 1 }), None);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    /// A write that fails turns writing off; what is cached is still read.
    #[test]
    fn a_failed_write_turns_writing_off() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        put(&c, &xorb(1), 0, 1, b"kept");
        // A file where temp files go: creating one fails (ENOTDIR).
        fs::remove_dir(dir.path().join("tmp")).unwrap();
        fs::write(dir.path().join("tmp"), b"").unwrap();
        assert!(c.is_writable());
        assert!(c
            .writer(&xorb(2), ChunkRange { start: 0, end: 1 })
            .is_none());
        assert!(!c.is_writable());
        assert!(c
            .clone()
            .writer(&xorb(3), ChunkRange { start: 0, end: 1 })
            .is_none());
        let e = c.lookup(&xorb(1), ChunkRange { start: 0, end: 1 }).unwrap();
        assert_eq!(fs::read(e.path).unwrap(), b"kept");
        // A root whose layout cannot be made opens read-only.
        let ro = tempfile::tempdir().unwrap();
        fs::write(ro.path().join("xorbs"), b"").unwrap();
        assert!(!ChunkCache::open(ro.path(), 1 << 20).unwrap().is_writable());
    }

    #[test]
    fn eviction_removes_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 2500).unwrap();
        let old = SystemTime::now() - Duration::from_secs(100);
        for n in 0..3u8 {
            put(&c, &xorb(n), 0, 1, &[n; 1000]);
            let e = c.lookup(&xorb(n), ChunkRange { start: 0, end: 1 }).unwrap();
            let f = File::options().append(true).open(&e.path).unwrap();
            f.set_modified(old + Duration::from_secs(n.into())).unwrap();
        }
        // Touch the oldest: now xorb 1 is the least recently used.
        c.lookup(&xorb(0), ChunkRange { start: 0, end: 1 }).unwrap();
        assert_eq!(c.size().unwrap(), 3000);
        assert_eq!(c.evict().unwrap(), 1000);
        assert_eq!(c.size().unwrap(), 2000);
        assert!(c
            .lookup(&xorb(1), ChunkRange { start: 0, end: 1 })
            .is_none());
        assert!(c
            .lookup(&xorb(0), ChunkRange { start: 0, end: 1 })
            .is_some());
        assert!(c
            .lookup(&xorb(2), ChunkRange { start: 0, end: 1 })
            .is_some());
    }

    #[test]
    fn setgid_root_makes_everything_group_writable() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o2775)).unwrap();
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        put(&c, &xorb(7), 0, 1, b"x");
        let e = c.lookup(&xorb(7), ChunkRange { start: 0, end: 1 }).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&e.path), 0o664);
        assert_eq!(mode(e.path.parent().unwrap()), 0o2775);
        let r = ChunkRange { start: 0, end: 1 };
        let lock = c.lock(&xorb(7), r).unwrap();
        assert_eq!(mode(&e.path.parent().unwrap().join("lock.0-1")), 0o664);
        lock.release();
        assert!(!e.path.parent().unwrap().join("lock.0-1").exists());
        // A log created under umask 077 (so 0600) is shared by the next
        // record; the e2e test runs the client under that umask.
        let log = c.locations("http://h:1");
        File::create(&log.path).unwrap();
        fs::set_permissions(&log.path, fs::Permissions::from_mode(0o600)).unwrap();
        let loc = ChunkLocation {
            xorb: xorb(1),
            index: 0,
        };
        log.record(&[(ChunkHash::from_bytes([1; 32]), loc)]);
        assert_eq!(mode(&log.path), 0o664);
    }
}
