//! A stand-in for the Hugging Face Hub, for the tests of `cas-client
//! mirror`: the real Hub is not reachable from the tests, so this serves
//! what the Hub serves where a downloader depends on it, as the pinned
//! `huggingface_hub` reads it (its `snapshot_download` runs against it in
//! `tests/tests/mirror.rs` to prove that):
//!
//! - `GET /api/{models,datasets}/{id}[/revision/{rev}]`: `id`, `sha`,
//!   `siblings`; `GET /api/.../tree/{rev}[/{path}]?recursive=true`: files
//!   with `oid` (git blob id), `size` and, for large files, `lfs` (`oid` =
//!   SHA-256, `size`, `pointerSize`), 1,000 a page with `Link: rel="next"`.
//! - `HEAD`/`GET /[datasets/]{id}/resolve/{rev}/{path}`: a small file
//!   itself (`ETag` = its git blob id), a large one a 302 to a separate
//!   port, the "CDN", with `X-Linked-Etag` (its SHA-256) and
//!   `X-Linked-Size`; both with `X-Repo-Commit`.
//! - The CDN serves `GET`/`HEAD` with one `Range` (206) and records every
//!   request and whether it carried an `Authorization` header.
//! - Errors with the Hub's `X-Error-Code`: `RepoNotFound` (404, or 401
//!   without a token), `RevisionNotFound`, `EntryNotFound`, `GatedRepo`
//!   (401 without a token, 403 with a wrong one).
//! - Knobs: the next N API answers are 429 with `Retry-After`; one CDN
//!   request stalls after some bytes; a file's bytes are served wrong; the
//!   next N CDN URLs handed out for a blob are expired by the time they
//!   are used (every GET of one answers 403, as the Hub's CDN answers a
//!   stale signed URL; a URL handed out later works).
//!
//! A small HTTP/1.1 server on std threads (one per connection, keep-alive).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cas_protocol::Sha256;
use serde_json::{json, Value};
use sha1::Digest;

/// Files at least this large are LFS files (what a `.gitattributes` of
/// `*.safetensors` and the Hub's 10 MB rule do for real repositories).
pub const LFS_MIN: usize = 64 << 10;
/// Tree entries per page, as the Hub pages recursive listings.
const PAGE: usize = 1000;

/// One file of a revision.
#[derive(Clone)]
pub struct File {
    pub data: Arc<Vec<u8>>,
    pub sha256: String,
    /// Git blob id of the bytes (small files) or of the LFS pointer.
    pub oid: String,
    pub lfs: bool,
}

impl File {
    pub fn new(data: Vec<u8>) -> Self {
        let sha256 = Sha256::of(&data).to_string();
        let lfs = data.len() >= LFS_MIN;
        let oid = if lfs {
            let pointer = format!(
                "version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {}\n",
                data.len()
            );
            git_blob_id(pointer.as_bytes())
        } else {
            git_blob_id(&data)
        };
        Self {
            data: Arc::new(data),
            sha256,
            oid,
            lfs,
        }
    }
}

/// `sha1("blob {len}\0" + bytes)`, git's id of a file's contents.
pub fn git_blob_id(data: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", data.len()));
    h.update(data);
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A repository: commits (sha -> files), branches and tags (name -> sha).
#[derive(Default)]
struct Repo {
    commits: HashMap<String, BTreeMap<String, File>>,
    refs: HashMap<String, String>,
    gated: bool,
}

/// What the stand-in saw, for assertions.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub api_requests: u64,
    pub resolve_requests: u64,
    /// Requests to the CDN port, and those that carried `Authorization`.
    pub cdn_requests: u64,
    pub cdn_with_auth: u64,
    /// Body bytes sent by the CDN and by `/resolve` (small files; API
    /// answers not counted).
    pub cdn_bytes: u64,
    pub resolve_bytes: u64,
    /// `Authorization` values seen on the upstream (API and resolve).
    pub upstream_auth: Vec<String>,
    pub rate_limited: u64,
    /// CDN requests answered 403 as expired.
    pub cdn_expired: u64,
    /// Most `/resolve/` requests inside their added latency at once.
    pub resolve_peak: u64,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    /// LFS blobs by SHA-256, as the CDN serves them.
    blobs: HashMap<String, Arc<Vec<u8>>>,
    /// The token that opens gated repositories.
    token: Option<String>,
    /// The next this many API or resolve answers are 429.
    limit: u64,
    retry_after: u64,
    /// CDN requests for this blob stall after this many bytes, while the
    /// count lasts.
    stall: Option<(String, u64, u64)>,
    /// Added to every `/resolve/` answer, as the round trip to the real
    /// Hub adds it.
    latency: Duration,
    /// `/resolve/` requests inside their latency now.
    resolving: u64,
    /// The next this many CDN URLs handed out for this blob are stale.
    expire: Option<(String, u64)>,
    /// CDN URLs handed out so far (each carries its number, `u=`).
    urls: u64,
    /// The numbers of the stale ones: their GETs answer 403.
    stale: HashSet<u64>,
    /// Paths whose bytes are served with one byte changed.
    corrupt: HashSet<String>,
    /// The CDN's bytes per second over all connections (a link), from
    /// when it was set, and the bytes sent since.
    bandwidth: Option<(u64, Instant, u64)>,
    seen: Seen,
}

/// The running stand-in: an upstream port and a CDN port.
pub struct StandIn {
    state: Arc<Mutex<State>>,
    pub url: String,
    pub cdn_url: String,
    stop: Arc<AtomicBool>,
    /// Total CDN body bytes, readable while a download runs.
    cdn_bytes: Arc<AtomicU64>,
}

/// `models/org/name` or `datasets/org/name`: the key of a repository.
fn key(kind: &str, id: &str) -> String {
    format!("{kind}/{id}")
}

impl StandIn {
    pub fn start() -> Self {
        Self::start_with_cdn("127.0.0.1", None)
    }

    /// Listens on `host` (an address the clients reach, which its URLs
    /// then name). With `external`, large files redirect to
    /// `{cdn}/blobs/{sha256}` (another server, say nginx, serving them)
    /// instead of the stand-in's own CDN port.
    pub fn start_with_cdn(host: &str, external: Option<&str>) -> Self {
        let state = Arc::new(Mutex::new(State {
            retry_after: 1,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let cdn_bytes = Arc::new(AtomicU64::new(0));
        let api = TcpListener::bind((host, 0)).unwrap();
        let cdn = TcpListener::bind((host, 0)).unwrap();
        let url = format!("http://{}", api.local_addr().unwrap());
        let cdn_url = match external {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => format!("http://{}", cdn.local_addr().unwrap()),
        };
        for (listener, is_cdn) in [(api, false), (cdn, true)] {
            let ctx = Ctx {
                state: state.clone(),
                cdn_url: cdn_url.clone(),
                cdn: is_cdn,
                cdn_bytes: cdn_bytes.clone(),
            };
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let ctx = ctx.clone();
                    std::thread::spawn(move || ctx.serve(conn));
                }
            });
        }
        Self {
            state,
            url,
            cdn_url,
            stop,
            cdn_bytes,
        }
    }

    /// Adds a commit `sha` of `id` (`models/org/name` or
    /// `datasets/org/name`) holding `files`, and points `branch` at it.
    pub fn commit(&self, id: &str, branch: &str, sha: &str, files: &BTreeMap<String, Vec<u8>>) {
        let (kind, id) = id.split_once('/').unwrap();
        let mut s = self.state.lock().unwrap();
        let files: BTreeMap<String, File> = files
            .iter()
            .map(|(p, d)| (p.clone(), File::new(d.clone())))
            .collect();
        for f in files.values().filter(|f| f.lfs) {
            s.blobs.insert(f.sha256.clone(), f.data.clone());
        }
        let repo = s.repos.entry(key(kind, id)).or_default();
        repo.commits.insert(sha.to_owned(), files);
        repo.refs.insert(branch.to_owned(), sha.to_owned());
    }

    /// Makes `id` gated: readable only with `token`.
    pub fn gate(&self, id: &str, token: &str) {
        let (kind, id) = id.split_once('/').unwrap();
        let mut s = self.state.lock().unwrap();
        s.token = Some(token.to_owned());
        s.repos.get_mut(&key(kind, id)).unwrap().gated = true;
    }

    /// The next `n` API and resolve requests answer 429 with
    /// `Retry-After: seconds`.
    pub fn rate_limit(&self, n: u64, seconds: u64) {
        let mut s = self.state.lock().unwrap();
        s.limit = n;
        s.retry_after = seconds;
    }

    /// The next `times` CDN requests for the blob with this SHA-256 send
    /// `after` bytes and then nothing (the connection stays open).
    pub fn stall(&self, sha256: &str, after: u64, times: u64) {
        self.state.lock().unwrap().stall = Some((sha256.to_owned(), after, times));
    }

    /// Every `/resolve/` answer waits this long first (a far Hub).
    pub fn latency(&self, latency: Duration) {
        self.state.lock().unwrap().latency = latency;
    }

    /// The next `times` CDN URLs `/resolve/` hands out for the blob with
    /// this SHA-256 are expired when used: every GET of one answers 403,
    /// as for a signed URL gone stale. Resolving again gives a fresh URL
    /// (once `times` are used up).
    pub fn expire(&self, sha256: &str, times: u64) {
        self.state.lock().unwrap().expire = Some((sha256.to_owned(), times));
    }

    /// The CDN sends at most `bytes_per_second` over all its connections,
    /// as a link slower than the mirror's pipeline does.
    pub fn bandwidth(&self, bytes_per_second: u64) {
        self.state.lock().unwrap().bandwidth = Some((bytes_per_second, Instant::now(), 0));
    }

    /// `path` (of any repository) is served with one byte changed.
    pub fn corrupt(&self, path: &str) {
        self.state.lock().unwrap().corrupt.insert(path.to_owned());
    }

    /// Serves every file right again.
    pub fn clear_corrupt(&self) {
        self.state.lock().unwrap().corrupt.clear();
    }

    pub fn seen(&self) -> Seen {
        self.state.lock().unwrap().seen.clone()
    }

    /// Bytes the CDN has sent so far.
    pub fn cdn_bytes(&self) -> u64 {
        self.cdn_bytes.load(Ordering::Relaxed)
    }

    pub fn reset_seen(&self) {
        self.state.lock().unwrap().seen = Seen::default();
        self.cdn_bytes.store(0, Ordering::Relaxed);
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for u in [&self.url, &self.cdn_url] {
            let _ = TcpStream::connect(u.trim_start_matches("http://"));
        }
    }
}

#[derive(Clone)]
struct Ctx {
    state: Arc<Mutex<State>>,
    cdn_url: String,
    cdn: bool,
    cdn_bytes: Arc<AtomicU64>,
}

/// A parsed request head.
struct Req {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
    host: String,
}

/// An answer: status, headers, body (the body is left out for HEAD), and
/// a stall point.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Arc<Vec<u8>>,
    range: (usize, usize),
    stall_after: Option<u64>,
    corrupt: bool,
}

impl Resp {
    fn new(status: u16, body: Vec<u8>) -> Self {
        let len = body.len();
        Self {
            status,
            headers: vec![],
            body: Arc::new(body),
            range: (0, len),
            stall_after: None,
            corrupt: false,
        }
    }

    fn json(v: Value) -> Self {
        Self::new(200, v.to_string().into_bytes()).header("Content-Type", "application/json")
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        let mut r = Self::new(status, json!({ "error": message }).to_string().into_bytes())
            .header("Content-Type", "application/json")
            .header("X-Error-Message", message);
        if !code.is_empty() {
            r = r.header("X-Error-Code", code);
        }
        r
    }

    fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_owned(), v.to_owned()));
        self
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        _ => "Error",
    }
}

/// Percent-decoding of a path or query value.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        if let (b'%', Some(Ok(v))) = (b[i], hex.map(|h| u8::from_str_radix(h, 16))) {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Ctx {
    fn serve(&self, conn: TcpStream) {
        let _ = conn.set_nodelay(true);
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut out = conn;
        loop {
            let Some(req) = read_head(&mut reader) else {
                return;
            };
            let resp = if self.cdn {
                self.cdn(&req)
            } else {
                self.upstream(&req)
            };
            if !self.write(&mut out, &req, resp) {
                return;
            }
        }
    }

    /// Writes `r`; false when the connection must end.
    fn write(&self, out: &mut TcpStream, req: &Req, r: Resp) -> bool {
        let (a, b) = r.range;
        let mut head = format!("HTTP/1.1 {} {}\r\n", r.status, reason(r.status));
        for (k, v) in &r.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", b - a));
        if out.write_all(head.as_bytes()).is_err() {
            return false;
        }
        if req.method == "HEAD" {
            return true;
        }
        let mut body = r.body[a..b].to_vec();
        if r.corrupt && !body.is_empty() {
            let mid = body.len() / 2;
            body[mid] ^= 0x55;
        }
        let send = match r.stall_after {
            Some(n) => (n as usize).min(body.len()),
            None => body.len(),
        };
        for piece in body[..send].chunks(64 << 10) {
            if out.write_all(piece).is_err() {
                return false;
            }
            let n = piece.len() as u64;
            if self.cdn {
                self.cdn_bytes.fetch_add(n, Ordering::Relaxed);
                let mut s = self.state.lock().unwrap();
                s.seen.cdn_bytes += n;
                // Past the link's rate: wait until the link is free again.
                if let Some((rate, since, sent)) = s.bandwidth.as_mut() {
                    *sent += n;
                    let due = Duration::from_secs_f64(*sent as f64 / *rate as f64);
                    let wait = due.saturating_sub(since.elapsed());
                    drop(s);
                    std::thread::sleep(wait);
                }
            } else if !req.path.starts_with("/api/") {
                self.state.lock().unwrap().seen.resolve_bytes += n;
            }
        }
        if r.stall_after.is_some() {
            // Keep the connection open and silent, as a stuck peer does.
            std::thread::sleep(Duration::from_secs(600));
            return false;
        }
        true
    }

    fn cdn(&self, req: &Req) -> Resp {
        let mut s = self.state.lock().unwrap();
        s.seen.cdn_requests += 1;
        if req.headers.contains_key("authorization") {
            s.seen.cdn_with_auth += 1;
        }
        let Some(sha) = req.path.strip_prefix("/blobs/") else {
            return Resp::error(404, "", "no such blob");
        };
        let Some(data) = s.blobs.get(sha).cloned() else {
            return Resp::error(404, "", "no such blob");
        };
        // A URL just handed out works for a HEAD; a GET later finds it
        // expired.
        let number = req.query.get("u").and_then(|u| u.parse::<u64>().ok());
        if req.method == "GET" && number.is_some_and(|n| s.stale.contains(&n)) {
            s.seen.cdn_expired += 1;
            return Resp::error(403, "", "Request has expired");
        }
        let path = req.query.get("path").cloned().unwrap_or_default();
        let corrupt = s.corrupt.contains(&path);
        let len = data.len();
        let mut r = Resp::new(200, vec![]);
        r.body = data;
        r.range = (0, len);
        r.corrupt = corrupt;
        r = r
            .header("ETag", &format!("\"{sha}\""))
            .header("Accept-Ranges", "bytes")
            .header("Content-Type", "application/octet-stream");
        if let Some(range) = req.headers.get("range") {
            match parse_range(range, len) {
                Some((a, b)) => {
                    r.status = 206;
                    r.range = (a, b);
                    r = r.header("Content-Range", &format!("bytes {a}-{}/{len}", b - 1));
                }
                None => {
                    let mut e = Resp::error(416, "", "range not satisfiable");
                    e = e.header("Content-Range", &format!("bytes */{len}"));
                    return e;
                }
            }
        }
        if req.method == "GET" {
            if let Some((stall_sha, after, times)) = s.stall.as_mut() {
                if stall_sha == sha && *times > 0 {
                    *times -= 1;
                    r.stall_after = Some(*after);
                }
            }
        }
        r
    }

    fn upstream(&self, req: &Req) -> Resp {
        let resolve = !req.path.starts_with("/api/");
        let latency = self.state.lock().unwrap().latency;
        if resolve && !latency.is_zero() {
            {
                let mut s = self.state.lock().unwrap();
                s.resolving += 1;
                s.seen.resolve_peak = s.seen.resolve_peak.max(s.resolving);
            }
            std::thread::sleep(latency);
            self.state.lock().unwrap().resolving -= 1;
        }
        let mut s = self.state.lock().unwrap();
        if resolve {
            s.seen.resolve_requests += 1;
        } else {
            s.seen.api_requests += 1;
        }
        if let Some(a) = req.headers.get("authorization") {
            s.seen.upstream_auth.push(a.clone());
        }
        if s.limit > 0 {
            s.limit -= 1;
            s.seen.rate_limited += 1;
            let after = s.retry_after.to_string();
            return Resp::error(429, "", "You have been rate-limited; retry later.")
                .header("Retry-After", &after);
        }
        let token = req
            .headers
            .get("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::to_owned);
        let r = if resolve {
            self.resolve(&s, req, token.as_deref())
                .map(|r| Self::number_cdn_url(&mut s, r))
        } else {
            self.api(&s, req, token.as_deref())
        };
        r.unwrap_or_else(|e| e)
    }

    /// Gives a redirect to the built-in CDN its URL's number, and marks
    /// the URL stale if [`StandIn::expire`] asks for it.
    fn number_cdn_url(s: &mut State, mut r: Resp) -> Resp {
        let Some((_, location)) = r.headers.iter_mut().find(|(k, _)| k == "Location") else {
            return r;
        };
        let Some(blob) = location.split("/blobs/").nth(1) else {
            return r;
        };
        let blob = blob.split('?').next().unwrap_or_default();
        let n = s.urls;
        s.urls += 1;
        if let Some((expired, times)) = s.expire.as_mut() {
            if expired == blob && *times > 0 {
                *times -= 1;
                s.stale.insert(n);
            }
        }
        location.push_str(&format!("&u={n}"));
        r
    }

    /// The repository `kind/org/name` and what follows it in `rest`.
    fn repo<'a>(
        &self,
        s: &'a State,
        kind: &str,
        rest: &str,
        token: Option<&str>,
    ) -> Result<(&'a Repo, String, String), Resp> {
        let mut parts = rest.splitn(3, '/');
        let (org, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let tail = parts.next().unwrap_or("").to_owned();
        let id = format!("{org}/{name}");
        let not_found = || {
            Resp::error(
                404,
                "RepoNotFound",
                "Repository Not Found for url. Please make sure you specified the correct `repo_id` and `repo_type`.",
            )
        };
        let repo = s.repos.get(&key(kind, &id)).ok_or_else(not_found)?;
        if repo.gated && token != s.token.as_deref() {
            let status = if token.is_none() { 401 } else { 403 };
            return Err(Resp::error(
                status,
                "GatedRepo",
                &format!("Access to model {id} is restricted. You must have access to it and be authenticated to access it. Please log in."),
            ));
        }
        Ok((repo, id, tail))
    }

    fn revision<'a>(
        repo: &'a Repo,
        rev: &str,
    ) -> Result<(String, &'a BTreeMap<String, File>), Resp> {
        let rev = decode(rev);
        let sha = repo.refs.get(&rev).cloned().unwrap_or(rev.clone());
        match repo.commits.get(&sha) {
            Some(files) => Ok((sha, files)),
            None => Err(Resp::error(
                404,
                "RevisionNotFound",
                &format!("Invalid rev id: {rev}"),
            )),
        }
    }

    fn api(&self, s: &State, req: &Req, token: Option<&str>) -> Result<Resp, Resp> {
        let rest = &req.path["/api/".len()..];
        let (kind, rest) = rest.split_once('/').unwrap_or((rest, ""));
        if kind != "models" && kind != "datasets" {
            return Err(Resp::error(404, "", "Not Found"));
        }
        let (repo, id, tail) = self.repo(s, kind, rest, token)?;
        if tail.is_empty() || tail.starts_with("revision/") {
            let rev = tail.strip_prefix("revision/").unwrap_or("main");
            let (sha, files) = Self::revision(repo, rev)?;
            let siblings: Vec<Value> = files.keys().map(|p| json!({ "rfilename": p })).collect();
            let mut v = json!({
                "_id": format!("{kind}/{id}"),
                "id": id,
                "author": id.split('/').next(),
                "sha": sha,
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
                "private": false,
                "gated": if repo.gated { json!("auto") } else { json!(false) },
                "disabled": false,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            });
            if kind == "models" {
                v["modelId"] = json!(id);
            }
            return Ok(Resp::json(v));
        }
        if let Some(t) = tail.strip_prefix("tree/") {
            let (rev, dir) = t.split_once('/').unwrap_or((t, ""));
            let (_, files) = Self::revision(repo, rev)?;
            let dir = decode(dir);
            let recursive = req
                .query
                .get("recursive")
                .is_some_and(|v| v == "true" || v == "1");
            let prefix = if dir.is_empty() {
                String::new()
            } else {
                format!("{dir}/")
            };
            let mut entries: Vec<Value> = Vec::new();
            let mut dirs = std::collections::BTreeSet::new();
            for (path, f) in files.range(prefix.clone()..) {
                let Some(rel) = path.strip_prefix(&prefix) else {
                    break;
                };
                // Directories above the file, as the Hub lists them.
                let parts: Vec<&str> = rel.split('/').collect();
                for k in 1..parts.len() {
                    if !recursive && k > 1 {
                        break;
                    }
                    let d = format!("{prefix}{}", parts[..k].join("/"));
                    if dirs.insert(d.clone()) {
                        entries.push(json!({ "type": "directory", "oid": git_blob_id(d.as_bytes()), "size": 0, "path": d }));
                    }
                }
                if !recursive && parts.len() > 1 {
                    continue;
                }
                let mut e =
                    json!({ "type": "file", "oid": f.oid, "size": f.data.len(), "path": path });
                if f.lfs {
                    e["lfs"] = json!({ "oid": f.sha256, "size": f.data.len(), "pointerSize": 134 });
                }
                entries.push(e);
            }
            if entries.is_empty() && !dir.is_empty() {
                return Err(Resp::error(
                    404,
                    "EntryNotFound",
                    &format!("{dir} does not exist"),
                ));
            }
            let start: usize = req
                .query
                .get("cursor")
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let end = (start + PAGE).min(entries.len());
            let page: Vec<Value> = entries[start.min(end)..end].to_vec();
            let mut r = Resp::json(Value::Array(page));
            if end < entries.len() {
                let mut q: Vec<String> = req
                    .query
                    .iter()
                    .filter(|(k, _)| *k != "cursor")
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                q.push(format!("cursor={end}"));
                r = r.header(
                    "Link",
                    &format!(
                        "<http://{}{}?{}>; rel=\"next\"",
                        req.host,
                        req.path,
                        q.join("&")
                    ),
                );
            }
            return Ok(r);
        }
        Err(Resp::error(404, "", "Not Found"))
    }

    fn resolve(&self, s: &State, req: &Req, token: Option<&str>) -> Result<Resp, Resp> {
        let (kind, rest) = match req.path[1..].strip_prefix("datasets/") {
            Some(r) => ("datasets", r),
            None => ("models", &req.path[1..]),
        };
        let (repo, _, tail) = self.repo(s, kind, rest, token)?;
        let Some(t) = tail.strip_prefix("resolve/") else {
            return Err(Resp::error(404, "", "Not Found"));
        };
        let (rev, path) = t.split_once('/').unwrap_or((t, ""));
        let (sha, files) = Self::revision(repo, rev)?;
        let path = decode(path);
        let Some(f) = files.get(&path) else {
            return Err(
                Resp::error(404, "EntryNotFound", &format!("{path} does not exist"))
                    .header("X-Repo-Commit", &sha),
            );
        };
        if f.lfs {
            let location = format!(
                "{}/blobs/{}?path={}",
                self.cdn_url,
                f.sha256,
                path.replace('%', "%25")
                    .replace(' ', "%20")
                    .replace('&', "%26")
            );
            return Ok(Resp::new(302, vec![])
                .header("Location", &location)
                .header("X-Repo-Commit", &sha)
                .header("X-Linked-Etag", &format!("\"{}\"", f.sha256))
                .header("X-Linked-Size", &f.data.len().to_string())
                .header("ETag", &format!("\"{}\"", f.oid)));
        }
        let len = f.data.len();
        let mut r = Resp::new(200, vec![]);
        r.body = f.data.clone();
        r.range = (0, len);
        r.corrupt = s.corrupt.contains(&path);
        r = r
            .header("X-Repo-Commit", &sha)
            .header("ETag", &format!("\"{}\"", f.oid))
            .header("Accept-Ranges", "bytes")
            .header("Content-Type", "application/octet-stream");
        if let Some((a, b)) = req.headers.get("range").and_then(|h| parse_range(h, len)) {
            r.status = 206;
            r.range = (a, b);
            r = r.header("Content-Range", &format!("bytes {a}-{}/{len}", b - 1));
        }
        Ok(r)
    }
}

/// `bytes=A-B`, `bytes=A-`, `bytes=-N` against `len`: `[a, b)`.
fn parse_range(h: &str, len: usize) -> Option<(usize, usize)> {
    let (a, b) = h.strip_prefix("bytes=")?.split_once('-')?;
    let (a, b) = match (a.is_empty(), b.is_empty()) {
        (true, false) => (len.saturating_sub(b.parse().ok()?), len),
        (false, true) => (a.parse().ok()?, len),
        (false, false) => (a.parse().ok()?, (b.parse::<usize>().ok()? + 1).min(len)),
        (true, true) => return None,
    };
    (a < b).then_some((a, b))
}

fn read_head(r: &mut BufReader<TcpStream>) -> Option<Req> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut it = line.split_whitespace();
    let method = it.next()?.to_owned();
    let target = it.next()?.to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    // Bodies (none expected) are skipped.
    if let Some(n) = headers
        .get("content-length")
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::io::copy(&mut std::io::Read::take(&mut *r, n), &mut std::io::sink()).ok()?;
    }
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), decode(v))
        })
        .collect();
    let host = headers.get("host").cloned().unwrap_or_default();
    Some(Req {
        method,
        path: path.to_owned(),
        query,
        headers,
        host,
    })
}
