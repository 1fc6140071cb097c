//! Execute: carry a plan out, in the crash-safe order `gc` describes.

use super::plan::CondemnedRecord;
use super::{now_ms, GcPlan, GcReport, XorbAction};
use crate::core::{Core, CoreError};
use crate::index::Index;
use crate::store::{ObjectKey, ObjectStore};

/// Files removed from the index in one batch.
const FILE_BATCH: usize = 4096;

impl GcPlan {
    /// Carries the plan out: dead files leave the index, dead xorbs are
    /// condemned (and leave dedup), condemned ones past the grace period
    /// are deleted, referenced ones recovered.
    pub async fn execute<O: ObjectStore, I: Index>(
        self,
        core: &Core<O, I>,
    ) -> Result<GcReport, CoreError> {
        let mut report = GcReport::default();
        for batch in self.dead_files.chunks(FILE_BATCH) {
            let files = batch.to_vec();
            let n = files.len() as u64;
            core.with_index(move |i| Ok(i.remove(&files, &[])?)).await?;
            report.files_removed += n;
        }
        for d in &self.xorbs {
            let xorb = d.xorb;
            let mark = ObjectKey::condemned(&xorb);
            match d.action {
                XorbAction::Wait => {}
                XorbAction::Condemn => {
                    // The mark is durable before the chunks leave dedup.
                    let record = CondemnedRecord { at_ms: now_ms() };
                    core.objects.put(&mark, record.bytes()).await?;
                    core.with_index(move |i| Ok(i.withdraw_xorb(&xorb)?))
                        .await?;
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
                    // object, never an entry naming a missing object.
                    core.with_index(move |i| Ok(i.remove(&[], &[xorb])?))
                        .await?;
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
