//! Repositories end to end, through the real binaries: uploads committed to
//! branches (with dedup across versions), history, tags, fetches of
//! branches, tags, commit ids and prefixes; concurrent uploads to one
//! branch; strict parents; datasets; tokens limited to repositories; and
//! refused names.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cas_e2e::client::{self, assert_same_tree};
use cas_e2e::{agent, body, fails, json_of, ok, show, Metrics};
use serde_json::Value;

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

    /// A server that checks tokens.
    fn with_tokens() -> Self {
        Self(client::Env::with_tokens())
    }

    /// `cas-client ARGS...` (the subcommand first), with `token` if given.
    fn cas(&self, token: Option<&str>, args: &[&str]) -> Command {
        self.client(token, 1, args)
    }

    /// `upload --json --repo REPO ARGS... PATH` (ARGS: more flags).
    fn upload(&self, token: Option<&str>, repo: &str, path: &Path, args: &[&str]) -> Value {
        let mut full = vec!["upload", "--json", "--repo", repo];
        full.extend_from_slice(args);
        full.push(path.to_str().unwrap());
        json_of(ok(self.cas(token, &full)))
    }

    /// `fetch SPEC -o OUT` (a fresh OUT under the scratch directory).
    fn fetch(&self, token: Option<&str>, spec: &str, out: &str) -> (PathBuf, Value) {
        let dest = self.root.join(out);
        let v = json_of(ok(self.cas(
            token,
            &["fetch", "--json", spec, "-o", dest.to_str().unwrap()],
        )));
        (dest, v)
    }

    /// The commit ids of `log SPEC`, newest first.
    fn log(&self, token: Option<&str>, spec: &str) -> Vec<String> {
        let v = json_of(ok(self.cas(token, &["log", "--json", spec])));
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// A directory of `files` (relative path, bytes) under the scratch space.
    fn tree(&self, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
        let dir = self.root.join(name);
        for (path, data) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        dir
    }
}

fn s(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not a string: {v}"))
        .to_owned()
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// v1 and v2 of a model (v2: 10% of the weights rewritten, a new config)
/// go to one repository; the log shows both; the branch, a tag, a full
/// commit id and a short prefix all fetch byte-identical trees.
#[test]
fn versions_tags_ids_and_prefixes_fetch_byte_identical() {
    let env = Env::new();
    let weights = cas_bench::bf16_weights(21, 6_000_000);
    let v1 = env.tree(
        "v1",
        &[
            ("model.safetensors", &weights),
            ("config.json", br#"{"layers": 4}"#),
            ("tokenizer/vocab.txt", b"a\nb\nc\n"),
        ],
    );
    let weights2 = cas_bench::edited(&weights, 22, 6, 0.10);
    let v2 = env.tree(
        "v2",
        &[
            ("model.safetensors", &weights2),
            ("config.json", br#"{"layers": 4, "tuned": true}"#),
            ("tokenizer/vocab.txt", b"a\nb\nc\n"),
        ],
    );

    let u1 = env.upload(None, "org/model", &v1, &["-m", "first version"]);
    let c1 = s(&u1["commit"]["id"]);
    assert_eq!(c1.len(), 40, "{u1}");
    assert_eq!(u1["commit"]["tree"], u1["roots"][0]["hash"], "{u1}");
    assert_eq!(u1["commit"]["parents"], serde_json::json!([]));
    assert_eq!(u1["commit"]["author"], "tester");
    let u2 = env.upload(None, "org/model", &v2, &["-m", "second version"]);
    let c2 = s(&u2["commit"]["id"]);
    assert_eq!(u2["commit"]["parents"], serde_json::json!([c1]), "{u2}");
    let (new2, bytes2) = (n(&u2["new_bytes"]), n(&u2["bytes"]));
    assert!(
        (new2 as f64) < 0.3 * bytes2 as f64,
        "v2 sent {new2} new bytes of {bytes2}: dedup across versions"
    );

    // The human forms: the upload's two lines and the log's.
    let text = String::from_utf8(ok(env.cas(
        None,
        &[
            "upload",
            "--repo",
            "org/model",
            "-m",
            "again",
            v2.to_str().unwrap(),
        ],
    )))
    .unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].ends_with("  tree  org/model"), "{text}");
    assert!(lines[1].contains("  commit  org/model@main"), "{text}");
    let c3 = lines[1].split_whitespace().next().unwrap().to_owned();
    let log = String::from_utf8(ok(env.cas(None, &["log", "org/model"]))).unwrap();
    let log: Vec<&str> = log.lines().collect();
    assert_eq!(log.len(), 3, "{log:?}");
    assert!(
        log[0].starts_with(&c3) && log[0].ends_with("tester  again"),
        "{log:?}"
    );
    assert!(
        log[1].starts_with(&c2) && log[1].ends_with("second version"),
        "{log:?}"
    );
    assert!(
        log[2].starts_with(&c1) && log[2].ends_with("first version"),
        "{log:?}"
    );
    assert_eq!(
        env.log(None, "org/model@main"),
        [c3.as_str(), c2.as_str(), c1.as_str()]
    );
    assert_eq!(
        env.log(None, &format!("org/model@{c2}")),
        [c2.as_str(), c1.as_str()]
    );

    let tagged =
        String::from_utf8(ok(env.cas(None, &["tag", "org/model", "v1.0", &c1[..8]]))).unwrap();
    assert_eq!(tagged.trim(), format!("{c1}  tag  org/model@v1.0"));

    let (out, f) = env.fetch(None, "org/model", "at-main");
    assert_same_tree(&v2, &out);
    assert_eq!(s(&f["commit"]["id"]), c3, "{f}");
    let (out, f) = env.fetch(None, "org/model@v1.0", "at-tag");
    assert_same_tree(&v1, &out);
    assert_eq!(s(&f["commit"]["id"]), c1);
    let (out, _) = env.fetch(None, &format!("org/model@{}", &c1[..6]), "at-prefix");
    assert_same_tree(&v1, &out);
    let (out, _) = env.fetch(None, &format!("models/org/model@{c2}"), "at-id");
    assert_same_tree(&v2, &out);
    // Raw hashes keep working.
    let (out, _) = env.fetch(None, &s(&u1["roots"][0]["hash"]), "raw");
    assert_same_tree(&v1, &out);

    let repos = json_of(ok(env.cas(None, &["repos", "--json"])));
    assert_eq!(repos[0]["id"], "org/model", "{repos}");
    assert_eq!(repos[0]["type"], "model");
    assert_eq!(repos[0]["default_branch"], "main");
}

/// Several processes upload to one branch at the same moment: every one
/// succeeds and the branch's history holds every commit, one after the
/// other.
#[test]
fn concurrent_uploads_to_one_branch_keep_every_commit() {
    const UPLOADS: usize = 8;
    let env = Env::new();
    let dirs: Vec<PathBuf> = (0..UPLOADS)
        .map(|i| {
            let data = cas_bench::random_bytes(i as u64, 300_000);
            env.tree(&format!("u{i}"), &[("data.bin", &data)])
        })
        .collect();
    let children: Vec<_> = dirs
        .iter()
        .map(|d| {
            let mut c = env.cas(
                None,
                &[
                    "upload",
                    "--json",
                    "--repo",
                    "org/busy",
                    d.to_str().unwrap(),
                ],
            );
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    let mut made = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", show(&out));
        made.push(s(&json_of(out.stdout)["commit"]["id"]));
    }
    let mut history = env.log(None, "org/busy");
    assert_eq!(history.len(), UPLOADS, "{history:?}");
    history.sort();
    made.sort();
    assert_eq!(history, made, "every upload's commit is in the history");
}

/// `--parent` makes the commit strict: a stale parent fails with one clear
/// line naming the head, and the branch does not move.
#[test]
fn a_stale_parent_fails_clearly_and_changes_nothing() {
    let env = Env::new();
    let a = env.tree("a", &[("f", b"one")]);
    let b = env.tree("b", &[("f", b"two")]);
    let c = env.tree("c", &[("f", b"three")]);
    let c1 = s(&env.upload(None, "org/p", &a, &[])["commit"]["id"]);
    let u2 = env.upload(None, "org/p", &b, &["--parent", &c1]);
    let c2 = s(&u2["commit"]["id"]);
    assert_eq!(u2["commit"]["parents"], serde_json::json!([c1]));

    let m0 = Metrics::fetch(&env.server.url);
    let line = fails(env.cas(
        None,
        &[
            "upload",
            "--repo",
            "org/p",
            "--parent",
            &c1,
            c.to_str().unwrap(),
        ],
    ));
    assert!(
        line.contains("has moved") && line.contains(&c2) && line.contains(&c1),
        "{line}"
    );
    let m1 = Metrics::fetch(&env.server.url);
    assert_eq!(
        m1.requests("xorb_put"),
        m0.requests("xorb_put"),
        "nothing was uploaded"
    );
    assert_eq!(m1.requests("repo_commit"), m0.requests("repo_commit"));
    assert_eq!(
        env.log(None, "org/p"),
        [c2.as_str(), c1.as_str()],
        "the branch did not move"
    );

    // A new branch starts at its parent.
    let dev = env.upload(
        None,
        "org/p",
        &c,
        &["--branch", "feature/x", "--parent", &c1],
    );
    let d = s(&dev["commit"]["id"]);
    assert_eq!(env.log(None, "org/p@feature/x"), [d.as_str(), c1.as_str()]);
    assert_eq!(env.log(None, "org/p"), [c2.as_str(), c1.as_str()]);
    let (out, _) = env.fetch(None, "org/p@feature/x", "feature");
    assert_same_tree(&c, &out);
}

/// Datasets are their own namespace: `datasets/` or `--repo-type dataset`.
#[test]
fn dataset_repositories() {
    let env = Env::new();
    let data = env.tree(
        "data",
        &[("train.jsonl", b"{\"x\": 1}\n"), ("test/a.jsonl", b"{}\n")],
    );
    let single = env.root.join("README.md");
    std::fs::write(&single, b"# data\n").unwrap();
    // Files and a directory combine into one tree: the file at the root.
    let u = json_of(ok(env.cas(
        None,
        &[
            "upload",
            "--json",
            "--repo",
            "org/data",
            "--repo-type",
            "dataset",
            data.to_str().unwrap(),
            single.to_str().unwrap(),
        ],
    )));
    assert_eq!(u["repo"]["type"], "dataset", "{u}");
    let (out, _) = env.fetch(None, "datasets/org/data", "d1");
    let expected = env.tree(
        "expected",
        &[
            ("train.jsonl", b"{\"x\": 1}\n"),
            ("test/a.jsonl", b"{}\n"),
            ("README.md", b"# data\n"),
        ],
    );
    assert_same_tree(&expected, &out);
    let out2 = env.root.join("d2");
    ok(env.cas(
        None,
        &[
            "fetch",
            "org/data",
            "--repo-type",
            "dataset",
            "-o",
            out2.to_str().unwrap(),
        ],
    ));
    assert_same_tree(&expected, &out2);
    let line = fails(env.cas(None, &["fetch", "org/data", "-o", "nowhere"]));
    assert!(
        line.contains("404 repo_not_found") && line.contains("org/data"),
        "{line}"
    );
    let listed = String::from_utf8(ok(env.cas(None, &["repos"]))).unwrap();
    assert!(
        listed.starts_with("dataset  datasets/org/data  created "),
        "{listed}"
    );
    // Two inputs that land on one name are refused before anything is sent.
    let other = env.tree("other", &[("train.jsonl", b"other")]);
    let line = fails(env.cas(
        None,
        &[
            "upload",
            "--repo",
            "datasets/org/data",
            data.to_str().unwrap(),
            other.to_str().unwrap(),
        ],
    ));
    assert!(line.contains("lands on \"train.jsonl\""), "{line}");
}

/// A read token limited to `org/*` reads org/a; other/b answers exactly
/// like a repository that does not exist; none of other/b's files can be
/// read by hash, with or without naming a repository it may read.
#[test]
fn a_token_limited_to_an_organisation_reads_only_its_repositories() {
    let env = Env::with_tokens();
    let writer = env.token(&["--scope", "write", "--scope", "read"]);
    let reader = env.token(&["--scope", "read", "--repo", "org/*"]);
    let a = env.tree("a", &[("w.bin", b"org's weights")]);
    let b = env.tree("b", &[("secret.bin", b"other's weights")]);
    env.upload(Some(&writer), "org/a", &a, &[]);
    let ub = env.upload(Some(&writer), "other/b", &b, &[]);
    let b_tree = s(&ub["commit"]["tree"]);
    let b_file = s(&ub["files"][0]["hash"]);

    let (out, _) = env.fetch(Some(&reader), "org/a", "a-copy");
    assert_same_tree(&a, &out);
    let hidden = fails(env.cas(Some(&reader), &["fetch", "other/b", "-o", "x"]));
    let missing = fails(env.cas(Some(&reader), &["fetch", "other/none", "-o", "x"]));
    assert!(hidden.contains("404 repo_not_found"), "{hidden}");
    assert_eq!(
        hidden.replace("other/b", "other/none"),
        missing,
        "a repository the token may not see looks missing"
    );
    let log = fails(env.cas(Some(&reader), &["log", "other/b"]));
    assert!(log.contains("404 repo_not_found"), "{log}");
    let repos = json_of(ok(env.cas(Some(&reader), &["repos", "--json"])));
    assert_eq!(repos.as_array().unwrap().len(), 1, "{repos}");
    assert_eq!(repos[0]["id"], "org/a");

    // By raw hash: refused without a repository, and through one that
    // does not hold the file.
    for hash in [&b_tree, &b_file] {
        let line = fails(env.cas(Some(&reader), &["fetch", hash, "-o", "y"]));
        assert!(line.contains("403 forbidden"), "{line}");
    }
    let get = |query: &str| {
        let r = agent()
            .get(format!("{}/v1/files/{b_file}{query}", env.server.url))
            .header("Authorization", &format!("Bearer {reader}"))
            .call()
            .unwrap();
        let (status, bytes) = body(r);
        (status, String::from_utf8(bytes).unwrap())
    };
    let (status, text) = get("?repo=models/org/a&rev=main");
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("is not in org/a at main"), "{text}");
    let (status, text) = get("?repo=other/b&rev=main");
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("does not grant other/b"), "{text}");
    // The unlimited token reads it either way.
    let (out, _) = env.fetch(Some(&writer), &b_file, "b-file");
    assert_eq!(std::fs::read(out).unwrap(), b"other's weights");

    // A write token limited to org/* commits there and nowhere else.
    let org_writer = env.token(&["--scope", "write", "--scope", "read", "--repo", "org/*"]);
    env.upload(Some(&org_writer), "org/c", &a, &[]);
    let line = fails(env.cas(
        Some(&org_writer),
        &["upload", "--repo", "other/c", a.to_str().unwrap()],
    ));
    assert!(line.contains("404 repo_not_found"), "{line}");
}

/// Names that break the rules are refused by the client with one line,
/// before anything is sent.
#[test]
fn bad_names_are_refused_with_one_clear_line() {
    let env = Env::new();
    let dir = env.tree("d", &[("f", b"x")]);
    let d = dir.to_str().unwrap();
    let m0 = Metrics::fetch(&env.server.url);
    for (args, why) in [
        (
            vec!["upload", "--repo", "../x", d],
            "invalid organisation \"..\"",
        ),
        (
            vec!["upload", "--repo", "a/b/c", d],
            "invalid repository \"a/b/c\"",
        ),
        (
            vec!["upload", "--repo", "org/a", "--branch", "..", d],
            "invalid branch or tag name \"..\"",
        ),
        (
            vec!["upload", "--repo", "org/a", "--parent", "main", d],
            "invalid commit id",
        ),
        (vec!["fetch", "../x"], "invalid organisation \"..\""),
        (vec!["log", "a/b/c"], "invalid repository \"a/b/c\""),
        (
            vec!["tag", "org/a", "..", "main"],
            "invalid branch or tag name \"..\"",
        ),
    ] {
        let line = fails(env.cas(None, &args));
        assert!(line.contains(why), "{args:?}: {line}");
    }
    let m1 = Metrics::fetch(&env.server.url);
    for route in [
        "dedup",
        "xorb_put",
        "shard",
        "repo_commit",
        "repo_revision",
        "repo_log",
        "repo_tag",
    ] {
        assert_eq!(
            m1.requests(route),
            m0.requests(route),
            "{route}: nothing was sent"
        );
    }
    // The server refuses them too, with a 400 naming the rule.
    for path in [
        "/v1/repos/models/.x/y",
        "/v1/repos/models/a--b/y",
        "/v1/repos/spaces/org/a",
        "/v1/repos/models/org/a/revisions/a..b",
    ] {
        let (status, text) = body(
            agent()
                .get(format!("{}{path}", env.server.url))
                .call()
                .unwrap(),
        );
        let text = String::from_utf8(text).unwrap();
        assert!(
            (status == 400 && text.contains("bad_name"))
                || (status == 404 && path.contains("revisions")),
            "{path}: {status} {text}"
        );
    }
}
