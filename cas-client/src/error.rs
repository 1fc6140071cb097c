//! One error type for every client operation; each variant renders as one
//! line a user can act on.

use std::io;
use std::path::PathBuf;

use cas_protocol::{ChunkHash, XorbHash};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No HTTP answer at all (refused, reset, timed out). `transient` says
    /// whether trying again may help.
    #[error("{what}: cannot reach {url}: {reason}")]
    Transport {
        what: String,
        url: String,
        reason: String,
        transient: bool,
    },
    /// The server answered with an error status.
    #[error("{what}: server answered {status} {code}: {message}")]
    Server {
        what: String,
        status: u16,
        code: String,
        message: String,
    },
    /// A branch is not where the caller expected it (found before asking
    /// the server to commit).
    #[error("{what}: {message}")]
    Conflict { what: String, message: String },
    /// The upstream of a mirror refused, failed or sent wrong bytes.
    #[error("{what}: {message}")]
    Upstream { what: String, message: String },
    /// The server answered success with a body we cannot use.
    #[error("{what}: unusable answer: {reason}")]
    BadAnswer { what: String, reason: String },
    /// Bytes of a xorb did not decode or did not hash to what the
    /// reconstruction promised.
    #[error("xorb {xorb} failed verification ({reason}), read from {origin}")]
    CorruptXorb {
        xorb: XorbHash,
        reason: String,
        origin: String,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// CA certificates the environment names (`SSL_CERT_FILE`,
    /// `SSL_CERT_DIR`) that cannot be read.
    #[error("{var} names CA certificates that cannot be used: {reason}")]
    Certificates { var: &'static str, reason: String },
    /// An input or destination that cannot be used as given.
    #[error("{path}: {reason}")]
    Input { path: PathBuf, reason: String },
    /// The assembled file does not match its hashes; it was removed.
    #[error("{path}: fetched bytes do not match ({reason}); the partial file was removed")]
    Mismatch { path: PathBuf, reason: String },
    /// A file with other content stands where a fetched file goes.
    #[error("{0} already exists and differs (use force to replace it)")]
    Exists(PathBuf),
    /// A tree names a path that must not be written.
    #[error("refusing tree entry {path:?}: {reason}")]
    UnsafePath { path: String, reason: String },
    /// A chunk before a resumed file's checkpoint (see `mirror`) that the
    /// server no longer stores (collected since it was asked about).
    #[error("chunk {chunk} of a resumed file is no longer stored on the server; run again (the file is then read whole)")]
    Gone { chunk: ChunkHash },
    /// A worker stopped because another part of the operation failed.
    #[error("operation cancelled")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }

    /// Whether retrying the same request may succeed: dropped connections,
    /// timeouts, 5xx, 408 and 429.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport { transient, .. } => *transient,
            Error::Server { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => false,
        }
    }
}
