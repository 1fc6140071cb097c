//! End-to-end tests of the real `cas-client` binary against a real
//! `cas-server`: model directories with dedup across versions, many small
//! files in few requests, resuming after kill -9, concurrent fetches and
//! users sharing one cache, corrupted data, and clear failures.
//!
//! Every test starts its own server on a temporary directory and gives the
//! client its own cache directory.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cas_e2e::client::{
    assert_same_tree, bound_by_permissions, cas_as, find_journal, have_setpriv, is_root, ok,
    snapshot, u, write_mode, Env, Gate,
};
use cas_e2e::{assert_same_bytes, fails, json_of, show};
use cas_protocol::Sha256;
use serde_json::Value;

// ------------------------------------------------------------------ tests

/// A model directory round-trips exactly; a fine-tune that rewrote ~10%
/// of the weights uploads and downloads only about what changed.
#[test]
fn model_directory_round_trip_and_incremental_versions() {
    let env = Env::start();
    let model = env.dir("model");
    let weights = cas_bench::bf16_weights(11, 20_000_000);
    write_mode(&model.join("weights/model.safetensors"), &weights, 0o644);
    write_mode(
        &model.join("config.json"),
        br#"{"hidden_size": 4096, "layers": 32}"#,
        0o644,
    );
    let tokenizer: Vec<u8> = (0..30_000)
        .flat_map(|i| format!("\"tok{i}\": {i},\n").into_bytes())
        .collect();
    write_mode(&model.join("tokenizer/tokenizer.json"), &tokenizer, 0o644);
    write_mode(&model.join("tokenizer/special.txt"), b"<s>\n</s>\n", 0o600);
    write_mode(&model.join("run.sh"), b"#!/bin/sh\necho run\n", 0o755);
    write_mode(&model.join("empty.txt"), b"", 0o644);
    write_mode(&model.join("deep/a/b/c/notes.md"), b"# notes\n", 0o640);

    let up1 = env.upload(&model);
    let roots = up1["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 1, "{up1}");
    assert_eq!(roots[0]["tree"], true);
    let tree1 = roots[0]["hash"].as_str().unwrap().to_owned();
    assert_eq!(up1["files"].as_array().unwrap().len(), 7, "{up1}");

    // A fresh destination and an empty cache.
    let cache = env.dir("cache");
    let m0 = env.metrics();
    let f1 = env.fetch(&tree1, &env.root.join("copy1"), Some(&cache));
    let m1 = env.metrics();
    assert_same_tree(&model, &env.root.join("copy1"));
    assert_eq!(
        (f1["tree"].as_bool(), u(&f1["files"])),
        (Some(true), 7),
        "{f1}"
    );
    let total: u64 = snapshot(&model).values().map(|(b, _)| b.len() as u64).sum();
    assert_eq!(u(&f1["bytes"]), total);
    let net1 = u(&f1["network_bytes"]);
    let served1 = m1.xorb_bytes_out() - m0.xorb_bytes_out();
    assert!(net1 > 0 && served1 >= net1, "{f1}; server sent {served1}");

    // v2: the weights with ~10% rewritten in 8 places.
    let weights2 = cas_bench::edited(&weights, 12, 8, 0.10);
    assert_ne!(weights, weights2);
    write_mode(&model.join("weights/model.safetensors"), &weights2, 0o644);
    let up2 = env.upload(&model);
    let tree2 = up2["roots"][0]["hash"].as_str().unwrap().to_owned();
    assert_ne!(tree1, tree2);
    let (new2, bytes2) = (u(&up2["new_bytes"]), u(&up2["bytes"]));
    assert!(bytes2 >= weights2.len() as u64, "{up2}");
    assert!(
        (new2 as f64) < 0.3 * bytes2 as f64,
        "v2 sent {new2} new bytes of {bytes2}: {up2}"
    );

    // Fetching v2 with the v1 cache moves little more than the edits.
    let f2 = env.fetch(&tree2, &env.root.join("copy2"), Some(&cache));
    let m2 = env.metrics();
    assert_same_tree(&model, &env.root.join("copy2"));
    let net2 = u(&f2["network_bytes"]);
    let served2 = m2.xorb_bytes_out() - m1.xorb_bytes_out();
    eprintln!("v1: {net1} network, {served1} served; v2: {net2} network, {served2} served; upload v2 {new2} new of {bytes2}");
    assert!(u(&f2["cache_bytes"]) > 0, "{f2}");
    assert!(
        (net2 as f64) < 0.35 * net1 as f64,
        "v2 fetched {net2} bytes over the network, v1 {net1}: {f2}"
    );
    assert!(
        (served2 as f64) < 0.35 * served1 as f64,
        "server sent {served2} xorb bytes for v2, {served1} for v1"
    );
    // The v1 copy is untouched by all of this.
    assert_same_bytes(&weights, &env.root.join("copy1/weights/model.safetensors"));
}

/// `n` small files (1-4 KiB) in nested directories under `dir`; returns
/// their relative paths and contents.
fn small_files(dir: &Path, n: u64) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let len = 1024 + (i * 7919 % 3072) as usize;
            let rel = format!("d{}/e{}/f{i}.bin", i % 10, i / 10 % 7);
            let data = cas_bench::random_bytes(1000 + i, len);
            write_mode(&dir.join(&rel), &data, 0o644);
            (rel, data)
        })
        .collect()
}

/// Thousands of small files go up in a handful of requests and come back
/// exact.
#[test]
fn many_small_files_upload_in_few_requests() {
    let env = Env::start();
    let src = env.dir("small");
    let n = 2000;
    small_files(&src, n);
    let before = env.metrics();
    let up = env.upload(&src);
    let after = env.metrics();
    assert_eq!(up["files"].as_array().unwrap().len() as u64, n);
    let delta = |route| after.requests(route) - before.requests(route);
    let (puts, dedups, shards) = (delta("xorb_put"), delta("dedup"), delta("shard"));
    assert!(
        (1..=3).contains(&puts),
        "{puts} xorb PUTs for {n} small files"
    );
    assert!(dedups <= 3, "{dedups} dedup queries for {n} small files");
    assert!(shards <= 3, "{shards} shard commits for {n} small files");
    assert_eq!(u(&up["xorbs"]), puts, "{up}");

    // And come back in a handful too: batched reconstructions, ranges
    // joined per xorb, no per-file lookups.
    let tree = up["roots"][0]["hash"].as_str().unwrap();
    let out = env.root.join("out");
    let before = env.metrics();
    let f = env.fetch(tree, &out, Some(&env.dir("cache")));
    let after = env.metrics();
    let delta = |route| after.requests(route) - before.requests(route);
    assert_eq!(u(&f["files"]), n, "{f}");
    assert_same_tree(&src, &out);
    assert_eq!(delta("reconstruction_batch"), 2, "{n} files, 1024 a batch");
    // The tree's own listing is the only file fetched alone.
    assert_eq!(delta("file"), 1);
    assert_eq!(delta("reconstruction"), 1);
    let gets = delta("xorb_get");
    assert!(gets <= 6, "{gets} xorb GETs for {n} small files");
}

/// Every regular file under `dir` outside the work directory.
fn placed_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with(".cas-fetch") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A fetch of a tree of small files killed with SIGKILL between batches:
/// every file under its final name is complete, and the same command
/// keeps them and fetches only the rest.
#[test]
fn small_file_tree_fetch_resumes_after_kill_9() {
    let mut env = Env::start();
    let src = env.dir("src");
    let n = 3000;
    let files = small_files(&src, n);
    let up = env.upload(&src);
    let tree = up["roots"][0]["hash"].as_str().unwrap().to_owned();
    let xorb_bytes: u64 = env
        .stored_xorbs()
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();

    // Three batches, one GET each; one connection: the first gets through,
    // the second stalls half-way.
    let gate = Gate::start(&mut env.server, xorb_bytes / 2);
    let out = env.root.join("out");
    let mut c = cas_as(None, &gate.url, None, "fetch", &env.root);
    c.args(["--connections", "1", &tree, "-o"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let started = Instant::now();
    while !(gate.stalled() && out.exists() && !placed_files(&out).is_empty()) {
        assert!(child.try_wait().unwrap().is_none(), "fetch ended early");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no batch placed within 60 s ({} bytes relayed)",
            gate.passed()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the batch's renames finish, then kill.
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    gate.close(&mut env.server);

    let placed = placed_files(&out);
    assert!(
        !placed.is_empty() && placed.len() < n as usize,
        "{} of {n} files placed",
        placed.len()
    );
    let want: std::collections::HashMap<_, _> = files.into_iter().collect();
    for p in &placed {
        let rel = p.strip_prefix(&out).unwrap().to_str().unwrap();
        assert!(
            std::fs::read(p).unwrap() == want[rel],
            "{rel} is under its name but not complete"
        );
    }

    let f = env.fetch(&tree, &out, None);
    assert_same_tree(&src, &out);
    assert_eq!(u(&f["kept_files"]), placed.len() as u64, "{f}");
    assert!(u(&f["network_bytes"]) < xorb_bytes, "{f}");
}

/// A fetch killed with SIGKILL half-way resumes: the verified part is not
/// fetched again, and nothing stands under the final name until the whole
/// file is verified.
#[test]
fn fetch_resumes_after_kill_9() {
    let mut env = Env::start();
    let src = env.dir("src");
    // B = A + new data: B's reconstruction spans A's xorb and a new one,
    // two separately fetched (and journaled) units.
    let a = cas_bench::random_bytes(31, 16_000_000);
    let mut b = a.clone();
    b.extend(cas_bench::random_bytes(32, 16_000_000));
    std::fs::write(src.join("a.bin"), &a).unwrap();
    env.upload(&src.join("a.bin"));
    std::fs::write(src.join("b.bin"), &b).unwrap();
    let up = env.upload(&src.join("b.bin"));
    let hash = up["roots"][0]["hash"].as_str().unwrap().to_owned();
    let xorbs = env.stored_xorbs();
    assert_eq!(xorbs.len(), 2, "{xorbs:?}");
    let xorb_bytes: u64 = xorbs
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();

    // Through the gate, one connection at a time: the first unit gets
    // through whole, the second stalls half-way.
    let budget = xorb_bytes * 3 / 4;
    let gate = Gate::start(&mut env.server, budget);
    let dest = env.root.join("out/b.bin");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    let out = dest.parent().unwrap();
    let mut c = cas_as(None, &gate.url, None, "fetch", &env.root);
    c.args(["--connections", "1", &hash, "-o"])
        .arg(&dest)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let started = Instant::now();
    loop {
        let lines = find_journal(out)
            .and_then(|j| std::fs::read_to_string(j).ok())
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= 2 && gate.stalled() {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("fetch ended before it was killed: {status}: {err}");
        }
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!(
                "no unit was journaled within 60 s ({} bytes relayed)",
                gate.passed()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    gate.close(&mut env.server);
    assert!(!dest.exists(), "nothing under the final name after a kill");
    assert!(find_journal(out).is_some());

    let f = env.fetch(&hash, &dest, None);
    assert_same_bytes(&b, &dest);
    let (resumed, net) = (u(&f["resumed_bytes"]), u(&f["network_bytes"]));
    eprintln!("resume of {} bytes ({xorb_bytes} xorb bytes): {f}", b.len());
    assert!(resumed > 0, "{f}");
    assert!(net < b.len() as u64, "{f}");
    assert!(
        net <= xorb_bytes - resumed + (1 << 20),
        "only what was not verified is fetched again: {f}"
    );
    let left: Vec<_> = std::fs::read_dir(out).unwrap().collect();
    assert_eq!(left.len(), 1, "only b.bin is left: {left:?}");
}

/// Two fetches of one file at once through one cache move its bytes over
/// the network once.
#[test]
fn concurrent_fetches_share_one_cache() {
    let env = Env::start();
    let data = cas_bench::bf16_weights(41, 24_000_000);
    let (_, hash) = env.upload_bytes("weights.bin", &data);

    // What one fetch moves.
    let m0 = env.metrics();
    let single = env.fetch(&hash, &env.root.join("single.bin"), None);
    let m1 = env.metrics();
    let one_copy = m1.xorb_bytes_out() - m0.xorb_bytes_out();
    assert!(one_copy >= u(&single["network_bytes"]) && one_copy > 0);

    let cache = env.dir("shared-cache");
    let spawn = |name: &str| {
        let mut c = env.cas("fetch", Some(&cache));
        c.args(["--json", &hash, "-o"])
            .arg(env.root.join(name))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c.spawn().unwrap()
    };
    let (p1, p2) = (spawn("one.bin"), spawn("two.bin"));
    let reports: Vec<Value> = [p1, p2]
        .into_iter()
        .map(|p| {
            let out = p.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", show(&out));
            json_of(out.stdout)
        })
        .collect();
    let m2 = env.metrics();
    assert_same_bytes(&data, &env.root.join("one.bin"));
    assert_same_bytes(&data, &env.root.join("two.bin"));
    let both = m2.xorb_bytes_out() - m1.xorb_bytes_out();
    eprintln!("one copy {one_copy}, two concurrent {both}: {reports:?}");
    assert!(
        (both as f64) < 1.5 * one_copy as f64,
        "two concurrent fetches made the server send {both} xorb bytes; one copy is {one_copy}: {reports:?}"
    );
    let net: u64 = reports.iter().map(|r| u(&r["network_bytes"])).sum();
    assert!((net as f64) < 1.5 * one_copy as f64, "{reports:?}");
}

/// Users in one group share a setgid cache: what one fetched, the next
/// reads locally.
#[test]
fn users_share_a_setgid_cache() {
    if !is_root() || !have_setpriv() {
        eprintln!("skipped: needs root and setpriv to act as two users");
        return;
    }
    let env = Env::start();
    let data = cas_bench::bf16_weights(51, 6_000_000);
    let (_, hash) = env.upload_bytes("shared.bin", &data);

    let group = 65534;
    let cache = env.dir("cache");
    std::os::unix::fs::chown(&cache, None, Some(group)).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o2777)).unwrap();
    let fetch_as = |uid: u32, dir: &str| {
        let d = env.dir(dir);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut c = cas_as(
            Some((uid, group)),
            env.url(),
            Some(&cache),
            "fetch",
            &env.root,
        );
        c.args(["--json", &hash, "-o"]).arg(d.join("shared.bin"));
        let r = json_of(ok(c));
        assert_same_bytes(&data, &d.join("shared.bin"));
        r
    };
    let first = fetch_as(65534, "first");
    assert!(u(&first["network_bytes"]) > 0, "{first}");
    let m = env.metrics();
    let second = fetch_as(65533, "second");
    assert_eq!(u(&second["network_bytes"]), 0, "{second}");
    assert!(u(&second["cache_bytes"]) > 0, "{second}");
    assert_eq!(
        env.metrics().xorb_bytes_out(),
        m.xorb_bytes_out(),
        "the second user's fetch sent nothing"
    );
}

/// A flipped byte in a stored xorb is caught: the fetch fails naming the
/// xorb, and no file appears under the destination name.
#[test]
fn corrupted_xorb_fails_verification() {
    let env = Env::start();
    let data = cas_bench::random_bytes(61, 4_000_000);
    let (_, hash) = env.upload_bytes("data.bin", &data);
    let xorbs = env.stored_xorbs();
    assert_eq!(xorbs.len(), 1);
    let xorb_hex = xorbs[0].file_name().unwrap().to_str().unwrap().to_owned();
    let mut bytes = std::fs::read(&xorbs[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&xorbs[0], &bytes).unwrap();

    let dest = env.root.join("out.bin");
    let mut c = env.cas("fetch", None);
    c.arg(&hash).arg("-o").arg(&dest);
    let err = fails(c);
    assert!(err.contains(&xorb_hex), "{err}");
    assert!(err.contains("failed verification"), "{err}");
    assert!(!dest.exists(), "{err}");
}

/// Each failure is one clear line on stderr and exit code 1, and nothing
/// is written where it must not be.
#[test]
fn failures_are_clear_and_safe() {
    let env = Env::start();
    let src = env.dir("src");
    write_mode(&src.join("a.txt"), b"top file\n", 0o644);
    write_mode(&src.join("sub/b.txt"), b"nested file\n", 0o644);
    let up = env.upload(&src);
    let tree = up["roots"][0]["hash"].as_str().unwrap().to_owned();
    let file = up["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with("a.txt"))
        .unwrap()["hash"]
        .as_str()
        .unwrap()
        .to_owned();

    // Unreachable server.
    let started = Instant::now();
    let mut c = cas_as(None, "http://127.0.0.1:1", None, "fetch", &env.root);
    c.env("CAS_RETRIES", "1")
        .arg(&file)
        .arg("-o")
        .arg(env.root.join("never"));
    let err = fails(c);
    assert!(
        err.contains("cannot reach") && err.contains("127.0.0.1:1"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!env.root.join("never").exists());

    // Unknown hash.
    let unknown = "ab".repeat(32);
    let mut c = env.cas("fetch", None);
    c.arg(&unknown).arg("-o").arg(env.root.join("unknown"));
    let err = fails(c);
    assert!(err.contains("404"), "{err}");
    let lower = err.to_lowercase();
    assert!(
        lower.contains("not found") || lower.contains("not_found"),
        "{err}"
    );
    assert!(!env.root.join("unknown").exists());

    // Permission denied: a read-only destination directory.
    if let Some(user) = bound_by_permissions() {
        let ro = env.dir("readonly");
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let mut c = cas_as(user, env.url(), None, "fetch", &env.root);
        c.arg(&file).arg("-o").arg(ro.join("a.txt"));
        let err = fails(c);
        assert!(err.contains("Permission denied"), "{err}");
        assert!(err.contains("readonly"), "names the path: {err}");
        assert!(!ro.join("a.txt").exists());
    }

    // Disk full.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut c = env.cas("cat", None);
    c.arg(&file).stdout(full);
    let err = fails(c);
    assert!(err.contains("No space left"), "{err}");

    // An existing file is not replaced without --force.
    let existing = env.root.join("existing.txt");
    std::fs::write(&existing, b"keep me").unwrap();
    let mut c = env.cas("fetch", None);
    c.arg(&file).arg("-o").arg(&existing);
    let err = fails(c);
    assert!(err.contains("exists"), "{err}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    let mut c = env.cas("fetch", None);
    c.arg(&file).arg("-o").arg(&existing).arg("--force");
    ok(c);
    assert_eq!(std::fs::read(&existing).unwrap(), b"top file\n");

    // A tree never writes through a symlink planted in its target.
    let outside = env.dir("outside");
    let target = env.dir("target");
    std::os::unix::fs::symlink(&outside, target.join("sub")).unwrap();
    let mut c = env.cas("fetch", None);
    c.arg(&tree).arg("-o").arg(&target);
    let err = fails(c);
    assert!(err.contains("sub"), "{err}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "{err}");
    assert!(
        !target.join("a.txt").exists(),
        "every target is vetted before anything is written: {err}"
    );
}

/// `cat` ranges are the slices they name, and `stat` describes the file.
#[test]
fn cat_ranges_and_stat() {
    let env = Env::start();
    let mut data = cas_bench::random_bytes(81, 400_000);
    data.extend(cas_bench::bf16_weights(82, 300_000));
    let (_, hash) = env.upload_bytes("ranges.bin", &data);
    let cache = env.dir("cache");
    let cat = |range: Option<&str>| {
        let mut c = env.cas("cat", Some(&cache));
        c.arg(&hash);
        if let Some(r) = range {
            c.arg(format!("--range={r}"));
        }
        ok(c)
    };
    let n = data.len();
    for (range, want) in [
        (Some("100-199"), &data[100..200]),
        (Some("-50"), &data[n - 50..]),
        (Some("5-"), &data[5..]),
        (Some("0-0"), &data[..1]),
        (Some("350000-450000"), &data[350_000..450_001]),
        (Some("600000-99999999"), &data[600_000..]),
        (None, &data[..]),
    ] {
        let got = cat(range);
        assert!(
            got == want,
            "{range:?}: {} bytes, want {}",
            got.len(),
            want.len()
        );
    }
    let mut c = env.cas("cat", Some(&cache));
    c.args([&hash, &format!("--range={n}-")]);
    let err = fails(c);
    assert!(err.contains("range"), "{err}");

    let mut c = env.cas("stat", Some(&cache));
    c.args(["--json", &hash]);
    let v = json_of(ok(c));
    assert_eq!(v["hash"], hash.as_str());
    assert_eq!(u(&v["size"]), n as u64);
    assert_eq!(v["sha256"], Sha256::of(&data).to_string());
    assert!(u(&v["chunks"]) > 1, "{v}");
    assert!(v["tree"].is_null(), "{v}");
}

/// A damaged cache entry is not trusted: it is dropped and fetched again.
#[test]
fn corrupted_cache_entry_is_refetched() {
    let env = Env::start();
    let data = cas_bench::random_bytes(91, 3_000_000);
    let (_, hash) = env.upload_bytes("c.bin", &data);
    let cache = env.dir("cache");
    env.fetch(&hash, &env.root.join("one.bin"), Some(&cache));
    // Flip a byte in the middle of the largest cache entry.
    let mut entries = Vec::new();
    let mut stack = vec![cache.join("xorbs")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() != "lock" {
                entries.push((std::fs::metadata(&p).unwrap().len(), p));
            }
        }
    }
    let (len, entry) = entries.into_iter().max().expect("a cache entry");
    assert!(len as usize >= data.len() / 2, "{len}");
    let mut bytes = std::fs::read(&entry).unwrap();
    bytes[len as usize / 2] ^= 1;
    std::fs::write(&entry, &bytes).unwrap();

    let f = env.fetch(&hash, &env.root.join("two.bin"), Some(&cache));
    assert_same_bytes(&data, &env.root.join("two.bin"));
    assert!(u(&f["network_bytes"]) > 0, "{f}");
    // The replacement is good: a third fetch is served from the cache.
    let f = env.fetch(&hash, &env.root.join("three.bin"), Some(&cache));
    assert_same_bytes(&data, &env.root.join("three.bin"));
    assert_eq!(u(&f["network_bytes"]), 0, "{f}");
}

/// `--range -N` (the suffix form, written as the help shows it) is taken
/// as the option's value, not as an unknown flag.
#[test]
fn cat_suffix_range_as_separate_argument() {
    let env = Env::start();
    let data = cas_bench::random_bytes(85, 10_000);
    let (_, hash) = env.upload_bytes("suffix.bin", &data);
    let mut c = env.cas("cat", None);
    c.args([&hash, "--range", "-50"]);
    assert_eq!(ok(c), &data[data.len() - 50..]);
}

/// An I/O error names its path and its cause once:
/// `PATH: Permission denied (os error 13)`, not the cause twice.
#[test]
fn io_errors_state_their_cause_once() {
    let env = Env::start();
    let src = env.root.join("one.txt");
    std::fs::write(&src, b"one\n").unwrap();
    let hash = env.upload(&src)["roots"][0]["hash"]
        .as_str()
        .unwrap()
        .to_owned();

    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut c = env.cas("cat", None);
    c.arg(&hash).stdout(full);
    let err = fails(c);
    assert_eq!(err.matches("No space left").count(), 1, "{err}");

    if let Some(user) = bound_by_permissions() {
        let ro = env.dir("readonly");
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let mut c = cas_as(user, env.url(), None, "fetch", &env.root);
        c.arg(&hash).arg("-o").arg(ro.join("one.txt"));
        let err = fails(c);
        assert_eq!(err.matches("Permission denied").count(), 1, "{err}");
    }
}

/// A stored file tagged as a tree whose entries escape the target (`..`,
/// an absolute path) is refused before anything is written; `--raw`
/// still fetches its bytes.
#[test]
fn hostile_tree_is_refused() {
    use cas_protocol::tree::{Tree, TreeEntry};
    use cas_protocol::Message;

    let env = Env::start();
    let payload = env.root.join("payload");
    std::fs::write(&payload, b"owned").unwrap();
    let file = env.upload(&payload)["roots"][0]["hash"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    for evil in ["../escaped", "/tmp/escaped-absolute", "a/../../escaped"] {
        // Built field by field: Tree::new and the decoder would refuse it.
        let tree = Tree {
            entries: vec![TreeEntry {
                path: evil.into(),
                mode: 0o644,
                size: 5,
                file,
            }],
        };
        let hash = cas_e2e::upload_as(env.url(), &[&tree.to_bytes()], cas_protocol::Kind::Tree)
            .unwrap()
            .files[0]
            .to_string();
        let target = env.root.join("target");
        let mut c = env.cas("fetch", None);
        c.arg(&hash).arg("-o").arg(&target);
        let err = fails(c);
        assert!(err.contains("not a valid tree"), "{evil}: {err}");
        assert!(!env.root.join("escaped").exists(), "{evil}");
        assert!(!Path::new("/tmp/escaped-absolute").exists(), "{evil}");
        assert!(!target.exists(), "{evil}: nothing created");

        let raw = env.root.join("raw");
        let mut c = env.cas("fetch", None);
        c.args(["--raw", "--force", &hash, "-o"]).arg(&raw);
        ok(c);
        assert_eq!(std::fs::read(&raw).unwrap(), tree.to_bytes());
    }
}
