//! Driving the stock `huggingface_hub` client (pinned, in the venv that
//! `scripts/setup-python` makes and `scripts/test` names in
//! `CAS_HF_VENV`) from the tests: its API calls through
//! `tests/hub/hf_calls.py`, and its `hf` command.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::show;

/// The venv with the pinned huggingface_hub. A test that needs it fails,
/// with the way to get it, when it is missing: never a silent skip.
pub fn venv() -> PathBuf {
    let dir = std::env::var_os("CAS_HF_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "CAS_HF_VENV is not set: run scripts/setup-python and export \
             CAS_HF_VENV=<the directory it prints> (scripts/test does both)"
            )
        });
    for exe in ["python", "hf"] {
        assert!(
            dir.join("bin").join(exe).is_file(),
            "{} has no bin/{exe}: run scripts/setup-python (CAS_HF_VENV={})",
            dir.display(),
            dir.display()
        );
    }
    dir
}

/// An exception the client raised.
#[derive(Debug, Clone)]
pub struct HfError {
    /// Its class.
    pub kind: String,
    /// Its class and every class it derives from.
    pub mro: Vec<String>,
    pub status: Option<u64>,
    pub message: String,
}

impl HfError {
    /// Whether the exception is a `class` (or derives from it).
    pub fn is(&self, class: &str) -> bool {
        self.mro.iter().any(|c| c == class)
    }
}

/// The stock client as a user runs it: `HF_ENDPOINT` = our server,
/// `HF_TOKEN` = one of our tokens (or none), and its own `HF_HOME` so no
/// cache or token of the machine leaks in.
pub struct Hf {
    pub endpoint: String,
    pub token: Option<String>,
    pub home: PathBuf,
}

impl Hf {
    pub fn new(endpoint: &str, token: Option<&str>, home: &Path) -> Self {
        std::fs::create_dir_all(home).unwrap();
        Self {
            endpoint: endpoint.to_owned(),
            token: token.map(str::to_owned),
            home: home.to_owned(),
        }
    }

    /// The same client with another token (`None`: anonymous).
    pub fn with_token(&self, token: Option<&str>) -> Self {
        Self::new(&self.endpoint, token, &self.home)
    }

    /// A command of the venv (`python`, `hf`) in this client's environment.
    pub fn command(&self, exe: &str) -> Command {
        let mut c = Command::new(venv().join("bin").join(exe));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("HF_") {
                c.env_remove(&k);
            }
        }
        c.env("HF_ENDPOINT", &self.endpoint)
            .env("HF_HOME", &self.home)
            .env("HF_HUB_DISABLE_TELEMETRY", "1")
            // Uploads take the Git LFS path (the server has no Xet API).
            .env("HF_HUB_DISABLE_XET", "1")
            .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            .env("NO_COLOR", "1");
        if let Some(t) = &self.token {
            c.env("HF_TOKEN", t);
        }
        c
    }

    /// `HfApi().OP(**args)` (or the module function `OP`): its result, or
    /// the exception it raised.
    pub fn call(&self, op: &str, args: Value) -> Result<Value, HfError> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hub/hf_calls.py");
        let mut c = self.command("python");
        c.arg(script).arg(op).arg(args.to_string());
        let out = c.output().unwrap();
        let line = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("{op}: {e}; {}", show(&out)));
        match v.get("ok") {
            Some(ok) => Ok(ok.clone()),
            None => {
                let e = &v["error"];
                Err(HfError {
                    kind: e["type"].as_str().unwrap().to_owned(),
                    mro: e["mro"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| c.as_str().unwrap().to_owned())
                        .collect(),
                    status: e["status"].as_u64(),
                    message: e["message"].as_str().unwrap().to_owned(),
                })
            }
        }
    }

    /// [`call`](Self::call), which must succeed.
    pub fn ok(&self, op: &str, args: Value) -> Value {
        self.call(op, args.clone())
            .unwrap_or_else(|e| panic!("{op}({args}) raised {}: {}", e.kind, e.message))
    }

    /// [`call`](Self::call), which must raise.
    pub fn err(&self, op: &str, args: Value) -> HfError {
        match self.call(op, args.clone()) {
            Ok(v) => panic!("{op}({args}) returned {v} instead of raising"),
            Err(e) => e,
        }
    }
}

/// Every file under `dir` (symlinks followed, as in the client's cache;
/// its `.cache` metadata directory left out): relative path -> bytes.
pub fn files_under(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_owned();
            if rel == ".cache" {
                continue;
            }
            if std::fs::metadata(&p).unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// `got` holds exactly the files `want` names, byte for byte (paths
/// listed on a mismatch, never megabytes of bytes).
pub fn assert_same_files(want: &BTreeMap<String, Vec<u8>>, got: &Path) {
    let g = files_under(got);
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        g.keys().collect::<Vec<_>>(),
        "files under {}",
        got.display()
    );
    for (path, bytes) in want {
        assert!(
            *bytes == g[path],
            "{path}: {} bytes expected, got {} different ones",
            bytes.len(),
            g[path].len()
        );
    }
}
