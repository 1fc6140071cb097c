//! Execute: carry a plan out, in the crash-safe order `gc` describes,
//! re-checking each step against the leases under the fence (see
//! `core::lease`): what a request leased since the plan was made is kept.

use std::collections::HashSet;

use cas_protocol::XorbHash;

use super::plan::CondemnedRecord;
use super::{GcPlan, GcReport, XorbAction};
use crate::core::lease::Leased;
use crate::core::{Core, CoreError};
use crate::index::Index;
use crate::store::{ObjectKey, ObjectStore};

/// Files removed from the index in one batch.
const FILE_BATCH: usize = 4096;

impl GcPlan {
    /// Carries the plan out: dead files leave the index, dead xorbs are
    /// condemned (and leave dedup), condemned ones past the grace period
    /// are deleted, referenced ones recovered. A file or xorb leased since
    /// planning is skipped, and so are the xorbs a skipped file uses.
    pub async fn execute<O: ObjectStore, I: Index>(
        self,
        core: &Core<O, I>,
    ) -> Result<GcReport, CoreError> {
        let mut report = GcReport::default();
        // Xorbs that files kept for their leases use.
        let mut keep: HashSet<XorbHash> = HashSet::new();
        for batch in self.dead_files.chunks(FILE_BATCH) {
            let files = batch.to_vec();
            let leases = core.leases.clone();
            let (removed, kept) = core
                .with_index(move |i| {
                    let kept = leases.remove_unleased(&files, |gone| i.remove(gone, &[]))?;
                    let mut xorbs = Vec::new();
                    for f in &kept {
                        if let Some(r) = i.file(f)? {
                            xorbs.extend(r.terms.iter().map(|t| t.xorb));
                        }
                    }
                    Ok((
                        (files.len() - kept.len()) as u64,
                        (kept.len() as u64, xorbs),
                    ))
                })
                .await?;
            report.files_removed += removed;
            report.files_leased += kept.0;
            keep.extend(kept.1);
        }
        for d in &self.xorbs {
            let xorb = d.xorb;
            let mark = ObjectKey::condemned(&xorb);
            let leased = [Leased::Xorb(xorb)];
            let skip = matches!(d.action, XorbAction::Condemn | XorbAction::Delete)
                && (keep.contains(&xorb) || core.leases.any_leased(&leased));
            if skip {
                report.skipped_leased += 1;
                continue;
            }
            match d.action {
                XorbAction::Wait => {}
                XorbAction::Condemn => {
                    // The mark is durable before the chunks leave dedup.
                    let record = CondemnedRecord {
                        at_ms: core.leases.clock().now_ms(),
                    };
                    core.objects.put(&mark, record.bytes()).await?;
                    let leases = core.leases.clone();
                    let withdrawn = core
                        .with_index(move |i| {
                            Ok(leases
                                .unless_leased(&leased, || i.withdraw_xorb(&xorb))
                                .transpose()?)
                        })
                        .await?;
                    if withdrawn.is_none() {
                        // Leased since the check above: not condemned.
                        core.objects.delete(&mark).await?;
                        report.skipped_leased += 1;
                        continue;
                    }
                    report.condemned.add(d.bytes);
                }
                XorbAction::Recover => {
                    core.with_index(move |i| {
                        if let Some(record) = i.xorb(&xorb)? {
                            if !i.is_damaged(&xorb)? {
                                i.add_xorb(&xorb, &record)?;
                            }
                        }
                        Ok(())
                    })
                    .await?;
                    core.objects.delete(&mark).await?;
                    report.recovered.add(d.bytes);
                }
                XorbAction::Delete => {
                    // Index first: a crash after it leaves an orphan
                    // object, never an entry naming a missing object. Until
                    // `deleting` drops, an upload or shard naming the xorb
                    // waits (then finds it gone).
                    let leases = core.leases.clone();
                    let deleting = core
                        .with_index(move |i| {
                            Ok(leases.start_delete(xorb, || i.remove(&[], &[xorb]))?)
                        })
                        .await?;
                    let Some(_deleting) = deleting else {
                        report.skipped_leased += 1;
                        continue;
                    };
                    core.objects.delete(&ObjectKey::xorb(&xorb)).await?;
                    core.objects.delete(&mark).await?;
                    report.deleted.add(d.bytes);
                }
                XorbAction::Forget => {
                    core.objects.delete(&mark).await?;
                    report.forgotten += 1;
                }
            }
        }
        Ok(report)
    }
}
