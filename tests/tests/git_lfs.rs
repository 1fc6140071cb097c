//! Git LFS with Debian's stock `git` and `git-lfs` against the real
//! `cas-server` (with a signing key, so every call needs a token): a bare
//! repository on disk keeps the git objects, `lfs.url` (a committed
//! `.lfsconfig`) points git-lfs at the server, git's credential helper
//! holds the token. Versions 1 and 2 of a generated model (safetensors
//! shards, a tensor retrained in v2) are pushed and cloned into fresh
//! directories byte-identical; a corrupted object is refused. Then the
//! same through `cas-client lfs-agent` (git-lfs's custom transfer,
//! standalone): v2's push sends about the changed bytes where the basic
//! transfer sends the changed file whole, and each failure is answered as
//! the protocol's error object.

use std::path::{Path, PathBuf};
use std::process::Command;

use cas_e2e::client;
use cas_e2e::{bin, ok, show, Metrics};

/// The model's size: four 16 MiB tensors in two shards; v2 retrains one.
const MODEL_BYTES: u64 = 64 << 20;
const SHARD_BYTES: u64 = 32 << 20;
const CHANGED_BYTES: u64 = cas_bench::model::TENSOR_BYTES;

/// A server with a signing key and an isolated git environment (its own
/// `$HOME`, no system config, never a prompt).
struct Setup {
    base: client::Env,
    home: PathBuf,
}

impl std::ops::Deref for Setup {
    type Target = client::Env;
    fn deref(&self) -> &client::Env {
        &self.base
    }
}

impl Setup {
    fn new() -> Self {
        let base = client::Env::with_tokens();
        let home = base.root.join("home");
        std::fs::create_dir(&home).unwrap();
        let s = Self { base, home };
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
        self.isolate(&mut c, dir);
        c.args(args);
        c
    }

    /// `cas-client ARGS` in `dir`, in the same environment as git (so it
    /// finds git's config and credentials).
    fn cas(&self, dir: &Path, args: &[&str]) -> Command {
        let mut c = bin("cas-client");
        self.isolate(&mut c, dir);
        c.args(args);
        c
    }

    /// Runs `c` in `dir` with this test's `$HOME`, no system git config,
    /// no prompts, and a chunk cache of its own.
    fn isolate(&self, c: &mut Command, dir: &Path) {
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
            .env("CAS_CACHE_DIR", self.root.join("cache"))
            .env("CAS_RETRIES", "1");
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

    /// A token with these scopes (`read`, `write`).
    fn token_for(&self, scopes: &[&str]) -> String {
        let args: Vec<&str> = scopes.iter().flat_map(|s| ["--scope", *s]).collect();
        self.base.token(&args)
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
    s.credentials(&s.token_for(&["read", "write"]));
    let work = s.work_repo("basic");

    let before = s.bytes_in();
    ok(s.push_version(&work, 1));
    let v1_in = s.bytes_in() - before;
    assert!(v1_in >= MODEL_BYTES, "v1 sent {v1_in} bytes");
    // Cloned with a read-only token.
    s.credentials(&s.token_for(&["read"]));
    assert_same_model(&work, &s.clone("basic", "clone1"));

    s.credentials(&s.token_for(&["read", "write"]));
    let before = s.bytes_in();
    ok(s.push_version(&work, 2));
    let v2_in = s.bytes_in() - before;
    // Basic transfer sends every changed file whole: the shard holding
    // the retrained tensor.
    eprintln!("basic: v1 sent {v1_in} bytes, v2 {v2_in} ({CHANGED_BYTES} changed)");
    assert!(
        (SHARD_BYTES..SHARD_BYTES + (1 << 20)).contains(&v2_in),
        "v2 sent {v2_in} bytes, changed {CHANGED_BYTES}"
    );
    s.credentials(&s.token_for(&["read"]));
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
    s.credentials(&s.token_for(&["read"]));
    let out = s.git(&work, &["push", "origin", "main"]).output().unwrap();
    assert!(!out.status.success(), "{}", show(&out));

    // The local object rots: same size, other bytes, under the same OID.
    s.credentials(&s.token_for(&["read", "write"]));
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
        .header(
            "Authorization",
            format!("Bearer {}", s.token_for(&["read"])),
        )
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

/// Runs `cas-client lfs-agent` in `dir` with `input` on stdin; returns
/// its exit success and stdout's messages.
fn agent_session(s: &Setup, dir: &Path, input: &str) -> (bool, Vec<serde_json::Value>) {
    use std::io::Write;
    let mut c = s.cas(dir, &["lfs-agent"]);
    let mut child = c
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let lines = String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {}", show(&out))))
        .collect();
    (out.status.success(), lines)
}

#[test]
fn the_agent_pushes_only_new_chunks_and_clones_byte_identical() {
    let s = Setup::new();
    s.credentials(&s.token_for(&["read", "write"]));
    let work = s.work_repo("smart");
    // This repository only (its lfs.url comes from .lfsconfig).
    let out = ok(s.cas(&work, &["lfs-agent", "install", "--local"]));
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("standalonetransferagent cas"), "{out}");

    let before = s.bytes_in();
    ok(s.push_version(&work, 1));
    let v1_in = s.bytes_in() - before;
    let m = Metrics::fetch(&s.server.url);
    assert_eq!(
        m.requests("lfs_upload"),
        0,
        "no basic PUT: the agent sent v1"
    );
    assert!(m.requests("shard") > 0, "the agent committed shards");
    assert!(v1_in > MODEL_BYTES / 2, "v1 sent {v1_in} bytes");

    // Every repository of this server, for the clones.
    ok(s.cas(
        &s.root,
        &["lfs-agent", "install", "--endpoint", &s.server.url],
    ));
    s.credentials(&s.token_for(&["read"]));
    assert_same_model(&work, &s.clone("smart", "clone1"));

    s.credentials(&s.token_for(&["read", "write"]));
    let before = s.bytes_in();
    ok(s.push_version(&work, 2));
    let v2_in = s.bytes_in() - before;
    // Only the retrained tensor's chunks travel (plus chunk queries and
    // a shard), not its whole 32 MiB file as with the basic transfer.
    eprintln!("agent: v1 sent {v1_in} bytes, v2 {v2_in} ({CHANGED_BYTES} changed)");
    assert!(
        v2_in <= CHANGED_BYTES * 3 / 2 + (1 << 20),
        "v2 sent {v2_in} bytes for {CHANGED_BYTES} changed"
    );
    assert!(v2_in < SHARD_BYTES, "less than the changed file");
    s.credentials(&s.token_for(&["read"]));
    let clone2 = s.clone("smart", "clone2");
    assert_same_model(&work, &clone2);
    let m = Metrics::fetch(&s.server.url);
    assert_eq!(m.requests("lfs_upload"), 0);
    assert_eq!(m.requests("signed_content_get"), 0, "no basic download");
}

#[test]
fn the_agent_answers_every_failure_as_a_protocol_error() {
    let s = Setup::new();
    s.credentials(&s.token_for(&["read", "write"]));
    let work = s.work_repo("errs");
    let missing = "0".repeat(64);
    let file = s.root.join("f.bin");
    std::fs::write(&file, b"some bytes").unwrap();
    let real = cas_protocol::Sha256::of(b"some bytes").to_string();
    let f = file.to_str().unwrap();

    // Uploads: a file that is not its object id, a size that is not the
    // file's, a missing file; then a good one.
    let (ok_exit, lines) = agent_session(
        &s,
        &work,
        &format!(
            "{{\"event\":\"init\",\"operation\":\"upload\"}}\n\
             {{\"event\":\"upload\",\"oid\":\"{missing}\",\"size\":10,\"path\":\"{f}\"}}\n\
             {{\"event\":\"upload\",\"oid\":\"{real}\",\"size\":11,\"path\":\"{f}\"}}\n\
             {{\"event\":\"upload\",\"oid\":\"{real}\",\"size\":10,\"path\":\"/nonexistent\"}}\n\
             {{\"event\":\"upload\",\"oid\":\"{real}\",\"size\":10,\"path\":\"{f}\"}}\n\
             {{\"event\":\"terminate\"}}\n"
        ),
    );
    assert!(ok_exit);
    let errors: Vec<u64> = lines[1..4]
        .iter()
        .map(|l| l["error"]["code"].as_u64().unwrap())
        .collect();
    assert_eq!(errors, [409, 409, 400], "{lines:?}");
    assert!(lines[1]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not its object id"));
    assert_eq!(lines.last().unwrap()["event"], "complete");
    assert!(lines.last().unwrap().get("error").is_none(), "{lines:?}");

    // Downloads: a missing object fails alone; the session goes on.
    let (ok_exit, lines) = agent_session(
        &s,
        &work,
        &format!(
            "{{\"event\":\"init\",\"operation\":\"download\",\"concurrent\":true,\"concurrenttransfers\":3}}\n\
             {{\"event\":\"download\",\"oid\":\"{missing}\",\"size\":10,\"action\":null}}\n\
             {{\"event\":\"upload\",\"oid\":\"{real}\",\"size\":10,\"path\":\"{f}\"}}\n\
             {{\"event\":\"terminate\"}}\n"
        ),
    );
    assert!(ok_exit);
    assert_eq!(lines[0], serde_json::json!({}));
    assert_eq!(lines[1]["error"]["code"], 404, "{}", lines[1]);
    assert!(lines[1]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not stored"));
    assert_eq!(lines[2]["error"]["code"], 400, "{}", lines[2]);

    // A read-only token cannot upload: the server's refusal, per object.
    s.credentials(&s.token_for(&["read"]));
    let (_, lines) = agent_session(
        &s,
        &work,
        &format!(
            "{{\"event\":\"init\",\"operation\":\"upload\"}}\n\
             {{\"event\":\"upload\",\"oid\":\"{real}\",\"size\":10,\"path\":\"{f}\"}}\n"
        ),
    );
    assert_eq!(lines[1]["error"]["code"], 403, "{lines:?}");
    assert!(lines[1]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("write"));

    // Junk after init: a non-zero exit (git-lfs reports it).
    let (ok_exit, _) = agent_session(
        &s,
        &work,
        "{\"event\":\"init\",\"operation\":\"upload\"}\nnot json\n",
    );
    assert!(!ok_exit);

    // No LFS endpoint anywhere: init succeeds, each transfer says why.
    let bare = s.root.join("not-a-repo");
    std::fs::create_dir(&bare).unwrap();
    let (_, lines) = agent_session(
        &s,
        &bare,
        &format!(
            "{{\"event\":\"init\",\"operation\":\"download\"}}\n\
             {{\"event\":\"download\",\"oid\":\"{real}\",\"size\":10}}\n"
        ),
    );
    assert!(
        lines[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("lfs.url"),
        "{lines:?}"
    );
}

/// The processes below `pid` (children, theirs, ...) whose name is `comm`.
fn descendants_named(pid: u32, comm: &str) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32, String)> = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let ppid = stat[close + 2..]
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if let (Ok(p), Some(pp)) = (stat[..open].trim().parse::<u32>(), ppid) {
            parent_of.push((p, pp, stat[open + 1..close].to_owned()));
        }
    }
    let mut below = vec![pid];
    let mut i = 0;
    while i < below.len() {
        let p = below[i];
        below.extend(
            parent_of
                .iter()
                .filter(|(_, pp, _)| *pp == p)
                .map(|(c, _, _)| *c),
        );
        i += 1;
    }
    parent_of
        .iter()
        .filter(|(p, _, c)| c == comm && below[1..].contains(p))
        .map(|(p, _, _)| *p)
        .collect()
}

#[test]
fn an_agent_killed_mid_push_resumes_without_sending_or_storing_twice() {
    // Incompressible, so bytes sent and stored are the file's: three
    // xorbs of the client's (64 MiB each at most).
    const FILE_BYTES: usize = 160 << 20;
    let s = Setup::new();
    let token = s.token_for(&["read", "write"]);
    s.credentials(&token);
    let work = s.work_repo("resume");
    let data = cas_e2e::noise(41, FILE_BYTES);
    std::fs::write(work.join("w.safetensors"), &data).unwrap();
    ok(s.git(&work, &["add", "-A"]));
    ok(s.git(&work, &["commit", "-q", "-m", "w"]));
    // The push goes through a gate that holds the second xorb PUT; this
    // repository's lfs.url names the gate, and the agent serves it.
    let gate = client::Gate::holding_nth(&s.server, "PUT /v1/xorbs/", 2);
    let gate_lfs = format!("{}/org/resume.git/info/lfs", gate.url);
    ok(s.git(&work, &["config", "lfs.url", &gate_lfs]));
    ok(s.cas(&work, &["lfs-agent", "install", "--local"]));
    let push = |what: &str| {
        let mut c = s.git(&work, &["push", "-q", "origin", "main"]);
        c.env("CAS_TOKEN", &token);
        eprintln!("{what}");
        c
    };
    let metrics = || Metrics::fetch(&s.server.url);

    let first = push("first push")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        gate.wait_stalled(std::time::Duration::from_secs(300)),
        "the second xorb PUT never came"
    );
    // The first xorb's PUT may still be streaming beside the held one.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while metrics().get("cas_xorbs") < 1 {
        assert!(
            std::time::Instant::now() < until,
            "the first xorb was never stored"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // git-lfs starts lfs.concurrenttransfers agents (8); one has the
    // object. All die.
    let agents = descendants_named(first.id(), "cas-client");
    assert!(!agents.is_empty(), "no agent under git push");
    let mut kill = Command::new("kill");
    kill.arg("-9").args(agents.iter().map(u32::to_string));
    ok(kill);
    gate.release();
    let out = first.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    let m = metrics();
    let (sent1, stored1) = (m.get("cas_bytes_in_total"), m.get("cas_stored_bytes"));
    assert_eq!(m.get("cas_xorbs"), 1, "only the first xorb got through");
    assert!(stored1 >= 32 << 20, "the first xorb holds {stored1} bytes");

    // Pushed again: the stored xorb's chunks are not sent again.
    ok(push("second push"));
    let m = metrics();
    let sent2 = m.get("cas_bytes_in_total") - sent1;
    let stored = m.get("cas_stored_bytes");
    let file = FILE_BYTES as u64;
    eprintln!("first push sent {sent1} bytes ({stored1} stored), the second {sent2}; {stored} stored in all");
    assert!(
        sent2 <= file - stored1 + (1 << 20),
        "the second push sent {sent2} bytes, {stored1} of {file} being stored"
    );
    assert!(
        (file..file + file / 100).contains(&stored),
        "{stored} bytes stored for a {file}-byte file"
    );
    // Cloned (basic transfer, through .lfsconfig's lfs.url) byte-identical.
    s.credentials(&s.token_for(&["read"]));
    let clone = s.clone("resume", "clone");
    cas_e2e::assert_same_bytes(&data, &clone.join("w.safetensors"));
}
