//! Git LFS with Debian's stock `git` and `git-lfs` against the real
//! `cas-server` (with a signing key, so every call needs a token): a bare
//! repository on disk keeps the git objects, `lfs.url` (a committed
//! `.lfsconfig`) points git-lfs at the server, git's credential helper
//! holds the token. Versions 1 and 2 of a generated model (safetensors
//! shards, a tensor retrained in v2) are pushed and cloned into fresh
//! directories byte-identical; a corrupted object is refused.

use std::path::{Path, PathBuf};
use std::process::Command;

use cas_e2e::{bin, ok, show, token, Metrics, ServerProcess};

/// The model's size: four 16 MiB tensors in two shards; v2 retrains one.
const MODEL_BYTES: u64 = 64 << 20;
const SHARD_BYTES: u64 = 32 << 20;
const CHANGED_BYTES: u64 = cas_bench::model::TENSOR_BYTES;

/// A server with a signing key and an isolated git environment (its own
/// `$HOME`, no system config, never a prompt).
struct Setup {
    server: ServerProcess,
    root: PathBuf,
    key: PathBuf,
    home: PathBuf,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let data = root.join("server");
        std::fs::create_dir(&data).unwrap();
        let key = root.join("signing.key");
        let mut c = bin("cas-server");
        c.args(["key", "create"]).arg(&key);
        ok(c);
        let server =
            ServerProcess::start_with(&data, &["--signing-key-file", key.to_str().unwrap()]);
        let home = root.join("home");
        std::fs::create_dir(&home).unwrap();
        let s = Self {
            server,
            root,
            key,
            home,
            _dir: dir,
        };
        // The clean/smudge filters for every repository of this $HOME, and
        // the credentials from a file (written by `credentials`).
        ok(s.git(&s.root, &["lfs", "install", "--skip-repo"]));
        let store = format!("store --file={}", s.root.join("credentials").display());
        ok(s.git(
            &s.root,
            &["config", "--global", "credential.helper", &store],
        ));
        for (k, v) in [("user.name", "Tester"), ("user.email", "t@example.com")] {
            ok(s.git(&s.root, &["config", "--global", k, v]));
        }
        s
    }

    /// `git ARGS` in `dir` with the isolated environment.
    fn git(&self, dir: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("git");
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("GIT_") || k.starts_with("CAS_") {
                c.env_remove(k);
            }
        }
        c.current_dir(dir)
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .args(args);
        c
    }

    /// The LFS endpoint of repository `org/NAME`.
    fn lfs_url(&self, name: &str) -> String {
        format!("{}/org/{name}.git/info/lfs", self.server.url)
    }

    /// git's credential store answers `token` for the server.
    fn credentials(&self, token: &str) {
        let url = self
            .server
            .url
            .replacen("http://", &format!("http://git:{token}@"), 1);
        std::fs::write(self.root.join("credentials"), format!("{url}\n")).unwrap();
    }

    fn token(&self, scopes: &[&str]) -> String {
        let args: Vec<&str> = scopes.iter().flat_map(|s| ["--scope", *s]).collect();
        token(&self.key, &args)
    }

    fn bytes_in(&self) -> u64 {
        Metrics::fetch(&self.server.url).get("cas_bytes_in_total")
    }

    /// A working repository for model `name` with a bare `origin`: LFS
    /// tracks `*.safetensors`, `.lfsconfig` names the server.
    fn work_repo(&self, name: &str) -> PathBuf {
        let origin = self.root.join(format!("{name}.git"));
        ok(self.git(
            &self.root,
            &[
                "init",
                "-q",
                "--bare",
                "-b",
                "main",
                origin.to_str().unwrap(),
            ],
        ));
        let work = self.root.join(format!("{name}-work"));
        ok(self.git(
            &self.root,
            &["init", "-q", "-b", "main", work.to_str().unwrap()],
        ));
        ok(self.git(&work, &["lfs", "install", "--local"]));
        ok(self.git(&work, &["lfs", "track", "*.safetensors"]));
        let lfsconfig = work.join(".lfsconfig");
        ok(self.git(
            &work,
            &[
                "config",
                "-f",
                lfsconfig.to_str().unwrap(),
                "lfs.url",
                &self.lfs_url(name),
            ],
        ));
        ok(self.git(
            &work,
            &["remote", "add", "origin", origin.to_str().unwrap()],
        ));
        work
    }

    /// Writes model `version` into `work`, commits and pushes it.
    fn push_version(&self, work: &Path, version: u32) -> Command {
        cas_bench::model::write_model(work, MODEL_BYTES, SHARD_BYTES, version, 7).unwrap();
        ok(self.git(work, &["add", "-A"]));
        ok(self.git(work, &["commit", "-q", "-m", &format!("v{version}")]));
        self.git(work, &["push", "-q", "origin", "main"])
    }

    /// Clones `name` into a fresh directory.
    fn clone(&self, name: &str, into: &str) -> PathBuf {
        let dest = self.root.join(into);
        let origin = self.root.join(format!("{name}.git"));
        ok(self.git(
            &self.root,
            &[
                "clone",
                "-q",
                origin.to_str().unwrap(),
                dest.to_str().unwrap(),
            ],
        ));
        dest
    }
}

/// The model files of `dir` (safetensors and config), sorted by name.
fn model_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors") || n == "config.json")
        .map(|n| {
            let data = std::fs::read(dir.join(&n)).unwrap();
            (n, data)
        })
        .collect();
    files.sort();
    files
}

/// `clone` holds exactly the model files of `work`, real content (not
/// LFS pointers).
fn assert_same_model(work: &Path, clone: &Path) {
    let (want, got) = (model_files(work), model_files(clone));
    assert_eq!(want.len(), 3, "two shards and a config");
    let names = |f: &[(String, Vec<u8>)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&want), names(&got));
    for ((name, w), (_, g)) in want.iter().zip(&got) {
        assert!(
            w == g,
            "{name}: {} bytes expected, got {} different ones (starting {:?})",
            w.len(),
            g.len(),
            String::from_utf8_lossy(&g[..g.len().min(60)])
        );
    }
}

#[test]
fn basic_transfer_pushes_and_clones_two_versions_byte_identical() {
    let s = Setup::new();
    s.credentials(&s.token(&["read", "write"]));
    let work = s.work_repo("basic");

    let before = s.bytes_in();
    ok(s.push_version(&work, 1));
    let v1_in = s.bytes_in() - before;
    assert!(v1_in >= MODEL_BYTES, "v1 sent {v1_in} bytes");
    // Cloned with a read-only token.
    s.credentials(&s.token(&["read"]));
    assert_same_model(&work, &s.clone("basic", "clone1"));

    s.credentials(&s.token(&["read", "write"]));
    let before = s.bytes_in();
    ok(s.push_version(&work, 2));
    let v2_in = s.bytes_in() - before;
    // Basic transfer sends every changed file whole: the shard holding
    // the retrained tensor.
    assert!(
        (SHARD_BYTES..SHARD_BYTES + (1 << 20)).contains(&v2_in),
        "v2 sent {v2_in} bytes, changed {CHANGED_BYTES}"
    );
    s.credentials(&s.token(&["read"]));
    let clone2 = s.clone("basic", "clone2");
    assert_same_model(&work, &clone2);
    assert!(std::fs::read(clone2.join("config.json"))
        .unwrap()
        .ends_with(b"\"version\": 2}\n"));
}

#[test]
fn a_corrupted_object_and_a_read_token_are_refused() {
    let s = Setup::new();
    let work = s.work_repo("bad");
    std::fs::write(work.join("w.safetensors"), vec![7u8; 100_000]).unwrap();
    ok(s.git(&work, &["add", "-A"]));
    ok(s.git(&work, &["commit", "-q", "-m", "w"]));
    let oid = cas_protocol::Sha256::of(&vec![7u8; 100_000]).to_string();

    // A read-only token may not upload.
    s.credentials(&s.token(&["read"]));
    let out = s.git(&work, &["push", "origin", "main"]).output().unwrap();
    assert!(!out.status.success(), "{}", show(&out));

    // The local object rots: same size, other bytes, under the same OID.
    s.credentials(&s.token(&["read", "write"]));
    let object = work.join(format!(
        ".git/lfs/objects/{}/{}/{oid}",
        &oid[..2],
        &oid[2..4]
    ));
    let mut rotten = std::fs::read(&object).unwrap();
    rotten[50_000] ^= 1;
    std::fs::write(&object, &rotten).unwrap();
    let out = s.git(&work, &["push", "origin", "main"]).output().unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("hash to"), "{stderr}");
    // Nothing was stored under the OID: a download batch finds nothing.
    let batch = cas_e2e::agent()
        .post(format!("{}/objects/batch", s.lfs_url("bad")))
        .header("Authorization", format!("Bearer {}", s.token(&["read"])))
        .header("Content-Type", "application/vnd.git-lfs+json")
        .send(
            serde_json::json!({"operation": "download",
                "objects": [{"oid": oid, "size": 100_000}]})
            .to_string(),
        )
        .unwrap();
    let (status, body) = cas_e2e::body(batch);
    assert_eq!(status, 200);
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["objects"][0]["error"]["code"], 404, "{answer}");
}
