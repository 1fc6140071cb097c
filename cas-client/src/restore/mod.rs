//! Writing fetched files and trees to disk: positioned writes into
//! `NAME.part`, a journal of verified terms for resuming, a final check of
//! file hash and SHA-256, then an atomic rename. Nothing unverified ever
//! stands under the final name.
//!
//! - [`file`]: one file, from `.part` and journal to its final name;
//! - [`journal`]: which verified terms are on disk, for resuming;
//! - [`digest`]: file hash and SHA-256 computed in file order as terms
//!   are verified;
//! - [`tree`]: a tree's directories, checked paths, and its files.

mod digest;
mod file;
mod journal;
mod tree;

use std::path::PathBuf;

use cas_protocol::FileHash;
use serde::Serialize;

use crate::fetch::Transfer;

pub(crate) use file::fetch_file;
pub(crate) use tree::fetch_tree;

/// What a fetch did.
#[derive(Debug, Clone, Serialize)]
pub struct FetchReport {
    pub hash: FileHash,
    pub path: PathBuf,
    /// Whether `hash` named a tree (restored as a directory).
    pub tree: bool,
    pub files: u64,
    /// File bytes written.
    pub bytes: u64,
    /// File bytes an earlier, interrupted fetch had already verified.
    pub resumed_bytes: u64,
    #[serde(flatten)]
    pub transfer: Transfer,
    pub seconds: f64,
}
