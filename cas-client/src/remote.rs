//! The server's HTTP API as typed async calls, each retried on transient
//! failures with capped exponential backoff and jitter.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cas_protocol::messages::{ChunkLocation, DedupAnswer, DedupQuery, MAX_DEDUP_BATCH};
use cas_protocol::messages::{
    FileReconstruction, Reconstruction, ReconstructionBatch, ReconstructionQuery, MAX_BATCH_FILES,
    MAX_RECONSTRUCTION_BYTES,
};
use cas_protocol::messages::{Sha256Answer, Sha256Query, StoredFile, MAX_SHA256_LOOKUP};
use cas_protocol::shard::Shard;
use cas_protocol::{ByteRange, ChunkHash, FileHash, Kind, Message, Sha256, XorbHash};
use rand::Rng;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::failover::Endpoints;

/// How often and how patiently to retry a transient failure.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// A connection that delivers no bytes for this long is dropped and
    /// its request retried (on the next node, when there are several):
    /// a stalled peer or proxy must not hold a transfer forever.
    pub stall: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 6,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
            stall: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Delay before retry number `attempt` (0-based): half of the capped
    /// exponential step plus a random share of the other half, so clients
    /// that failed together do not retry together.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let step = self
            .base_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        let half = step / 2;
        half + half.mul_f64(rand::thread_rng().gen::<f64>())
    }

    /// Runs `op` until it succeeds, fails for good, or runs out of tries.
    pub(crate) async fn run<T, F, Fut>(&self, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) if e.is_transient() && attempt + 1 < self.attempts => {
                    let wait = self.delay(attempt);
                    tracing::warn!("{e}; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }
}

/// What `GET /v1/files/{hash}` says about a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub hash: FileHash,
    /// A file or a tree, as recorded when it was committed. A server that
    /// lies about it is caught: the hash is computed for the kind.
    pub kind: Kind,
    pub size: u64,
    pub sha256: Sha256,
    pub chunks: u64,
    pub terms: u64,
}

/// The direction of a Git LFS batch ([`Remote::lfs_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LfsOperation {
    Upload,
    Download,
}

/// What a Git LFS batch says of one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LfsObject {
    /// Stored; a download batch names the file that holds it.
    Stored(Option<FileHash>),
    Missing,
}

/// A connection to a server (or several nodes of one, see
/// [`crate::failover`]): base URLs, optional bearer token, retries.
#[derive(Debug, Clone)]
pub struct Remote {
    http: reqwest::Client,
    endpoints: Arc<Endpoints>,
    token: Option<HeaderValue>,
    retry: RetryPolicy,
    /// `?repo=...&rev=...` on file and reconstruction requests: the
    /// repository revision a fetch reads through (a token limited to
    /// repositories reads a file by its hash only through one).
    context: Option<String>,
}

const OCTETS: &str = "application/octet-stream";
const JSON: &str = "application/json";

impl Remote {
    /// `endpoint`: one base URL, or several nodes' separated by commas.
    pub fn new(endpoint: &str, token: Option<&str>, retry: RetryPolicy) -> Result<Self> {
        let bad = |reason: String| Error::Input {
            path: endpoint.into(),
            reason,
        };
        let endpoints = Endpoints::parse(endpoint).map_err(bad)?;
        for e in endpoints.all() {
            let url =
                reqwest::Url::parse(e).map_err(|err| bad(format!("{e} is not a URL: {err}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(bad("endpoint must be an http:// or https:// URL".into()));
            }
        }
        let token = token
            .map(|t| {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| bad("token contains characters not allowed in a header".into()))?;
                v.set_sensitive(true);
                Ok(v)
            })
            .transpose()?;
        let http = crate::tls::client_builder(retry.stall)?
            .pool_max_idle_per_host(32)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            http,
            endpoints: Arc::new(endpoints),
            token,
            retry,
            context: None,
        })
    }

    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The node requests go to now.
    pub(crate) fn endpoint(&self) -> &str {
        self.endpoints.current()
    }

    /// This remote, naming `query` (`repo=...&rev=...`) on its file and
    /// reconstruction requests.
    pub(crate) fn with_context(&self, query: String) -> Self {
        Self {
            context: Some(format!("?{query}")),
            ..self.clone()
        }
    }

    fn context(&self) -> &str {
        self.context.as_deref().unwrap_or("")
    }

    /// A request with the token attached, but only to the endpoints' own
    /// URLs: xorb URLs may point at a CDN that must not see it. A URL of
    /// one of the nodes goes to the current node.
    pub(crate) fn request(&self, method: reqwest::Method, url: &str) -> RequestBuilder {
        let url = self.endpoints.rebase(url);
        let rb = self.http.request(method, &url);
        match &self.token {
            Some(t) if same_origin(&url, self.endpoint()) => rb.header(AUTHORIZATION, t.clone()),
            _ => rb,
        }
    }

    /// Sends a request, mapping transport failures and error statuses; a
    /// transient failure of a node moves the client to the next one.
    pub(crate) async fn send(&self, what: &str, url: &str, rb: RequestBuilder) -> Result<Response> {
        let sent = match rb.send().await {
            Ok(resp) if resp.status().is_success() => return Ok(resp),
            Ok(resp) => server_error(what, resp).await,
            Err(e) => transport(what, url, &e),
        };
        if sent.is_transient() {
            self.endpoints.failed(&self.endpoints.rebase(url));
        }
        Err(sent)
    }

    /// A response body that broke off: a transport error, and the node
    /// that sent it is failing (the retry goes to the next one).
    pub(crate) fn body_failed(&self, what: &str, url: &str, e: &reqwest::Error) -> Error {
        let err = transport(what, url, e);
        if err.is_transient() {
            self.endpoints.failed(&self.endpoints.rebase(url));
        }
        err
    }

    /// Which of `hashes` the server already stores, in order. Queries in
    /// batches of the protocol's maximum.
    pub async fn dedup(&self, hashes: &[ChunkHash]) -> Result<Vec<Option<ChunkLocation>>> {
        let url = format!("{}/v1/dedup", self.endpoint());
        let mut out = Vec::with_capacity(hashes.len());
        for batch in hashes.chunks(MAX_DEDUP_BATCH) {
            let body = Bytes::from(
                DedupQuery {
                    chunks: batch.to_vec(),
                }
                .to_bytes(),
            );
            let what = "dedup query";
            let limit = 16 + batch.len() * 48;
            let answer: DedupAnswer = decode(
                what,
                &self.post_limited(what, &url, OCTETS, body, limit).await?,
            )?;
            if answer.found.len() != batch.len() {
                return Err(Error::BadAnswer {
                    what: what.into(),
                    reason: format!("{} answers for {} hashes", answer.found.len(), batch.len()),
                });
            }
            out.extend(answer.found);
        }
        Ok(out)
    }

    /// The stored files whose bytes have these SHA-256s, in order (`None`:
    /// not stored), [`MAX_SHA256_LOOKUP`] per request.
    pub async fn files_by_sha256(&self, sha256s: &[Sha256]) -> Result<Vec<Option<StoredFile>>> {
        let url = format!("{}/v1/sha256", self.endpoint());
        let what = "SHA-256 lookup";
        let mut out = Vec::with_capacity(sha256s.len());
        for batch in sha256s.chunks(MAX_SHA256_LOOKUP) {
            let body = Bytes::from(
                serde_json::to_vec(&Sha256Query {
                    sha256: batch.to_vec(),
                })
                .expect("json"),
            );
            let limit = 64 + batch.len() * 120;
            let answer: Sha256Answer = decode_json(
                what,
                &self.post_limited(what, &url, JSON, body, limit).await?,
            )?;
            if answer.files.len() != batch.len() {
                return Err(Error::BadAnswer {
                    what: what.into(),
                    reason: format!(
                        "{} answers for {} SHA-256s",
                        answer.files.len(),
                        batch.len()
                    ),
                });
            }
            out.extend(answer.files);
        }
        Ok(out)
    }

    /// Stores a xorb; `true` when the server did not have it yet.
    pub async fn put_xorb(&self, hash: XorbHash, bytes: Bytes) -> Result<bool> {
        let url = format!("{}/v1/xorbs/{hash}", self.endpoint());
        let what = format!("upload of xorb {hash}");
        self.retry
            .run(|| async {
                let rb = self
                    .request(reqwest::Method::PUT, &url)
                    .header(CONTENT_TYPE, OCTETS)
                    .body(bytes.clone());
                let resp = self.send(&what, &url, rb).await?;
                Ok(resp.status() == StatusCode::CREATED)
            })
            .await
    }

    /// Commits file recipes; all become visible at once or none do.
    pub async fn commit_shard(&self, shard: &Shard) -> Result<()> {
        let url = format!("{}/v1/shards", self.endpoint());
        let body = Bytes::from(shard.to_bytes());
        self.retry
            .run(|| async {
                let rb = self
                    .request(reqwest::Method::POST, &url)
                    .header(CONTENT_TYPE, OCTETS)
                    .body(body.clone());
                self.send("shard commit", &url, rb).await.map(drop)
            })
            .await
    }

    /// How to rebuild bytes `range` (not empty) of `file`. The answer is
    /// checked against the question before anyone sizes anything from it.
    pub async fn reconstruct(&self, file: FileHash, range: ByteRange) -> Result<Reconstruction> {
        let url = format!(
            "{}/v1/reconstructions/{file}{}",
            self.endpoint(),
            self.context()
        );
        let what = format!("reconstruction of {file}");
        let header = range.to_http_range().ok_or_else(|| Error::BadAnswer {
            what: what.clone(),
            reason: "asked for an empty range".into(),
        })?;
        let rec: Reconstruction = self
            .retry
            .run(|| async {
                let rb = self
                    .request(reqwest::Method::GET, &url)
                    .header(ACCEPT, OCTETS)
                    .header(RANGE, &header);
                let resp = self.send(&what, &url, rb).await?;
                decode(
                    &what,
                    &read_limited(&what, &url, resp, MAX_RECONSTRUCTION_BYTES).await?,
                )
            })
            .await?;
        answers(&rec, file, range).map_err(|reason| Error::BadAnswer { what, reason })?;
        Ok(rec)
    }

    /// Whole-file reconstructions of `files`, in order, with their kinds
    /// and SHA-256s: one request per [`MAX_BATCH_FILES`] files, more when
    /// the server answers only the first ones (it bounds its answers).
    pub async fn reconstruct_batch(&self, files: &[FileHash]) -> Result<Vec<FileReconstruction>> {
        let url = format!("{}/v1/reconstructions{}", self.endpoint(), self.context());
        let what = "batched reconstruction";
        let mut out = Vec::with_capacity(files.len());
        while out.len() < files.len() {
            let asked = &files[out.len()..files.len().min(out.len() + MAX_BATCH_FILES)];
            let body = Bytes::from(
                ReconstructionQuery {
                    files: asked.to_vec(),
                }
                .to_bytes(),
            );
            let limit = cas_protocol::messages::MAX_BATCH_ANSWER_BYTES;
            let batch: ReconstructionBatch = decode(
                what,
                &self.post_limited(what, &url, OCTETS, body, limit).await?,
            )?;
            if batch.files.is_empty() || batch.files.len() > asked.len() {
                return Err(Error::BadAnswer {
                    what: what.into(),
                    reason: format!("{} answers for {} files", batch.files.len(), asked.len()),
                });
            }
            for (f, &hash) in batch.files.into_iter().zip(asked) {
                let r = &f.reconstruction;
                let whole = ByteRange {
                    start: 0,
                    end: r.file_size,
                };
                answers(r, hash, whole).map_err(|reason| Error::BadAnswer {
                    what: format!("reconstruction of {hash}"),
                    reason,
                })?;
                out.push(f);
            }
        }
        Ok(out)
    }

    /// POSTs `body` as `content_type` (asking for the same type back),
    /// retried on transient failures, and reads an answer of at most
    /// `limit` bytes.
    async fn post_limited(
        &self,
        what: &str,
        url: &str,
        content_type: &'static str,
        body: Bytes,
        limit: usize,
    ) -> Result<Bytes> {
        self.retry
            .run(|| async {
                let rb = self
                    .request(reqwest::Method::POST, url)
                    .header(CONTENT_TYPE, content_type)
                    .header(ACCEPT, content_type)
                    .body(body.clone());
                let resp = self.send(what, url, rb).await?;
                read_limited(what, url, resp, limit).await
            })
            .await
    }

    pub async fn file_info(&self, file: FileHash) -> Result<FileInfo> {
        let url = format!("{}/v1/files/{file}{}", self.endpoint(), self.context());
        let what = format!("lookup of file {file}");
        let info: FileInfo = self
            .retry
            .run(|| async {
                let rb = self.request(reqwest::Method::GET, &url);
                let resp = self.send(&what, &url, rb).await?;
                decode_json(&what, &read_limited(&what, &url, resp, 64 * 1024).await?)
            })
            .await?;
        if info.hash != file {
            return Err(Error::BadAnswer {
                what,
                reason: "answer is for another file".into(),
            });
        }
        Ok(info)
    }

    /// Asks the Git LFS batch API at `lfs_url` (`.../ORG/NAME.git/info/lfs`,
    /// on this server) about object `oid` of `size` bytes. An upload
    /// batch needs the write scope and creates the repository when it is
    /// new; a download batch's action names the stored file's content URL,
    /// `.../v1/content/{file}[/{mac}]`.
    pub async fn lfs_batch(
        &self,
        lfs_url: &str,
        operation: LfsOperation,
        oid: Sha256,
        size: u64,
    ) -> Result<LfsObject> {
        #[derive(Deserialize)]
        struct Answer {
            objects: Vec<Object>,
        }
        #[derive(Deserialize)]
        struct Object {
            oid: String,
            #[serde(default)]
            actions: Actions,
            #[serde(default)]
            error: Option<ObjectError>,
        }
        #[derive(Deserialize, Default)]
        struct Actions {
            upload: Option<Href>,
            download: Option<Href>,
        }
        #[derive(Deserialize)]
        struct Href {
            href: String,
        }
        #[derive(Deserialize)]
        struct ObjectError {
            code: u16,
            message: String,
        }
        const LFS_JSON: &str = "application/vnd.git-lfs+json";
        let url = format!("{}/objects/batch", lfs_url.trim_end_matches('/'));
        let what = format!("Git LFS batch for object {oid}");
        let op = match operation {
            LfsOperation::Upload => "upload",
            LfsOperation::Download => "download",
        };
        let body = serde_json::json!({
            "operation": op,
            "transfers": ["basic"],
            "objects": [{"oid": oid, "size": size}],
            "hash_algo": "sha256",
        })
        .to_string();
        let answer: Answer = decode_json(
            &what,
            &self
                .post_limited(&what, &url, LFS_JSON, Bytes::from(body), 64 * 1024)
                .await?,
        )?;
        let bad = |reason: String| Error::BadAnswer {
            what: what.clone(),
            reason,
        };
        let [object] = &answer.objects[..] else {
            return Err(bad(format!("{} objects for one", answer.objects.len())));
        };
        if object.oid != oid.to_string() {
            return Err(bad("answer is for another object".into()));
        }
        let a = &object.actions;
        match (operation, &object.error, &a.upload, &a.download) {
            (_, Some(e), _, _) if e.code == 404 => Ok(LfsObject::Missing),
            (_, Some(e), _, _) => Err(Error::Server {
                what,
                status: e.code,
                code: "lfs_object".into(),
                message: e.message.clone(),
            }),
            (LfsOperation::Upload, None, None, _) => Ok(LfsObject::Stored(None)),
            (LfsOperation::Upload, None, Some(_), _) => Ok(LfsObject::Missing),
            (LfsOperation::Download, None, _, Some(d)) => d
                .href
                .split_once("/v1/content/")
                .and_then(|(_, rest)| rest.split(['/', '?']).next())
                .and_then(|h| h.parse::<FileHash>().ok())
                .map(|f| LfsObject::Stored(Some(f)))
                .ok_or_else(|| bad(format!("download URL {} names no file", d.href))),
            (LfsOperation::Download, None, _, None) => {
                Err(bad("neither a download action nor an error".into()))
            }
        }
    }

    /// Tells the server that bytes of `xorb` failed verification, so it
    /// checks its own copy (and stops offering it for dedup if that is
    /// damaged too). One try: this only helps the next upload.
    pub async fn report_corrupt(&self, xorb: XorbHash) -> Result<String> {
        #[derive(Deserialize)]
        struct Checked {
            status: String,
        }
        let url = format!("{}/v1/xorbs/{xorb}/check", self.endpoint());
        let what = format!("check of xorb {xorb}");
        let resp = self
            .send(&what, &url, self.request(reqwest::Method::POST, &url))
            .await?;
        let body = read_limited(&what, &url, resp, 4096).await?;
        let c: Checked = serde_json::from_slice(&body).map_err(|e| Error::BadAnswer {
            what,
            reason: e.to_string(),
        })?;
        Ok(c.status)
    }

    /// Starts a range GET of a xorb URL; the caller streams the body. Only a
    /// 206 for exactly `range` is accepted (a proxy that ignores `Range`
    /// would otherwise hand us the wrong bytes).
    pub async fn get_range(&self, xorb: XorbHash, url: &str, range: ByteRange) -> Result<Response> {
        let what = format!("read of xorb {xorb}");
        let header = range.to_http_range().ok_or_else(|| Error::BadAnswer {
            what: what.clone(),
            reason: "empty fetch range".into(),
        })?;
        let rb = self
            .request(reqwest::Method::GET, url)
            .header(RANGE, header);
        let resp = self.send(&what, url, rb).await?;
        let expected = format!("bytes {}-{}/", range.start, range.end - 1);
        let ok = resp.status() == StatusCode::PARTIAL_CONTENT
            && resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with(&expected));
        if !ok {
            return Err(Error::BadAnswer {
                what,
                reason: format!(
                    "{url} answered {} without the requested range {}-{}",
                    resp.status(),
                    range.start,
                    range.end - 1
                ),
            });
        }
        Ok(resp)
    }
}

/// Whether `rec` rebuilds exactly bytes `range` of `file`. The decoder
/// has checked that the answer is consistent in itself (its terms cover
/// its range, its range lies in its file); this checks that it is the
/// answer to the question, so nothing is ever sized from a length the
/// server made up.
fn answers(rec: &Reconstruction, file: FileHash, range: ByteRange) -> Result<(), String> {
    if rec.file != file {
        return Err(format!("answer is for file {}", rec.file));
    }
    if rec.range != range {
        return Err(format!(
            "answer is for bytes {}..{}, not the {}..{} asked for",
            rec.range.start, rec.range.end, range.start, range.end
        ));
    }
    Ok(())
}

fn same_origin(url: &str, endpoint: &str) -> bool {
    url.strip_prefix(endpoint)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The innermost cause of a transport error: "Connection refused (os error
/// 111)" says more than reqwest's "error sending request". A certificate
/// the client does not accept is not transient: asking again cannot help.
pub(crate) fn transport(what: &str, url: &str, e: &reqwest::Error) -> Error {
    let mut reason = e.to_string();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cur {
        reason = c.to_string();
        cur = c.source();
    }
    if e.is_timeout() {
        reason = format!("timed out ({reason})");
    }
    let certificate = crate::tls::certificate_error(e);
    if let Some(rustls::CertificateError::UnknownIssuer) = certificate {
        reason = format!(
            "{reason}: the server's certificate is not signed by a CA this client trusts \
             (a private CA: name its PEM file in SSL_CERT_FILE)"
        );
    }
    Error::Transport {
        what: what.into(),
        url: url.into(),
        reason,
        transient: !e.is_builder() && certificate.is_none(),
    }
}

async fn server_error(what: &str, resp: Response) -> Error {
    #[derive(Deserialize)]
    struct Body {
        error: String,
        message: String,
    }
    let status = resp.status();
    let url = resp.url().to_string();
    let body = read_limited(what, &url, resp, 64 * 1024)
        .await
        .unwrap_or_default();
    let (code, message) = match serde_json::from_slice::<Body>(&body) {
        Ok(b) => (b.error, b.message),
        Err(_) => (
            status.canonical_reason().unwrap_or("error").to_lowercase(),
            String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_owned(),
        ),
    };
    Error::Server {
        what: what.into(),
        status: status.as_u16(),
        code,
        message,
    }
}

/// Reads a whole body, refusing one longer than `limit` before and while
/// reading it.
pub(crate) async fn read_limited(
    what: &str,
    url: &str,
    mut resp: Response,
    limit: usize,
) -> Result<Bytes> {
    let too_long = || Error::BadAnswer {
        what: what.into(),
        reason: format!("body longer than {limit} bytes"),
    };
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_long());
    }
    let mut buf = BytesMut::new();
    while let Some(piece) = resp.chunk().await.map_err(|e| transport(what, url, &e))? {
        if buf.len() + piece.len() > limit {
            return Err(too_long());
        }
        buf.extend_from_slice(&piece);
    }
    Ok(buf.freeze())
}

fn decode_json<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::BadAnswer {
        what: what.into(),
        reason: e.to_string(),
    })
}

fn decode<M: Message>(what: &str, body: &[u8]) -> Result<M> {
    M::from_bytes(body).map_err(|e| Error::BadAnswer {
        what: what.into(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let p = RetryPolicy::default();
        for attempt in 0..20 {
            let step = (p.base_delay * (1 << attempt.min(16))).min(p.max_delay);
            let d = p.delay(attempt);
            assert!(d >= step / 2 && d <= step, "attempt {attempt}: {d:?}");
        }
        let spread: std::collections::HashSet<_> = (0..20).map(|_| p.delay(3)).collect();
        assert!(spread.len() > 1, "delays are jittered");
    }

    /// Lying answers (another file, a larger or shifted range) are refused.
    #[test]
    fn a_reconstruction_must_answer_the_question() {
        let file = FileHash::from_bytes([1; 32]);
        let asked = ByteRange { start: 0, end: 100 };
        let rec = |file, range| Reconstruction {
            file,
            file_size: 1 << 40,
            range,
            offset_into_first_term: 0,
            terms: Vec::new(),
            fetch: Vec::new(),
        };
        assert!(answers(&rec(file, asked), file, asked).is_ok());
        let huge = ByteRange {
            start: 0,
            end: 1 << 40,
        };
        let err = answers(&rec(file, huge), file, asked).unwrap_err();
        assert!(err.contains("not the 0..100 asked for"), "{err}");
        let shifted = ByteRange { start: 1, end: 101 };
        assert!(answers(&rec(file, shifted), file, asked).is_err());
        let other = FileHash::from_bytes([2; 32]);
        assert!(answers(&rec(other, asked), file, asked).is_err());
    }

    #[test]
    fn token_only_goes_to_the_endpoint() {
        assert!(same_origin("http://h:1/v1/x", "http://h:1"));
        assert!(!same_origin("http://h:12/v1/x", "http://h:1"));
        assert!(!same_origin("http://cdn/v1/x", "http://h:1"));
    }

    #[tokio::test]
    async fn retries_transient_failures_only() {
        let p = RetryPolicy {
            attempts: 4,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            ..RetryPolicy::default()
        };
        let server = |status| Error::Server {
            what: "x".into(),
            status,
            code: String::new(),
            message: String::new(),
        };
        let mut calls = 0;
        let r: Result<()> = p
            .run(|| {
                calls += 1;
                async { Err(server(503)) }
            })
            .await;
        assert!(r.is_err());
        assert_eq!(calls, 4);
        let mut calls = 0;
        let r: Result<()> = p
            .run(|| {
                calls += 1;
                async { Err(server(404)) }
            })
            .await;
        assert!(r.is_err());
        assert_eq!(calls, 1);
        let mut calls = 0;
        let r = p
            .run(|| {
                calls += 1;
                let c = calls;
                async move {
                    if c < 3 {
                        Err(server(500))
                    } else {
                        Ok(c)
                    }
                }
            })
            .await;
        assert_eq!(r.unwrap(), 3);
    }
}
