//! Lifecycle end to end, through the real binaries: deleting tags,
//! branches, repositories and roots; `cas-server gc` (dry run, two-phase
//! deletion after the grace period) freeing exactly the bytes of what only
//! the deleted names referenced; `fsck` finding missing and corrupt xorbs;
//! `repair`, a re-upload, and a clean `fsck` again; online gc
//! (`--endpoint`, admin scope) collecting while an upload that shares its
//! garbage's chunks runs; `gc` killed with SIGKILL at every point of its
//! crash ordering.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cas_e2e::client::{assert_same_tree, cas_as};
use cas_e2e::{bin, json_of, ok, show, token, Metrics, ServerProcess};
use serde_json::Value;

/// A data directory with a server that can be stopped (offline `gc` and
/// `fsck` need the directory to themselves) and started again.
struct Env {
    server: Option<ServerProcess>,
    root: PathBuf,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let data = root.join("server");
        std::fs::create_dir(&data).unwrap();
        Self {
            server: Some(ServerProcess::start(&data)),
            root,
            data,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        self.server.as_ref().expect("server running").url.clone()
    }

    fn stop(&mut self) {
        self.server.take();
    }

    fn start(&mut self) {
        assert!(self.server.is_none());
        self.server = Some(ServerProcess::start(&self.data));
    }

    fn cas(&self, sub: &str) -> Command {
        cas_as(None, &self.url(), None, sub, &self.root)
    }

    /// `cas-client ARGS --json`, which must succeed.
    fn cas_json(&self, sub: &str, args: &[&str]) -> Value {
        let mut c = self.cas(sub);
        c.args(args).arg("--json");
        json_of(ok(c))
    }

    /// `cas-server SUB ARGS` on the data directory.
    fn server_cmd(&self, sub: &str, args: &[&str]) -> Command {
        let mut c = bin("cas-server");
        c.arg(sub).args(args).arg("--data-dir").arg(&self.data);
        c
    }

    /// `cas-server gc --json --grace 1s ARGS` (server stopped).
    fn gc(&self, args: &[&str]) -> Value {
        let mut c = self.server_cmd("gc", &["--json", "--grace", "1s"]);
        c.args(args);
        json_of(ok(c))
    }

    /// `cas-server fsck --json ARGS`: its report and whether it exited 0.
    fn fsck(&self, args: &[&str]) -> (Value, bool) {
        let out = self
            .server_cmd("fsck", &["--json"])
            .args(args)
            .output()
            .unwrap();
        let report = json_of(out.stdout.clone());
        assert_eq!(
            out.status.success(),
            report["clean"] == true,
            "{}",
            show(&out)
        );
        (report, out.status.success())
    }

    fn xorbs(&self) -> BTreeSet<PathBuf> {
        let top = self.data.join("objects/xorbs");
        let mut out = BTreeSet::new();
        for prefix in std::fs::read_dir(&top).unwrap() {
            for x in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
                out.insert(x.unwrap().path());
            }
        }
        out
    }

    fn write(&self, rel: &str, data: &[u8]) -> PathBuf {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        p
    }
}

fn bytes_of(paths: &BTreeSet<PathBuf>) -> u64 {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// v1 and v2 of a model share a file; deleting v1's tag and branch and
/// collecting garbage frees exactly v1's own xorb, after the grace
/// period, and nothing v2 or a root needs; v2 still fetches
/// byte-identical and fsck is clean.
#[test]
fn deleting_v1_frees_exactly_its_unique_xorb_after_the_grace_period() {
    let mut env = Env::new();
    let shared = env.write("shared.bin", &cas_bench::random_bytes(1, 3 << 20));
    // The shared file first, on its own (a root): v1's and v2's own files
    // then pack into xorbs of their own.
    let up = env.cas_json("upload", &[s(&shared)]);
    let shared_hash = up["roots"][0]["hash"].as_str().unwrap().to_owned();
    let before_v1 = env.xorbs();
    let v1 = env.root.join("v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::copy(&shared, v1.join("shared.bin")).unwrap();
    env.write("v1/weights.bin", &cas_bench::random_bytes(2, 2 << 20));
    env.cas_json("upload", &["--repo", "org/m", "--branch", "v1", s(&v1)]);
    let v1_only: BTreeSet<PathBuf> = env.xorbs().difference(&before_v1).cloned().collect();
    assert_eq!(v1_only.len(), 1, "v1's own file in a xorb of its own");
    let v1_bytes = bytes_of(&v1_only);
    let tag = env.cas_json("tag", &["org/m", "v1", "v1"]);
    let v2 = env.root.join("v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::copy(&shared, v2.join("shared.bin")).unwrap();
    env.write("v2/weights.bin", &cas_bench::random_bytes(3, 2 << 20));
    env.cas_json("upload", &["--repo", "org/m", s(&v2)]);

    // Delete v1's tag and branch; the root of the shared file goes too
    // (v2 still names it).
    let gone = env.cas_json("tag", &["--delete", "org/m", "v1"]);
    assert_eq!(gone["commit"], tag["commit"]);
    let mut c = bin("cas-client");
    c.current_dir(&env.root)
        .env("CAS_ENDPOINT", env.url())
        .env_remove("CAS_TOKEN")
        .args(["branch", "delete", "org/m", "v1", "--no-cache", "--json"]);
    assert_eq!(json_of(ok(c))["commit"], tag["commit"]);
    let mut rm = env.cas("rm");
    rm.arg(&shared_hash);
    ok(rm);
    env.stop();
    let all = env.xorbs();
    let all_bytes = bytes_of(&all);

    // A dry run says what would happen and changes nothing.
    let dry = env.gc(&["--dry-run"]);
    assert!(dry["report"].is_null());
    let plan = &dry["plan"];
    assert_eq!(plan["condemn"]["xorbs"], 1, "{plan}");
    assert_eq!(plan["condemn"]["bytes"], v1_bytes, "{plan}");
    assert_eq!(plan["delete"]["xorbs"], 0);
    // v1's tree and its own file.
    assert_eq!(plan["dead_files"].as_array().unwrap().len(), 2, "{plan}");
    assert_eq!(env.xorbs(), all);

    // First run: condemned, nothing deleted; the second within the grace
    // period waits.
    let first = env.gc(&[]);
    assert_eq!(first["report"]["condemned"]["xorbs"], 1);
    assert_eq!(first["report"]["deleted"]["xorbs"], 0);
    assert_eq!(first["report"]["files_removed"], 2);
    assert_eq!(env.xorbs(), all);
    let (report, clean) = env.fsck(&[]);
    assert!(clean, "{report}");

    std::thread::sleep(Duration::from_millis(1100));
    let second = env.gc(&[]);
    assert_eq!(second["report"]["deleted"]["xorbs"], 1, "{second}");
    assert_eq!(second["report"]["deleted"]["bytes"], v1_bytes);
    let left = env.xorbs();
    assert_eq!(
        all.difference(&left).cloned().collect::<BTreeSet<_>>(),
        v1_only
    );
    assert_eq!(all_bytes - bytes_of(&left), v1_bytes);
    // Nothing more to do.
    let third = env.gc(&[]);
    assert_eq!(third["plan"]["xorbs"].as_array().unwrap().len(), 0);
    let (report, clean) = env.fsck(&["--full"]);
    assert!(clean, "{report}");
    assert_eq!(report["refs"], 1);

    env.start();
    let out = env.root.join("out");
    let mut c = env.cas("fetch");
    c.args(["org/m", "-o", s(&out)]);
    ok(c);
    assert_same_tree(&v2, &out);
    let mut c = env.cas("fetch");
    c.args(["org/m@v1"]);
    assert!(!c.output().unwrap().status.success(), "v1 is gone");
}

/// Deleting a repository removes every ref; gc then frees all its xorbs.
#[test]
fn a_deleted_repository_is_collected_whole() {
    let mut env = Env::new();
    let dir = env.root.join("model");
    env.write("model/a.bin", &cas_bench::random_bytes(4, 1 << 20));
    env.cas_json("upload", &["--repo", "datasets/org/d", s(&dir)]);
    env.cas_json("tag", &["datasets/org/d", "v1"]);
    let gone = env.cas_json("delete", &["datasets/org/d"]);
    assert_eq!(gone["branches"].as_array().unwrap().len(), 1, "{gone}");
    assert_eq!(gone["tags"].as_array().unwrap().len(), 1, "{gone}");
    let mut c = env.cas("delete");
    c.arg("datasets/org/d");
    assert!(!c.output().unwrap().status.success(), "deleted once");
    env.stop();
    let all = bytes_of(&env.xorbs());
    assert!(all > 0);
    env.gc(&[]);
    std::thread::sleep(Duration::from_millis(1100));
    let r = env.gc(&[]);
    assert_eq!(r["report"]["deleted"]["bytes"], all, "{r}");
    assert!(env.xorbs().is_empty());
    assert!(env.fsck(&["--full"]).1);
}

/// fsck finds a missing xorb, and (with --full) a flipped byte, naming the
/// damaged files and repositories; repair takes them out of dedup; the
/// next upload of the same content heals them and fsck is clean again.
#[test]
fn fsck_finds_damage_repair_and_reupload_heal_it() {
    let mut env = Env::new();
    let dir = env.root.join("model");
    env.write("model/a.bin", &cas_bench::random_bytes(5, 1 << 20));
    env.write("model/b.bin", &cas_bench::random_bytes(6, 1 << 20));
    // Two uploads: two xorbs, one for each file.
    env.cas_json("upload", &["--repo", "org/m", s(&dir.join("a.bin"))]);
    let before = env.xorbs();
    env.cas_json("upload", &["--repo", "org/n", s(&dir.join("b.bin"))]);
    let b_xorbs: Vec<PathBuf> = env.xorbs().difference(&before).cloned().collect();
    let a_xorbs: Vec<PathBuf> = before.iter().cloned().collect();
    env.stop();
    assert!(env.fsck(&["--full"]).1);

    // Flip a byte near the end of a's xorb (inside a chunk's bytes).
    let victim = &a_xorbs[0];
    let mut bytes = std::fs::read(victim).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x40;
    std::fs::write(victim, &bytes).unwrap();
    let (report, clean) = env.fsck(&[]);
    assert!(clean, "a flipped byte keeps the length: {report}");
    let (report, clean) = env.fsck(&["--full"]);
    assert!(!clean);
    assert_eq!(report["problems"][0]["problem"], "corrupt_xorb", "{report}");
    assert_eq!(report["damaged_repos"], serde_json::json!(["model/org/m"]));

    // And b's xorb goes missing.
    std::fs::remove_file(&b_xorbs[0]).unwrap();
    let (report, clean) = env.fsck(&[]);
    assert!(!clean);
    assert_eq!(report["problems"][0]["problem"], "missing_xorb", "{report}");
    assert_eq!(report["damaged_repos"], serde_json::json!(["model/org/n"]));

    let repaired = json_of(ok(env.server_cmd("repair", &["--json", "--full"])));
    assert_eq!(repaired["marked_damaged"].as_array().unwrap().len(), 2);
    // Each repository's tree and file.
    assert_eq!(
        repaired["lost_files"].as_array().unwrap().len(),
        4,
        "{repaired}"
    );
    let (report, clean) = env.fsck(&["--full"]);
    assert!(!clean, "lost until uploaded again: {report}");
    let problems = report["problems"].as_array().unwrap().len() as u64;

    // The server started next reports that last (offline) fsck.
    env.start();
    let m = Metrics::fetch(&env.url());
    assert_eq!(m.get("cas_fsck_last_clean"), 0);
    assert_eq!(m.get("cas_fsck_last_problems"), problems);
    assert!(m.get("cas_fsck_last_finished_seconds") > 1_700_000_000);
    env.cas_json("upload", &["--repo", "org/m", s(&dir.join("a.bin"))]);
    env.cas_json("upload", &["--repo", "org/n", s(&dir.join("b.bin"))]);
    env.stop();
    let (report, clean) = env.fsck(&["--full"]);
    assert!(clean, "{report}");
    env.start();
    let m = Metrics::fetch(&env.url());
    assert_eq!(m.get("cas_fsck_last_clean"), 1);
    assert_eq!(m.get("cas_fsck_last_problems"), 0);
    let out = env.root.join("out");
    let mut c = env.cas("fetch");
    c.args(["org/m", "-o", s(&out)]);
    ok(c);
    assert_eq!(
        std::fs::read(out.join("a.bin")).unwrap(),
        std::fs::read(dir.join("a.bin")).unwrap()
    );
}

/// `cas-server gc --grace 1s` on the stopped store, halted after its
/// `n`-th change (`CAS_GC_HALT_AFTER`) and then killed with SIGKILL; false
/// when the run finished before making `n` changes.
fn gc_killed_after(env: &Env, n: u64) -> bool {
    let mut c = env.server_cmd("gc", &["--grace", "1s"]);
    c.env("CAS_GC_HALT_AFTER", n.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    for line in stderr.lines() {
        if line.unwrap().starts_with("gc halted after") {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "gc failed: {status}");
    false
}

/// Kills `gc` after its 1st, 2nd, ... change until a run finishes; after
/// every kill `fsck` is clean. Returns how many runs were killed.
fn kill_at_every_point(env: &Env) -> u64 {
    let mut n = 1;
    while gc_killed_after(env, n) {
        let (report, clean) = env.fsck(&[]);
        assert!(clean, "after a kill at change {n}: {report}");
        n += 1;
        assert!(n < 40, "gc never finished");
    }
    n - 1
}

/// `gc` is killed with SIGKILL at every point of its crash ordering, while
/// condemning (mark written, chunks withdrawn) and while deleting (index
/// entry, object, mark): after every kill `fsck` is clean, the next runs
/// finish the work, and the live repository fetches byte-identical.
#[test]
fn gc_killed_at_every_point_leaves_a_clean_store() {
    let mut env = Env::new();
    let v1 = env.root.join("v1");
    let before_v1 = env.xorbs();
    for (i, name) in ["a.bin", "b.bin", "c.bin"].iter().enumerate() {
        env.write(
            &format!("v1/{name}"),
            &cas_bench::random_bytes(20 + i as u64, 1 << 20),
        );
        // One upload each: a xorb each.
        env.cas_json(
            "upload",
            &["--repo", "org/k", "--branch", "v1", s(&v1.join(name))],
        );
    }
    let v1_only: BTreeSet<PathBuf> = env.xorbs().difference(&before_v1).cloned().collect();
    assert_eq!(v1_only.len(), 3, "a xorb per upload");
    let v2 = env.root.join("v2");
    env.write("v2/d.bin", &cas_bench::random_bytes(30, 1 << 20));
    env.cas_json("upload", &["--repo", "org/k", s(&v2)]);
    let mut c = bin("cas-client");
    c.current_dir(&env.root)
        .env("CAS_ENDPOINT", env.url())
        .env_remove("CAS_TOKEN")
        .args(["branch", "delete", "org/k", "v1", "--no-cache"]);
    ok(c);
    env.stop();
    let all = env.xorbs();

    // Files leave the index; then per xorb: mark, withdrawal.
    let condemning = kill_at_every_point(&env);
    assert!(condemning >= 2, "{condemning}");
    std::thread::sleep(Duration::from_millis(1100));
    // Per xorb: index entry, object, mark.
    let deleting = kill_at_every_point(&env);
    assert!(deleting >= 2, "{deleting}");
    std::thread::sleep(Duration::from_millis(1100));
    env.gc(&[]);
    let last = env.gc(&[]);
    assert_eq!(last["plan"]["xorbs"].as_array().unwrap().len(), 0, "{last}");
    let left = env.xorbs();
    assert_eq!(
        all.difference(&left).cloned().collect::<BTreeSet<_>>(),
        v1_only
    );
    let (report, clean) = env.fsck(&["--full"]);
    assert!(clean, "{report}");

    env.start();
    let out = env.root.join("out");
    let mut c = env.cas("fetch");
    c.args(["org/k", "-o", s(&out)]);
    ok(c);
    assert_same_tree(&v2, &out);
}

/// Online gc (`cas-server gc --endpoint`, admin scope) runs again and
/// again with no grace period while an upload runs whose chunks the
/// garbage shares: the dedup answers, the xorbs being uploaded and the
/// unrooted commit are leased, so the upload succeeds and fetches
/// byte-identical; the garbage only it held is freed; fsck is clean.
#[test]
fn an_upload_survives_online_gc_running_beside_it() {
    let mut env = Env::new();
    let key = env.root.join("signing.key");
    ok({
        let mut c = bin("cas-server");
        c.args(["key", "create"]).arg(&key);
        c
    });
    let args = ["--signing-key-file", s(&key), "--gc-grace", "10m"];
    env.stop();
    env.server = Some(ServerProcess::start_with(&env.data, &args));
    let writer = token(&key, &["--scope", "read", "--scope", "write"]);
    let admin = token(&key, &["--scope", "admin"]);
    let cas = |env: &Env, sub: &str| {
        let mut c = env.cas(sub);
        c.env("CAS_TOKEN", &writer);
        c
    };

    // Garbage: a.bin (which the upload below shares) and c.bin, uploaded
    // as roots and removed; a restart drops their leases.
    let model = env.root.join("model");
    let a = env.write("model/a.bin", &cas_bench::random_bytes(40, 4 << 20));
    let c_bin = env.write("garbage/c.bin", &cas_bench::random_bytes(41, 2 << 20));
    for f in [&a, &c_bin] {
        let mut c = cas(&env, "upload");
        c.args([s(f), "--json"]);
        let hash = json_of(ok(c))["roots"][0]["hash"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut rm = cas(&env, "rm");
        rm.arg(&hash);
        ok(rm);
    }
    env.write("model/b.bin", &cas_bench::random_bytes(42, 4 << 20));
    let garbage = env.xorbs();
    env.server.as_mut().unwrap().restart_with(&args);
    let url = env.url();

    let gc = |token: &str| {
        let mut c = bin("cas-server");
        c.args([
            "gc",
            "--json",
            "--grace",
            "1ms",
            "--endpoint",
            &url,
            "--token",
            token,
        ]);
        c
    };
    let denied = gc(&writer).output().unwrap();
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("403"),
        "{}",
        show(&denied)
    );

    let stop = Arc::new(AtomicBool::new(false));
    let runs = {
        let (stop, run) = (stop.clone(), gc(&admin));
        let program = run.get_program().to_owned();
        let run_args: Vec<_> = run.get_args().map(|a| a.to_owned()).collect();
        std::thread::spawn(move || {
            let mut reports = vec![];
            while !stop.load(Ordering::SeqCst) {
                let mut c = Command::new(&program);
                c.args(&run_args);
                let out = c.output().unwrap();
                if out.status.success() {
                    reports.push(json_of(out.stdout)["report"].clone());
                } else {
                    // Only "another run is in progress" may refuse one.
                    assert!(
                        String::from_utf8_lossy(&out.stderr).contains("409"),
                        "{}",
                        show(&out)
                    );
                }
            }
            reports
        })
    };
    let mut up = cas(&env, "upload");
    up.args(["--repo", "org/m", s(&model), "--json"]);
    let uploaded = up.output().unwrap();
    stop.store(true, Ordering::SeqCst);
    let reports = runs.join().unwrap();
    assert!(uploaded.status.success(), "{}", show(&uploaded));
    assert!(!reports.is_empty(), "gc ran while the upload did");

    // Two more runs: c.bin's xorb (garbage nobody shares) is condemned,
    // then deleted.
    let mut freed: u64 = reports
        .iter()
        .map(|r| r["deleted"]["bytes"].as_u64().unwrap())
        .sum();
    for _ in 0..2 {
        freed += json_of(ok(gc(&admin)))["report"]["deleted"]["bytes"]
            .as_u64()
            .unwrap();
    }
    assert!(freed > 0, "the garbage was freed");
    assert!(
        !garbage.is_subset(&env.xorbs()),
        "some garbage xorb is gone"
    );
    let metrics = ok({
        let mut c = Command::new("curl");
        c.args(["-sf", &format!("{url}/metrics")]);
        c
    });
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(metrics.contains("cas_gc_runs_total"), "{metrics}");
    assert!(
        !metrics.contains("cas_gc_bytes_freed_total 0\n"),
        "{metrics}"
    );

    let out = env.root.join("out");
    let mut c = cas(&env, "fetch");
    c.args(["org/m", "-o", s(&out)]);
    ok(c);
    assert_same_tree(&model, &out);
    env.stop();
    let (report, clean) = env.fsck(&["--full"]);
    assert!(clean, "{report}");
}
