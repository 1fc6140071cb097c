//! Where chunks live on one server, as this machine learned it: hints
//! that let an upload skip asking.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use cas_protocol::messages::ChunkLocation;
use cas_protocol::{ChunkHash, XorbHash};

use super::{share, ChunkCache, Writable, PRIVATE_FILE, SHARED_FILE};
use crate::error::Error;

impl ChunkCache {
    /// The chunk location log of the server at `endpoint`.
    pub fn locations(&self, endpoint: &str) -> LocationLog {
        let id = blake3::hash(endpoint.trim_end_matches('/').as_bytes()).to_hex();
        LocationLog {
            path: self.root.join("chunks").join(format!("{}.log", &id[..32])),
            shared: self.shared,
            writable: self.writable.clone(),
        }
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
    pub(super) path: PathBuf,
    /// In a shared cache: group-writable like every other file.
    shared: bool,
    writable: Arc<Writable>,
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

    /// Appends records; failures only cost future dedup, so they turn the
    /// cache's writing off (with its one warning) and are otherwise ignored.
    pub fn record(&self, entries: &[(ChunkHash, ChunkLocation)]) {
        if entries.is_empty() || !self.writable.get() {
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
            self.writable.failed(&Error::io(&self.path)(e));
        }
    }

    /// Starts over, e.g. after the server refused a recipe built from it.
    pub fn forget(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::xorb;

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
}
