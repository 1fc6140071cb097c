//! `cas-client mirror` against a stand-in Hub (tests/src/standin.rs, its
//! faithfulness checked here with the stock `huggingface_hub`): a model
//! and a dataset of thousands of small files mirrored into the real
//! `cas-server` and read back byte-identical with `cas-client` and with
//! `huggingface_hub` through our server; the token kept from the CDN;
//! wrong bytes, gated and unknown repositories and revisions refused in
//! one line; 429 and a stalled connection survived; the same revision
//! again downloads nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use cas_e2e::hub::{assert_same_files, Hf};
use cas_e2e::standin::StandIn;
use cas_e2e::{bin, fails, json_of, noise, ok, ServerProcess};
use cas_protocol::Sha256;
use serde_json::{json, Value};

type Files = BTreeMap<String, Vec<u8>>;

/// A model: small JSON files, an empty file, a one-range LFS file and a
/// 20 MiB one read in three ranges.
fn model(seed: u64) -> Files {
    let mut f = Files::new();
    f.insert("config.json".into(), br#"{"hidden_size": 64}"#.to_vec());
    f.insert(
        ".gitattributes".into(),
        b"*.safetensors filter=lfs\n".to_vec(),
    );
    f.insert("empty.txt".into(), vec![]);
    f.insert("tokenizer.json".into(), noise(seed, 300 << 10));
    f.insert("model.safetensors".into(), noise(seed + 1, 20 << 20));
    f
}

/// `n` small files in a few directories.
fn dataset(n: usize) -> Files {
    (0..n)
        .map(|i| {
            (
                format!("data/part-{:02}/row-{i:05}.txt", i % 17),
                format!("row {i}: {}\n", "x".repeat(i % 700)).into_bytes(),
            )
        })
        .collect()
}

const SHA1: &str = "1111111111111111111111111111111111111111";
const SHA2: &str = "2222222222222222222222222222222222222222";

/// A stand-in Hub, a real server, a scratch directory.
struct Env {
    hub: StandIn,
    server: ServerProcess,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let data = root.join("server");
        std::fs::create_dir(&data).unwrap();
        Self {
            hub: StandIn::start(),
            server: ServerProcess::start(&data),
            root,
            _dir: dir,
        }
    }

    /// `cas-client ARGS` against the server, the stand-in as `HF_ENDPOINT`,
    /// without a cache.
    fn cas(&self, args: &[&str]) -> Command {
        let mut c = self.cas_cached(args);
        c.arg("--no-cache");
        c
    }

    /// `cas-client ARGS` with a cache (where `mirror` keeps its journal) in
    /// the scratch directory.
    fn cas_cached(&self, args: &[&str]) -> Command {
        let mut c = bin("cas-client");
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("CAS_") || k.starts_with("HF_") {
                c.env_remove(k);
            }
        }
        c.current_dir(&self.root)
            .env("CAS_ENDPOINT", &self.server.url)
            .env("CAS_AUTHOR", "tester")
            .env("CAS_RETRIES", "3")
            .env("HF_ENDPOINT", &self.hub.url)
            .env("HF_HOME", self.root.join("hf-home-of-mirror"))
            .env("CAS_CACHE_DIR", self.root.join("cas-cache"))
            .args(args);
        c
    }

    fn mirror(&self, args: &[&str]) -> Value {
        let mut a = vec!["mirror", "--json"];
        a.extend_from_slice(args);
        json_of(ok(self.cas(&a)))
    }

    fn dir(&self, name: &str) -> PathBuf {
        let d = self.root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// `cas-client fetch SPEC` into a fresh directory, its files.
    fn fetch(&self, spec: &str, name: &str) -> PathBuf {
        let out = self.root.join(name);
        ok(self.cas(&["fetch", spec, "-o", out.to_str().unwrap()]));
        out
    }
}

/// The stand-in serves what the stock client expects (`snapshot_download`
/// gets every byte, the large file through the CDN redirect); `mirror`
/// copies it into our server, and both `cas-client fetch` and
/// `snapshot_download` through our server give back the same bytes. The
/// token reaches the upstream and never the CDN. Mirroring the same
/// revision again downloads nothing and commits nothing.
#[test]
fn a_model_mirrors_byte_identical_and_the_token_stays_upstream() {
    let env = Env::new();
    let files = model(1);
    env.hub.commit("models/org/model", "main", SHA1, &files);

    // The stand-in is faithful: the stock client downloads it whole.
    let hf = Hf::new(&env.hub.url, None, &env.root.join("hf-upstream"));
    let snap = hf.ok("snapshot_download", json!({"repo": "org/model"}));
    let snap = PathBuf::from(snap.as_str().unwrap());
    assert!(
        snap.ends_with(format!("snapshots/{SHA1}")),
        "{}",
        snap.display()
    );
    assert_same_files(&files, &snap);
    assert!(
        env.hub.seen().cdn_requests > 0,
        "the large files came from the CDN"
    );
    env.hub.reset_seen();

    let mut c = env.cas(&["mirror", "org/model", "--json"]);
    c.env("HF_TOKEN", "hf_secret");
    let r = json_of(ok(c));
    assert_eq!(r["upstream_commit"], SHA1);
    assert_eq!(r["branch"], "main");
    assert_eq!(r["files"], 5);
    assert_eq!(r["unchanged"], false);
    let total: usize = files.values().map(Vec::len).sum();
    assert_eq!(r["bytes"], total as u64);
    assert!(
        r["commit"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("upstream commit {SHA1}")),
        "{r}"
    );
    let seen = env.hub.seen();
    assert!(seen.upstream_auth.iter().all(|a| a == "Bearer hf_secret"));
    assert!(!seen.upstream_auth.is_empty());
    assert!(
        seen.cdn_requests >= 4,
        "20 MiB in 8 MiB ranges and one more file: {seen:?}"
    );
    assert_eq!(seen.cdn_with_auth, 0, "the token reached the CDN: {seen:?}");
    // Downloaded once: no byte fetched twice.
    assert_eq!(
        seen.cdn_bytes + seen.resolve_bytes,
        total as u64,
        "{seen:?}"
    );
    assert_eq!(r["downloaded_bytes"], total as u64);

    let out = env.fetch("org/model", "fetched");
    assert_same_files(&files, &out);
    let ours = Hf::new(&env.server.url, None, &env.root.join("hf-ours"));
    let snap = ours.ok("snapshot_download", json!({"repo": "org/model"}));
    assert_same_files(&files, &PathBuf::from(snap.as_str().unwrap()));

    // The same revision again: nothing downloaded, the same commit.
    env.hub.reset_seen();
    let again = env.mirror(&["org/model"]);
    assert_eq!(again["unchanged"], true);
    assert_eq!(again["commit"]["id"], r["commit"]["id"]);
    assert_eq!(env.hub.seen().cdn_bytes + env.hub.seen().resolve_bytes, 0);
}

/// Three thousand small files, listed over several pages, fetched many at
/// once: all of them arrive, byte-identical, under another name.
#[test]
fn a_dataset_of_thousands_of_small_files_mirrors() {
    let env = Env::new();
    let files = dataset(3000);
    env.hub.commit("datasets/org/rows", "main", SHA1, &files);
    // A Hub 20 ms away: what the number of requests in flight decides.
    env.hub.latency(std::time::Duration::from_millis(20));
    let started = Instant::now();
    let r = env.mirror(&["datasets/org/rows", "--as", "team/rows-copy"]);
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "3000 small files, 20 ms per request, 16 connections: {seconds:.1} s, {:.0} files/s",
        3000.0 / seconds
    );
    // More requests in flight than connections: small files share slots
    // (the time is printed, not asserted: bench/mirror-bench measures it).
    let peak = env.hub.seen().resolve_peak;
    assert!(
        peak > 16,
        "small files do not share connections' slots: {peak} in flight at most"
    );
    assert_eq!(r["files"], 3000);
    assert_eq!(
        r["repo"],
        json!({"id": "team/rows-copy", "type": "dataset"})
    );
    let seen = env.hub.seen();
    assert!(seen.api_requests >= 4, "several listing pages: {seen:?}");
    let out = env.fetch("datasets/team/rows-copy", "rows");
    assert_same_files(&files, &out);

    // --include / --exclude choose files.
    let part = env.mirror(&[
        "datasets/org/rows",
        "--as",
        "team/rows-part",
        "--include",
        "data/part-01/",
        "--exclude",
        "*-0001?.txt",
    ]);
    let expected: Files = files
        .iter()
        .filter(|(p, _)| p.starts_with("data/part-01/"))
        .filter(|(p, _)| {
            let n = &p[p.len() - 9..p.len() - 4];
            !n.starts_with("0001")
        })
        .map(|(p, d)| (p.clone(), d.clone()))
        .collect();
    assert_eq!(part["files"], expected.len() as u64);
    let out = env.fetch("datasets/team/rows-part", "rows-part");
    assert_same_files(&expected, &out);
}

/// A large file and a small one served with a byte changed: each refused,
/// naming the file, and nothing committed.
#[test]
fn wrong_bytes_are_refused_naming_the_file() {
    let env = Env::new();
    env.hub.commit("models/org/model", "main", SHA1, &model(2));
    for path in ["model.safetensors", "config.json"] {
        env.hub.corrupt(path);
        let err = fails(env.cas(&["mirror", "org/model"]));
        let line = err.trim();
        assert_eq!(line.lines().count(), 1, "{err}");
        assert!(
            line.contains(path)
                && line.contains("do not match")
                && line.contains("nothing was committed"),
            "{err}"
        );
        let e = fails(env.cas(&["log", "org/model"]));
        assert!(e.contains("404"), "{e}");
        env.hub.clear_corrupt();
    }
}

/// Gated (no token, wrong token), unknown repository, unknown revision:
/// one line each saying what to do.
#[test]
fn upstream_refusals_are_one_clear_line() {
    let env = Env::new();
    env.hub.commit("models/org/gated", "main", SHA1, &model(3));
    env.hub.gate("models/org/gated", "hf_right");
    let one_line = |mut c: Command, want: &[&str]| {
        let err = fails({
            c.env("CAS_RETRIES", "0");
            c
        });
        let line = err.trim();
        assert_eq!(line.lines().count(), 1, "{err}");
        for w in want {
            assert!(line.contains(w), "{w:?} not in {line:?}");
        }
    };
    one_line(
        env.cas(&["mirror", "org/gated"]),
        &["401", "accept the license", "token"],
    );
    let mut c = env.cas(&["mirror", "org/gated"]);
    c.env("HF_TOKEN", "hf_wrong");
    one_line(c, &["403", "accept the license", "refused"]);
    one_line(
        env.cas(&["mirror", "org/nothing"]),
        &["org/nothing", "not found"],
    );
    one_line(
        env.cas(&[
            "mirror",
            "org/gated",
            "--revision",
            "v9",
            "--hf-token",
            "hf_right",
        ]),
        &["no such revision"],
    );
    let mut c = env.cas(&["mirror", "org/gated", "--from", "http://127.0.0.1:9"]);
    c.env("HF_TOKEN", "hf_right");
    one_line(c, &["unreachable"]);
    // The right token, from the file huggingface_hub writes.
    let home = env.dir("hf-home-of-mirror");
    std::fs::write(home.join("token"), "hf_right\n").unwrap();
    let r = env.mirror(&["org/gated"]);
    assert_eq!(r["files"], 5);
}

/// 429 with `Retry-After` is waited out; a CDN connection that stalls is
/// abandoned after the stall timeout and its range fetched again.
#[test]
fn rate_limits_and_stalls_are_survived() {
    let env = Env::new();
    let files = model(4);
    env.hub.commit("models/org/model", "main", SHA1, &files);
    let big = Sha256::of(&files["model.safetensors"]).to_string();
    env.hub.rate_limit(2, 1);
    env.hub.stall(&big, 1 << 20, 1);
    let started = Instant::now();
    let mut c = env.cas(&["mirror", "org/model", "--json"]);
    c.env("CAS_STALL_TIMEOUT", "2s");
    let r = json_of(ok(c));
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        seconds >= 2.0,
        "waited for Retry-After and the stall: {seconds}"
    );
    assert!(seconds < 30.0, "{seconds}");
    let seen = env.hub.seen();
    assert_eq!(seen.rate_limited, 2);
    assert_eq!(r["files"], 5);
    let out = env.fetch("org/model", "out");
    assert_same_files(&files, &out);
}

/// Bytes the stand-in served (CDN and `/resolve/`).
fn served(hub: &StandIn) -> u64 {
    let seen = hub.seen();
    seen.cdn_bytes + seen.resolve_bytes
}

/// A newer upstream revision downloads only its changed files and sends
/// only their new chunks; the unchanged ones are taken from the mirrored
/// revision. The same revision again downloads nothing and keeps the
/// commit. Another repository of the same store finds the LFS files by
/// SHA-256 and downloads only the small ones (no journal without a cache).
#[test]
fn a_newer_revision_downloads_only_changed_files() {
    let env = Env::new();
    let files = model(5);
    env.hub.commit("models/org/model", "main", SHA1, &files);
    let r1 = env.mirror(&["org/model"]);
    assert_eq!(r1["reused_files"], 0);

    let mut v2 = files.clone();
    v2.insert("extra.json".into(), b"{}".to_vec());
    v2.insert("tokenizer.json".into(), noise(99, 300 << 10));
    v2.remove("empty.txt");
    env.hub.commit("models/org/model", "main", SHA2, &v2);
    env.hub.reset_seen();
    let r2 = env.mirror(&["org/model"]);
    assert_eq!(r2["upstream_commit"], SHA2);
    let changed = (300 << 10) + 2;
    assert_eq!(served(&env.hub), changed, "{:?}", env.hub.seen());
    assert_eq!(r2["downloaded_bytes"], changed);
    assert_eq!(r2["reused_files"], 3, "config, .gitattributes, the model");
    let new = r2["upload"]["new_bytes"].as_u64().unwrap();
    assert!(
        new < 1 << 20,
        "only the changed files' chunks are new: {new}"
    );
    let out = env.fetch("org/model", "v2");
    assert_same_files(&v2, &out);

    env.hub.reset_seen();
    let again = env.mirror(&["org/model"]);
    assert_eq!(again["unchanged"], true);
    assert_eq!(again["commit"]["id"], r2["commit"]["id"]);
    assert_eq!(served(&env.hub), 0);

    // Another repository: the LFS files are found by SHA-256.
    env.hub.reset_seen();
    let copy = env.mirror(&["org/model", "--as", "team/copy"]);
    let small: u64 = v2
        .values()
        .filter(|d| d.len() < cas_e2e::standin::LFS_MIN)
        .map(|d| d.len() as u64)
        .sum();
    assert_eq!(env.hub.seen().cdn_bytes, 0, "{:?}", env.hub.seen());
    assert_eq!(served(&env.hub), small);
    assert_eq!(copy["reused_files"], 2, "the two LFS files");
    assert_eq!(
        copy["commit"]["commit"]["tree"],
        r2["commit"]["commit"]["tree"]
    );
}

/// A mirror killed (-9) after most of its bytes arrived, run again: the
/// groups it committed are not downloaded again (LFS files found by
/// SHA-256, small files through the journal of their git blob ids), so
/// the bytes downloaded twice stay within one group plus the parts in
/// flight, and the result is byte-identical.
#[test]
fn a_killed_mirror_resumes_without_downloading_again() {
    let env = Env::new();
    let mut files = Files::new();
    for i in 0..1200 {
        files.insert(
            format!("data/row-{i:04}.txt"),
            format!("row {i}\n").into_bytes(),
        );
    }
    for i in 0..24 {
        files.insert(
            format!("shards/model-{i:05}.safetensors"),
            noise(1000 + i, 8 << 20),
        );
    }
    let total: u64 = files.values().map(|d| d.len() as u64).sum();
    env.hub.commit("models/org/big", "main", SHA1, &files);
    let args = ["mirror", "org/big", "--json", "--connections", "4"];

    let kill_at = 144u64 << 20;
    let first = kill_when(&env, &args, &format!("{kill_at} CDN bytes"), || {
        env.hub.cdn_bytes() >= kill_at
    });

    let r = json_of(ok(env.cas_cached(&args)));
    let second = served(&env.hub);
    let twice = (first + second).saturating_sub(total);
    eprintln!(
        "killed after {} MiB of {} MiB; the rerun downloaded {} MiB ({} MiB twice), reused {} files",
        first >> 20,
        total >> 20,
        second >> 20,
        twice >> 20,
        r["reused_files"]
    );
    // One group (32 MiB) plus the parts in flight (4 connections and 2
    // queued, 8 MiB each), and some slack; the old mirror downloaded
    // everything again (144 MiB twice).
    assert!(twice <= 96 << 20, "{twice} bytes downloaded twice");
    assert!(
        r["reused_files"].as_u64().unwrap() >= 1000 + 8,
        "the small files' group and the committed shards: {r}"
    );
    assert_eq!(r["files"], files.len() as u64);
    let out = env.fetch("org/big", "out");
    assert_same_files(&files, &out);
}

/// Where the mirror run by [`Env::cas_cached`] keeps the resume record of
/// the file with these bytes.
fn record_of(env: &Env, data: &[u8]) -> PathBuf {
    env.root
        .join("cas-cache/mirror-partial")
        .join(Sha256::of(data).to_string())
}

/// Starts `args` (with a cache), waits until the stand-in's CDN served
/// `kill_at` bytes and the resume record of `data` holds a checkpoint (or
/// all of `data` was served: a mirror that keeps no record), kills the
/// mirror (-9) and returns the bytes served.
fn kill_inside(env: &Env, args: &[&str], data: &[u8], kill_at: u64) -> u64 {
    let record = record_of(env, data);
    env.hub.reset_seen();
    // The header is 61 bytes; a checkpoint block adds well over 100.
    let checkpointed = || std::fs::metadata(&record).is_ok_and(|m| m.len() > 200);
    let all = data.len() as u64;
    let what = format!("{kill_at} CDN bytes and a checkpoint");
    kill_when(env, args, &what, || {
        env.hub.cdn_bytes() >= kill_at && (checkpointed() || env.hub.cdn_bytes() >= all)
    })
}

/// Starts `args` (with a cache), kills the mirror (-9) once `ready` holds
/// (polled; the mirror must not end before: `what` says what it waited
/// for) and returns the bytes the stand-in served, its counters reset.
fn kill_when(env: &Env, args: &[&str], what: &str, ready: impl Fn() -> bool) -> u64 {
    let mut child = env
        .cas_cached(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(300);
    while !ready() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the mirror ended before {what}"
        );
        assert!(Instant::now() < deadline, "{:?}", env.hub.seen());
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let first = served(&env.hub);
    env.hub.reset_seen();
    first
}

/// One large file: the model of a mirror killed (-9) inside it.
fn large_model(seed: u64) -> Files {
    let mut files = Files::new();
    files.insert("config.json".into(), br#"{"hidden_size": 64}"#.to_vec());
    files.insert("model.safetensors".into(), noise(seed, 256 << 20));
    files
}

/// A mirror killed (-9) inside one large file resumes inside it: the
/// rerun downloads only the bytes after the last checkpoint whose chunks
/// were stored, so the bytes downloaded twice stay within what was in
/// flight (the download window, the batch being chunked and the xorb being
/// packed); the file is byte-identical and its SHA-256 checked over all
/// of it. The resume record is gone once the file is committed.
#[test]
fn a_mirror_killed_inside_a_large_file_resumes_inside_it() {
    let env = Env::new();
    let files = large_model(2000);
    let big = &files["model.safetensors"];
    let total: u64 = files.values().map(|d| d.len() as u64).sum();
    env.hub.commit("models/org/large", "main", SHA1, &files);
    // A link slower than the pipeline, as a real one is.
    env.hub.bandwidth(64 << 20);
    let args = ["mirror", "org/large", "--json", "--connections", "4"];
    let first = kill_inside(&env, &args, big, 224 << 20);

    let r = json_of(ok(env.cas_cached(&args)));
    let second = served(&env.hub);
    let twice = (first + second).saturating_sub(total);
    let resumed = r["resumed_bytes"].as_u64().unwrap_or(0);
    eprintln!(
        "killed after {} MiB of {} MiB; the rerun resumed at {} MiB and downloaded {} MiB ({} MiB twice)",
        first >> 20,
        total >> 20,
        resumed >> 20,
        second >> 20,
        twice >> 20,
    );
    // At most what can be in flight: the download window (64 MiB) and
    // the two parts queued after it (8 MiB each), the segment being chunked
    // and the batch being packed (16 MiB each), the xorbs being stored (a
    // batch each, 4 at once), the stand-in's socket buffers; typically
    // 40-72 MiB. The old mirror downloaded the whole file again (224 MiB
    // twice at least).
    assert!(twice <= 192 << 20, "{twice} bytes downloaded twice");
    assert_eq!(second + resumed, total, "{r}");
    assert_eq!(r["downloaded_bytes"], second);
    assert!(
        !record_of(&env, big).exists(),
        "the record outlived the commit"
    );
    let out = env.fetch("org/large", "out");
    assert_same_files(&files, &out);
}

/// Resume records that must not be trusted are not: the CDN sending wrong
/// bytes after the resume point is refused naming the file, commits
/// nothing and drops the record (the bytes before it may be the wrong
/// ones), so the next run downloads the file whole; a record of the file
/// an upstream path held before is not used for its new content; a record
/// cut short by a kill while it was written resumes at the checkpoint
/// before the torn one. Every result is byte-identical.
#[test]
fn resume_records_that_do_not_fit_are_not_used() {
    let env = Env::new();
    let v1 = large_model(3000);
    let big = &v1["model.safetensors"];
    let size = big.len() as u64;
    env.hub.commit("models/org/large", "main", SHA1, &v1);
    env.hub.bandwidth(64 << 20);
    let args = ["mirror", "org/large", "--json", "--connections", "4"];
    let record = record_of(&env, big);

    // Wrong bytes after the resume point.
    kill_inside(&env, &args, big, 128 << 20);
    env.hub.corrupt("model.safetensors");
    let err = fails(env.cas_cached(&["mirror", "org/large", "--connections", "4"]));
    let line = err.trim();
    assert_eq!(line.lines().count(), 1, "{err}");
    assert!(
        line.contains("model.safetensors")
            && line.contains("do not match")
            && line.contains("nothing was committed"),
        "{err}"
    );
    assert!(
        env.hub.seen().cdn_bytes < size,
        "the wrong bytes came after the resume point: {:?}",
        env.hub.seen()
    );
    assert!(fails(env.cas(&["log", "org/large"])).contains("404"));
    assert!(!record.exists(), "the record of wrong bytes was kept");
    env.hub.clear_corrupt();

    // The upstream path holds other bytes now: the record of the old ones
    // is not used.
    kill_inside(&env, &args, big, 128 << 20);
    assert!(record.exists());
    let mut v2 = v1.clone();
    v2.insert("model.safetensors".into(), noise(3001, 256 << 20));
    env.hub.commit("models/org/large", "main", SHA2, &v2);
    env.hub.reset_seen();
    let r = json_of(ok(env.cas_cached(&args)));
    assert_eq!(r["resumed_bytes"], 0, "{r}");
    assert_eq!(env.hub.seen().cdn_bytes, size, "{:?}", env.hub.seen());
    assert_same_files(&v2, &env.fetch("org/large", "v2"));

    // A record torn by a kill while it was appended to.
    const SHA3: &str = "3333333333333333333333333333333333333333";
    let mut v3 = v1.clone();
    v3.insert("model.safetensors".into(), noise(3002, 256 << 20));
    env.hub.commit("models/org/large", "main", SHA3, &v3);
    let big3 = &v3["model.safetensors"];
    kill_inside(&env, &args, big3, 160 << 20);
    let record3 = record_of(&env, big3);
    let whole = std::fs::read(&record3).unwrap();
    std::fs::write(&record3, &whole[..whole.len() - 7]).unwrap();
    let r = json_of(ok(env.cas_cached(&args)));
    let resumed = r["resumed_bytes"].as_u64().unwrap();
    assert!(resumed > 0, "{r}");
    assert_eq!(env.hub.seen().cdn_bytes + resumed, size, "{r}");
    assert_same_files(&v3, &env.fetch("org/large", "v3"));
    assert!(!record3.exists());
}

/// Two mirrors of one repository at once append to the same resume
/// record: killed both (-9), a third run resumes from it (or, had the
/// later start replaced the blocks of the earlier one, reads the file
/// whole) to a byte-identical file, never from a mixed-up prefix.
#[test]
fn two_mirrors_at_once_share_a_resume_record_safely() {
    let env = Env::new();
    let files = large_model(4000);
    let big = &files["model.safetensors"];
    let total: u64 = files.values().map(|d| d.len() as u64).sum();
    env.hub.commit("models/org/large", "main", SHA1, &files);
    env.hub.bandwidth(96 << 20);
    let args = ["mirror", "org/large", "--json", "--connections", "4"];
    let other = env
        .cas_cached(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Both download (through one link): about twice the bytes each.
    kill_inside(&env, &args, big, 320 << 20);
    let mut other = other;
    other.kill().unwrap();
    other.wait().unwrap();
    env.hub.reset_seen();

    let r = json_of(ok(env.cas_cached(&args)));
    let resumed = r["resumed_bytes"].as_u64().unwrap();
    eprintln!(
        "two mirrors killed; the third resumed at {} MiB",
        resumed >> 20
    );
    assert_eq!(served(&env.hub) + resumed, total, "{r}");
    assert_same_files(&files, &env.fetch("org/large", "out"));
}

/// A CDN URL that has expired (403) is resolved again through
/// `/resolve/` and the range fetched from the fresh URL; one that keeps
/// failing is one clear line.
#[test]
fn an_expired_cdn_url_is_resolved_again() {
    let env = Env::new();
    let files = model(6);
    env.hub.commit("models/org/model", "main", SHA1, &files);
    let big = Sha256::of(&files["model.safetensors"]).to_string();
    env.hub.expire(&big, 1);
    // Six parts of 1 MiB (parts are 64 MiB / connections, at least 1 MiB)
    // share the file's first URL, which is stale by the time they use it:
    // each asks `/resolve/` for a fresh one.
    let r = env.mirror(&["org/model", "--connections", "64"]);
    let seen = env.hub.seen();
    assert!(seen.cdn_expired >= 2, "{seen:?}");
    assert_eq!(r["files"], 5);
    let out = env.fetch("org/model", "out");
    assert_same_files(&files, &out);

    // A URL that stays refused: one line naming the file and the status.
    let other = model(7);
    env.hub.commit("models/org/other", "main", SHA1, &other);
    let big = Sha256::of(&other["model.safetensors"]).to_string();
    env.hub.expire(&big, 1000);
    let err = fails(env.cas(&["mirror", "org/other"]));
    assert!(
        err.contains("model.safetensors") && err.contains("403") && !err.contains("license"),
        "{err}"
    );
}
