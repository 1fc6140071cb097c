//! Damaged xorbs: an object the index names that is missing, or whose bytes
//! no longer verify. A damaged xorb leaves dedup at once (its chunks are no
//! longer offered), reads of files that need it fail with a clear error,
//! and the next upload of its chunks repairs it: a re-sent xorb of the same
//! hash replaces the object, and a re-uploaded file gets a recipe that
//! avoids it (see `ingest`).
//!
//! Damage is found when a read finds the object missing, when a stream of
//! a file's bytes fails verification, and when a client reports that bytes
//! it read failed verification. A report is only a hint: the server checks
//! its own copy before marking anything, at most a few at a time, and a
//! xorb that checked out is not checked again for a while.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cas_protocol::xorb::XorbView;
use cas_protocol::{ByteRange, XorbHash};
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

use super::{blocking, Core, CoreError};
use crate::index::Index;
use crate::store::{ObjectKey, ObjectReader, ObjectStore};

/// Verifications of reported xorbs that run at once (each reads and
/// decompresses up to 64 MiB).
const CONCURRENT_CHECKS: usize = 2;
/// A xorb that verified is not verified again on reports for this long.
const RECHECK_AFTER: Duration = Duration::from_secs(600);
/// Remembered good verifications, at most.
const MAX_REMEMBERED: usize = 4096;

pub(crate) struct Health {
    checks: Semaphore,
    verified: Mutex<HashMap<XorbHash, Instant>>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            checks: Semaphore::new(CONCURRENT_CHECKS),
            verified: Mutex::default(),
        }
    }
}

impl Health {
    fn recently_verified(&self, xorb: &XorbHash) -> bool {
        let verified = self.verified.lock().expect("not poisoned");
        verified
            .get(xorb)
            .is_some_and(|t| t.elapsed() < RECHECK_AFTER)
    }

    fn remember_verified(&self, xorb: XorbHash) {
        let mut verified = self.verified.lock().expect("not poisoned");
        if verified.len() >= MAX_REMEMBERED {
            verified.retain(|_, t| t.elapsed() < RECHECK_AFTER);
            if verified.len() >= MAX_REMEMBERED {
                verified.clear();
            }
        }
        verified.insert(xorb, Instant::now());
    }
}

/// What the server found when it checked its copy of a xorb.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XorbCheck {
    /// The stored copy verifies: what the reporter read was damaged on the
    /// way (a cache, a proxy, the network).
    Ok,
    /// Missing or corrupt: out of dedup until an upload repairs it.
    Damaged,
}

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// Marks a xorb damaged: logs and counts it the first time.
    pub(crate) async fn mark_damaged(&self, xorb: XorbHash, why: &str) -> Result<(), CoreError> {
        if self.with_index(move |i| Ok(i.mark_damaged(&xorb)?)).await? {
            tracing::warn!(%xorb, "xorb damaged ({why}); no longer offered for dedup until an upload repairs it");
            self.metrics.xorbs_damaged.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    /// Length of a stored xorb, or `None`. A xorb the index knows but the
    /// object store lacks is damaged: it is marked so, and the answer is
    /// [`CoreError::Damaged`].
    ///
    /// On a shared store (S3) an indexed xorb's length comes from the index,
    /// without a HEAD per read (S3 requests cost); a missing object is found
    /// by the read itself ([`Core::open_xorb`]).
    pub async fn xorb_len(&self, hash: XorbHash) -> Result<Option<u64>, CoreError> {
        if self.shares_store() {
            if let Some(r) = self.with_index(move |i| Ok(i.xorb(&hash)?)).await? {
                return Ok(Some(r.object_len()));
            }
        }
        let len = self.objects.len(&ObjectKey::xorb(&hash)).await?;
        if len.is_none()
            && self
                .with_index(move |i| Ok(i.xorb(&hash)?))
                .await?
                .is_some()
        {
            self.mark_damaged(hash, "object missing").await?;
            return Err(CoreError::Damaged {
                file: None,
                xorb: hash,
            });
        }
        Ok(len)
    }

    /// A reader found bytes of `xorb` that failed verification: check the
    /// stored copy completely and mark it damaged if it fails too.
    pub async fn check_xorb(&self, xorb: XorbHash) -> Result<XorbCheck, CoreError> {
        let record = self
            .with_index(move |i| Ok(i.xorb(&xorb)?))
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("xorb {xorb}")))?;
        if self.with_index(move |i| Ok(i.is_damaged(&xorb)?)).await? {
            return Ok(XorbCheck::Damaged);
        }
        if self.health.recently_verified(&xorb) {
            return Ok(XorbCheck::Ok);
        }
        let _slot = self.health.checks.acquire().await.expect("never closed");
        let len = match self.xorb_len(xorb).await {
            Ok(Some(len)) => len,
            Ok(None) | Err(CoreError::Damaged { .. }) => return Ok(XorbCheck::Damaged),
            Err(e) => return Err(e),
        };
        let problem = if len != record.object_len() {
            Some(format!(
                "object is {len} bytes, its header says {}",
                record.object_len()
            ))
        } else {
            let bytes = match self.read_whole(xorb, len).await {
                Err(CoreError::Damaged { .. }) => return Ok(XorbCheck::Damaged),
                r => r?,
            };
            blocking(move || {
                Ok(XorbView::parse(&bytes)
                    .and_then(|v| v.verify(xorb))
                    .err()
                    .map(|e| e.to_string()))
            })
            .await?
        };
        match problem {
            Some(why) => {
                self.mark_damaged(xorb, &why).await?;
                Ok(XorbCheck::Damaged)
            }
            None => {
                self.health.remember_verified(xorb);
                Ok(XorbCheck::Ok)
            }
        }
    }

    /// Starts a read of a stored xorb's bytes. An object the store lacks is
    /// marked damaged and answered [`CoreError::Damaged`].
    pub(crate) async fn open_xorb(
        &self,
        xorb: XorbHash,
        range: ByteRange,
    ) -> Result<ObjectReader, CoreError> {
        match self
            .objects
            .read_range(&ObjectKey::xorb(&xorb), range)
            .await
        {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.mark_damaged(xorb, "object missing").await?;
                Err(CoreError::Damaged { file: None, xorb })
            }
            r => Ok(r?),
        }
    }

    pub(crate) async fn read_whole(&self, xorb: XorbHash, len: u64) -> Result<Bytes, CoreError> {
        let mut reader = self
            .open_xorb(xorb, ByteRange { start: 0, end: len })
            .await?;
        let mut buf = Vec::with_capacity(len as usize);
        reader.read_to_end(&mut buf).await?;
        Ok(buf.into())
    }
}
