//! The Hugging Face Hub–compatible API through the stock client: the real
//! `cas-server`, a model repository with two commits and a tag (and a
//! dataset) uploaded by the real `cas-client`, and the pinned
//! `huggingface_hub` (`CAS_HF_VENV`, from `scripts/setup-python`) with
//! `HF_ENDPOINT` pointed at the server: every `HfApi` call the Hub API
//! subset serves, `snapshot_download` by branch, tag and commit (with
//! `allow_patterns`), `hf_hub_download` resumed by `Range` after a cut
//! connection, `hf download`, the client's typed exceptions (missing
//! repository, revision, file; missing, bad or insufficient token), and
//! curl, wget and aria2c on a resolve URL.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cas_e2e::hub::{assert_same_files, files_under, Hf};
use cas_e2e::{agent, bin, body, json_of, ok, show, token, Metrics, ServerProcess};
use cas_protocol::Sha256;
use serde_json::{json, Value};

type Files = BTreeMap<String, Vec<u8>>;

/// A server (with a signing key or without), a scratch directory and the
/// client commands and tokens that go with it.
struct Hub {
    server: ServerProcess,
    root: PathBuf,
    key: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Hub {
    fn new() -> Self {
        Self::start(false, &[])
    }

    /// With a signing key, `extra` server flags.
    fn start(keyed: bool, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let data = root.join("server");
        std::fs::create_dir(&data).unwrap();
        let key = keyed.then(|| {
            let key = root.join("signing.key");
            let mut c = bin("cas-server");
            c.args(["key", "create"]).arg(&key);
            ok(c);
            key
        });
        let mut args: Vec<&str> = extra.to_vec();
        if let Some(k) = &key {
            args.extend(["--signing-key-file", k.to_str().unwrap()]);
        }
        let server = ServerProcess::start_with(&data, &args);
        Self {
            server,
            root,
            key,
            _dir: dir,
        }
    }

    fn url(&self) -> &str {
        &self.server.url
    }

    fn token(&self, args: &[&str]) -> String {
        token(self.key.as_ref().expect("a keyed server"), args)
    }

    /// A write token when the server checks tokens.
    fn writer(&self) -> Option<String> {
        self.key
            .as_ref()
            .map(|_| self.token(&["--scope", "write", "--scope", "read"]))
    }

    /// `cas-client ARGS...` against the server, as author `tester`.
    fn cas(&self, args: &[&str]) -> Command {
        let mut c = bin("cas-client");
        for k in ["CAS_TOKEN", "CAS_AUTHOR", "CAS_LOG", "CAS_CACHE_DIR"] {
            c.env_remove(k);
        }
        c.current_dir(&self.root)
            .env("CAS_ENDPOINT", self.url())
            .env("CAS_AUTHOR", "tester")
            .env("CAS_RETRIES", "1")
            .args(args)
            .arg("--no-cache");
        if let Some(t) = self.writer() {
            c.env("CAS_TOKEN", t);
        }
        c
    }

    /// Writes `files` under a fresh directory and uploads it to `repo`
    /// (`ARGS`: more flags); returns the commit id.
    fn commit(&self, repo: &str, name: &str, files: &Files, args: &[&str]) -> String {
        let dir = self.root.join(name);
        for (path, data) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        let mut full = vec!["upload", "--json", "--repo", repo];
        full.extend_from_slice(args);
        full.push(dir.to_str().unwrap());
        let v = json_of(ok(self.cas(&full)));
        v["commit"]["id"].as_str().unwrap().to_owned()
    }

    /// The stock client against `endpoint` with `token`.
    fn hf(&self, endpoint: &str, token: Option<&str>) -> Hf {
        Hf::new(endpoint, token, &self.root.join("hf-home"))
    }

    /// A fresh directory under the scratch space.
    fn dir(&self, name: &str) -> PathBuf {
        let d = self.root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

/// The test model: v1 (commit `c1`, tagged `v1.0`) and v2 (commit `c2`,
/// the head of `main`): new weights for a tenth of the tensors, a new
/// config, one file more.
struct Model {
    v1: Files,
    v2: Files,
    c1: String,
    c2: String,
}

fn files(list: &[(&str, &[u8])]) -> Files {
    list.iter()
        .map(|(p, d)| ((*p).to_owned(), d.to_vec()))
        .collect()
}

fn model(hub: &Hub) -> Model {
    let weights = cas_bench::bf16_weights(7, 6_000_000);
    let mut weights2 = weights.clone();
    for b in &mut weights2[2_000_000..2_600_000] {
        *b = b.wrapping_add(1);
    }
    let vocab: Vec<u8> = (0..5000)
        .flat_map(|i| format!("tok{i}\n").into_bytes())
        .collect();
    let v1 = files(&[
        (
            "config.json",
            b"{\"model_type\": \"cas-test\", \"version\": 1}\n",
        ),
        ("model.safetensors", &weights),
        ("tokenizer/vocab.txt", &vocab),
        ("README.md", b"# test model\n"),
    ]);
    let mut v2 = v1.clone();
    v2.insert(
        "config.json".into(),
        b"{\"model_type\": \"cas-test\", \"version\": 2}\n".to_vec(),
    );
    v2.insert("model.safetensors".into(), weights2);
    v2.insert("extra/notes.txt".into(), b"fine-tuned\n".to_vec());
    let c1 = hub.commit(
        "org/model",
        "v1",
        &v1,
        &["-m", "Upload v1\n\nfirst weights"],
    );
    let c2 = hub.commit("org/model", "v2", &v2, &["-m", "Upload v2"]);
    ok(hub.cas(&["tag", "org/model", "v1.0", &c1]));
    Model { v1, v2, c1, c2 }
}

fn sha256(data: &[u8]) -> String {
    Sha256::of(data).to_string()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// Every `HfApi` call of the subset answers what the repository holds, at
/// the default branch, a tag, a commit id, and git's full ref forms.
#[test]
fn api_calls_answer_like_the_hub() {
    let hub = Hub::new();
    let m = model(&hub);
    let hf = hub.hf(hub.url(), None);
    let repo = "org/model";

    let info = hf.ok("model_info", json!({"repo": repo}));
    assert_eq!(info["class"], "ModelInfo");
    assert_eq!(
        (info["id"].as_str(), info["sha"].as_str()),
        (Some(repo), Some(&*m.c2))
    );
    let names: Vec<_> = info["siblings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["rfilename"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, m.v2.keys().cloned().collect::<Vec<_>>());
    assert!(info["last_modified"].is_string() && info["created_at"].is_string());
    for rev in ["v1.0", &m.c1, "refs/tags/v1.0"] {
        let i = hf.ok("model_info", json!({"repo": repo, "revision": rev}));
        assert_eq!(i["sha"].as_str(), Some(&*m.c1), "{rev}");
    }
    assert_eq!(
        hf.ok(
            "model_info",
            json!({"repo": repo, "revision": "refs/heads/main"})
        )["sha"],
        m.c2.as_str()
    );
    // files_metadata: sizes and the LFS SHA-256 of every file.
    let meta = hf.ok("model_info", json!({"repo": repo, "files_metadata": true}));
    for s in meta["siblings"].as_array().unwrap() {
        let data = &m.v2[s["rfilename"].as_str().unwrap()];
        assert_eq!(s["size"].as_u64(), Some(data.len() as u64), "{s}");
        assert_eq!(s["lfs"]["sha256"].as_str(), Some(&*sha256(data)), "{s}");
        assert_eq!(s["blob_id"].as_str().map(str::len), Some(40), "{s}");
    }
    let r = hf.ok("repo_info", json!({"repo": repo, "revision": "v1.0"}));
    assert_eq!(
        (r["class"].as_str(), r["sha"].as_str()),
        (Some("ModelInfo"), Some(&*m.c1))
    );

    assert_eq!(
        strs(&hf.ok("list_repo_files", json!({"repo": repo}))),
        m.v2.keys().cloned().collect::<Vec<_>>()
    );
    assert_eq!(
        strs(&hf.ok("list_repo_files", json!({"repo": repo, "revision": "v1.0"}))),
        m.v1.keys().cloned().collect::<Vec<_>>()
    );

    let tree = hf.ok("list_repo_tree", json!({"repo": repo, "recursive": true}));
    let mut seen = Vec::new();
    for n in tree.as_array().unwrap() {
        let path = n["path"].as_str().unwrap();
        if n["type"] == "file" {
            let data = &m.v2[path];
            assert_eq!(n["size"].as_u64(), Some(data.len() as u64));
            assert_eq!(n["lfs"]["sha256"].as_str(), Some(&*sha256(data)));
        } else {
            assert_eq!(n["tree_id"].as_str().map(str::len), Some(40));
        }
        seen.push(format!("{}:{path}", n["type"].as_str().unwrap()));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "directory:extra",
            "directory:tokenizer",
            "file:README.md",
            "file:config.json",
            "file:extra/notes.txt",
            "file:model.safetensors",
            "file:tokenizer/vocab.txt"
        ]
    );
    let top = hf.ok("list_repo_tree", json!({"repo": repo, "revision": &m.c1}));
    let top: Vec<_> = top
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        top,
        ["README.md", "config.json", "model.safetensors", "tokenizer"]
    );
    let sub = hf.ok(
        "list_repo_tree",
        json!({"repo": repo, "path_in_repo": "tokenizer"}),
    );
    assert_eq!(sub[0]["path"], "tokenizer/vocab.txt");
    assert_eq!(sub.as_array().unwrap().len(), 1);

    let refs = hf.ok(
        "list_repo_refs",
        json!({"repo": repo, "include_pull_requests": true}),
    );
    assert_eq!(refs["branches"], json!([["main", "refs/heads/main", m.c2]]));
    assert_eq!(refs["tags"], json!([["v1.0", "refs/tags/v1.0", m.c1]]));
    assert_eq!(refs["pull_requests"], json!([]));

    let log = hf.ok("list_repo_commits", json!({"repo": repo}));
    let ids: Vec<_> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [&*m.c2, &*m.c1]);
    assert_eq!(log[1]["title"], "Upload v1");
    assert_eq!(log[1]["message"], "first weights");
    assert_eq!(log[1]["authors"], json!(["tester"]));
    let old = hf.ok(
        "list_repo_commits",
        json!({"repo": repo, "revision": "v1.0"}),
    );
    assert_eq!(old.as_array().unwrap().len(), 1);

    for (file, rev, want) in [
        ("config.json", None, true),
        ("extra/notes.txt", None, true),
        ("extra/notes.txt", Some("v1.0"), false),
        ("missing.bin", None, false),
    ] {
        let got = hf.ok(
            "file_exists",
            json!({"repo": repo, "filename": file, "revision": rev}),
        );
        assert_eq!(got, json!(want), "{file} at {rev:?}");
    }

    let paths = hf.ok(
        "get_paths_info",
        json!({"repo": repo, "paths": ["config.json", "tokenizer", "nothing", "extra/notes.txt"]}),
    );
    let got: Vec<_> = paths
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            format!(
                "{}:{}",
                n["type"].as_str().unwrap(),
                n["path"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            "file:config.json",
            "directory:tokenizer",
            "file:extra/notes.txt"
        ]
    );
    assert_eq!(
        paths[0]["lfs"]["sha256"].as_str(),
        Some(&*sha256(&m.v2["config.json"]))
    );

    // A branch named like a Hub pull request, sent URL-encoded.
    let c3 = hub.commit("org/model", "pr", &m.v1, &["--branch", "refs/pr/1"]);
    let pr = hf.ok("model_info", json!({"repo": repo, "revision": "refs/pr/1"}));
    assert_eq!(pr["sha"].as_str(), Some(&*c3));
    let path = hf.ok(
        "hf_hub_download",
        json!({"repo": repo, "filename": "config.json", "revision": "refs/pr/1"}),
    );
    assert_eq!(
        std::fs::read(path.as_str().unwrap()).unwrap(),
        m.v1["config.json"]
    );
}

/// `snapshot_download` by branch, tag and commit id (to the cache and to a
/// local directory), with `allow_patterns`; `hf_hub_download`; and the `hf
/// download` command: every byte as uploaded.
#[test]
fn snapshots_by_branch_tag_and_commit_are_byte_identical() {
    let hub = Hub::new();
    let m = model(&hub);
    let hf = hub.hf(hub.url(), None);
    let repo = "org/model";
    for (rev, want) in [("main", &m.v2), ("v1.0", &m.v1), (m.c1.as_str(), &m.v1)] {
        let cache = hub.dir(&format!("cache-{}", &rev[..4.min(rev.len())]));
        let dir = hf.ok(
            "snapshot_download",
            json!({"repo": repo, "revision": rev, "cache_dir": cache}),
        );
        let dir = PathBuf::from(dir.as_str().unwrap());
        let commit = if want == &m.v1 { &m.c1 } else { &m.c2 };
        assert!(
            dir.ends_with(format!("snapshots/{commit}")),
            "{}",
            dir.display()
        );
        assert_same_files(want, &dir);
    }
    let local = hub.dir("local");
    hf.ok(
        "snapshot_download",
        json!({"repo": repo, "revision": "v1.0", "local_dir": local,
               "allow_patterns": ["*.json", "tokenizer/*"]}),
    );
    let some: Files =
        m.v1.iter()
            .filter(|(p, _)| p.ends_with(".json") || p.starts_with("tokenizer/"))
            .map(|(p, d)| (p.clone(), d.clone()))
            .collect();
    assert_eq!(some.len(), 2);
    assert_same_files(&some, &local);

    let one = hf.ok(
        "hf_hub_download",
        json!({"repo": repo, "filename": "model.safetensors", "revision": "v1.0",
               "cache_dir": hub.dir("single")}),
    );
    let one = PathBuf::from(one.as_str().unwrap());
    assert!(std::fs::read(&one).unwrap() == m.v1["model.safetensors"]);
    // The client names its cached blob after the file's SHA-256 (the
    // ETag it was given), as it does for the Hub's LFS files.
    let blob = std::fs::canonicalize(&one).unwrap();
    assert_eq!(
        blob.file_name().unwrap().to_str().unwrap(),
        sha256(&m.v1["model.safetensors"])
    );

    let out = hub.dir("cli");
    let mut c = hf.command("hf");
    c.args(["download", repo, "--revision", "v1.0", "--local-dir"])
        .arg(&out);
    let o = c.output().unwrap();
    assert!(o.status.success(), "hf download: {}", show(&o));
    assert_same_files(&m.v1, &out);
}

/// Missing repositories, revisions and files raise the client's typed
/// exceptions; so does a missing, bad or insufficient token on a server
/// that checks tokens, where a repository the token may not read looks
/// exactly like one that does not exist.
#[test]
fn errors_raise_the_clients_typed_exceptions() {
    let hub = Hub::start(true, &[]);
    let m = model(&hub);
    let reader = hub.token(&["--scope", "read"]);
    let hf = hub.hf(hub.url(), Some(&reader));
    let download = |repo: &str, file: &str, rev: &str| json!({"repo": repo, "filename": file, "revision": rev, "cache_dir": hub.root.join("c")});

    let e = hf.err("model_info", json!({"repo": "org/nothing"}));
    assert!(
        e.is("RepositoryNotFoundError") && e.status == Some(404),
        "{e:?}"
    );
    let e = hf.err(
        "hf_hub_download",
        download("org/nothing", "config.json", "main"),
    );
    assert!(e.is("RepositoryNotFoundError"), "{e:?}");
    let e = hf.err(
        "model_info",
        json!({"repo": "org/model", "revision": "nope"}),
    );
    assert!(e.is("RevisionNotFoundError"), "{e:?}");
    let e = hf.err(
        "hf_hub_download",
        download("org/model", "config.json", "nope"),
    );
    assert!(e.is("RevisionNotFoundError"), "{e:?}");
    let e = hf.err(
        "hf_hub_download",
        download("org/model", "missing.bin", "main"),
    );
    assert!(
        e.is("RemoteEntryNotFoundError") && e.is("EntryNotFoundError"),
        "{e:?}"
    );
    let e = hf.err(
        "list_repo_tree",
        json!({"repo": "org/model", "path_in_repo": "nowhere"}),
    );
    assert!(e.is("RemoteEntryNotFoundError"), "{e:?}");
    let e = hf.err("dataset_info", json!({"repo": "org/model"}));
    assert!(
        e.is("RepositoryNotFoundError"),
        "a model is not a dataset: {e:?}"
    );

    // No token: as the Hub answers an anonymous client about a private
    // repository, whether it exists or not.
    let anonymous = hf.with_token(None);
    for repo in ["org/model", "org/nothing"] {
        let e = anonymous.err("model_info", json!({"repo": repo}));
        assert!(
            e.is("RepositoryNotFoundError") && e.status == Some(401),
            "{repo}: {e:?}"
        );
        let e = anonymous.err("hf_hub_download", download(repo, "config.json", "main"));
        assert!(
            e.is("RepositoryNotFoundError") && e.status == Some(401),
            "{repo}: {e:?}"
        );
    }
    // A token that is not ours: a plain 401, not "not found".
    let junk = hf.with_token(Some("cas1.00.00"));
    let e = junk.err("model_info", json!({"repo": "org/model"}));
    assert!(e.kind == "HfHubHTTPError" && e.status == Some(401), "{e:?}");
    // A token without the read scope.
    let writer = hf.with_token(Some(&hub.token(&["--scope", "write"])));
    let e = writer.err(
        "hf_hub_download",
        download("org/model", "config.json", "main"),
    );
    assert!(e.is("GatedRepoError") && e.status == Some(403), "{e:?}");
    // A token limited to another organisation: the repository is missing.
    let other = hf.with_token(Some(&hub.token(&["--scope", "read", "--repo", "other/*"])));
    for op in ["model_info", "list_repo_refs", "list_repo_commits"] {
        let e = other.err(op, json!({"repo": "org/model"}));
        assert!(
            e.is("RepositoryNotFoundError") && e.status == Some(404),
            "{op}: {e:?}"
        );
    }
    let e = other.err(
        "snapshot_download",
        json!({"repo": "org/model", "cache_dir": hub.root.join("o")}),
    );
    assert!(e.is("RepositoryNotFoundError"), "{e:?}");
    assert_eq!(
        other.ok(
            "file_exists",
            json!({"repo": "org/model", "filename": "config.json"})
        ),
        json!(false)
    );
    // A token limited to this repository reads it.
    let mine = hf.with_token(Some(&hub.token(&[
        "--scope",
        "read",
        "--repo",
        "org/model",
    ])));
    let dir = mine.ok(
        "snapshot_download",
        json!({"repo": "org/model", "cache_dir": hub.root.join("m")}),
    );
    assert_same_files(&m.v2, Path::new(dir.as_str().unwrap()));

    // The content URL a resolve hands out is a capability: it needs no
    // token; a wrong MAC (or none) is a 404 that no cache keeps.
    let r = no_redirects()
        .get(format!("{}/org/model/resolve/main/config.json", hub.url()))
        .header("Authorization", format!("Bearer {reader}"))
        .call()
        .unwrap();
    assert_eq!(r.status(), 302);
    let location = header(&r, "location");
    let (status, got) = body(agent().get(&location).call().unwrap());
    assert_eq!((status, got), (200, m.v2["config.json"].clone()));
    let (base, mac) = location
        .split_once('?')
        .unwrap()
        .0
        .rsplit_once('/')
        .unwrap();
    assert_eq!(mac.len(), 32, "{location}");
    let forged = format!("{base}/{}", "0".repeat(32));
    for url in [forged.as_str(), base] {
        let r = agent().get(url).call().unwrap();
        assert_eq!(r.status(), 404, "{url}");
        assert_eq!(header(&r, "cache-control"), "no-store", "{url}");
    }
}

/// An agent that returns redirects instead of following them.
fn no_redirects() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .max_redirects_will_error(false)
        .build()
        .into()
}

fn header(r: &ureq::http::Response<ureq::Body>, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// A TCP proxy that cuts the first answer to a `GET /v1/content/` after
/// `cut_after` bytes (closing both ends, as a dropped link does) and keeps
/// every request head it relays.
struct Cutter {
    url: String,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Cutter {
    fn start(listener: TcpListener, upstream: &str, cut_after: usize) -> Self {
        let url = format!("http://{}", listener.local_addr().unwrap());
        let target = upstream.strip_prefix("http://").unwrap().to_owned();
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let armed = Arc::new(AtomicBool::new(true));
        let h = heads.clone();
        std::thread::spawn(move || {
            for down in listener.incoming() {
                let (Ok(down), Ok(up)) = (down, TcpStream::connect(&target)) else {
                    continue;
                };
                let cutting = Arc::new(AtomicBool::new(false));
                let (mut from_client, mut to_server) =
                    (down.try_clone().unwrap(), up.try_clone().unwrap());
                let (h, armed, c) = (h.clone(), armed.clone(), cutting.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut pending = Vec::new();
                    while let Ok(n) = from_client.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&pending[..end]).to_lowercase();
                            pending.drain(..end + 4);
                            if head.starts_with("get /v1/content/")
                                && armed.swap(false, Ordering::SeqCst)
                            {
                                c.store(true, Ordering::SeqCst);
                            }
                            h.lock().unwrap().push(head);
                        }
                        if to_server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to_server.shutdown(Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let (mut up, mut down) = (up, down);
                    let mut buf = vec![0u8; 64 << 10];
                    let mut sent = 0;
                    while let Ok(n) = up.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let mut take = n;
                        if cutting.load(Ordering::SeqCst) {
                            take = n.min(cut_after - sent);
                            sent += take;
                        }
                        if down.write_all(&buf[..take]).is_err() || take < n || sent == cut_after {
                            break;
                        }
                    }
                    let _ = down.shutdown(Shutdown::Both);
                    let _ = up.shutdown(Shutdown::Both);
                });
            }
        });
        Self { url, heads }
    }

    /// The heads of the `GET /v1/content/` requests relayed so far.
    fn content_gets(&self) -> Vec<String> {
        self.heads
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.starts_with("get /v1/content/"))
            .cloned()
            .collect()
    }
}

/// A download whose connection drops mid-body is resumed by the client
/// with a `Range` from where it stopped, and ends byte-identical. (The
/// client writes in 10 MiB pieces: the cut comes after the first.)
#[test]
fn an_interrupted_download_resumes_by_range() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    let hub = Hub::start(false, &["--public-url", &proxy_url]);
    let big = files(&[("weights.bin", &cas_bench::bf16_weights(9, 24_000_000))]);
    hub.commit("org/big", "big", &big, &[]);
    let cut = 12 << 20;
    let cutter = Cutter::start(listener, hub.url(), cut);
    let hf = hub.hf(&cutter.url, None);
    let path = hf.ok(
        "hf_hub_download",
        json!({"repo": "org/big", "filename": "weights.bin", "cache_dir": hub.dir("c")}),
    );
    assert!(std::fs::read(path.as_str().unwrap()).unwrap() == big["weights.bin"]);
    let gets = cutter.content_gets();
    assert_eq!(gets.len(), 2, "{gets:#?}");
    assert!(!gets[0].contains("\r\nrange:"), "{}", gets[0]);
    let range = gets[1]
        .lines()
        .find_map(|l| l.strip_prefix("range: bytes="))
        .unwrap_or_else(|| panic!("the second GET sent no Range: {}", gets[1]));
    let from: usize = range.trim_end_matches('-').parse().unwrap();
    assert!((10 << 20..cut).contains(&from), "resumed from {from}");
}

/// curl, wget and aria2c on a resolve URL: a `302` that no cache may keep,
/// to content that every cache may keep forever, read by ranges.
#[test]
fn plain_http_tools_download_resolve_urls() {
    let hub = Hub::new();
    let m = model(&hub);
    let want = &m.v2["model.safetensors"];
    let url = format!("{}/org/model/resolve/main/model.safetensors", hub.url());

    for method in ["GET", "HEAD"] {
        let r = match method {
            "GET" => no_redirects().get(&url).call(),
            _ => no_redirects().head(&url).call(),
        }
        .unwrap();
        assert_eq!(r.status(), 302, "{method}");
        assert_eq!(header(&r, "cache-control"), "no-store");
        assert_eq!(header(&r, "x-repo-commit"), m.c2);
        assert_eq!(header(&r, "x-linked-size"), want.len().to_string());
        assert_eq!(header(&r, "x-linked-etag"), format!("\"{}\"", sha256(want)));
        assert!(header(&r, "location").contains("/v1/content/"));
    }
    let location = header(&no_redirects().get(&url).call().unwrap(), "location");
    let head = agent().head(&location).call().unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "content-length"), want.len().to_string());
    assert_eq!(
        header(&head, "cache-control"),
        "public, max-age=31536000, immutable"
    );
    assert_eq!(header(&head, "accept-ranges"), "bytes");
    let etag = header(&head, "etag");
    assert_eq!(etag, format!("\"{}\"", sha256(want)));
    assert_eq!(header(&head, "x-repo-commit"), m.c2);
    let r = agent()
        .get(&location)
        .header("If-None-Match", &etag)
        .call()
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = agent()
        .get(&location)
        .header("Range", "bytes=100-199")
        .call()
        .unwrap();
    assert_eq!(
        header(&r, "content-range"),
        format!("bytes 100-199/{}", want.len())
    );
    assert_eq!(body(r), (206, want[100..200].to_vec()));
    let r = agent()
        .get(&location)
        .header("Range", format!("bytes={}-", want.len()))
        .call()
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(
        header(&r, "content-range"),
        format!("bytes */{}", want.len())
    );

    let run = |c: &mut Command| {
        let o = c.output().unwrap();
        assert!(o.status.success(), "{c:?}: {}", show(&o));
    };
    // curl: a first part, then -C - finishes it from where it stopped.
    let dest = hub.root.join("curl.bin");
    run(Command::new("curl")
        .args(["-sS", "-L", "-r", "0-1048575", "-o"])
        .arg(&dest)
        .arg(&url));
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 1 << 20);
    run(Command::new("curl")
        .args(["-sS", "-L", "-C", "-", "-o"])
        .arg(&dest)
        .arg(&url));
    assert!(std::fs::read(&dest).unwrap() == *want, "curl -C -");
    // wget -c, after a part of its own.
    let dest = hub.root.join("wget.bin");
    std::fs::write(&dest, &want[..777_777]).unwrap();
    run(Command::new("wget")
        .args(["-q", "-c", "-O"])
        .arg(&dest)
        .arg(&url));
    assert!(std::fs::read(&dest).unwrap() == *want, "wget -c");
    // aria2c with 8 connections, each a range (its speed capped, so the
    // first connection cannot finish the file before the others start).
    let before = Metrics::fetch(hub.url());
    run(Command::new("aria2c")
        .args([
            "-q",
            "-x8",
            "-s8",
            "-k1M",
            "--max-overall-download-limit=4M",
            "--allow-overwrite=true",
            "--auto-file-renaming=false",
            "-d",
        ])
        .arg(&hub.root)
        .args(["-o", "aria2.bin", &url]));
    assert!(
        std::fs::read(hub.root.join("aria2.bin")).unwrap() == *want,
        "aria2c"
    );
    let ranged = Metrics::fetch(hub.url()).answered("content_get", 206)
        - before.answered("content_get", 206);
    assert!(ranged >= 2, "aria2c read by ranges: {ranged}");
}

/// A dataset repository through the Hub's `/datasets/` prefixes.
#[test]
fn dataset_repositories_use_the_datasets_prefix() {
    let hub = Hub::new();
    let data = files(&[
        ("train.csv", b"x,y\n1,2\n"),
        ("data/part-0.jsonl", b"{\"a\": 1}\n"),
        ("README.md", b"# data\n"),
    ]);
    let c = hub.commit("org/data", "data", &data, &["--repo-type", "dataset"]);
    let hf = hub.hf(hub.url(), None);
    let info = hf.ok("dataset_info", json!({"repo": "org/data"}));
    assert_eq!(
        (info["class"].as_str(), info["sha"].as_str()),
        (Some("DatasetInfo"), Some(&*c))
    );
    let e = hf.err("model_info", json!({"repo": "org/data"}));
    assert!(e.is("RepositoryNotFoundError"), "{e:?}");
    assert_eq!(
        strs(&hf.ok(
            "list_repo_files",
            json!({"repo": "org/data", "repo_type": "dataset"})
        )),
        data.keys().cloned().collect::<Vec<_>>()
    );
    let dir = hf.ok(
        "snapshot_download",
        json!({"repo": "org/data", "repo_type": "dataset", "cache_dir": hub.dir("c")}),
    );
    assert_same_files(&data, Path::new(dir.as_str().unwrap()));
    let one = hf.ok(
        "hf_hub_download",
        json!({"repo": "org/data", "repo_type": "dataset", "filename": "data/part-0.jsonl",
               "cache_dir": hub.dir("d")}),
    );
    assert_eq!(
        std::fs::read(one.as_str().unwrap()).unwrap(),
        data["data/part-0.jsonl"]
    );
    let url = format!("{}/datasets/org/data/resolve/main/train.csv", hub.url());
    assert_eq!(
        body(agent().get(&url).call().unwrap()),
        (200, data["train.csv"].clone())
    );
    assert_eq!(files_under(Path::new(dir.as_str().unwrap())).len(), 3);
}
