//! Reads through a caching proxy: the real `cas-server` behind nginx
//! running docs/nginx/cas-cache.conf (rendered, nothing added), the way
//! docs/DEPLOYMENT.md tells operators to run it. The origin's reconstruction
//! answers point xorb URLs at nginx (`--public-url`), so every xorb read of
//! a client goes through the cache.
//!
//! Covered: two clients share the cache (the origin serves the second
//! none of its xorb bytes); ranges come from the cache as 206 with the
//! origin's bytes; a corrupted cache entry is caught by the client and never
//! written; uploads and the rest of the API pass through uncached; with a
//! signing key, tokens reach the origin through the proxy, the grant URLs
//! of a token limited to repositories are cached like xorbs and plain xorb
//! reads with a token never enter the cache; Hub API
//! downloads share the cache by content and see a moved branch at once.
//! And docs/DEPLOYMENT.md shows the tested file verbatim.
//!
//! Needs nginx (`scripts/setup-debian` installs it); without it every test
//! here fails with that instruction instead of passing vacuously.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cas_e2e::client::cas_as;
use cas_e2e::hub::Hf;
use cas_e2e::nginx::{nginx_bin, Nginx, TEMPLATE};
use cas_e2e::{
    agent, assert_same_bytes, bin, body, fails, free_port, json_of, ok, Metrics, ServerProcess,
};
use serde_json::Value;

// ---------------------------------------------------------------- helpers

/// An origin `cas-server` whose xorb URLs point at an nginx cache in front
/// of it, plus scratch space. Fields drop in order: nginx, server, files.
struct Cdn {
    nginx: Nginx,
    server: ServerProcess,
    root: PathBuf,
    /// The origin's signing key, if it has one.
    key: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Cdn {
    /// An origin without a signing key (it serves loopback peers, and
    /// nginx is one).
    fn new() -> Self {
        Self::start(false)
    }

    /// An origin with a signing key: API calls need tokens.
    fn with_key() -> Self {
        Self::start(true)
    }

    fn start(with_key: bool) -> Self {
        nginx_bin(); // before anything starts: fail with the instruction
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        // nginx started as root runs its workers as `nobody`; they reach the
        // cache and temp directories (which nginx creates and hands to
        // them) through this one.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = root.join("server");
        std::fs::create_dir(&data).unwrap();
        // nginx's port first: the origin must name it in reconstructions.
        let port = free_port();
        let public_url = format!("http://127.0.0.1:{port}");
        let mut args = vec!["--public-url".to_owned(), public_url.clone()];
        let key = with_key.then(|| {
            let key = root.join("signing.key");
            let mut c = bin("cas-server");
            c.args(["key", "create"]).arg(&key);
            ok(c);
            args.extend([
                "--signing-key-file".to_owned(),
                key.to_str().unwrap().to_owned(),
            ]);
            key
        });
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = ServerProcess::start_with(&data, &args);
        let origin = server.url.strip_prefix("http://").unwrap().to_owned();
        let nginx = Nginx::start(port, &origin, &root.join("nginx"));
        assert_eq!(nginx.url, public_url);
        Self {
            nginx,
            server,
            root,
            key,
            _dir: dir,
        }
    }

    /// A one-hour token of `scope`, signed with the origin's key.
    fn token(&self, scope: &str) -> String {
        self.token_with(&["--scope", scope])
    }

    /// A one-hour token from `token create ARGS`.
    fn token_with(&self, args: &[&str]) -> String {
        let mut c = bin("cas-server");
        c.args(["token", "create", "--signing-key-file"])
            .arg(self.key.as_ref().expect("an origin with a key"))
            .args(args)
            .args(["--ttl", "1h"]);
        String::from_utf8(ok(c)).unwrap().trim().to_owned()
    }

    fn origin(&self) -> &str {
        &self.server.url
    }

    fn cdn(&self) -> &str {
        &self.nginx.url
    }

    /// A fresh, empty directory under the scratch space.
    fn dir(&self, name: &str) -> PathBuf {
        let d = self.root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// `cas-client SUB` against `endpoint` with `cache` as its cache
    /// (`None`: `--no-cache`); the caller's environment cannot leak in.
    fn cas(&self, endpoint: &str, cache: Option<&Path>, sub: &str) -> Command {
        cas_as(None, endpoint, cache, sub, &self.root)
    }

    /// Writes `data` to `name` and uploads it to the origin; returns the
    /// path and the file hash.
    fn upload_bytes(&self, name: &str, data: &[u8]) -> (PathBuf, String) {
        let path = self.root.join(name);
        std::fs::write(&path, data).unwrap();
        let mut c = self.cas(self.origin(), None, "upload");
        c.arg("--json").arg(&path);
        let hash = json_of(ok(c))["roots"][0]["hash"]
            .as_str()
            .unwrap()
            .to_owned();
        (path, hash)
    }

    /// Fetches `hash` to `dest` through the proxy (API and xorbs) and
    /// returns the `--json` report.
    fn fetch_via_cdn(&self, hash: &str, dest: &Path, cache: Option<&Path>) -> Value {
        let mut c = self.cas(self.cdn(), cache, "fetch");
        c.args(["--json", hash, "-o"]).arg(dest);
        json_of(ok(c))
    }

    /// The origin's metrics (never through the proxy).
    fn metrics(&self) -> Metrics {
        Metrics::fetch(self.origin())
    }

    /// The reconstruction of `hash`, asked through the proxy.
    fn reconstruction(&self, hash: &str) -> Value {
        self.reconstruction_with(hash, None)
    }

    /// The reconstruction of `hash` asked through the proxy with `token`.
    fn reconstruction_with(&self, hash: &str, token: Option<&str>) -> Value {
        let mut req = agent().get(format!("{}/v1/reconstructions/{hash}", self.cdn()));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let (status, bytes) = body(req.call().unwrap());
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        serde_json::from_slice(&bytes).unwrap()
    }
}

/// Runs `c`, which must succeed; returns its stdout.
fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A response header as a string ("" when absent).
fn header(r: &ureq::http::Response<ureq::Body>, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// ~12 MB of bf16 weights: one xorb of ~8 MB, several cache slices.
fn model_bytes(seed: u64) -> Vec<u8> {
    cas_bench::bf16_weights(seed, 12_000_000)
}

// ------------------------------------------------------------------ tests

/// Client A's fetch fills the proxy cache; client B, with its own empty
/// local cache, then gets every xorb byte from the proxy: the origin
/// serves none.
#[test]
fn two_clients_share_the_cdn_cache() {
    let cdn = Cdn::new();
    let data = model_bytes(1);
    let (_, hash) = cdn.upload_bytes("model.bin", &data);
    let stored = cdn.metrics().get("cas_stored_bytes");

    let before_a = cdn.metrics();
    let a = cdn.fetch_via_cdn(&hash, &cdn.root.join("a.bin"), Some(&cdn.dir("cache-a")));
    let before_b = cdn.metrics();
    assert_same_bytes(&data, &cdn.root.join("a.bin"));
    assert!(u(&a["network_bytes"]) > 0, "{a}");
    let origin_a = before_b.xorb_bytes_out() - before_a.xorb_bytes_out();
    assert!(
        origin_a > 0,
        "A's xorb reads reached the origin through nginx"
    );
    // Slices cover the xorb once; concurrent misses wait for one fetch.
    assert!(
        origin_a <= stored,
        "the origin sent {origin_a} xorb bytes for {stored} stored"
    );

    let b = cdn.fetch_via_cdn(&hash, &cdn.root.join("b.bin"), Some(&cdn.dir("cache-b")));
    let after_b = cdn.metrics();
    assert_same_bytes(&data, &cdn.root.join("b.bin"));
    assert!(
        u(&b["network_bytes"]) > 0,
        "B used the network (the CDN): {b}"
    );
    assert_eq!(u(&b["cache_bytes"]), 0, "{b}");
    assert_eq!(
        after_b.xorb_bytes_out(),
        before_b.xorb_bytes_out(),
        "B's xorb bytes all came from the nginx cache"
    );
    assert_eq!(
        after_b.requests("xorb_get"),
        before_b.requests("xorb_get"),
        "no xorb GET of B reached the origin"
    );
    // The API calls themselves did reach the origin (never cached).
    assert!(after_b.requests("reconstruction") > before_b.requests("reconstruction"));
}

/// After one fetch, arbitrary ranges of a xorb come from the proxy cache as
/// 206 with the origin's bytes; `cas-client cat --range` through the proxy
/// with an empty local cache is the file's slice.
#[test]
fn range_requests_are_served_from_the_cdn_cache() {
    let cdn = Cdn::new();
    let data = model_bytes(2);
    let (_, hash) = cdn.upload_bytes("model.bin", &data);
    cdn.fetch_via_cdn(&hash, &cdn.root.join("warm.bin"), None);

    let rec = cdn.reconstruction(&hash);
    let xorb = rec["fetch"][0]["xorb"].as_str().unwrap().to_owned();
    let url = rec["fetch"][0]["url"].as_str().unwrap().to_owned();
    assert_eq!(
        url,
        format!("{}/v1/xorbs/{xorb}", cdn.cdn()),
        "--public-url"
    );
    let origin_url = format!("{}/v1/xorbs/{xorb}", cdn.origin());
    let size: u64 = header(&agent().head(&origin_url).call().unwrap(), "content-length")
        .parse()
        .unwrap();
    assert!(size > 3 << 20, "a xorb of several slices: {size}");

    // (Range header, first byte, last byte)
    let cases = [
        ("bytes=0-99".to_owned(), 0, 99),
        // across the first 1 MiB slice boundary
        ("bytes=1048000-1049999".to_owned(), 1_048_000, 1_049_999),
        ("bytes=100000-3999999".to_owned(), 100_000, 3_999_999),
        (format!("bytes={}-", size - 5000), size - 5000, size - 1),
        ("bytes=-1000".to_owned(), size - 1000, size - 1),
    ];
    // Straight from the origin first: these reads count in its metrics.
    let want: Vec<Vec<u8>> = cases
        .iter()
        .map(|(range, _, _)| {
            let (status, bytes) = body(
                agent()
                    .get(&origin_url)
                    .header("Range", range)
                    .call()
                    .unwrap(),
            );
            assert_eq!(status, 206, "origin {range}");
            bytes
        })
        .collect();

    let before = cdn.metrics();
    for ((range, first, last), want) in cases.iter().zip(&want) {
        let r = agent().get(&url).header("Range", range).call().unwrap();
        assert_eq!(
            header(&r, "x-cache-status"),
            "HIT",
            "{range}: served from the cache"
        );
        assert_eq!(
            header(&r, "content-range"),
            format!("bytes {first}-{last}/{size}"),
            "{range}"
        );
        let (status, got) = body(r);
        assert_eq!(status, 206, "{range}");
        assert_eq!(got.len() as u64, last - first + 1, "{range}");
        assert!(&got == want, "{range}: bytes differ from the origin's");
    }
    let after = cdn.metrics();
    assert_eq!(after.xorb_bytes_out(), before.xorb_bytes_out());
    assert_eq!(after.requests("xorb_get"), before.requests("xorb_get"));

    // A verified byte range of the file, through the proxy, nothing cached
    // locally: exactly the slice, and still no xorb byte from the origin.
    let (a, b) = (1_234_567usize, 5_678_901usize);
    let mut c = cdn.cas(cdn.cdn(), Some(&cdn.dir("cat-cache")), "cat");
    c.args([&hash, "--range", &format!("{a}-{b}")]);
    let got = ok(c);
    assert!(
        got == data[a..=b],
        "cat --range {a}-{b}: {} bytes",
        got.len()
    );
    assert_eq!(cdn.metrics().xorb_bytes_out(), after.xorb_bytes_out());
}

/// A proxy cache that hands out corrupted bytes cannot make a client write
/// them: the fetch fails naming the xorb, and nothing stands under the
/// destination name.
#[test]
fn corrupted_cdn_object_is_detected() {
    let cdn = Cdn::new();
    let data = model_bytes(3);
    let (_, hash) = cdn.upload_bytes("model.bin", &data);
    cdn.fetch_via_cdn(&hash, &cdn.root.join("warm.bin"), None);
    let xorb = cdn.reconstruction(&hash)["fetch"][0]["xorb"]
        .as_str()
        .unwrap()
        .to_owned();

    // A cache file is nginx's binary header, the key, the upstream's
    // response headers, then the body: its last byte is a xorb byte.
    let files = cdn.nginx.cached_files();
    assert!(files.len() > 1, "slices cached: {files:?}");
    for path in &files {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut head = vec![0u8; 1024];
        let n = f.read(&mut head).unwrap();
        let head = String::from_utf8_lossy(&head[..n]);
        assert!(
            head.contains(&format!("KEY: /v1/xorbs/{xorb}")),
            "{}: not a slice of {xorb}",
            path.display()
        );
        let mut last = [0u8];
        f.seek(SeekFrom::End(-1)).unwrap();
        f.read_exact(&mut last).unwrap();
        f.seek(SeekFrom::End(-1)).unwrap();
        f.write_all(&[last[0] ^ 0x5a]).unwrap();
    }

    let dest = cdn.root.join("bad.bin");
    let mut c = cdn.cas(cdn.cdn(), Some(&cdn.dir("fresh-cache")), "fetch");
    c.args([&hash, "-o"]).arg(&dest);
    let line = fails(c);
    assert!(
        line.contains(&format!("xorb {xorb}")) && line.contains("failed verification"),
        "{line}"
    );
    assert!(!dest.exists(), "nothing under the final name");
}

/// Uploads through the proxy work (xorb PUTs of several MB stream to the
/// origin, shards and dedup pass through) and nothing but xorb reads is
/// cached: reconstructions reach the origin every time.
#[test]
fn api_calls_pass_through_uncached() {
    let cdn = Cdn::new();
    let data = model_bytes(4);
    let path = cdn.root.join("model.bin");
    std::fs::write(&path, &data).unwrap();
    let mut c = cdn.cas(cdn.cdn(), None, "upload");
    c.arg("--json").arg(&path);
    let hash = json_of(ok(c))["roots"][0]["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let m = cdn.metrics();
    assert_eq!(m.requests("xorb_put"), 1);
    assert!(
        cdn.nginx.cached_files().is_empty(),
        "uploads left nothing in the cache: {:?}",
        cdn.nginx.cached_files()
    );

    for _ in 0..2 {
        let r = agent()
            .get(format!("{}/v1/reconstructions/{hash}", cdn.cdn()))
            .call()
            .unwrap();
        assert_eq!(header(&r, "cache-control"), "no-store");
        assert_eq!(header(&r, "x-cache-status"), "", "not a cached location");
        assert_eq!(body(r).0, 200);
    }
    assert_eq!(
        cdn.metrics().requests("reconstruction"),
        m.requests("reconstruction") + 2,
        "every reconstruction reached the origin"
    );
    cdn.fetch_via_cdn(&hash, &cdn.root.join("copy.bin"), None);
    assert_same_bytes(&data, &cdn.root.join("copy.bin"));
}

/// An origin with a signing key, as it must run behind a proxy others can
/// reach: the proxy passes `Authorization` to the API untouched, so the
/// origin checks every token; xorb reads need none and come from the cache.
#[test]
fn tokens_pass_through_the_proxy_to_the_origin() {
    let cdn = Cdn::with_key();
    let (read, write) = (cdn.token("read"), cdn.token("write"));
    let data = model_bytes(5);
    let path = cdn.root.join("model.bin");
    std::fs::write(&path, &data).unwrap();

    let upload = |token: Option<&str>| {
        let mut c = cdn.cas(cdn.cdn(), None, "upload");
        c.arg("--json").arg(&path);
        if let Some(t) = token {
            c.env("CAS_TOKEN", t);
        }
        c
    };
    let line = fails(upload(None));
    assert!(line.contains("401 unauthorized"), "{line}");
    let line = fails(upload(Some(&read)));
    assert!(line.contains("403 forbidden"), "{line}");
    let hash = json_of(ok(upload(Some(&write))))["roots"][0]["hash"]
        .as_str()
        .unwrap()
        .to_owned();

    // Each fetch with its own empty local cache.
    let fetch = |token: Option<&str>, name: &str| {
        let cache = cdn.dir(&format!("{name}-cache"));
        let mut c = cdn.cas(cdn.cdn(), Some(&cache), "fetch");
        c.args(["--json", &hash, "-o"]).arg(cdn.root.join(name));
        if let Some(t) = token {
            c.env("CAS_TOKEN", t);
        }
        c
    };
    let line = fails(fetch(None, "none.bin"));
    assert!(line.contains("401 unauthorized"), "{line}");
    ok(fetch(Some(&read), "a.bin"));
    assert_same_bytes(&data, &cdn.root.join("a.bin"));
    let before = cdn.metrics();
    ok(fetch(Some(&read), "b.bin"));
    assert_same_bytes(&data, &cdn.root.join("b.bin"));
    assert_eq!(cdn.metrics().xorb_bytes_out(), before.xorb_bytes_out());

    // A large refused upload through the proxy is a clean 401/403, not a
    // 502 from the proxy losing the connection mid-body: the origin reads
    // the refused body before answering.
    let big = vec![7u8; 20 << 20];
    let xorb_put = format!("{}/v1/xorbs/{}", cdn.cdn(), "ab".repeat(32));
    for (auth, want) in [(None, 401), (Some(&read), 403)] {
        for _ in 0..3 {
            let mut req = agent().put(&xorb_put);
            if let Some(t) = auth {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            assert_eq!(body(req.send(&big[..]).unwrap()).0, want, "{auth:?}");
        }
    }

    // The xorb URL the unlimited token got is a grant of the whole xorb,
    // a capability: no token needed, and a junk one is neither checked
    // nor part of the cache key.
    let url = cdn.reconstruction_with(&hash, Some(&read))["fetch"][0]["url"]
        .as_str()
        .unwrap()
        .to_owned();
    for auth in [None, Some("Bearer junk")] {
        let mut req = agent().get(&url).header("Range", "bytes=0-99");
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let r = req.call().unwrap();
        assert_eq!(header(&r, "x-cache-status"), "HIT", "{auth:?}");
        assert_eq!(body(r).0, 206, "{auth:?}");
    }
}

/// With a signing key: a reader limited to its repository fetches through
/// the proxy by grant URLs, and a second such reader with an empty cache
/// gets every byte from nginx. A plain xorb read with an unlimited token
/// passes its token to the origin and is never cached nor served from the
/// cache; without a token it is refused, not served from the cache.
#[test]
fn grants_are_cached_and_token_reads_are_not() {
    let cdn = Cdn::with_key();
    let write = cdn.token("write");
    let read = cdn.token("read");
    let limited = cdn.token_with(&["--scope", "read", "--repo", "org/*"]);
    let data = model_bytes(8);
    let dir = cdn.dir("m");
    std::fs::write(dir.join("model.bin"), &data).unwrap();
    let mut c = cdn.cas(cdn.origin(), None, "upload");
    c.args(["--json", "--repo", "org/m"])
        .arg(&dir)
        .env("CAS_TOKEN", &write);
    let file = json_of(ok(c))["files"][0]["hash"]
        .as_str()
        .unwrap()
        .to_owned();

    let fetch = |name: &str| {
        let mut c = cdn.cas(cdn.cdn(), Some(&cdn.dir(&format!("{name}-cache"))), "fetch");
        c.args(["org/m", "-o"])
            .arg(cdn.root.join(name))
            .env("CAS_TOKEN", &limited);
        ok(c);
        assert_same_bytes(&data, &cdn.root.join(name).join("model.bin"));
    };
    let before = cdn.metrics();
    fetch("a");
    let first = cdn.metrics();
    assert!(first.requests("xorb_grant_get") > before.requests("xorb_grant_get"));
    assert_eq!(first.requests("xorb_get"), before.requests("xorb_get"));
    fetch("b");
    let second = cdn.metrics();
    assert_eq!(
        second.xorb_bytes_out(),
        first.xorb_bytes_out(),
        "the second limited reader's bytes all came from the cache"
    );
    assert_eq!(
        second.requests("xorb_grant_get"),
        first.requests("xorb_grant_get")
    );

    // Its reconstruction names grants, which nginx serves without a token.
    let mut req = agent().get(format!(
        "{}/v1/reconstructions/{file}?repo=models/org/m&rev=main",
        cdn.cdn()
    ));
    req = req.header("Authorization", format!("Bearer {limited}"));
    let (status, rec) = body(req.call().unwrap());
    assert_eq!(status, 200);
    let rec: Value = serde_json::from_slice(&rec).unwrap();
    let grant = rec["fetch"][0]["url"].as_str().unwrap().to_owned();
    let xorb = rec["fetch"][0]["xorb"].as_str().unwrap().to_owned();
    assert!(
        grant.starts_with(&format!("{}/v1/xorbs/{xorb}/", cdn.cdn())),
        "{grant}"
    );
    let r = agent()
        .get(&grant)
        .header("Range", "bytes=0-99")
        .header("Authorization", "Bearer junk")
        .call()
        .unwrap();
    assert_eq!(header(&r, "x-cache-status"), "HIT");
    assert_eq!(body(r).0, 206);

    // The plain URL of the same xorb: the limited token is refused, the
    // unlimited one reaches the origin every time, nothing is cached.
    let plain = format!("{}/v1/xorbs/{xorb}", cdn.cdn());
    let get = |token: Option<&str>| {
        let mut req = agent().get(&plain).header("Range", "bytes=0-99");
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        req.call().unwrap()
    };
    let cached = cdn.nginx.cached_files().len();
    let m = cdn.metrics();
    for _ in 0..2 {
        let r = get(Some(&read));
        assert_ne!(header(&r, "x-cache-status"), "HIT");
        assert!(header(&r, "cache-control").starts_with("private"));
        assert_eq!(body(r).0, 206);
    }
    assert_eq!(
        cdn.metrics().requests("xorb_get"),
        m.requests("xorb_get") + 2
    );
    assert_eq!(body(get(Some(&limited))).0, 403);
    assert_eq!(body(get(None)).0, 401, "nothing cached serves it tokenless");
    assert_eq!(
        cdn.nginx.cached_files().len(),
        cached,
        "no plain read entered the cache"
    );
}

/// The Hub API through the proxy: `hf_hub_download` of a branch gets a
/// redirect from the origin (never cached) to the file's content URL,
/// which the proxy caches. A second download with an empty client cache
/// takes no file byte from the origin; after the branch moves to a new
/// commit, the next download gets the new bytes at once.
#[test]
fn hub_downloads_share_the_cache_and_see_a_moved_branch_at_once() {
    let cdn = Cdn::with_key();
    let write = cdn.token("write");
    let read = cdn.token("read");
    let commit = |name: &str, data: &[u8]| {
        let dir = cdn.dir(name);
        std::fs::write(dir.join("model.safetensors"), data).unwrap();
        let mut c = cdn.cas(cdn.origin(), None, "upload");
        c.args(["--json", "--repo", "org/model"])
            .arg(&dir)
            .env("CAS_TOKEN", &write);
        json_of(ok(c))["commit"]["id"].as_str().unwrap().to_owned()
    };
    let v1 = model_bytes(6);
    let c1 = commit("v1", &v1);
    let hf = Hf::new(cdn.cdn(), Some(&read), &cdn.root.join("hf-home"));
    let download = |cache: &str| {
        let path = hf.ok(
            "hf_hub_download",
            serde_json::json!({"repo": "org/model", "filename": "model.safetensors",
                               "cache_dir": cdn.dir(cache)}),
        );
        std::fs::read(path.as_str().unwrap()).unwrap()
    };
    let content = |m: &Metrics| m.get("cas_content_bytes_out_total");

    let before = cdn.metrics();
    assert!(download("a") == v1);
    let first = cdn.metrics();
    assert!(
        content(&first) > content(&before),
        "the first download filled the cache"
    );
    assert!(
        content(&first) - content(&before) <= v1.len() as u64,
        "each slice once"
    );
    assert!(download("b") == v1);
    let second = cdn.metrics();
    assert_eq!(
        content(&second),
        content(&first),
        "no file byte from the origin"
    );
    assert!(
        second.requests("hf_resolve") > first.requests("hf_resolve"),
        "the resolve itself reached the origin (never cached)"
    );

    let v2 = model_bytes(7);
    let c2 = commit("v2", &v2);
    assert_ne!(c1, c2);
    assert!(download("c") == v2, "the moved branch is seen at once");
    let third = cdn.metrics();

    // The branch moves back to v1's bytes in a new commit: the content is
    // cached (filled under commit c1), and the client must still learn
    // the commit its own request resolved to, not the first reader's.
    let c3 = commit("v3", &v1);
    let path = hf.ok(
        "hf_hub_download",
        serde_json::json!({"repo": "org/model", "filename": "model.safetensors",
                           "cache_dir": cdn.dir("d")}),
    );
    let path = path.as_str().unwrap();
    assert!(std::fs::read(path).unwrap() == v1);
    assert!(
        path.contains(&format!("/snapshots/{c3}/")),
        "{path}: filed under the commit main names now"
    );
    assert_eq!(
        content(&cdn.metrics()),
        content(&third),
        "v1's bytes came from the cache"
    );
    let r = agent()
        .get(format!(
            "{}/org/model/resolve/{c3}/model.safetensors",
            cdn.cdn()
        ))
        .header("Authorization", format!("Bearer {read}"))
        .header("Range", "bytes=0-9")
        .call()
        .unwrap();
    assert_eq!(header(&r, "x-cache-status"), "HIT");
    assert_eq!(header(&r, "x-repo-commit"), c3);
    assert_eq!(body(r).1, v1[..10].to_vec());
}

/// docs/DEPLOYMENT.md shows operators the configuration these tests run,
/// unchanged.
#[test]
fn deployment_doc_shows_the_tested_config() {
    let doc = include_str!("../../docs/DEPLOYMENT.md");
    assert!(
        doc.contains(&format!("```nginx\n{TEMPLATE}```\n")),
        "docs/DEPLOYMENT.md must contain docs/nginx/cas-cache.conf verbatim in an nginx code block"
    );
}
