//! The upstream Hub, as a downloader needs it: a revision's commit, the
//! recursive tree listing (paged by `Link`), each file's content URL (a
//! large file's `/resolve/` redirects to a CDN host) and byte ranges of
//! it. The token goes to the upstream's own origin only, never to the
//! hosts it redirects to. 429 waits as `Retry-After` says; dropped and
//! stalled connections are retried from the byte they stopped at.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cas_protocol::repo::RepoType;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, LOCATION, RANGE, RETRY_AFTER};
use reqwest::{Method, Response, StatusCode};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::progress::{Progress, Stage};
use crate::remote::RetryPolicy;

/// Characters of a path segment sent as they are.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// Longest wait a `Retry-After` is honoured for (longer: this cap).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Redirects followed for one file.
const MAX_REDIRECTS: usize = 5;
/// Largest API answer (one page of a tree listing).
const MAX_API_ANSWER: usize = 64 << 20;

/// A file of the upstream revision, as its tree listing describes it.
#[derive(Debug, Clone, Deserialize)]
pub struct Entry {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
    #[serde(default)]
    pub size: u64,
    /// Git blob id (of the bytes, or of the LFS pointer).
    #[serde(default)]
    pub oid: String,
    pub lfs: Option<Lfs>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Lfs {
    /// The file's SHA-256.
    pub oid: String,
    pub size: u64,
}

#[derive(Deserialize)]
struct Info {
    sha: Option<String>,
}

/// One upstream repository.
pub struct Upstream {
    http: reqwest::Client,
    endpoint: String,
    host: String,
    token: Option<HeaderValue>,
    repo_type: RepoType,
    id: String,
    retry: RetryPolicy,
    /// Body bytes received from the upstream and its CDN hosts.
    pub received: Arc<AtomicU64>,
}

fn segments(path: &str) -> String {
    path.split('/')
        .map(|s| utf8_percent_encode(s, SEGMENT).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

fn origin(url: &reqwest::Url) -> (String, Option<String>, Option<u16>) {
    (
        url.scheme().to_owned(),
        url.host_str().map(str::to_owned),
        url.port_or_known_default(),
    )
}

impl Upstream {
    pub fn new(
        endpoint: &str,
        token: Option<&str>,
        repo_type: RepoType,
        id: &str,
        retry: RetryPolicy,
        stall: Duration,
    ) -> Result<Self> {
        let bad = |reason: String| Error::Input {
            path: endpoint.into(),
            reason,
        };
        let url = reqwest::Url::parse(endpoint).map_err(|e| bad(format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("the upstream must be an http:// or https:// URL".into()));
        }
        let token = token
            .map(|t| {
                let mut v = HeaderValue::from_str(&format!("Bearer {}", t.trim()))
                    .map_err(|_| bad("token contains characters not allowed in a header".into()))?;
                v.set_sensitive(true);
                Ok(v)
            })
            .transpose()?;
        let http = crate::tls::client_builder(stall)?
            // Redirects are followed by hand, so the token never follows
            // one to another host.
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            http,
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            host: url.host_str().unwrap_or("").to_owned(),
            token,
            repo_type,
            id: id.to_owned(),
            retry,
            received: Arc::new(AtomicU64::new(0)),
        })
    }

    fn kind(&self) -> &'static str {
        match self.repo_type {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
        }
    }

    /// The upstream's name of the repository: `org/name` or
    /// `datasets/org/name`.
    pub fn name(&self) -> String {
        match self.repo_type {
            RepoType::Model => self.id.clone(),
            RepoType::Dataset => format!("datasets/{}", self.id),
        }
    }

    /// Whether `url` is on the upstream's own origin (the only one that
    /// sees the token).
    fn own(&self, url: &str) -> bool {
        match (
            reqwest::Url::parse(url),
            reqwest::Url::parse(&self.endpoint),
        ) {
            (Ok(a), Ok(b)) => origin(&a) == origin(&b),
            _ => false,
        }
    }

    async fn get(
        &self,
        method: &Method,
        url: &str,
        headers: HeaderMap,
    ) -> reqwest::Result<Response> {
        let mut rb = self.http.request(method.clone(), url).headers(headers);
        if let Some(t) = self.token.as_ref().filter(|_| self.own(url)) {
            rb = rb.header(AUTHORIZATION, t.clone());
        }
        rb.send().await
    }

    /// One line for an error answer of the upstream.
    async fn refusal(&self, what: &str, resp: Response) -> Error {
        let status = resp.status();
        let code = resp
            .headers()
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        // The Hub's own answers carry its meaning; a CDN's only a status.
        let own = self.own(resp.url().as_str());
        let message = match (status.as_u16(), code.as_str()) {
            (401 | 403, _) if own => format!(
                "{} on {} is gated or private ({status}): accept the license on the Hub and pass a token \
                 (--hf-token, $HF_TOKEN or `hf auth login`){}",
                self.name(),
                self.host,
                if self.token.is_some() { "; the token given was refused" } else { "" }
            ),
            (404, "RevisionNotFound") if own => {
                format!("{} on {} has no such revision", self.name(), self.host)
            }
            (404, "EntryNotFound") if own => format!("not found in {} on {}", self.name(), self.host),
            (404, _) if own => {
                format!("{} not found on {} (unknown repository)", self.name(), self.host)
            }
            _ => {
                let host = resp.url().host_str().unwrap_or("").to_owned();
                let text = resp.text().await.unwrap_or_default();
                let text: String = text.chars().take(200).collect();
                format!("{host} answered {status}: {}", text.trim())
            }
        };
        Error::Upstream {
            what: what.to_owned(),
            message,
        }
    }

    fn unreachable(&self, what: &str, e: &reqwest::Error) -> Error {
        let reason = if e.is_timeout() {
            "no progress within the stall timeout".to_owned()
        } else {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(c) = src {
                s = format!("{s}: {c}");
                src = c.source();
            }
            s
        };
        Error::Upstream {
            what: what.to_owned(),
            message: format!("upstream {} unreachable: {reason}", self.host),
        }
    }

    /// How long to wait after a 429 or 503: its `Retry-After` seconds.
    fn retry_after(resp: &Response) -> Option<Duration> {
        let secs: u64 = resp
            .headers()
            .get(RETRY_AFTER)?
            .to_str()
            .ok()?
            .parse()
            .ok()?;
        Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
    }

    /// GETs `url` until it answers something other than a transient
    /// failure: the answer (any status but 429/5xx), or the last error.
    async fn send(
        &self,
        what: &str,
        method: Method,
        url: &str,
        headers: HeaderMap,
    ) -> Result<Response> {
        let mut attempt = 0;
        loop {
            let (wait, err) = match self.get(&method, url, headers.clone()).await {
                Ok(r)
                    if r.status() == StatusCode::TOO_MANY_REQUESTS
                        || r.status().is_server_error() =>
                {
                    let wait = Self::retry_after(&r).unwrap_or_else(|| self.retry.delay(attempt));
                    (wait, self.refusal(what, r).await)
                }
                Ok(r) => return Ok(r),
                Err(e) => (self.retry.delay(attempt), self.unreachable(what, &e)),
            };
            attempt += 1;
            if attempt >= self.retry.attempts {
                return Err(err);
            }
            tracing::warn!("{err}; retrying in {wait:?}");
            tokio::time::sleep(wait).await;
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        url: &str,
    ) -> Result<(T, Option<String>)> {
        let resp = self.send(what, Method::GET, url, HeaderMap::new()).await?;
        if !resp.status().is_success() {
            return Err(self.refusal(what, resp).await);
        }
        let next = resp
            .headers()
            .get(reqwest::header::LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(next_link);
        let body = crate::remote::read_limited(what, url, resp, MAX_API_ANSWER).await?;
        let v = serde_json::from_slice(&body).map_err(|e| Error::BadAnswer {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
        Ok((v, next))
    }

    /// The commit sha that `revision` names.
    pub async fn commit(&self, revision: &str) -> Result<String> {
        let url = format!(
            "{}/api/{}/{}/revision/{}",
            self.endpoint,
            self.kind(),
            self.id,
            utf8_percent_encode(revision, NON_ALPHANUMERIC)
        );
        let what = format!("{}@{revision}", self.name());
        let (info, _): (Info, _) = self.json(&what, &url).await?;
        info.sha.ok_or_else(|| Error::BadAnswer {
            what,
            reason: "no commit sha in the repository's description".into(),
        })
    }

    /// Every file of commit `sha`.
    pub async fn files(&self, sha: &str) -> Result<Vec<Entry>> {
        let mut url = format!(
            "{}/api/{}/{}/tree/{sha}?recursive=true&expand=false",
            self.endpoint,
            self.kind(),
            self.id
        );
        let what = format!("listing of {}@{sha}", self.name());
        let mut out = Vec::new();
        loop {
            let (page, next): (Vec<Entry>, _) = self.json(&what, &url).await?;
            out.extend(page.into_iter().filter(|e| e.kind == "file"));
            match next {
                // Pages stay on the upstream (the token goes nowhere else).
                Some(n) if self.own(&n) => url = n,
                Some(n) => {
                    return Err(Error::BadAnswer {
                        what,
                        reason: format!("the next page is on another host: {n}"),
                    })
                }
                None => return Ok(out),
            }
        }
    }

    /// The `/resolve/` URL of `path` at `sha`.
    fn resolve_url(&self, sha: &str, path: &str) -> String {
        let prefix = match self.repo_type {
            RepoType::Model => "",
            RepoType::Dataset => "datasets/",
        };
        format!(
            "{}/{prefix}{}/resolve/{sha}/{}",
            self.endpoint,
            self.id,
            segments(path)
        )
    }

    /// Where the bytes of `path` are: its `/resolve/` URL, or the URL it
    /// redirects to (a large file's CDN URL), relative ones resolved.
    pub async fn location(&self, sha: &str, path: &str) -> Result<String> {
        let mut url = self.resolve_url(sha, path);
        for _ in 0..MAX_REDIRECTS {
            let resp = self
                .send(path, Method::HEAD, &url, HeaderMap::new())
                .await?;
            match redirect(path, &resp)? {
                Some(to) => url = to,
                None if resp.status().is_success() => return Ok(url),
                None => return Err(self.refusal(path, resp).await),
            }
        }
        Err(too_many(path))
    }

    /// Bytes `[start, end)` of `path` at `sha`, from `url` (see
    /// [`location`](Self::location)) when known, else through its
    /// `/resolve/` URL, whole: a connection that drops or stalls is resumed
    /// from the byte it stopped at, and an expired CDN URL is replaced by
    /// a fresh one from `/resolve/` (once). The bytes go into `into` (its
    /// capacity reused).
    #[allow(clippy::too_many_arguments)]
    pub async fn read(
        &self,
        sha: &str,
        path: &str,
        url: Option<&str>,
        (start, end): (u64, u64),
        whole: bool,
        progress: &dyn Progress,
        into: Vec<u8>,
    ) -> Result<Bytes> {
        let mut url = match url {
            Some(u) => u.to_owned(),
            None => self.resolve_url(sha, path),
        };
        let mut buf = into;
        buf.clear();
        buf.reserve((end - start) as usize);
        let (mut attempt, mut redirects, mut renewed) = (0, 0, false);
        while (buf.len() as u64) < end - start {
            let from = start + buf.len() as u64;
            let mut headers = HeaderMap::new();
            if !(whole && from == 0) {
                let r = format!("bytes={from}-{}", end - 1);
                headers.insert(RANGE, HeaderValue::from_str(&r).expect("ascii"));
            }
            let resp = self.send(path, Method::GET, &url, headers).await?;
            if let Some(to) = redirect(path, &resp)? {
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(too_many(path));
                }
                url = to;
                continue;
            }
            let status = resp.status();
            // A CDN URL is signed for a while: once it has expired (403 or
            // 410 from a host other than the upstream), ask `/resolve/`
            // again for a fresh one, once.
            if matches!(status, StatusCode::FORBIDDEN | StatusCode::GONE)
                && !self.own(&url)
                && !renewed
            {
                tracing::warn!("{path}: {status} from {url}; asking the upstream for a fresh URL");
                renewed = true;
                url = self.resolve_url(sha, path);
                continue;
            }
            let ranged = status == StatusCode::PARTIAL_CONTENT;
            if !(ranged || (status == StatusCode::OK && from == 0)) {
                return Err(self.refusal(path, resp).await);
            }
            let mut resp = resp;
            let failed = loop {
                match resp.chunk().await {
                    Ok(Some(c)) => {
                        let room = (end - start) as usize - buf.len();
                        let take = c.len().min(room);
                        buf.extend_from_slice(&c[..take]);
                        self.received.fetch_add(c.len() as u64, Ordering::Relaxed);
                        progress.advance(Stage::Download, take as u64);
                        if take < c.len() {
                            break None;
                        }
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(self.unreachable(path, &e)),
                }
            };
            let short = (buf.len() as u64) < end - start;
            match failed {
                Some(e) if short => {
                    attempt += 1;
                    if attempt >= self.retry.attempts {
                        return Err(e);
                    }
                    tracing::warn!("{e}; resuming at byte {}", start + buf.len() as u64);
                }
                _ if short => {
                    return Err(Error::BadAnswer {
                        what: path.to_owned(),
                        reason: format!("the upstream sent {} bytes of {}", buf.len(), end - start),
                    })
                }
                _ => {}
            }
        }
        Ok(Bytes::from(buf))
    }
}

/// Where a redirect points (relative locations resolved); `None` for
/// any other answer.
fn redirect(what: &str, resp: &Response) -> Result<Option<String>> {
    if !resp.status().is_redirection() {
        return Ok(None);
    }
    let bad = |reason: String| Error::BadAnswer {
        what: what.to_owned(),
        reason,
    };
    let to = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad(format!("{} without a Location", resp.status())))?;
    let url = resp
        .url()
        .join(to)
        .map_err(|e| bad(format!("bad Location {to:?}: {e}")))?;
    Ok(Some(url.into()))
}

fn too_many(what: &str) -> Error {
    Error::BadAnswer {
        what: what.to_owned(),
        reason: format!("more than {MAX_REDIRECTS} redirects"),
    }
}

/// The URL of `<URL>; rel="next"` in a `Link` header.
fn next_link(h: &str) -> Option<String> {
    h.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| matches!(p.trim(), "rel=\"next\"" | "rel=next"))
            .then(|| {
                url.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_owned()
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_paths() {
        assert_eq!(
            next_link("<https://h/api/x?cursor=2>; rel=\"next\"").as_deref(),
            Some("https://h/api/x?cursor=2")
        );
        assert_eq!(next_link("<https://h/a>; rel=\"prev\""), None);
        assert_eq!(segments("a b/c%d/e.txt"), "a%20b/c%25d/e.txt");
    }

    #[test]
    fn the_token_stays_on_the_upstream() {
        let u = Upstream::new(
            "http://127.0.0.1:9000",
            Some("secret"),
            RepoType::Model,
            "org/x",
            RetryPolicy::default(),
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(u.own("http://127.0.0.1:9000/org/x/resolve/main/a"));
        assert!(!u.own("http://127.0.0.1:9001/blobs/a"));
        assert!(!u.own("https://127.0.0.1:9000/a"));
        assert!(!u.own("http://cdn.example/a"));
    }
}
