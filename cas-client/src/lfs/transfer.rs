//! The agent's transfers against the store: an upload is the client's
//! smart upload (chunk, ask which chunks the server has, send only new
//! ones), which records the file with its SHA-256, so the server's Git LFS
//! index finds it by its object id; a download asks the Git LFS batch API
//! which file holds the object and fetches it verified (through the chunk
//! cache, resuming a partial file of an earlier try).

use std::path::PathBuf;
use std::sync::Arc;

use super::session::code;
use super::wire::{Download, ErrorObject, Upload};
use super::Transfers;
use crate::{Client, Error, FetchOptions, LfsObject, LfsOperation, Progress};

/// Transfers through a server for one repository's LFS endpoint.
pub struct StoreTransfers {
    pub client: Client,
    /// `.../ORG/NAME.git/info/lfs`.
    pub lfs_url: String,
    /// Where downloads are written before git-lfs moves them (git-lfs's
    /// own temporary directory, on the same file system as its store).
    pub download_dir: PathBuf,
}

fn failed(code: u16, message: impl Into<String>) -> ErrorObject {
    ErrorObject {
        code,
        message: message.into(),
    }
}

/// A client error as one message, with a code git-lfs users can read.
fn client_error(e: Error) -> ErrorObject {
    let code = match &e {
        Error::Server { status: 404, .. } => code::NOT_FOUND,
        Error::Server {
            status: 401 | 403, ..
        } => code::DENIED,
        Error::Mismatch { .. } | Error::CorruptXorb { .. } => code::MISMATCH,
        Error::Input { .. } | Error::Io { .. } => code::BAD_REQUEST,
        _ => code::FAILED,
    };
    failed(code, e.to_string())
}

impl Transfers for StoreTransfers {
    async fn upload(&self, u: &Upload, progress: Arc<dyn Progress>) -> Result<(), ErrorObject> {
        let len = std::fs::metadata(&u.path)
            .map_err(|e| failed(code::BAD_REQUEST, format!("{}: {e}", u.path.display())))?
            .len();
        if len != u.size {
            return Err(failed(
                code::MISMATCH,
                format!("{} has {len} bytes, not {}", u.path.display(), u.size),
            ));
        }
        // The upload batch also creates the repository on first use.
        let known = self
            .client
            .lfs_batch(&self.lfs_url, LfsOperation::Upload, u.oid, u.size)
            .await
            .map_err(client_error)?;
        if known != LfsObject::Missing {
            return Ok(());
        }
        let report = self
            .client
            .clone()
            .with_progress(progress)
            .upload(std::slice::from_ref(&u.path))
            .await
            .map_err(client_error)?;
        let sha256 = report.files.first().map(|f| f.sha256);
        if sha256 != Some(u.oid) {
            return Err(failed(
                code::MISMATCH,
                format!(
                    "{} hashes to {}, not its object id {}",
                    u.path.display(),
                    sha256.map_or("nothing".into(), |s| s.to_string()),
                    u.oid
                ),
            ));
        }
        Ok(())
    }

    async fn download(
        &self,
        d: &Download,
        progress: Arc<dyn Progress>,
    ) -> Result<PathBuf, ErrorObject> {
        let found = self
            .client
            .lfs_batch(&self.lfs_url, LfsOperation::Download, d.oid, d.size)
            .await
            .map_err(client_error)?;
        let LfsObject::Stored(Some(file)) = found else {
            return Err(failed(
                code::NOT_FOUND,
                format!("object {} is not stored at {}", d.oid, self.lfs_url),
            ));
        };
        let info = self.client.stat(file).await.map_err(client_error)?;
        if info.sha256 != d.oid || info.size != d.size {
            return Err(failed(
                code::MISMATCH,
                format!(
                    "the server names file {file} ({} bytes, SHA-256 {}) for object {} of {} bytes",
                    info.size, info.sha256, d.oid, d.size
                ),
            ));
        }
        std::fs::create_dir_all(&self.download_dir).map_err(|e| {
            failed(
                code::BAD_REQUEST,
                format!("{}: {e}", self.download_dir.display()),
            )
        })?;
        let dest = self.download_dir.join(d.oid.to_string());
        // The object id is the SHA-256: it is what git-lfs asked for.
        let options = FetchOptions {
            force: true,
            raw: true,
            verify_sha256: true,
        };
        self.client
            .clone()
            .with_progress(progress)
            .fetch(file, &dest, options)
            .await
            .map_err(client_error)?;
        Ok(dest)
    }
}

/// The agent when it could not be set up (no LFS endpoint, a bad
/// endpoint): every transfer fails with why.
pub struct Unconfigured(pub String);

impl Transfers for Unconfigured {
    async fn upload(&self, _: &Upload, _: Arc<dyn Progress>) -> Result<(), ErrorObject> {
        Err(failed(code::BAD_REQUEST, self.0.clone()))
    }

    async fn download(&self, _: &Download, _: Arc<dyn Progress>) -> Result<PathBuf, ErrorObject> {
        Err(failed(code::BAD_REQUEST, self.0.clone()))
    }
}
