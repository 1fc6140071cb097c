//! Lifecycle end to end, through the real binaries: deleting tags,
//! branches, repositories and roots; `cas-server gc` (dry run, two-phase
//! deletion after the grace period) freeing exactly the bytes of what only
//! the deleted names referenced; `fsck` finding missing and corrupt xorbs;
//! `repair`, a re-upload, and a clean `fsck` again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cas_e2e::client::{assert_same_tree, cas_as};
use cas_e2e::{bin, json_of, ok, show, ServerProcess};
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

    env.start();
    env.cas_json("upload", &["--repo", "org/m", s(&dir.join("a.bin"))]);
    env.cas_json("upload", &["--repo", "org/n", s(&dir.join("b.bin"))]);
    env.stop();
    let (report, clean) = env.fsck(&["--full"]);
    assert!(clean, "{report}");
    env.start();
    let out = env.root.join("out");
    let mut c = env.cas("fetch");
    c.args(["org/m", "-o", s(&out)]);
    ok(c);
    assert_eq!(
        std::fs::read(out.join("a.bin")).unwrap(),
        std::fs::read(dir.join("a.bin")).unwrap()
    );
}
