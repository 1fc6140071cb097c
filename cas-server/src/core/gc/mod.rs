//! Garbage collection and consistency checks, plan then execute.
//!
//! Roots are the commits named by branches and tags (with all their
//! history), and files and trees uploaded without a repository
//! (`roots/<hash>`, see `core::roots`). A file is live if a live commit's
//! tree names it (the tree itself too) or a root names it or the tree a
//! root names; a xorb is live if a live file's recipe uses one of its
//! chunks.
//!
//! - `mark`: the live files and, per live xorb, which chunks are used;
//! - `plan`: [`GcPlan`], every file and xorb that is not live with its
//!   decision and reason, and the dead fraction of partly live xorbs
//!   (nothing is changed; `cas-server gc --dry-run` prints it);
//! - `execute`: [`GcPlan::execute`] carries the plan out;
//! - `fsck`: [`FsckReport`], whether index and objects agree, and
//!   `repair`.
//!
//! Deletion is two-phase, like restic's and kopia's: a dead xorb is first
//! *condemned*, a durable record with its time (`condemned/<hash>`) that
//! every node sees, and its chunks leave dedup at once; only a run after
//! the grace period deletes it, if it is still unreferenced. One that a
//! new upload references again meanwhile is *recovered*. A file that is
//! not live leaves the index at once (its bytes stay until its xorbs go).
//!
//! Crash ordering: a condemned record is durable before the xorb's chunks
//! leave dedup; a deleted xorb leaves the index before its object goes and
//! its record goes last. A crash anywhere leaves either a condemned
//! record to finish, or an object no index entry names (an orphan the next
//! run condemns and deletes); never an index entry naming a missing
//! object that a live file needs.
//!
//! Repacking partly live xorbs is not done: the plan reports their dead
//! fraction (docs/OPERATIONS.md says why).

mod execute;
mod fsck;
mod mark;
mod plan;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use cas_protocol::{FileHash, XorbHash};
use serde::{Deserialize, Serialize};

use crate::core::{Core, CoreError};
use crate::index::Index;
use crate::store::ObjectStore;

pub use fsck::{FsckOptions, FsckRecord, FsckReport, Problem, RepairReport};

/// How garbage collection runs. The defaults are the safe values.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GcOptions {
    /// How long a condemned xorb waits before it is deleted.
    pub grace: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            grace: DEFAULT_GRACE,
        }
    }
}

impl GcOptions {
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }
}

/// The default grace period: a day, far longer than any upload takes
/// between its dedup query and its commit.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// What a run does with a xorb that is not simply kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XorbAction {
    /// Dead and not yet condemned: condemn it (it leaves dedup).
    Condemn,
    /// Condemned, grace period not over: leave it.
    Wait,
    /// Condemned longer than the grace period and still dead: delete it.
    Delete,
    /// Condemned but referenced again: back into dedup.
    Recover,
    /// A condemned record of a xorb that no longer exists: drop it.
    Forget,
}

/// Why a xorb is dead (or alive again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// No live file uses any of its chunks.
    Unreachable,
    /// The object exists but the index does not name it (an upload that
    /// never finished, or a deletion a crash interrupted).
    Orphan,
    /// A live file uses it again.
    Referenced,
    /// Neither object nor index entry exists any more.
    Gone,
}

/// One xorb's decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct XorbDecision {
    pub xorb: XorbHash,
    pub action: XorbAction,
    pub reason: Reason,
    /// Object length (as the index records it, else as stored).
    pub bytes: u64,
    /// When it was condemned (milliseconds since the epoch), if it was.
    pub condemned_at_ms: Option<u64>,
}

/// A live xorb some of whose chunks no live file uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartialXorb {
    pub xorb: XorbHash,
    pub bytes: u64,
    /// Stored bytes of the unused chunks' frames.
    pub dead_bytes: u64,
    pub dead_fraction: f64,
}

/// A count of xorbs and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub xorbs: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.xorbs += 1;
        self.bytes += bytes;
    }
}

/// What the roots are.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct RootCount {
    /// Branches and tags.
    pub refs: u64,
    /// Commits reachable from them.
    pub commits: u64,
    /// Files and trees uploaded without a repository.
    pub roots: u64,
}

/// What a run would do; [`GcPlan::execute`] does it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GcPlan {
    /// When planning started (milliseconds since the epoch).
    pub started_ms: u64,
    pub grace_secs: u64,
    pub roots: RootCount,
    pub live_files: u64,
    pub live: Tally,
    /// Files no root reaches: they leave the index.
    pub dead_files: Vec<FileHash>,
    /// Every xorb that is not simply kept.
    pub xorbs: Vec<XorbDecision>,
    /// Live xorbs with unused chunks, most dead first.
    pub partial: Vec<PartialXorb>,
    /// Dead bytes inside live xorbs (what a repack could free).
    pub partial_dead_bytes: u64,
    pub condemn: Tally,
    pub wait: Tally,
    /// What this run frees.
    pub delete: Tally,
    pub recover: Tally,
}

/// What [`GcPlan::execute`] did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcReport {
    pub files_removed: u64,
    /// Dead files kept because a request leased them since planning (a
    /// shard commit, a root or commit naming them).
    pub files_leased: u64,
    pub condemned: Tally,
    pub recovered: Tally,
    /// Deleted xorbs: the bytes freed.
    pub deleted: Tally,
    pub forgotten: u64,
    /// Xorbs not condemned or deleted because a dedup answer, an upload
    /// or a commit leased them (or a kept file uses them).
    pub skipped_leased: u64,
}

/// A run: its plan and, unless it was a dry run, what executing it did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GcRun {
    pub plan: GcPlan,
    pub report: Option<GcReport>,
}

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// Plans a run and (unless `dry_run`) executes it; counted in the
    /// metrics. One run at a time: another one meanwhile is a
    /// [`CoreError::Conflict`].
    pub async fn gc(&self, options: &GcOptions, dry_run: bool) -> Result<GcRun, CoreError> {
        let Ok(_one) = self.gc_running.try_lock() else {
            return Err(CoreError::Conflict(
                "a garbage collection run is in progress; try again when it is over".into(),
            ));
        };
        let plan = self.gc_plan(options).await?;
        let report = if dry_run {
            None
        } else {
            let report = plan.clone().execute(self).await?;
            let m = &self.metrics;
            m.gc_runs.fetch_add(1, Relaxed);
            m.gc_bytes_freed.fetch_add(report.deleted.bytes, Relaxed);
            m.gc_xorbs_condemned
                .fetch_add(report.condemned.xorbs, Relaxed);
            Some(report)
        };
        Ok(GcRun { plan, report })
    }
}
