//! Writes through the Hub-compatible API with the stock client: the real
//! `cas-server` (with a signing key) and the pinned `huggingface_hub`
//! (`CAS_HF_VENV`) with `HF_HUB_DISABLE_XET=1`, so large files take the
//! Git LFS batch API and a PUT of the whole object, which the server
//! chunks and deduplicates. `create_repo`, `upload_folder`,
//! `upload_file`, `create_commit` (adds, a deletion, `parent_commit`),
//! `delete_file`, `create_branch`, `create_tag` and `hf upload`, each read
//! back by `snapshot_download`, `list_repo_commits` and `cas-client`;
//! racing first commits keep every file; a wrong object is refused; a
//! read token writes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cas_e2e::client;
use cas_e2e::hub::{assert_same_files, Hf};
use cas_e2e::{agent, bin, body, json_of, noise, ok, show};
use cas_protocol::Sha256;
use serde_json::{json, Value};

type Files = BTreeMap<String, Vec<u8>>;

struct Hub(client::Env);

impl std::ops::Deref for Hub {
    type Target = client::Env;
    fn deref(&self) -> &client::Env {
        &self.0
    }
}

impl Hub {
    fn new() -> Self {
        Self(client::Env::with_tokens())
    }

    fn writer_token(&self) -> String {
        self.token(&["--scope", "write", "--scope", "read"])
    }

    fn hf(&self, token: &str) -> Hf {
        Hf::new(&self.server.url, Some(token), &self.root.join("hf-home"))
    }

    /// Writes `files` under a fresh directory `name`.
    fn write_dir(&self, name: &str, files: &Files) -> PathBuf {
        let dir = self.root.join(name);
        for (path, data) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        dir
    }

    fn cas(&self, args: &[&str]) -> Command {
        let mut c = bin("cas-client");
        for k in ["CAS_TOKEN", "CAS_AUTHOR", "CAS_LOG", "CAS_CACHE_DIR"] {
            c.env_remove(k);
        }
        c.current_dir(&self.root)
            .env("CAS_ENDPOINT", &self.server.url)
            .env("CAS_TOKEN", self.writer_token())
            .env("CAS_RETRIES", "1")
            .args(args)
            .arg("--no-cache");
        c
    }

    /// `snapshot_download` of `repo` at `rev` into a fresh directory.
    fn download(&self, hf: &Hf, repo: &str, rev: &str, name: &str) -> PathBuf {
        let dir = self.root.join(name);
        hf.ok(
            "snapshot_download",
            json!({"repo": repo, "revision": rev, "local_dir": dir.to_str().unwrap()}),
        );
        dir
    }
}

fn model_v1() -> Files {
    let mut f = Files::new();
    f.insert("model.safetensors".into(), noise(1, 12 << 20));
    f.insert("config.json".into(), br#"{"hidden": 64}"#.to_vec());
    f.insert("tokenizer/vocab.txt".into(), noise(2, 300 << 10));
    f.insert("empty.txt".into(), vec![]);
    f
}

/// The files of `dir` on disk minus the client's `.cache`.
fn files_of(dir: &Path) -> Files {
    cas_e2e::hub::files_under(dir)
}

#[test]
fn upload_folder_file_commit_branch_tag_and_read_back() {
    let hub = Hub::new();
    let hf = hub.hf(&hub.writer_token());
    let repo = "org/up";
    let url = hf.ok("create_repo", json!({"repo": repo}));
    assert!(url.as_str().unwrap().ends_with("/org/up"), "{url}");
    let again = hf.err("create_repo", json!({"repo": repo}));
    assert_eq!(again.status, Some(409), "{}", again.message);
    hf.ok("create_repo", json!({"repo": repo, "exist_ok": true}));

    // v1: a folder, with LFS and inline files and an empty one.
    let v1 = model_v1();
    let dir = hub.write_dir("v1", &v1);
    let c1 = hf.ok(
        "upload_folder",
        json!({"repo": repo, "folder_path": dir.to_str().unwrap(), "commit_message": "v1"}),
    );
    let c1 = c1["oid"].as_str().unwrap().to_owned();
    assert_same_files(&v1, &hub.download(&hf, repo, "main", "dl1"));

    // v2: new weights (a tenth changed) by upload_file; the same file
    // again changes nothing stored.
    let mut v2 = v1.clone();
    let w = v2.get_mut("model.safetensors").unwrap();
    let n = w.len();
    w[n / 2..n / 2 + n / 10].copy_from_slice(&noise(3, n / 10));
    let w2 = hub.root.join("w2");
    std::fs::write(&w2, &v2["model.safetensors"]).unwrap();
    let c2 = hf.ok(
        "upload_file",
        json!({"repo": repo, "path_or_fileobj": w2.to_str().unwrap(),
               "path_in_repo": "model.safetensors", "commit_message": "new weights"}),
    );
    let c2 = c2["oid"].as_str().unwrap().to_owned();

    // create_commit: an add and a deletion, on the expected parent.
    let readme = b"# up\n".to_vec();
    let c3 = hf.ok(
        "create_commit",
        json!({"repo": repo, "commit_message": "readme, no vocab", "parent_commit": c2,
               "operations": [{"add": "README.md", "text": "# up\n"},
                              {"delete": "tokenizer/vocab.txt"}]}),
    );
    let c3 = c3["oid"].as_str().unwrap().to_owned();
    v2.remove("tokenizer/vocab.txt");
    v2.insert("README.md".into(), readme);
    assert_same_files(&v2, &hub.download(&hf, repo, "main", "dl3"));

    // A stale parent is refused and changes nothing.
    let stale = hf.err(
        "create_commit",
        json!({"repo": repo, "commit_message": "stale", "parent_commit": c1,
               "operations": [{"delete": "config.json"}]}),
    );
    assert!(stale.status.is_some_and(|s| s >= 400), "{stale:?}");
    // Deleting a file that is not there is the Hub's EntryNotFound.
    let missing = hf.err(
        "delete_file",
        json!({"repo": repo, "path_in_repo": "nope.bin"}),
    );
    assert_eq!(missing.status, Some(404), "{missing:?}");

    let commits = hf.ok("list_repo_commits", json!({"repo": repo}));
    let ids: Vec<&str> = commits
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [c3.as_str(), c2.as_str(), c1.as_str()]);
    assert_eq!(commits[0]["title"], "readme, no vocab");
    // Our own client sees the same history and files.
    let log = json_of(ok(hub.cas(&["log", "--json", repo])));
    assert_eq!(log.as_array().map(Vec::len), Some(3), "{log}");
    let fetched = hub.root.join("fetched");
    ok(hub.cas(&["fetch", repo, "-o", fetched.to_str().unwrap()]));
    assert_eq!(files_of(&fetched), v2);

    // Branch and tag at v1; the tag reads back v1.
    hf.ok(
        "create_branch",
        json!({"repo": repo, "branch": "dev", "revision": c1}),
    );
    let dup = hf.err("create_branch", json!({"repo": repo, "branch": "dev"}));
    assert_eq!(dup.status, Some(409));
    hf.ok(
        "create_branch",
        json!({"repo": repo, "branch": "dev", "exist_ok": true}),
    );
    hf.ok(
        "create_tag",
        json!({"repo": repo, "tag": "v1.0", "revision": c1}),
    );
    let refs = hf.ok("list_repo_refs", json!({"repo": repo}));
    assert!(refs["branches"].to_string().contains("dev"), "{refs}");
    assert!(refs["tags"].to_string().contains(&c1), "{refs}");
    assert_same_files(&v1, &hub.download(&hf, repo, "v1.0", "dl-tag"));
    let dev = hf.ok(
        "upload_file",
        json!({"repo": repo, "path_or_fileobj": w2.to_str().unwrap(),
               "path_in_repo": "other.bin", "revision": "dev"}),
    );
    assert_ne!(dev["oid"].as_str().unwrap(), c3);

    // `hf upload` of a folder into a dataset.
    hf.ok(
        "create_repo",
        json!({"repo": "org/data", "repo_type": "dataset"}),
    );
    let data: Files = [("a.csv".to_owned(), b"x,y\n1,2\n".to_vec())].into();
    let ddir = hub.write_dir("data", &data);
    let mut c = hf.command("hf");
    c.args(["upload", "org/data"]).arg(&ddir).args([
        ".",
        "--repo-type",
        "dataset",
        "--commit-message",
        "data",
    ]);
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let got = hub.root.join("dl-data");
    hf.ok(
        "snapshot_download",
        json!({"repo": "org/data", "repo_type": "dataset", "local_dir": got.to_str().unwrap()}),
    );
    assert_same_files(&data, &got);
}

/// A token without the write scope uploads nothing; a token limited to
/// other repositories cannot create this one.
#[test]
fn writes_need_a_write_token_for_the_repository() {
    let hub = Hub::new();
    let writer = hub.hf(&hub.writer_token());
    writer.ok("create_repo", json!({"repo": "org/locked"}));
    let reader = hub.hf(&hub.token(&["--scope", "read"]));
    let f = hub.root.join("f");
    std::fs::write(&f, noise(4, 200 << 10)).unwrap();
    let e = reader.err(
        "upload_file",
        json!({"repo": "org/locked", "path_or_fileobj": f.to_str().unwrap(), "path_in_repo": "f"}),
    );
    assert_eq!(e.status, Some(403), "{e:?}");
    let other = hub.hf(&hub.token(&["--scope", "write", "--scope", "read", "--repo", "else/*"]));
    let e = other.err("create_repo", json!({"repo": "org/new"}));
    assert_eq!(e.status, Some(403), "{e:?}");
    let commits = writer.call("list_repo_commits", json!({"repo": "org/locked"}));
    assert!(commits.is_err() || commits.unwrap().as_array().unwrap().is_empty());
}

/// Racing first commits to one new repository: every file survives (a
/// commit that loses the race is rebuilt on the winner's tree).
#[test]
fn racing_first_commits_keep_every_file() {
    let hub = Hub::new();
    let hf = hub.hf(&hub.writer_token());
    hf.ok("create_repo", json!({"repo": "org/race"}));
    let n = 4;
    let mut want = Files::new();
    let runs: Vec<_> = (0..n)
        .map(|i| {
            let data = noise(10 + i as u64, 100 << 10);
            let path = hub.root.join(format!("r{i}"));
            std::fs::write(&path, &data).unwrap();
            want.insert(format!("f{i}.bin"), data);
            let hf = hub.hf(&hub.writer_token());
            std::thread::spawn(move || {
                hf.ok(
                    "upload_file",
                    json!({"repo": "org/race", "path_or_fileobj": path.to_str().unwrap(),
                           "path_in_repo": format!("f{i}.bin")}),
                )
            })
        })
        .collect();
    for r in runs {
        r.join().unwrap();
    }
    assert_same_files(&want, &hub.download(&hf, "org/race", "main", "dl-race"));
    let commits = hf.ok("list_repo_commits", json!({"repo": "org/race"}));
    assert_eq!(commits.as_array().unwrap().len(), n);
}

/// The LFS batch API by hand: an upload URL takes only bytes that hash to
/// its object id (a wrong body is refused and recorded nowhere), works
/// without credentials (it is the capability), and not once tampered
/// with; a stored object needs no upload and has a download action.
#[test]
fn lfs_batch_refuses_a_wrong_object() {
    let hub = Hub::new();
    let tok = hub.writer_token();
    let a = agent();
    let good = noise(7, 3 << 20);
    let oid = Sha256::of(&good).to_string();
    let batch = |op: &str| -> Value {
        let url = format!("{}/org/lfs.git/info/lfs/objects/batch", hub.server.url);
        let req = json!({"operation": op, "transfers": ["basic"],
                         "objects": [{"oid": oid, "size": good.len()}]});
        let r = a
            .post(&url)
            .header("Authorization", &format!("Bearer {tok}"))
            .header("Accept", "application/vnd.git-lfs+json")
            .send(req.to_string().as_bytes())
            .unwrap();
        let (status, b) = body(r);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
        serde_json::from_slice(&b).unwrap()
    };
    // The upload batch creates the repository; the object is not there.
    let up = batch("upload");
    let down = batch("download");
    assert_eq!(down["objects"][0]["error"]["code"], 404, "{down}");
    let href = up["objects"][0]["actions"]["upload"]["href"]
        .as_str()
        .unwrap()
        .to_owned();
    let put = |url: &str, data: &[u8]| body(a.put(url).send(data).unwrap()).0;
    let mut wrong = good.clone();
    wrong[12345] ^= 1;
    // 400, not 422: git-lfs ignores a 422 (docs/GIT-LFS.md).
    assert_eq!(put(&href, &wrong), 400, "a wrong body is refused");
    assert_eq!(put(&href.replace("mac=", "mac=0"), &good), 403, "tampered");
    let bad_size = href.replace(&format!("size={}", good.len()), "size=5");
    assert_eq!(put(&bad_size, &good), 403, "the size is under the MAC");
    let verify = |url: &str| {
        let r = a
            .post(url)
            .header("Authorization", &format!("Bearer {tok}"))
            .send(
                json!({"oid": oid, "size": good.len()})
                    .to_string()
                    .as_bytes(),
            )
            .unwrap();
        body(r).0
    };
    let verify_url = up["objects"][0]["actions"]["verify"]["href"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(verify(&verify_url), 404);
    assert_eq!(put(&href, &good), 200);
    assert_eq!(verify(&verify_url), 200);
    let up = batch("upload");
    assert!(up["objects"][0].get("actions").is_none(), "{up}");
    let down = batch("download");
    let href = down["objects"][0]["actions"]["download"]["href"]
        .as_str()
        .unwrap();
    let (status, got) = body(a.get(href).call().unwrap());
    assert_eq!(status, 200);
    assert!(got == good, "downloaded bytes differ");
}
