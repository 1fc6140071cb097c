//! The local chunk cache: xorb frame ranges exactly as fetched, shared by
//! every process and user of a machine.
//!
//! Layout under the root: `xorbs/<2 hex>/<xorb hex>/<first>-<end>` holds the
//! frames of chunks `first..end` of that xorb; `.../lock.<first>-<end>`
//! serialises fetches of that range across processes (so two fetches of
//! the same file move its bytes once) and is removed once the entry exists; `tmp/` holds entries being written. Entries are immutable
//! and appear by atomic rename, so a reader sees a whole entry or none.
//! Entries are not trusted: every read is verified against the range hashes
//! of a reconstruction like bytes from the network, and a bad entry is
//! deleted and fetched again.
//!
//! `chunks/<endpoint id>.log` records where chunks live on one server (as
//! learned from fetches and uploads), so an upload can skip asking about
//! chunks this machine has already seen. Records are hints: the server
//! checks every recipe it is sent, so a stale or forged record makes a
//! commit fail (and the upload retry without hints), never corrupts data.
//!
//! Sharing among users: when the root directory is setgid, directories are
//! created `rwxrwsr-x` and entries `rw-rw-r--`, so every member of the group
//! can read, add and evict. Lock files are opened read-only when they are
//! not writable, which `flock` allows.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cas_protocol::messages::ChunkLocation;
use cas_protocol::{ChunkHash, ChunkRange, XorbHash};

use crate::error::{Error, Result};

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

/// Holds the fetch lock (an `flock`) of one xorb range until dropped.
#[derive(Debug)]
pub struct RangeLock {
    _file: File,
    path: PathBuf,
}

impl RangeLock {
    /// Releases the lock and deletes its file once the entry it guarded
    /// is in place, so lock files do not pile up. A process that opened
    /// the file before the unlink still gets its lock, then finds the
    /// entry; one that races the unlink can at worst fetch the range
    /// again, never see a partial entry.
    pub fn release(self) {
        let _ = fs::remove_file(&self.path);
    }
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
        };
        cache.mkdir(&root.join("xorbs"))?;
        cache.mkdir(&root.join("tmp"))?;
        cache.mkdir(&root.join("chunks"))?;
        Ok(cache)
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

    /// Waits for the cross-process fetch lock of `chunks` of `xorb`.
    pub fn lock(&self, xorb: &XorbHash, chunks: ChunkRange) -> Result<RangeLock> {
        let dir = self.xorb_dir(xorb);
        self.mkdir(&dir)?;
        let path = dir.join(format!("lock.{}-{}", chunks.start, chunks.end));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(self.file_mode())
            .open(&path)
            .or_else(|e| match e.kind() {
                io::ErrorKind::PermissionDenied => File::open(&path),
                _ => Err(e),
            })
            .map_err(Error::io(&path))?;
        if self.shared {
            share(&file);
        }
        file.lock().map_err(Error::io(&path))?;
        Ok(RangeLock { _file: file, path })
    }

    /// Starts a new entry for `chunks` of `xorb`, written to a temp file.
    pub fn writer(&self, xorb: &XorbHash, chunks: ChunkRange) -> Result<EntryWriter> {
        let tmp_dir = self.root.join("tmp");
        let tmp = tempfile_in(&tmp_dir)?;
        let dir = self.xorb_dir(xorb);
        Ok(EntryWriter {
            file: Some(tmp.1),
            tmp: tmp.0,
            dest: dir.join(entry_name(chunks)),
            dir,
            xorb: *xorb,
            chunks,
            mode: self.file_mode(),
        })
    }

    /// The chunk location log of the server at `endpoint`.
    pub fn locations(&self, endpoint: &str) -> LocationLog {
        let id = blake3::hash(endpoint.trim_end_matches('/').as_bytes()).to_hex();
        LocationLog {
            path: self.root.join("chunks").join(format!("{}.log", &id[..32])),
            shared: self.shared,
        }
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

/// Largest location log; a writer that finds it larger starts it over.
const MAX_LOG: u64 = 32 << 20;
const RECORD: usize = 72;

/// Append-only records `chunk hash, xorb hash, index (u32 LE), check` where
/// check is the first 4 bytes of the BLAKE3 of the rest. Each append is one
/// `write` with `O_APPEND`, so concurrent writers do not interleave records;
/// reading stops at the first record that fails its check.
#[derive(Debug, Clone)]
pub struct LocationLog {
    path: PathBuf,
    /// In a shared cache: group-writable like every other file.
    shared: bool,
}

impl LocationLog {
    pub fn load(&self) -> HashMap<ChunkHash, ChunkLocation> {
        let mut map = HashMap::new();
        let mut bytes = Vec::new();
        let read = File::open(&self.path).and_then(|f| f.take(MAX_LOG).read_to_end(&mut bytes));
        if read.is_err() {
            return map;
        }
        for r in bytes.chunks_exact(RECORD) {
            if blake3::hash(&r[..68]).as_bytes()[..4] != r[68..] {
                break;
            }
            let part = |a: usize| -> [u8; 32] { r[a..a + 32].try_into().expect("32 bytes") };
            map.insert(
                ChunkHash::from_bytes(part(0)),
                ChunkLocation {
                    xorb: XorbHash::from_bytes(part(32)),
                    index: u32::from_le_bytes(r[64..68].try_into().expect("4 bytes")),
                },
            );
        }
        map
    }

    /// Appends records; failures only cost future dedup, so they are logged
    /// and otherwise ignored.
    pub fn record(&self, entries: &[(ChunkHash, ChunkLocation)]) {
        if entries.is_empty() {
            return;
        }
        let mut buf = Vec::with_capacity(entries.len() * RECORD);
        for (c, l) in entries {
            let start = buf.len();
            buf.extend_from_slice(c.as_bytes());
            buf.extend_from_slice(l.xorb.as_bytes());
            buf.extend_from_slice(&l.index.to_le_bytes());
            let check = blake3::hash(&buf[start..]);
            buf.extend_from_slice(&check.as_bytes()[..4]);
        }
        if fs::metadata(&self.path).is_ok_and(|m| m.len() > MAX_LOG) {
            self.forget();
        }
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(if self.shared {
                SHARED_FILE
            } else {
                PRIVATE_FILE
            })
            .open(&self.path)
            .and_then(|mut f| {
                if self.shared {
                    share(&f);
                }
                f.write_all(&buf)
            });
        if let Err(e) = written {
            tracing::warn!(
                "cannot record chunk locations in {}: {e}",
                self.path.display()
            );
        }
    }

    /// Starts over, e.g. after the server refused a recipe built from it.
    pub fn forget(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn read_dir_or_empty(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(rd) => Ok(rd.filter_map(|e| e.ok()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io(dir)(e)),
    }
}

/// A uniquely named new file in `dir`.
fn tempfile_in(dir: &Path) -> Result<(PathBuf, File)> {
    loop {
        let path = dir.join(format!(".{:016x}", rand::random::<u64>()));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(dir)(e)),
        }
    }
}

/// An entry being written; it appears under its name only on
/// [`commit`](EntryWriter::commit), and the temp file goes away on drop.
#[derive(Debug)]
pub struct EntryWriter {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    dir: PathBuf,
    xorb: XorbHash,
    chunks: ChunkRange,
    mode: u32,
}

impl EntryWriter {
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let file = self.file.as_mut().expect("not committed");
        file.write_all(bytes).map_err(Error::io(&self.tmp))
    }

    /// Publishes the entry. Not fsynced: a cache entry lost in a crash is
    /// refetched, and a torn one fails verification and is replaced.
    pub fn commit(mut self, cache: &ChunkCache) -> Result<()> {
        let file = self.file.take().expect("not committed");
        file.set_permissions(fs::Permissions::from_mode(self.mode))
            .map_err(Error::io(&self.tmp))?;
        drop(file);
        cache.mkdir(&self.dir)?;
        fs::rename(&self.tmp, &self.dest).map_err(Error::io(&self.dest))?;
        if let Some(v) = cache
            .listings
            .lock()
            .expect("not poisoned")
            .get_mut(&self.xorb)
        {
            v.push(self.chunks);
        }
        Ok(())
    }
}

impl Drop for EntryWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xorb(n: u8) -> XorbHash {
        XorbHash::from_bytes([n; 32])
    }

    fn put(c: &ChunkCache, x: &XorbHash, start: u32, end: u32, bytes: &[u8]) {
        let mut w = c.writer(x, ChunkRange { start, end }).unwrap();
        w.write(bytes).unwrap();
        w.commit(c).unwrap();
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
        w.write(b"partial").unwrap();
        drop(w);
        assert_eq!(c.lookup(&xorb(1), ChunkRange { start: 0, end: 1 }), None);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
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

    #[test]
    fn location_log_round_trips_and_stops_at_damage() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let log = c.locations("http://a:1/");
        assert_eq!(log.path, c.locations("http://a:1").path);
        assert_ne!(log.path, c.locations("http://b:1").path);
        let loc = |n: u8| {
            (
                ChunkHash::from_bytes([n; 32]),
                ChunkLocation {
                    xorb: xorb(n + 100),
                    index: u32::from(n),
                },
            )
        };
        log.record(&[loc(1), loc(2)]);
        log.record(&[loc(3)]);
        let m = log.load();
        assert_eq!(m.len(), 3);
        assert_eq!(m[&loc(2).0], loc(2).1);
        // Damage record 2: records 2 and 3 are dropped, record 1 kept.
        let mut raw = fs::read(&log.path).unwrap();
        raw[RECORD + 40] ^= 1;
        fs::write(&log.path, &raw).unwrap();
        assert_eq!(log.load().len(), 1);
        log.forget();
        assert!(log.load().is_empty());
    }

    #[test]
    fn lock_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let r = ChunkRange { start: 2, end: 9 };
        let held = c.lock(&xorb(3), r).unwrap();
        assert!(c.lookup(&xorb(3), r).is_none(), "a lock is not an entry");
        let path = c.xorb_dir(&xorb(3)).join("lock.2-9");
        let other = File::open(&path).unwrap();
        assert!(other.try_lock().is_err());
        drop(held);
        assert!(other.try_lock().is_ok());
    }
}
