//! `cas-client lfs-agent`: a Git LFS custom transfer agent (git-lfs
//! `docs/custom-transfers.md`), so `git push` sends only new chunks and
//! `git lfs pull` fetches through the verified, cached, resumable fetch.
//! docs/GIT-LFS.md says how to install and use it.
//!
//! - [`wire`]: the protocol's messages and their parser;
//! - [`session`]: its state machine (init, transfers, terminate);
//! - [`transfer`]: uploads and downloads against the store;
//! - [`setup`]: where the server, repository and token come from, and
//!   `install` (the git config).
//!
//! [`run`] drives a session over stdin and stdout.

pub mod session;
pub mod setup;
pub mod transfer;
pub mod wire;

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

use crate::progress::{Progress, Stage};
use session::{Session, Step};
use wire::{ErrorObject, Event};

/// Uploads and downloads of objects, as the agent performs them.
pub trait Transfers {
    /// Stores the file of `upload`; reports the bytes done to `progress`
    /// (as [`Stage::Hash`]).
    fn upload(
        &self,
        upload: &wire::Upload,
        progress: Arc<dyn Progress>,
    ) -> impl std::future::Future<Output = Result<(), ErrorObject>>;
    /// Writes object `download` to a file it hands over to git-lfs;
    /// reports the bytes done to `progress` (as [`Stage::Download`]).
    fn download(
        &self,
        download: &wire::Download,
        progress: Arc<dyn Progress>,
    ) -> impl std::future::Future<Output = Result<PathBuf, ErrorObject>>;
}

/// Why a session ended badly (git-lfs then sees a non-zero exit).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("git-lfs protocol: {0}")]
    Protocol(String),
    #[error("talking to git-lfs: {0}")]
    Io(#[from] std::io::Error),
}

/// Answers git-lfs's requests from `input` on `output` until `terminate`
/// (or the end of input) with `transfers`. A failed transfer is answered
/// with its error and the session goes on.
pub async fn run<R, W, T>(mut input: R, output: W, transfers: &T) -> Result<(), AgentError>
where
    R: AsyncBufRead + Unpin,
    W: Write + Send + 'static,
    T: Transfers,
{
    let out = Arc::new(Output(Mutex::new(output)));
    let mut session = Session::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut input)
            .take(wire::MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') && n > wire::MAX_LINE {
            return Err(AgentError::Protocol(format!(
                "a request line longer than {} bytes",
                wire::MAX_LINE
            )));
        }
        let text = String::from_utf8_lossy(&line);
        match session.next(text.trim_end_matches(['\n', '\r'])) {
            Step::Answer(a) => out.send(&a)?,
            Step::Stop => return Ok(()),
            Step::Fatal(reason) => return Err(AgentError::Protocol(reason)),
            Step::Upload(u) => {
                let progress = ObjectProgress::new(&out, u.oid.to_string(), u.size, Stage::Hash);
                let done = transfers.upload(&u, progress.clone()).await;
                out.send(&complete(&progress, done.map(|()| None)))?;
            }
            Step::Download(d) => {
                let progress =
                    ObjectProgress::new(&out, d.oid.to_string(), d.size, Stage::Download);
                let done = transfers.download(&d, progress.clone()).await;
                out.send(&complete(&progress, done.map(Some)))?;
            }
        }
    }
}

/// The final progress (the protocol wants the last one at the object's
/// size) and the `complete` line of a transfer.
fn complete<W: Write>(
    progress: &ObjectProgress<W>,
    done: Result<Option<PathBuf>, ErrorObject>,
) -> String {
    match done {
        Ok(path) => {
            let mut lines = progress.last().unwrap_or_default();
            lines.push_str(&wire::line(&Event::Complete {
                oid: progress.oid.clone(),
                path,
                error: None,
            }));
            lines
        }
        Err(e) => wire::line(&Event::failed(progress.oid.clone(), e)),
    }
}

/// stdout, shared by the driver and the progress reports.
struct Output<W>(Mutex<W>);

impl<W: Write> Output<W> {
    fn send(&self, lines: &str) -> std::io::Result<()> {
        let mut w = self.0.lock().expect("not poisoned");
        w.write_all(lines.as_bytes())?;
        w.flush()
    }
}

/// Least bytes between two progress messages.
const PROGRESS_STEP: u64 = 1 << 20;

/// Turns one stage's byte counts into `progress` messages for one object.
struct ObjectProgress<W> {
    out: Arc<Output<W>>,
    oid: String,
    size: u64,
    stage: Stage,
    /// Bytes done, and bytes done at the last message.
    counts: Mutex<(u64, u64)>,
}

impl<W: Write + Send + 'static> ObjectProgress<W> {
    fn new(out: &Arc<Output<W>>, oid: String, size: u64, stage: Stage) -> Arc<Self> {
        Arc::new(Self {
            out: out.clone(),
            oid,
            size,
            stage,
            counts: Mutex::new((0, 0)),
        })
    }
}

impl<W> ObjectProgress<W> {
    /// The message that brings the count to the object's size, if one is
    /// due.
    fn last(&self) -> Option<String> {
        let mut c = self.counts.lock().expect("not poisoned");
        let (_, sent) = *c;
        *c = (self.size, self.size);
        (sent < self.size).then(|| self.message(self.size, self.size - sent))
    }

    fn message(&self, so_far: u64, since_last: u64) -> String {
        wire::line(&Event::Progress {
            oid: self.oid.clone(),
            bytes_so_far: so_far,
            bytes_since_last: since_last,
        })
    }
}

impl<W: Write + Send> Progress for ObjectProgress<W> {
    fn advance(&self, stage: Stage, bytes: u64) {
        if stage != self.stage {
            return;
        }
        let line = {
            let mut c = self.counts.lock().expect("not poisoned");
            // Below the size: the last message is `last`'s.
            c.0 = (c.0 + bytes).min(self.size.saturating_sub(1));
            if c.0 < c.1 + PROGRESS_STEP {
                return;
            }
            let since = c.0 - c.1;
            c.1 = c.0;
            self.message(c.0, since)
        };
        // A failed write shows at the transfer's `complete`.
        let _ = self.out.send(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use session::code;

    /// Stores nothing: uploads succeed after reporting their bytes in
    /// small steps, downloads of `size` 0 fail.
    struct Fake;

    impl Transfers for Fake {
        async fn upload(
            &self,
            u: &wire::Upload,
            progress: Arc<dyn Progress>,
        ) -> Result<(), ErrorObject> {
            for _ in 0..u.size / 1000 {
                progress.advance(Stage::Hash, 1000);
                progress.advance(Stage::Upload, 1);
            }
            Ok(())
        }

        async fn download(
            &self,
            d: &wire::Download,
            _: Arc<dyn Progress>,
        ) -> Result<PathBuf, ErrorObject> {
            match d.size {
                0 => Err(ErrorObject {
                    code: code::NOT_FOUND,
                    message: "object is not stored".into(),
                }),
                _ => Ok(PathBuf::from("/tmp/x")),
            }
        }
    }

    /// A `Write` whose bytes the test reads afterwards.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    async fn session(input: &str) -> (Result<(), AgentError>, Vec<serde_json::Value>) {
        let out = Shared::default();
        let r = run(input.as_bytes(), out.clone(), &Fake).await;
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (r, lines)
    }

    const OID: &str = "bf3e3e2af9366a3b704ae0c31de5afa64193ebabffde2091936ad2e7510bc03a";

    #[tokio::test]
    async fn an_upload_session_reports_progress_to_the_size_then_completes() {
        let size = 5 << 20;
        let input = format!(
            "{{\"event\":\"init\",\"operation\":\"upload\"}}\n\
             {{\"event\":\"upload\",\"oid\":\"{OID}\",\"size\":{size},\"path\":\"/x\"}}\n\
             {{\"event\":\"terminate\"}}\n"
        );
        let (r, lines) = session(&input).await;
        r.unwrap();
        assert_eq!(lines[0], serde_json::json!({}));
        let (progress, rest) = lines[1..].split_at(lines.len() - 2);
        assert!(progress.len() >= 5, "{progress:?}");
        let mut so_far = 0;
        for p in progress {
            assert_eq!(p["event"], "progress");
            so_far += p["bytesSinceLast"].as_u64().unwrap();
            assert_eq!(p["bytesSoFar"].as_u64().unwrap(), so_far);
        }
        assert_eq!(so_far, size);
        assert_eq!(
            rest[0],
            serde_json::json!({"event": "complete", "oid": OID})
        );
    }

    #[tokio::test]
    async fn failures_answer_per_object_and_junk_after_init_ends_the_session() {
        let input = format!(
            "{{\"event\":\"init\",\"operation\":\"download\"}}\n\
             {{\"event\":\"download\",\"oid\":\"{OID}\",\"size\":0}}\n\
             {{\"event\":\"download\",\"oid\":\"{OID}\",\"size\":3}}\r\n\
             \u{fffd}\u{0}junk\n\
             {{\"event\":\"terminate\"}}\n"
        );
        let (r, lines) = session(&input).await;
        assert!(matches!(r, Err(AgentError::Protocol(_))), "{r:?}");
        assert_eq!(lines[1]["error"]["code"], 404);
        assert_eq!(lines[1]["error"]["message"], "object is not stored");
        assert_eq!(lines[2]["bytesSoFar"], 3);
        assert_eq!(lines[3]["path"], "/tmp/x");
        assert_eq!(lines.len(), 4);
        // Invalid UTF-8 and an endless line do not panic either.
        let out = Shared::default();
        let bytes: &[u8] = b"\xff\xfe{\"event\":\"init\"}\n";
        run(bytes, out.clone(), &Fake).await.unwrap();
        let endless = vec![b'x'; wire::MAX_LINE * 3];
        let r = run(&endless[..], out, &Fake).await;
        assert!(matches!(r, Err(AgentError::Protocol(_))), "{r:?}");
    }
}
