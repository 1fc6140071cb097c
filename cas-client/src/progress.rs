//! Progress reporting: the library calls an observer, the CLI draws bars.

/// What is being counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Input bytes read, chunked and hashed (upload).
    Hash,
    /// Xorb bytes sent to the server (upload).
    Upload,
    /// File bytes verified and written (fetch).
    Download,
}

/// Receives byte counts as an operation advances. Called from several
/// threads; implementations must be cheap.
pub trait Progress: Send + Sync {
    /// A stage starts; `total` when known.
    fn start(&self, _stage: Stage, _total: Option<u64>) {}
    fn advance(&self, _stage: Stage, _bytes: u64) {}
    fn finish(&self, _stage: Stage) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}
