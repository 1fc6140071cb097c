//! What a hash names and what the server keeps about it, with the real
//! binaries: the file/tree kind is recorded (a regular file that looks like
//! a tree stays a file), a committed file's SHA-256 cannot be changed by a
//! later shard (and a false first record is corrected by the bytes), and a
//! missing or corrupt xorb is repaired by uploading its content again.

use std::path::{Path, PathBuf};
use std::process::Command;

use cas_e2e::client;
use cas_e2e::{assert_same_bytes, fails, json_of, ok, Metrics};
use cas_protocol::tree::{Tree, TreeEntry};
use cas_protocol::{FileHash, Kind, Message, Sha256};

/// The shared environment ([`client::Env`]) plus this file's helpers.
struct Env(client::Env);

impl std::ops::Deref for Env {
    type Target = client::Env;
    fn deref(&self) -> &client::Env {
        &self.0
    }
}

impl Env {
    fn new() -> Self {
        Self(client::Env::start())
    }

    /// `cas-client SUB`, without retries: these tests expect failures.
    fn cas(&self, sub: &str) -> Command {
        self.client(None, 0, &[sub])
    }

    /// Uploads `path` with the client; the `--json` report.
    fn upload(&self, path: &Path) -> serde_json::Value {
        let mut c = self.cas("upload");
        c.arg("--json").arg(path);
        json_of(ok(c))
    }

    fn write(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.root.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    fn fetch(&self, hash: &str, dest: &Path) -> Command {
        let mut c = self.cas("fetch");
        c.args(["--force", hash, "-o"]).arg(dest);
        c
    }

    fn stat(&self, hash: &str) -> serde_json::Value {
        let mut c = self.cas("stat");
        c.args(["--json", hash]);
        json_of(ok(c))
    }

    fn damaged(&self) -> u64 {
        Metrics::fetch(&self.server.url).get("cas_xorbs_damaged_total")
    }

    fn xorb_files(&self) -> Vec<PathBuf> {
        let top = self.server.data_dir.join("objects/xorbs");
        let mut out: Vec<PathBuf> = std::fs::read_dir(top)
            .unwrap()
            .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
            .map(|e| e.unwrap().path())
            .collect();
        out.sort();
        out
    }
}

fn root_hash(report: &serde_json::Value) -> String {
    report["roots"][0]["hash"].as_str().unwrap().to_owned()
}

/// A regular file holding the exact bytes of a valid tree listing is a
/// file: stat says so and fetch gives its bytes back (it was sniffed as a
/// tree before, and could never be fetched or stat'ed).
#[test]
fn a_file_that_looks_like_a_tree_stays_a_file() {
    let env = Env::new();
    let listing = Tree::new(vec![TreeEntry {
        path: "weights.bin".into(),
        mode: 0o644,
        size: 3,
        file: FileHash::from_bytes([9; 32]),
    }])
    .to_bytes();
    assert!(listing.starts_with(b"CTRE"));
    let path = env.write("looks-like-a-tree", &listing);
    let report = env.upload(&path);
    let hash = root_hash(&report);
    assert_eq!(report["roots"][0]["tree"], false);
    assert_eq!(env.stat(&hash)["kind"], "file");
    let out = env.root.join("out");
    ok(env.fetch(&hash, &out));
    assert_same_bytes(&listing, &out);

    // A directory is recorded as a tree, under another hash than any file.
    let dir = env.root.join("dir");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a"), b"abc").unwrap();
    let tree = root_hash(&env.upload(&dir));
    assert_eq!(env.stat(&tree)["kind"], "tree");
    let copy = env.root.join("copy");
    ok(env.fetch(&tree, &copy));
    assert_same_bytes(b"abc", &copy.join("a"));
}

/// Once committed, a file's SHA-256 is fixed: a shard claiming another one
/// is refused and every fetch still works. A false claim that came first is
/// corrected by the first true one (the server computes it from the bytes).
/// Until then a fetch delivers the right bytes (the file hash is checked),
/// and `--verify-sha256` refuses the file, alone or in a tree.
#[test]
fn a_forged_sha256_cannot_break_a_file() {
    let env = Env::new();
    let data = cas_bench::random_bytes(7, 3_000_000);
    let url = env.server.url.clone();
    let forge = |_: &[u8]| Sha256::of(b"forged");

    // Honest first, then a forger with a write token.
    let path = env.write("honest.bin", &data);
    let hash = root_hash(&env.upload(&path));
    let err = cas_e2e::upload_with(&url, &[&data], Kind::File, forge).unwrap_err();
    assert!(err.contains("sha256_mismatch"), "{err}");
    let out = env.root.join("out");
    ok(env.fetch(&hash, &out));
    assert_same_bytes(&data, &out);

    // Forger first, then the honest upload corrects the record.
    let other = cas_bench::random_bytes(8, 2_000_000);
    let forged = cas_e2e::upload_with(&url, &[&other], Kind::File, forge).unwrap();
    let forged_hash = forged.files[0].to_string();
    assert_eq!(
        env.stat(&forged_hash)["sha256"],
        Sha256::of(b"forged").to_string()
    );
    ok(env.fetch(&forged_hash, &out));
    assert_same_bytes(&other, &out);
    let verified = |hash: &str, dest: &Path| {
        let mut c = env.fetch(hash, dest);
        c.arg("--verify-sha256");
        c
    };
    std::fs::remove_file(&out).unwrap();
    let err = fails(verified(&forged_hash, &out));
    assert!(err.contains("SHA-256"), "{err}");
    assert!(!out.exists(), "a refused file was put in place");
    // The same file in a tree goes through the small-file batches (a tree
    // uploaded as a listing: uploading the file would correct its record).
    let listing = Tree::new(vec![TreeEntry {
        path: "other.bin".into(),
        mode: 0o644,
        size: other.len() as u64,
        file: forged.files[0],
    }])
    .to_bytes();
    let tree = cas_e2e::upload_with(&url, &[&listing], Kind::Tree, Sha256::of)
        .unwrap()
        .files[0]
        .to_string();
    let restored = env.root.join("restored");
    let err = fails(verified(&tree, &restored));
    assert!(err.contains("SHA-256"), "{err}");
    assert!(!restored.join("other.bin").exists());
    let path = env.write("other.bin", &other);
    assert_eq!(root_hash(&env.upload(&path)), forged_hash);
    assert_eq!(
        env.stat(&forged_hash)["sha256"],
        Sha256::of(&other).to_string()
    );
    ok(verified(&forged_hash, &out));
    assert_same_bytes(&other, &out);
    ok(verified(&tree, &restored));
    assert_same_bytes(&other, &restored.join("other.bin"));
}

/// A xorb whose object disappeared: reads of files that need it say so,
/// it leaves dedup, a new upload sharing its chunks is readable, and
/// uploading the original file again repairs it.
#[test]
fn a_missing_xorb_is_repaired_by_uploading_again() {
    let env = Env::new();
    let data = cas_bench::random_bytes(11, 4_000_000);
    let path = env.write("data.bin", &data);
    let hash = root_hash(&env.upload(&path));
    let xorbs = env.xorb_files();
    assert_eq!(xorbs.len(), 1);
    std::fs::remove_file(&xorbs[0]).unwrap();

    let out = env.root.join("out");
    let err = fails(env.fetch(&hash, &out));
    assert!(err.contains("damaged"), "{err}");
    assert!(!out.exists());
    assert_eq!(env.damaged(), 1);

    // A new file sharing every chunk commits and reads back whole.
    let mut longer = data.clone();
    longer.extend_from_slice(&cas_bench::random_bytes(12, 100_000));
    let p2 = env.write("longer.bin", &longer);
    let r2 = env.upload(&p2);
    assert!(
        r2["new_bytes"].as_u64().unwrap() >= data.len() as u64,
        "{r2}"
    );
    let out2 = env.root.join("out2");
    ok(env.fetch(&root_hash(&r2), &out2));
    assert_same_bytes(&longer, &out2);

    // The original, uploaded again, is readable again.
    assert_eq!(root_hash(&env.upload(&path)), hash);
    ok(env.fetch(&hash, &out));
    assert_same_bytes(&data, &out);
    assert_eq!(env.damaged(), 1, "counted once");
}

/// A flipped byte in a stored xorb: the client's fetch fails verification
/// and reports it, the server checks its copy and takes it out of dedup,
/// and the next upload of the file sends its bytes again and heals it.
#[test]
fn a_corrupt_xorb_is_reported_and_repaired() {
    let env = Env::new();
    let data = cas_bench::random_bytes(21, 3_000_000);
    let path = env.write("data.bin", &data);
    let hash = root_hash(&env.upload(&path));
    let xorb = env.xorb_files().remove(0);
    let mut bytes = std::fs::read(&xorb).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&xorb, &bytes).unwrap();

    let out = env.root.join("out");
    let err = fails(env.fetch(&hash, &out));
    assert!(err.contains("failed verification"), "{err}");
    assert_eq!(env.damaged(), 1, "the client's report was checked");

    let again = env.upload(&path);
    assert!(
        again["new_bytes"].as_u64().unwrap() >= data.len() as u64,
        "the damaged chunks are sent again: {again}"
    );
    ok(env.fetch(&hash, &out));
    assert_same_bytes(&data, &out);
}

/// A report about a healthy xorb changes nothing (a reader cannot take
/// good data out of dedup by lying).
#[test]
fn a_false_report_changes_nothing() {
    let env = Env::new();
    let data = cas_bench::random_bytes(31, 1_000_000);
    let path = env.write("data.bin", &data);
    let hash = root_hash(&env.upload(&path));
    let xorb = env.xorb_files()[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let (status, body) = cas_e2e::body(
        cas_e2e::agent()
            .post(format!("{}/v1/xorbs/{xorb}/check", env.server.url))
            .send_empty()
            .unwrap(),
    );
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(env.damaged(), 0);
    let again = env.upload(&path);
    assert_eq!(again["new_bytes"], 0, "still deduplicated: {again}");
    let out = env.root.join("out");
    ok(env.fetch(&hash, &out));
    assert_same_bytes(&data, &out);
}
