//! Plan: every file and xorb that is not live gets a decision, nothing
//! changes.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use cas_protocol::{ChunkRange, FileHash, XorbHash};
use serde::{Deserialize, Serialize};

use super::{GcOptions, GcPlan, PartialXorb, Reason, Tally, XorbAction, XorbDecision};
use crate::core::{Core, CoreError};
use crate::index::{Index, XorbSummary};
use crate::store::{KeyPrefix, ObjectKey, ObjectKind, ObjectStore};

/// Partly live xorbs listed in a plan, at most (the most dead first; the
/// total counts them all).
const MAX_PARTIAL_LISTED: usize = 1000;

/// A condemned mark (JSON).
#[derive(Serialize, Deserialize)]
pub(super) struct CondemnedRecord {
    pub at_ms: u64,
}

impl CondemnedRecord {
    pub(super) fn bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("json"))
    }
}

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// The xorbs condemned so far, with when.
    async fn condemned(&self) -> Result<HashMap<XorbHash, u64>, CoreError> {
        let mut out = HashMap::new();
        let now_ms = self.leases.clock().now_ms();
        for key in self
            .objects
            .list(&KeyPrefix::kind(ObjectKind::Condemned))
            .await?
        {
            let Some(hash) = key.hash_bytes().map(XorbHash::from_bytes) else {
                continue;
            };
            let Some(bytes) = self.objects.get(&key).await? else {
                continue;
            };
            // An unreadable mark starts its grace period again.
            let at = serde_json::from_slice::<CondemnedRecord>(&bytes).map_or(now_ms, |r| r.at_ms);
            out.insert(hash, at);
        }
        Ok(out)
    }

    /// Xorb objects in the store, with their lengths.
    async fn stored_xorbs(&self) -> Result<HashSet<XorbHash>, CoreError> {
        let keys = self
            .objects
            .list(&KeyPrefix::kind(ObjectKind::Xorb))
            .await?;
        Ok(keys
            .iter()
            .filter_map(|k| k.hash_bytes().map(XorbHash::from_bytes))
            .collect())
    }

    /// Plans a garbage collection run: reads everything, changes nothing.
    pub async fn gc_plan(&self, options: &GcOptions) -> Result<GcPlan, CoreError> {
        let started_ms = self.leases.clock().now_ms();
        let grace_ms = options.grace.as_millis() as u64;
        let live = self.mark().await?;
        let (xorbs, file_hashes) = self
            .with_index(|i| Ok((i.xorbs()?, i.file_hashes()?)))
            .await?;
        let condemned = self.condemned().await?;
        let stored = self.stored_xorbs().await?;
        let dead_files: Vec<FileHash> = file_hashes
            .into_iter()
            .filter(|f| !live.files.contains(f))
            .collect();

        let mut plan = GcPlan {
            started_ms,
            grace_secs: options.grace.as_secs(),
            roots: live.roots,
            live_files: live.files.len() as u64,
            live: Tally::default(),
            dead_files,
            xorbs: vec![],
            partial: vec![],
            partial_dead_bytes: 0,
            condemn: Tally::default(),
            wait: Tally::default(),
            delete: Tally::default(),
            recover: Tally::default(),
        };
        let decide = |xorb: XorbHash, bytes: u64, reason: Reason, plan: &mut GcPlan| {
            let at = condemned.get(&xorb).copied();
            let action = match (reason, at) {
                (Reason::Referenced, _) => XorbAction::Recover,
                (Reason::Gone, _) => XorbAction::Forget,
                (_, None) => XorbAction::Condemn,
                (_, Some(at)) if at.saturating_add(grace_ms) <= started_ms => XorbAction::Delete,
                (_, Some(_)) => XorbAction::Wait,
            };
            match action {
                XorbAction::Condemn => plan.condemn.add(bytes),
                XorbAction::Wait => plan.wait.add(bytes),
                XorbAction::Delete => plan.delete.add(bytes),
                XorbAction::Recover => plan.recover.add(bytes),
                XorbAction::Forget => {}
            }
            plan.xorbs.push(XorbDecision {
                xorb,
                action,
                reason,
                bytes,
                condemned_at_ms: at,
            });
        };
        let mut indexed = HashSet::new();
        let mut partly_live = Vec::new();
        for x in &xorbs {
            indexed.insert(x.hash);
            match live.chunks.get(&x.hash) {
                Some(used) => {
                    plan.live.add(x.bytes);
                    if condemned.contains_key(&x.hash) {
                        decide(x.hash, x.bytes, Reason::Referenced, &mut plan);
                    }
                    if unused(x, used) {
                        partly_live.push((*x, used.clone()));
                    }
                }
                None => decide(x.hash, x.bytes, Reason::Unreachable, &mut plan),
            }
        }
        let mut orphans: Vec<XorbHash> = stored.difference(&indexed).copied().collect();
        orphans.sort();
        for x in orphans {
            let key = ObjectKey::xorb(&x);
            let bytes = self.objects.len(&key).await?.unwrap_or(0);
            decide(x, bytes, Reason::Orphan, &mut plan);
        }
        let mut gone: Vec<XorbHash> = condemned
            .keys()
            .filter(|x| !indexed.contains(x) && !stored.contains(x))
            .copied()
            .collect();
        gone.sort();
        for x in gone {
            decide(x, 0, Reason::Gone, &mut plan);
        }
        let partial = self
            .with_index(move |i| {
                let mut out = Vec::new();
                for (x, used) in partly_live {
                    if let Some(record) = i.xorb(&x.hash)? {
                        out.push(dead_part(x, &record.entries, &used));
                    }
                }
                Ok(out)
            })
            .await?;
        plan.partial_dead_bytes = partial.iter().map(|p| p.dead_bytes).sum();
        plan.partial = partial;
        plan.partial
            .sort_by(|a, b| b.dead_fraction.total_cmp(&a.dead_fraction));
        plan.partial.truncate(MAX_PARTIAL_LISTED);
        Ok(plan)
    }
}

/// Whether `used` leaves some of the xorb's chunks unused.
fn unused(x: &XorbSummary, used: &[ChunkRange]) -> bool {
    let covered = used_mask(x.chunks as usize, used);
    covered.iter().any(|c| !c)
}

fn used_mask(chunks: usize, used: &[ChunkRange]) -> Vec<bool> {
    let mut mask = vec![false; chunks];
    for r in used {
        for c in r.as_usize() {
            if let Some(m) = mask.get_mut(c) {
                *m = true;
            }
        }
    }
    mask
}

/// The stored bytes of a xorb's unused chunk frames.
fn dead_part(
    x: XorbSummary,
    entries: &[cas_protocol::xorb::IndexEntry],
    used: &[ChunkRange],
) -> PartialXorb {
    let mask = used_mask(entries.len(), used);
    let dead_bytes: u64 = entries
        .iter()
        .zip(&mask)
        .filter(|(_, used)| !**used)
        .map(|(e, _)| u64::from(e.stored_len) + cas_protocol::xorb::FRAME_HEADER_LEN as u64)
        .sum();
    PartialXorb {
        xorb: x.hash,
        bytes: x.bytes,
        dead_bytes,
        dead_fraction: dead_bytes as f64 / x.bytes.max(1) as f64,
    }
}
