//! Execute: carry a plan out, in the crash-safe order `gc` describes,
//! re-checking each step against the leases under the fence (see
//! `core::lease`): what a request leased since the plan was made is kept.

use std::collections::HashSet;

use cas_protocol::XorbHash;

use super::plan::CondemnedRecord;
use super::{GcPlan, GcReport, XorbAction};
use crate::core::lease::Leased;
use crate::core::Clock;
use crate::core::{Core, CoreError};
use crate::index::Index;
use crate::store::{ObjectKey, ObjectStore};

/// Files removed from the index in one batch.
const FILE_BATCH: usize = 4096;

/// A plan is carried out only while it is younger than the lease term:
/// whatever a request built on after planning is leased at least that
/// long, so until then every such dependency is visible to the checks;
/// after it, one that a plan did not see may have lost its lease.
struct Fresh<'a> {
    clock: &'a Clock,
    until_ms: u64,
    term: std::time::Duration,
}

impl<'a> Fresh<'a> {
    fn new<O: ObjectStore, I: Index>(plan: &GcPlan, core: &'a Core<O, I>) -> Self {
        let term = core.leases.term();
        Self {
            clock: core.leases.clock(),
            until_ms: plan.started_ms.saturating_add(term.as_millis() as u64),
            term,
        }
    }

    fn check(&self) -> Result<(), CoreError> {
        if self.clock.now_ms() < self.until_ms {
            return Ok(());
        }
        Err(CoreError::Conflict(format!(
            "the plan is older than the lease term ({:?}); plan again",
            self.term
        )))
    }
}

/// Counts a run's changes to store and index. With `CAS_GC_HALT_AFTER=N`
/// in the environment the run stops after its N-th change, says so on
/// stderr (`gc halted after N changes`) and waits to be killed: the
/// crash tests kill -9 it at each point of the crash ordering.
struct Changes {
    done: u64,
    halt_after: Option<u64>,
}

impl Changes {
    fn from_env() -> Self {
        Self {
            done: 0,
            halt_after: std::env::var("CAS_GC_HALT_AFTER")
                .ok()
                .and_then(|v| v.parse().ok()),
        }
    }

    fn made(&mut self) {
        self.done += 1;
        if self.halt_after == Some(self.done) {
            eprintln!("gc halted after {} changes", self.done);
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
    }
}

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
        let fresh = Fresh::new(&self, core);
        let mut changes = Changes::from_env();
        // Xorbs that files kept for their leases use.
        let mut keep: HashSet<XorbHash> = HashSet::new();
        for batch in self.dead_files.chunks(FILE_BATCH) {
            fresh.check()?;
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
            changes.made();
            report.files_removed += removed;
            report.files_leased += kept.0;
            keep.extend(kept.1);
        }
        for d in &self.xorbs {
            fresh.check()?;
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
                    changes.made();
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
                    changes.made();
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
                    changes.made();
                    core.objects.delete(&mark).await?;
                    changes.made();
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
                    changes.made();
                    core.objects.delete(&ObjectKey::xorb(&xorb)).await?;
                    changes.made();
                    core.objects.delete(&mark).await?;
                    changes.made();
                    report.deleted.add(d.bytes);
                }
                XorbAction::Forget => {
                    core.objects.delete(&mark).await?;
                    changes.made();
                    report.forgotten += 1;
                }
            }
        }
        Ok(report)
    }
}
