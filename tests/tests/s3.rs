//! The S3 store end to end: real cas-server and cas-client binaries over a
//! real SeaweedFS (`weed server -s3`, scripts/setup-seaweedfs); with
//! `cas-client mirror` from the tests' stand-in Hub, a model family copied
//! into the bucket.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use cas_e2e::client::{cas_as, ok};
use cas_e2e::hub::assert_same_files;
use cas_e2e::s3::Weed;
use cas_e2e::standin::StandIn;
use cas_e2e::{agent, assert_same_bytes, body, json_of, noise, Metrics};
use cas_protocol::xorb::{BuiltXorb, Compression, EncodedChunk, XorbBuilder};

fn random(len: usize, seed: u64) -> Vec<u8> {
    cas_bench::random_bytes(seed, len)
}

fn one_chunk_xorb(data: &[u8]) -> BuiltXorb {
    let mut b = XorbBuilder::new();
    b.try_push(EncodedChunk::encode(data, Compression::Raw).unwrap())
        .unwrap();
    b.finish().unwrap()
}

/// `cas-client upload --json PATH` through `url`; the file hash.
fn upload(url: &str, path: &Path, cwd: &Path) -> String {
    let mut c = cas_as(None, url, None, "upload", cwd);
    c.arg("--json").arg(path);
    json_of(ok(c))["roots"][0]["hash"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn fetch(url: &str, hash: &str, dest: &Path, cwd: &Path) {
    let mut c = cas_as(None, url, None, "fetch", cwd);
    c.args(["--json", hash, "-o"]).arg(dest);
    ok(c);
}

/// Waits until the node at `url` has stored `n` objects (its S3 PUTs),
/// while `child` (the upload) still runs.
fn wait_for_puts(url: &str, n: u64, child: &mut std::process::Child) {
    let start = Instant::now();
    loop {
        if Metrics::fetch(url).count("cas_store_requests_total{op=\"put\"}") >= n {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the upload ended before {n} PUTs"
        );
        assert!(start.elapsed() < Duration::from_secs(120), "no {n} PUTs");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The one `cas-client: ...` line a failed client ends with (after its
/// retries' warnings).
fn the_error_line(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "{}", cas_e2e::show(out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("cas-client: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line:\n{stderr}");
    assert_eq!(stderr.lines().last(), Some(errors[0]), "{stderr}");
    errors[0].to_owned()
}

fn healthz(url: &str) -> String {
    let (status, text) = body(agent().get(format!("{url}/healthz")).call().unwrap());
    assert_eq!(status, 200, "healthz stays up");
    String::from_utf8(text).unwrap()
}

/// Upload and fetch through a node whose objects live in S3: everything
/// durable is in the bucket under the prefix, none of it on the node's
/// disk, and the node counts its S3 requests.
#[test]
fn upload_and_fetch_through_the_bucket() {
    let weed = Weed::start();
    let dir = tempfile::tempdir().unwrap();
    let node = weed.node(&dir.path().join("a"), "team/models", &[]);
    let data = random(3 << 20, 1);
    let src = dir.path().join("model.bin");
    std::fs::write(&src, &data).unwrap();
    let hash = upload(&node.url, &src, dir.path());
    let out = dir.path().join("out.bin");
    fetch(&node.url, &hash, &out, dir.path());
    assert_same_bytes(&data, &out);

    let xorbs = weed.keys("team/models/xorbs/");
    let shards = weed.keys("team/models/shards/");
    assert!(
        !xorbs.is_empty() && !shards.is_empty(),
        "{xorbs:?} {shards:?}"
    );
    assert!(weed.keys("xorbs/").is_empty(), "nothing outside the prefix");
    assert!(
        !dir.path().join("a/objects").exists(),
        "no objects on the node's disk"
    );
    // An upload without --repo is kept by a garbage collection root.
    let roots = weed.keys("team/models/roots/");
    assert_eq!(roots.len(), 1, "{roots:?}");
    let m = Metrics::fetch(&node.url);
    assert_eq!(
        m.get("cas_store_requests_total{op=\"put\"}"),
        (xorbs.len() + shards.len() + roots.len()) as u64,
        "one PUT per object"
    );
    assert!(m.get("cas_store_requests_total{op=\"get_range\"}") > 0);
    assert_eq!(healthz(&node.url), "ok\n");

    // A xorb lost from the bucket: the read that finds it missing answers
    // 410 damaged (the index gave its length: no HEAD per read).
    let lost = &xorbs[0];
    let (status, _) = body(
        agent()
            .delete(format!(
                "{}/{}/{lost}",
                weed.endpoint(),
                cas_e2e::s3::BUCKET
            ))
            .call()
            .unwrap(),
    );
    assert_eq!(status, 204);
    let hash = lost.rsplit('/').next().unwrap();
    let (status, text) = body(
        agent()
            .get(format!("{}/v1/xorbs/{hash}", node.url))
            .header("Range", "bytes=0-99")
            .call()
            .unwrap(),
    );
    assert_eq!(status, 410, "{}", String::from_utf8_lossy(&text));
    assert_eq!(Metrics::fetch(&node.url).get("cas_xorbs_damaged_total"), 1);
}

/// The bucket goes away mid-service: calls that need it fail after the
/// retry timeout with 503 store_unavailable, the node stays up and says
/// it is degraded, nothing half-written is visible, and once the store is
/// back the same upload succeeds and the node is healthy again.
#[test]
fn store_outage_is_503_then_recovers() {
    let mut weed = Weed::start();
    let dir = tempfile::tempdir().unwrap();
    let node = weed.node(&dir.path().join("a"), "p", &["--store-retry-timeout", "2s"]);
    let first = dir.path().join("first.bin");
    std::fs::write(&first, random(1 << 20, 2)).unwrap();
    upload(&node.url, &first, dir.path());
    let before = weed.keys("p/");

    weed.kill();
    let data = random(2 << 20, 3);
    let src = dir.path().join("second.bin");
    std::fs::write(&src, &data).unwrap();
    let start = Instant::now();
    let mut c = cas_as(None, &node.url, None, "upload", dir.path());
    c.arg(&src);
    let out = c.output().unwrap();
    assert!(!out.status.success(), "an upload into a dead store fails");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("store_unavailable") || stderr.contains("503"),
        "{stderr}"
    );
    assert!(start.elapsed() < Duration::from_secs(120), "it gives up");
    // A xorb PUT straight to the API: 503 with its code and Retry-After.
    let x = one_chunk_xorb(&random(100_000, 4));
    let r = agent()
        .put(format!("{}/v1/xorbs/{}", node.url, x.hash))
        .send(&x.bytes[..])
        .unwrap();
    assert_eq!(r.headers()["retry-after"], "5");
    let (status, text) = body(r);
    let text = String::from_utf8(text).unwrap();
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("\"store_unavailable\""), "{text}");
    let health = healthz(&node.url);
    assert!(
        health.starts_with("degraded: object store failing"),
        "{health}"
    );
    assert!(Metrics::fetch(&node.url).get("cas_store_errors_total") > 0);

    weed.restart();
    assert_eq!(
        weed.keys("p/"),
        before,
        "nothing of the failed upload is visible"
    );
    let hash = upload(&node.url, &src, dir.path());
    assert_eq!(healthz(&node.url), "ok\n");
    let out = dir.path().join("out.bin");
    fetch(&node.url, &hash, &out, dir.path());
    assert_same_bytes(&data, &out);
}

/// SeaweedFS dies in the middle of an upload: one xorb stored, the next
/// on its way (the upload crosses a slow link, one xorb at a time). The
/// client fails with one clear line; nothing of the file is visible (no
/// shard, no root, the node answers 404 for it, and every object that
/// made it into the bucket is a whole, valid xorb); once SeaweedFS is back
/// the same upload succeeds and fetches byte-identical.
#[test]
fn the_bucket_dies_mid_upload_then_the_same_upload_succeeds() {
    let mut weed = Weed::start();
    let dir = tempfile::tempdir().unwrap();
    let node = weed.node(&dir.path().join("a"), "m", &["--store-retry-timeout", "2s"]);
    // Random bytes: three xorbs (64 + 64 + 12 MiB).
    let data = random(140 << 20, 30);
    let src = dir.path().join("model.bin");
    std::fs::write(&src, &data).unwrap();
    let slow = cas_e2e::s3::Throttle::uploads(&node.url, 32 << 20);
    let mut c = cas_as(None, &slow.url, None, "upload", dir.path());
    c.env("CAS_UPLOADS", "1")
        .arg("--json")
        .arg(&src)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    wait_for_puts(&node.url, 1, &mut child);
    assert!(
        slow.relayed() < data.len() as u64,
        "the next xorb is on its way"
    );
    weed.kill();
    let out = child.wait_with_output().unwrap();
    let error = the_error_line(&out);
    assert!(
        error.contains("store_unavailable") && error.contains("503"),
        "{error}"
    );

    weed.restart();
    let stored = weed.keys("m/");
    assert!(!stored.is_empty(), "the first xorb landed");
    for key in &stored {
        let hex = key
            .strip_prefix("m/xorbs/")
            .unwrap_or_else(|| panic!("only xorbs, no shard or root: {stored:?}"));
        let url = format!("{}/{}/{key}", weed.endpoint(), cas_e2e::s3::BUCKET);
        let (status, bytes) = body(agent().get(url).call().unwrap());
        assert_eq!(status, 200);
        let view = cas_protocol::xorb::XorbView::parse(&bytes).expect("a whole xorb");
        view.verify(hex.parse().unwrap()).expect("its bytes verify");
    }
    let mut h = cas_e2e::bin("cas-client");
    h.args(["hash", "--json"]).arg(&src);
    let hash = json_of(cas_e2e::ok(h))["file_hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = body(
        agent()
            .get(format!("{}/v1/files/{hash}", node.url))
            .call()
            .unwrap(),
    );
    assert_eq!(status, 404, "the file is not visible");

    assert_eq!(upload(&node.url, &src, dir.path()), hash);
    let out = dir.path().join("out.bin");
    fetch(&node.url, &hash, &out, dir.path());
    assert_same_bytes(&data, &out);
    assert_eq!(healthz(&node.url), "ok\n");
}

/// Three nodes on one bucket: a file uploaded through A is fetched through
/// C at once (a miss catches up), and B's dedup learns A's chunks within
/// its catch-up period, so uploading the same file through B sends nothing.
#[test]
fn three_nodes_share_one_bucket() {
    let weed = Weed::start();
    let dir = tempfile::tempdir().unwrap();
    let every = ["--catch-up-every", "1s"];
    let a = weed.node(&dir.path().join("a"), "shared", &every);
    let b = weed.node(&dir.path().join("b"), "shared", &every);
    let c = weed.node(&dir.path().join("c"), "shared", &["--catch-up-every", "1h"]);
    let data = random(5 << 20, 5);
    let src = dir.path().join("model.bin");
    std::fs::write(&src, &data).unwrap();
    let hash = upload(&a.url, &src, dir.path());
    let out = dir.path().join("via-c.bin");
    fetch(&c.url, &hash, &out, dir.path());
    assert_same_bytes(&data, &out);

    std::thread::sleep(Duration::from_secs(3));
    let mut again = cas_as(None, &b.url, None, "upload", dir.path());
    again.arg("--json").arg(&src);
    let report = json_of(ok(again));
    assert_eq!(report["xorbs"], 0, "B knew A's chunks: {report}");
    assert_eq!(report["new_chunks"], 0, "{report}");
}

/// A fetch through node A (behind a slow link) while A is killed with
/// SIGKILL: the client moves to B and the fetch completes byte-identical.
#[test]
fn a_fetch_survives_the_loss_of_its_node() {
    let weed = Weed::start();
    let dir = tempfile::tempdir().unwrap();
    let b = weed.node(&dir.path().join("b"), "p", &[]);
    let data = random(24 << 20, 6);
    let src = dir.path().join("big.bin");
    std::fs::write(&src, &data).unwrap();
    let hash = upload(&b.url, &src, dir.path());
    // A answers through a slow proxy; its xorb URLs name the proxy.
    let a_addr = format!("127.0.0.1:{}", cas_e2e::free_port());
    let throttle = cas_e2e::s3::Throttle::start(&format!("http://{a_addr}"), 4 << 20);
    let a = weed.node(
        &dir.path().join("a"),
        "p",
        &["--public-url", &throttle.url, "--listen", &a_addr],
    );
    let out = dir.path().join("out.bin");
    let endpoints = format!("{},{}", throttle.url, b.url);
    let mut c = cas_as(None, &endpoints, None, "fetch", dir.path());
    c.env("CAS_RETRIES", "4")
        .args(["--json", &hash, "-o"])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    let start = Instant::now();
    while throttle.relayed() < 2 << 20 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no bytes through A"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    a.kill9();
    let result = child.wait_with_output().unwrap();
    assert!(result.status.success(), "{}", cas_e2e::show(&result));
    assert_same_bytes(&data, &out);
    assert!(
        Metrics::fetch(&b.url).xorb_bytes_out() > 0,
        "B served the rest"
    );
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("moving to"), "{stderr}");
}

/// Three nodes on one bucket; an upload through A (behind a slow link,
/// one xorb at a time) while A is killed with SIGKILL once it stored a
/// xorb: the client moves to B, the upload completes there, and the file
/// fetched through C is byte-identical.
#[test]
fn an_upload_survives_the_loss_of_its_node() {
    let weed = Weed::start();
    let dir = tempfile::tempdir().unwrap();
    let a = weed.node(&dir.path().join("a"), "u", &[]);
    let b = weed.node(&dir.path().join("b"), "u", &[]);
    let c = weed.node(&dir.path().join("c"), "u", &["--catch-up-every", "1h"]);
    let data = random(140 << 20, 31);
    let src = dir.path().join("model.bin");
    std::fs::write(&src, &data).unwrap();
    let slow = cas_e2e::s3::Throttle::uploads(&a.url, 32 << 20);
    let endpoints = format!("{},{},{}", slow.url, b.url, c.url);
    let mut up = cas_as(None, &endpoints, None, "upload", dir.path());
    up.env("CAS_UPLOADS", "1")
        .arg("--json")
        .arg(&src)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = up.spawn().unwrap();
    wait_for_puts(&a.url, 1, &mut child);
    assert!(
        slow.relayed() < data.len() as u64,
        "the next xorb is on its way"
    );
    a.kill9();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", cas_e2e::show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("moving to"), "{stderr}");
    assert!(
        Metrics::fetch(&b.url).count("cas_store_requests_total{op=\"put\"}") >= 2,
        "B stored the rest of the xorbs and the shard"
    );
    let hash = json_of(out.stdout)["roots"][0]["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let fetched = dir.path().join("via-c.bin");
    fetch(&c.url, &hash, &fetched, dir.path());
    assert_same_bytes(&data, &fetched);
}

/// A node's index is a cache: wiped, `index rebuild` recreates it from the
/// bucket and every file is served again; a node started on an empty data
/// dir rebuilds by itself (its dedup knows every chunk).
#[test]
fn the_index_rebuilds_from_the_bucket() {
    let weed = Weed::start();
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let a = weed.node(&a_dir, "r", &[]);
    let files: Vec<(std::path::PathBuf, Vec<u8>)> = (0..4)
        .map(|i| {
            let p = dir.path().join(format!("f{i}.bin"));
            let d = random(300_000 + i * 100_000, 10 + i as u64);
            std::fs::write(&p, &d).unwrap();
            (p, d)
        })
        .collect();
    let hashes: Vec<String> = files
        .iter()
        .map(|(p, _)| upload(&a.url, p, dir.path()))
        .collect();
    a.kill9();
    std::fs::remove_dir_all(&a_dir).unwrap();

    let mut rebuild = cas_e2e::bin("cas-server");
    weed.s3_env(&mut rebuild);
    rebuild
        .arg("--data-dir")
        .arg(&a_dir)
        .args(["--store", "s3://cas/r", "--s3-endpoint", &weed.endpoint()])
        .args(["index", "rebuild"]);
    let done = json_of(cas_e2e::ok(rebuild));
    assert_eq!(done["shards"], 4, "{done}");
    assert_eq!(done["new_files"], 4, "{done}");
    assert!(done["xorbs"].as_u64().unwrap() >= 1, "{done}");
    let a = weed.node(&a_dir, "r", &["--catch-up-every", "1h"]);
    for (h, (_, d)) in hashes.iter().zip(&files) {
        let out = dir.path().join(format!("{h}.out"));
        fetch(&a.url, h, &out, dir.path());
        assert_same_bytes(d, &out);
    }

    let fresh = weed.node(&dir.path().join("fresh"), "r", &["--catch-up-every", "1h"]);
    let start = Instant::now();
    loop {
        let m = Metrics::fetch(&fresh.url);
        if m.get("cas_files") == 4 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{}", m.0);
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut again = cas_as(None, &fresh.url, None, "upload", dir.path());
    again.arg("--json").arg(&files[3].0);
    let report = json_of(ok(again));
    assert_eq!(report["xorbs"], 0, "rebuilt dedup: {report}");
}

/// `--xorb-reads redirect`: xorb GETs answer 307 to a presigned S3 URL
/// (no bytes through the node) and the client fetches byte-identical
/// through it.
#[test]
fn redirect_mode_sends_reads_to_the_bucket() {
    let weed = Weed::start();
    let dir = tempfile::tempdir().unwrap();
    let node = weed.node(&dir.path().join("a"), "d", &["--xorb-reads", "redirect"]);
    let data = random(4 << 20, 20);
    let src = dir.path().join("m.bin");
    std::fs::write(&src, &data).unwrap();
    let hash = upload(&node.url, &src, dir.path());
    let out = dir.path().join("out.bin");
    fetch(&node.url, &hash, &out, dir.path());
    assert_same_bytes(&data, &out);
    let m = Metrics::fetch(&node.url);
    assert_eq!(m.xorb_bytes_out(), 0, "no xorb bytes through the node");
    assert!(m.answered("xorb_get", 307) > 0, "{}", m.0);

    let xorb = weed.keys("d/xorbs/")[0]
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let no_redirects = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build();
    let no_redirects: ureq::Agent = no_redirects.into();
    let r = no_redirects
        .get(format!("{}/v1/xorbs/{xorb}", node.url))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 307);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&weed.endpoint()), "{location}");
    assert!(location.contains("X-Amz-Expires=300"), "{location}");
    // The presigned URL serves ranges by itself.
    let (status, bytes) = body(
        agent()
            .get(&location)
            .header("Range", "bytes=0-7")
            .call()
            .unwrap(),
    );
    assert_eq!((status, &bytes[..]), (206, &b"CASXORB\0"[..]));
}

/// Uploads to one repository branch through two nodes at once: every
/// commit lands in the branch's history (S3 compare-and-swap on the head
/// holds across nodes).
#[test]
fn concurrent_commits_through_two_nodes_keep_every_commit() {
    const UPLOADS: usize = 6;
    let weed = Weed::start();
    let dir = tempfile::tempdir().unwrap();
    let a = weed.node(&dir.path().join("a"), "c", &[]);
    let b = weed.node(&dir.path().join("b"), "c", &[]);
    let children: Vec<_> = (0..UPLOADS)
        .map(|i| {
            let d = dir.path().join(format!("u{i}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("data.bin"), random(200_000, 100 + i as u64)).unwrap();
            let url = if i % 2 == 0 { &a.url } else { &b.url };
            let mut c = cas_as(None, url, None, "upload", dir.path());
            c.env("CAS_AUTHOR", "tester")
                .args(["--json", "--repo", "org/busy"])
                .arg(&d)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    let mut made = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", cas_e2e::show(&out));
        made.push(
            json_of(out.stdout)["commit"]["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut log = cas_as(None, &b.url, None, "log", dir.path());
    log.args(["--json", "org/busy"]);
    let mut history: Vec<String> = json_of(ok(log))
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(history.len(), UPLOADS, "{history:?}");
    history.sort();
    made.sort();
    assert_eq!(history, made, "every commit is in the history");
}

/// The documented scale-out layout: nginx running
/// docs/nginx/cas-cache.conf with three nodes on one bucket as its
/// upstream servers, `--public-url` naming nginx on every node.
struct Layout {
    nginx: cas_e2e::nginx::Nginx,
    nodes: Vec<cas_e2e::ServerProcess>,
    weed: Weed,
    root: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Layout {
    fn start(extra_args: &[&str]) -> Self {
        use std::os::unix::fs::PermissionsExt;
        cas_e2e::nginx::nginx_bin(); // fail with the instruction first
        let weed = Weed::start();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        // nginx's workers (`nobody` when the tests run as root) reach
        // their cache and temp directories through this one.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let port = cas_e2e::free_port();
        let public = format!("http://127.0.0.1:{port}");
        let mut args = vec!["--public-url", &public];
        args.extend_from_slice(extra_args);
        let nodes: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|n| weed.node(&root.join(n), "n", &args))
            .collect();
        let origins: Vec<&str> = nodes
            .iter()
            .map(|n| n.url.strip_prefix("http://").unwrap())
            .collect();
        let nginx = cas_e2e::nginx::Nginx::balancing(port, &origins, &root.join("nginx"));
        assert_eq!(nginx.url, public);
        Self {
            nginx,
            nodes,
            weed,
            root,
            _dir: dir,
        }
    }

    /// Writes `data` and uploads it through nginx; the file hash.
    fn upload(&self, name: &str, data: &[u8]) -> String {
        let src = self.root.join(name);
        std::fs::write(&src, data).unwrap();
        upload(&self.nginx.url, &src, &self.root)
    }

    /// Fetches `hash` through nginx (no local cache) and checks the bytes.
    fn fetch(&self, hash: &str, data: &[u8]) {
        let out = self.root.join(format!("{hash}.out"));
        let _ = std::fs::remove_file(&out);
        fetch(&self.nginx.url, hash, &out, &self.root);
        assert_same_bytes(data, &out);
    }

    /// Requests the nodes answered, summed.
    fn requests(&self, route: &str) -> u64 {
        self.nodes
            .iter()
            .map(|n| Metrics::fetch(&n.url).requests(route))
            .sum()
    }
}

/// nginx in front of three nodes: uploads and fetches through it are
/// byte-identical, the nodes share the work, xorb reads fill the cache;
/// with one node killed (SIGKILL) nginx skips it: a cached file and one
/// never read before both fetch byte-identical.
#[test]
fn nginx_balances_three_nodes_and_survives_losing_one() {
    let mut layout = Layout::start(&[]);
    let first = random(6 << 20, 40);
    let second = random(5 << 20, 41);
    let h1 = layout.upload("first.bin", &first);
    let h2 = layout.upload("second.bin", &second);
    layout.fetch(&h1, &first);
    assert!(
        !layout.nginx.cached_files().is_empty(),
        "xorb reads went through the cache"
    );
    let busy = layout
        .nodes
        .iter()
        .filter(|n| {
            let m = Metrics::fetch(&n.url);
            ["xorb_put", "shard", "reconstruction", "file", "xorb_get"]
                .iter()
                .any(|r| m.requests(r) > 0)
        })
        .count();
    assert!(busy >= 2, "nginx spread the API calls over the nodes");

    layout.nodes.remove(0).kill9();
    let before = layout.requests("xorb_get");
    layout.fetch(&h1, &first);
    layout.fetch(&h2, &second);
    assert!(
        layout.requests("xorb_get") > before,
        "the file never read came from the live nodes"
    );
}

/// `--xorb-reads redirect` behind nginx: the nodes answer xorb reads with
/// a presigned S3 URL that nginx passes on uncached, the client follows it
/// to the bucket, and the file fetched through nginx is byte-identical; no
/// xorb byte crosses a node or enters the cache.
#[test]
fn redirect_mode_behind_nginx() {
    let layout = Layout::start(&["--xorb-reads", "redirect"]);
    let data = random(6 << 20, 42);
    let hash = layout.upload("m.bin", &data);
    layout.fetch(&hash, &data);
    layout.fetch(&hash, &data);
    let mut redirects = 0;
    for n in &layout.nodes {
        let m = Metrics::fetch(&n.url);
        assert_eq!(m.xorb_bytes_out(), 0, "no xorb bytes through a node");
        redirects += m.answered("xorb_get", 307);
    }
    assert!(redirects >= 2, "both fetches were redirected: {redirects}");
    assert!(
        layout.nginx.cached_files().is_empty(),
        "redirects are not cached: {:?}",
        layout.nginx.cached_files()
    );
    assert!(!layout.weed.keys("n/xorbs/").is_empty());
}

/// Garbage collection over the bucket, online: a removed root's xorb is
/// condemned (a record in the bucket) by one run and deleted from the
/// bucket by the next (`cas-server gc --endpoint`, no grace; a restart
/// first drops the node's leases), while the live file's xorb stays and
/// fetches byte-identical.
#[test]
fn online_gc_frees_a_dead_xorb_in_the_bucket() {
    let weed = Weed::start();
    let dir = tempfile::tempdir().unwrap();
    let node_dir = dir.path().join("a");
    let node = weed.node(&node_dir, "gc", &[]);
    let keep = random(2 << 20, 60);
    let (keep_src, gone_src) = (dir.path().join("keep.bin"), dir.path().join("gone.bin"));
    std::fs::write(&keep_src, &keep).unwrap();
    std::fs::write(&gone_src, random(2 << 20, 61)).unwrap();
    let keep_hash = upload(&node.url, &keep_src, dir.path());
    let gone_hash = upload(&node.url, &gone_src, dir.path());
    let mut rm = cas_as(None, &node.url, None, "rm", dir.path());
    rm.arg(&gone_hash);
    ok(rm);
    let xorbs = weed.keys("gc/xorbs/");
    assert_eq!(xorbs.len(), 2, "{xorbs:?}");
    drop(node);
    let node = weed.node(&node_dir, "gc", &[]);

    let gc = || {
        let mut c = cas_e2e::bin("cas-server");
        c.args(["gc", "--json", "--grace", "1ms", "--endpoint", &node.url]);
        json_of(ok(c))
    };
    let first = gc();
    assert_eq!(first["report"]["condemned"]["xorbs"], 1, "{first}");
    assert_eq!(weed.keys("gc/condemned/").len(), 1);
    let second = gc();
    assert_eq!(second["report"]["deleted"]["xorbs"], 1, "{second}");
    let left = weed.keys("gc/xorbs/");
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(xorbs.contains(&left[0]));
    assert!(weed.keys("gc/condemned/").is_empty());
    let out = dir.path().join("out.bin");
    fetch(&node.url, &keep_hash, &out, dir.path());
    assert_same_bytes(&keep, &out);
    let m = Metrics::fetch(&node.url);
    assert_eq!(m.get("cas_gc_runs_total"), 2);
    assert!(m.get("cas_gc_bytes_freed_total") > 0);
}

/// The team's S3 copy of a model family, one `cas-client mirror` per
/// model: every object lands in the bucket under the node's prefix (none
/// on its disk); the fine-tune mirrored after its base sends only the
/// chunks it changed; another node on the same bucket, which saw none of
/// it, serves both back byte-identical.
#[test]
fn a_model_family_mirrors_into_the_bucket_for_everyone() {
    let weed = Weed::start();
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let a = weed.node(&a_dir, "team/hf", &[]);
    let hub = StandIn::start();
    let base: BTreeMap<String, Vec<u8>> = [
        ("config.json", br#"{"hidden_size": 64}"#.to_vec()),
        ("tokenizer.json", noise(70, 300 << 10)),
        ("model.safetensors", noise(71, 20 << 20)),
    ]
    .into_iter()
    .map(|(p, d)| (p.to_owned(), d))
    .collect();
    let mut tuned = base.clone();
    let weights = tuned.get_mut("model.safetensors").unwrap();
    weights[8 << 20..9 << 20].copy_from_slice(&noise(72, 1 << 20));
    hub.commit(
        "models/org/base",
        "main",
        "1111111111111111111111111111111111111111",
        &base,
    );
    hub.commit(
        "models/org/base-ft",
        "main",
        "2222222222222222222222222222222222222222",
        &tuned,
    );
    let mirror = |id: &str| {
        let mut c = cas_as(None, &a.url, None, "mirror", dir.path());
        c.env_remove("HF_TOKEN")
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_HOME", dir.path().join("hf-home"))
            .env("CAS_AUTHOR", "tester")
            .args(["--json", id]);
        json_of(ok(c))
    };

    let first = mirror("org/base");
    assert_eq!(first["files"], 3, "{first}");
    let xorbs = weed.keys("team/hf/xorbs/").len();
    assert!(xorbs > 0 && !weed.keys("team/hf/shards/").is_empty());
    assert!(!weed.keys("team/hf/refs/").is_empty(), "the branch too");
    assert!(!a_dir.join("objects").exists(), "no objects on the node");
    let second = mirror("org/base-ft");
    let sent = second["upload"]["sent_bytes"].as_u64().unwrap();
    assert!(
        sent < 2 << 20,
        "the fine-tune sends its changed MiB, not {sent} bytes: {second}"
    );
    assert!(weed.keys("team/hf/xorbs/").len() > xorbs);

    let b = weed.node(&dir.path().join("b"), "team/hf", &[]);
    let want = Metrics::fetch(&a.url).get("cas_files");
    let start = Instant::now();
    while Metrics::fetch(&b.url).count("cas_files") < want {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node b caught up with {want} files"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (id, files) in [("org/base", &base), ("org/base-ft", &tuned)] {
        let out = dir.path().join(id.replace('/', "-"));
        let mut c = cas_as(None, &b.url, None, "fetch", dir.path());
        c.arg(id).arg("-o").arg(&out);
        ok(c);
        assert_same_files(files, &out);
    }
}
