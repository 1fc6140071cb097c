//! Read grants against the real binaries: a token limited to repositories
//! reads the xorb bytes its files need through grant URLs (one per merged
//! byte range, bound by a MAC), and nothing else of a xorb it shares with
//! another repository's file — not by the plain xorb URL, not by widening,
//! moving or re-signing a grant, not by a Range outside it. Unlimited
//! tokens get one grant per whole xorb, at the same offsets as before.

use std::process::Command;

use cas_e2e::client::{self, assert_same_tree};
use cas_e2e::{agent, body, json_of, noise, ok};
use serde_json::Value;

/// A server with a signing key, a scratch directory and tokens: `writer`
/// (unlimited, write and read) and `reader` (read, limited to `org/*`).
struct Env {
    base: client::Env,
    writer: String,
    reader: String,
}

impl std::ops::Deref for Env {
    type Target = client::Env;
    fn deref(&self) -> &client::Env {
        &self.base
    }
}

impl Env {
    fn start() -> Self {
        let base = client::Env::with_tokens();
        Self {
            writer: base.token(&["--scope", "write", "--scope", "read"]),
            reader: base.token(&["--scope", "read", "--repo", "org/*"]),
            base,
        }
    }

    /// `cas-client ARGS...` with `token`, no cache.
    fn cas(&self, token: &str, args: &[&str]) -> Command {
        self.client(Some(token), 5, args)
    }

    /// Commits `files` to `repo` as the writer; returns each file's hash.
    fn commit(&self, repo: &str, files: &[(&str, &[u8])]) -> Vec<String> {
        let dir = self.root.join(repo.replace('/', "-"));
        for (name, data) in files {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), data).unwrap();
        }
        let out = ok(self.cas(
            &self.writer,
            &["upload", "--json", "--repo", repo, dir.to_str().unwrap()],
        ));
        let v = json_of(out);
        v["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["hash"].as_str().unwrap().to_owned())
            .collect()
    }

    /// GET `url` with `token` (if any) and extra `headers`: status, body
    /// and the Cache-Control header.
    fn get(&self, url: &str, token: Option<&str>, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
        self.call("GET", url, token, headers)
    }

    fn call(
        &self,
        method: &str,
        url: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, Vec<u8>) {
        let a = agent();
        let mut req = match method {
            "HEAD" => a.head(url),
            _ => a.get(url),
        };
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        body(req.call().unwrap())
    }

    /// The reconstruction of `file` asked with `token` (through `query`,
    /// e.g. `?repo=models/org/b&rev=main`) for `range` (a Range value).
    fn reconstruction(&self, file: &str, token: &str, query: &str, range: Option<&str>) -> Value {
        let url = format!("{}/v1/reconstructions/{file}{query}", self.server.url);
        let headers: Vec<(&str, &str)> = range.map(|r| ("Range", r)).into_iter().collect();
        let (status, bytes) = self.get(&url, Some(token), &headers);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        serde_json::from_slice(&bytes).unwrap()
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A fetch entry's URL split into the plain xorb URL, its range and MAC.
fn grant_parts(url: &str) -> (String, u64, u64, String) {
    let (rest, mac) = url.rsplit_once('/').unwrap();
    let (xorb_url, range) = rest.rsplit_once('/').unwrap();
    let (s, e) = range.split_once('-').unwrap();
    (
        xorb_url.to_owned(),
        s.parse().unwrap(),
        e.parse().unwrap(),
        mac.to_owned(),
    )
}

/// Repository `secret/a` holds X+Y, `org/b` holds X+Z: b's X chunks dedup
/// against a's xorb, which also holds Y. A reader limited to `org/*` fetches
/// org/b byte for byte, and every URL it is given, or can make from one,
/// yields only bytes of the chunks b needs.
#[test]
fn a_limited_reader_reads_only_the_ranges_its_files_need() {
    let env = Env::start();
    let (x, y, z) = (noise(1, 3 << 20), noise(2, 3 << 20), noise(3, 2 << 20));
    let a = env.commit("secret/a", &[("a.bin", &[&x[..], &y[..]].concat())]);
    let b_data = [&x[..], &z[..]].concat();
    let b = env.commit("org/b", &[("b.bin", &b_data)]);

    // The limited reader fetches its repository, byte for byte.
    let out = env.root.join("b-copy");
    ok(env.cas(
        &env.reader,
        &["fetch", "org/b", "-o", out.to_str().unwrap()],
    ));
    assert_same_tree(&env.root.join("org-b"), &out);

    let b_query = "?repo=models/org/b&rev=main";
    let limited = env.reconstruction(&b[0], &env.reader, b_query, None);
    let whole = env.reconstruction(&b[0], &env.writer, "", None);
    assert_eq!(
        limited["terms"], whole["terms"],
        "the same terms either way"
    );

    // Unlimited: one grant per whole xorb, offsets in the xorb.
    let mut xorb_len = std::collections::HashMap::new();
    for f in whole["fetch"].as_array().unwrap() {
        let (plain, s, e, _) = grant_parts(f["url"].as_str().unwrap());
        assert_eq!(
            plain,
            format!(
                "{}/v1/xorbs/{}",
                env.server.url,
                f["xorb"].as_str().unwrap()
            )
        );
        assert_eq!(s, 0, "{f}");
        xorb_len.insert(f["xorb"].as_str().unwrap().to_owned(), e);
    }
    // a's xorb is the one b shares.
    let a_rec = env.reconstruction(&a[0], &env.writer, "", None);
    let shared = a_rec["fetch"][0]["xorb"].as_str().unwrap().to_owned();
    assert!(xorb_len.contains_key(&shared), "b dedups against a's xorb");
    // Where a's chunks past X start in that xorb: the fetch range of a
    // read of a's last 2 MiB (all of it Y, past any chunk X shares).
    let y_rec = env.reconstruction(&a[0], &env.writer, "", Some("bytes=-2097152"));
    let y_start = n(&y_rec["fetch"][0]["ranges"][0]["bytes"]["start"]);

    // Limited: one grant per merged range, offsets in the grant; none
    // reaches a's Y, and together they are less than the shared xorb.
    let mut grants = Vec::new();
    for f in limited["fetch"].as_array().unwrap() {
        let (plain, s, e, mac) = grant_parts(f["url"].as_str().unwrap());
        let ranges = f["ranges"].as_array().unwrap();
        assert_eq!(ranges.len(), 1, "{f}");
        assert_eq!(n(&ranges[0]["bytes"]["start"]), 0, "{f}");
        assert_eq!(n(&ranges[0]["bytes"]["end"]), e - s, "{f}");
        let xorb = f["xorb"].as_str().unwrap().to_owned();
        if xorb == shared {
            assert!(
                e <= y_start,
                "grant {s}-{e} reaches a's chunks at {y_start}"
            );
        }
        assert!(e <= xorb_len[&xorb]);
        grants.push((xorb, plain, s, e, mac));
    }
    let (_, plain, s, e, mac) = grants
        .iter()
        .find(|g| g.0 == shared)
        .cloned()
        .expect("a grant of the shared xorb");
    let len = xorb_len[&shared];
    assert!(e - s < len);

    // The grant serves exactly its bytes, as an object of its own.
    let grant = format!("{plain}/{s}-{e}/{mac}");
    let (status, granted) = env.get(&grant, None, &[]);
    assert_eq!(status, 200);
    let (status, in_xorb) = env.get(&plain, Some(&env.writer), &[]);
    assert_eq!(status, 200, "an unlimited token reads the plain URL");
    assert_eq!(granted, in_xorb[s as usize..e as usize]);
    let (status, tail) = env.get(&grant, None, &[("Range", "bytes=10-")]);
    assert_eq!((status, tail), (206, granted[10..].to_vec()));
    let past = format!("bytes={}-", e - s);
    assert_eq!(env.get(&grant, None, &[("Range", &past)]).0, 416);
    let (status, last) = env.get(&grant, None, &[("Range", "bytes=-5")]);
    assert_eq!((status, last), (206, granted[granted.len() - 5..].to_vec()));

    // The plain URL: 403 for the limited token (GET and HEAD), 401
    // without one.
    for method in ["GET", "HEAD"] {
        assert_eq!(env.call(method, &plain, Some(&env.reader), &[]).0, 403);
        assert_eq!(env.call(method, &plain, None, &[]).0, 401);
    }
    let (_, msg) = env.get(&plain, Some(&env.reader), &[]);
    assert!(
        String::from_utf8_lossy(&msg).contains("grant URLs"),
        "{}",
        String::from_utf8_lossy(&msg)
    );

    // Altered grants: a wider or moved range under the same MAC, another
    // xorb, a flipped or re-cased MAC, junk. All are the same 404.
    let flipped = {
        let mut m = mac.clone().into_bytes();
        m[0] = if m[0] == b'0' { b'1' } else { b'0' };
        String::from_utf8(m).unwrap()
    };
    let other_xorb = grants.iter().find(|g| g.0 != shared).map(|g| g.1.clone());
    let mut forged = vec![
        format!("{plain}/{s}-{len}/{mac}"),
        format!("{plain}/0-{len}/{mac}"),
        format!("{plain}/{s}-{}/{mac}", e + 1),
        format!("{plain}/{}-{e}/{mac}", s.saturating_sub(1)),
        format!("{plain}/0{s}-{e}/{mac}"),
        format!("{plain}/{s}-{e}/{flipped}"),
        format!("{plain}/{s}-{e}/{}", mac.to_uppercase()),
        format!("{plain}/{s}-{e}/"),
        format!("{plain}/{s}-{e}/{mac}00"),
        format!("{plain}/{e}-{s}/{mac}"),
        format!("{plain}/x-y/{mac}"),
    ];
    if let Some(other) = other_xorb {
        forged.push(format!("{other}/{s}-{e}/{mac}"));
    }
    // Another grant's MAC on this grant's range.
    for g in grants.iter().filter(|g| g.4 != mac) {
        forged.push(format!("{plain}/{s}-{e}/{}", g.4));
    }
    for url in &forged {
        let (status, bytes) = env.get(url, Some(&env.reader), &[]);
        assert_eq!(status, 404, "{url}: {}", String::from_utf8_lossy(&bytes));
    }

    // A reconstruction of part of b grants only that part's ranges.
    let part = env.reconstruction(&b[0], &env.reader, b_query, Some("bytes=0-99"));
    let fetch = part["fetch"].as_array().unwrap();
    assert_eq!(fetch.len(), 1, "{part}");
    let (_, ps, pe, _) = grant_parts(fetch[0]["url"].as_str().unwrap());
    assert!(
        pe - ps < 1 << 20,
        "one chunk or so, not the file: {ps}-{pe}"
    );

    // a's file itself stays out of reach.
    let url = format!("{}/v1/reconstructions/{}{b_query}", env.server.url, a[0]);
    assert_eq!(env.get(&url, Some(&env.reader), &[]).0, 403);
}

/// Grants are deterministic (every reader of a range gets one URL, so a
/// cache keeps one copy) and immutable: a strong ETag of the grant,
/// public caching, 304 for a matching If-None-Match.
#[test]
fn grants_are_stable_cacheable_urls() {
    let env = Env::start();
    let data = noise(4, 1 << 20);
    let f = env.commit("org/c", &[("c.bin", &data)]);
    let q = "?repo=models/org/c&rev=main";
    let one = env.reconstruction(&f[0], &env.reader, q, None);
    let two = env.reconstruction(&f[0], &env.reader, q, None);
    assert_eq!(one["fetch"], two["fetch"]);
    let url = one["fetch"][0]["url"].as_str().unwrap();
    let r = agent().get(url).call().unwrap();
    let etag = r
        .headers()
        .get("etag")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let cc = r
        .headers()
        .get("cache-control")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(cc, "public, max-age=31536000, immutable");
    let (_, s, e, _) = grant_parts(url);
    let xorb = one["fetch"][0]["xorb"].as_str().unwrap();
    assert_eq!(etag, format!("\"{xorb}:{s}-{e}\""));
    let (status, _) = env.get(url, None, &[("If-None-Match", &etag)]);
    assert_eq!(status, 304);
    let (status, bytes) = env.call("HEAD", url, None, &[]);
    assert_eq!((status, bytes.len()), (200, 0));
}
