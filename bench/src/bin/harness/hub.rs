//! The Hugging Face–compatible API against its yardsticks, on the model
//! workload's v1, in the same run (docs/HUB.md, docs/BENCHMARKS.md):
//!
//! - one file streamed through `/resolve` (curl: the redirect, then one
//!   connection; the server reconstructs and verifies) against
//!   `cas-client fetch` of the same file with a cold cache. Goal: at least
//!   0.7 of fetch's speed.
//! - `snapshot_download` of the whole model through our server against
//!   the same files from a plain nginx static server that answers the
//!   same Hub routes from files (the API answers saved from our server;
//!   `/resolve/` an alias of the model directory). Goal: at most 1.5x
//!   nginx's time.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::{json_of, list_files, op, rm, Env};

/// The repository the model is committed to.
const REPO: &str = "bench/model";

/// Where the static Hub's API answers live under the run directory.
fn static_dir(env: &Env) -> std::path::PathBuf {
    env.tmp.join("static-hub")
}

/// nginx locations that serve the model in `model_dir` as a static Hub:
/// the info and tree answers from files, the files by alias, each with
/// the `X-Repo-Commit` the client needs (taken from the URL).
pub fn nginx_locations(env: &Env, model_dir: &Path) -> String {
    let d = static_dir(env);
    format!(
        "location = /api/models/{REPO}/revision/main {{ default_type application/json; alias {d}/info.json; }}\n\
         location ^~ /api/models/{REPO}/tree/ {{ default_type application/json; root {d}; rewrite ^ /tree.json break; }}\n\
         location ~ \"^/{REPO}/resolve/(?<c>[0-9a-f]{{40}})/(?<p>.+)$\" {{ alias {m}/$p; add_header X-Repo-Commit $c always; }}\n",
        d = d.display(),
        m = model_dir.display(),
    )
}

/// Runs both comparisons against `endpoint` (our server, which already
/// stores the model's chunks) and `nginx` (with [`nginx_locations`]).
pub fn compare(
    env: &Env,
    endpoint: &str,
    nginx: &str,
    model_dir: &Path,
    work: &Path,
) -> Result<Value> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let dir = model_dir.display().to_string();
    let up = env.measure(&env.client(
        endpoint,
        "upload",
        &s(&["--json", "--no-cache", "--repo", REPO, "-m", "bench", &dir]),
    ))?;
    let commit = json_of(&up)?["commit"]["id"]
        .as_str()
        .context("commit id")?
        .to_owned();

    // One file: the largest.
    let files = list_files(model_dir)?;
    let (rel, size) = files
        .iter()
        .max_by_key(|(_, n)| *n)
        .context("model files")?
        .clone();
    let rel = rel.display().to_string();
    let one = env.measure(&env.client(
        endpoint,
        "upload",
        &s(&["--json", "--no-cache", &format!("{dir}/{rel}")]),
    ))?;
    let hash = json_of(&one)?["roots"][0]["hash"]
        .as_str()
        .context("file hash")?
        .to_owned();
    let out = work.join("hub-out.bin");
    let cache = work.join("hub-cache");
    let fetch = env.measure(&env.client(
        endpoint,
        "fetch",
        &s(&[
            &hash,
            "-o",
            &out.display().to_string(),
            "--json",
            "--cache-dir",
            &cache.display().to_string(),
        ]),
    ))?;
    rm(&out);
    rm(&cache);
    let mut curl = s(&["curl", "-sSf", "-L", "-o", &out.display().to_string()]);
    if let Some(t) = &env.token {
        curl.extend(s(&["-H", &format!("Authorization: Bearer {t}")]));
    }
    curl.push(format!("{endpoint}/{REPO}/resolve/main/{rel}"));
    let resolve = env.measure(&curl)?;
    let got = fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    anyhow::ensure!(got == size, "/resolve gave {got} bytes of {size}");
    rm(&out);

    // The static Hub: our server's own answers, saved.
    let sd = static_dir(env);
    fs::create_dir_all(&sd)?;
    let save = |url: String, name: &str| -> Result<()> {
        let mut c = s(&["curl", "-sSf", "-o", &sd.join(name).display().to_string()]);
        if let Some(t) = &env.token {
            c.extend(s(&["-H", &format!("Authorization: Bearer {t}")]));
        }
        c.push(url);
        env.measure(&c).map(|_| ())
    };
    save(
        format!("{endpoint}/api/models/{REPO}/revision/main"),
        "info.json",
    )?;
    save(
        format!("{endpoint}/api/models/{REPO}/tree/{commit}?recursive=true"),
        "tree.json",
    )?;
    let _ = std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&sd)
        .status();

    let bytes: u64 = files.iter().map(|(_, n)| n).sum();
    let python = std::env::var("CAS_HF_VENV")
        .map(|v| format!("{v}/bin/python"))
        .unwrap_or_else(|_| {
            format!(
                "{}/.cache/cas-venv/bin/python",
                std::env::var("HOME").unwrap_or_default()
            )
        });
    let snapshot = |base: &str, name: &str| -> Result<super::Run> {
        let home = work.join(format!("hf-{name}"));
        let mut a = s(&[
            "env",
            &format!("HF_ENDPOINT={base}"),
            &format!("HF_HOME={}", home.display()),
            "HF_HUB_DISABLE_PROGRESS_BARS=1",
            "HF_HUB_DISABLE_TELEMETRY=1",
        ]);
        if let Some(t) = &env.token {
            a.push(format!("HF_TOKEN={t}"));
        }
        a.extend(s(&[
            &python,
            "-c",
            &format!("from huggingface_hub import snapshot_download; snapshot_download('{REPO}')"),
        ]));
        let r = env.measure(&a)?;
        let got: u64 = list_files(&home.join("hub"))?
            .iter()
            .filter(|(p, _)| p.starts_with(format!("models--{}/blobs", REPO.replace('/', "--"))))
            .map(|(_, n)| n)
            .sum();
        anyhow::ensure!(
            got == bytes,
            "snapshot_download from {name} got {got} bytes of {bytes}"
        );
        rm(&home);
        Ok(r)
    };
    let ours = snapshot(endpoint, "ours")?;
    let plain = snapshot(nginx, "nginx")?;
    eprintln!(
        "harness: hub: /resolve {:.2} s vs fetch {:.2} s ({rel}); snapshot_download ours {:.2} s vs nginx {:.2} s",
        resolve.seconds, fetch.seconds, ours.seconds, plain.seconds
    );
    Ok(json!({
        "file": rel,
        "file_bytes": size,
        "resolve_curl": op(&resolve, size),
        "fetch_cold": op(&fetch, size),
        "resolve_speed_vs_fetch": fetch.seconds / resolve.seconds,
        "model_bytes": bytes,
        "snapshot_download_ours": op(&ours, bytes),
        "snapshot_download_nginx": op(&plain, bytes),
        "snapshot_ours_vs_nginx": ours.seconds / plain.seconds,
    }))
}

/// The Markdown lines of the comparison.
pub fn markdown(h: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    format!(
        "Hub API (model v1): one file ({}, {:.0} MiB) through `/resolve` with curl {:.2} s ({:.0} MiB/s) vs \
         `cas-client fetch` {:.2} s ({:.0} MiB/s): **{:.2}x fetch's speed** (goal ≥ 0.7). \
         `snapshot_download` of the model: ours {:.2} s vs a plain nginx static server {:.2} s: \
         **{:.2}x** (goal ≤ 1.5).\n",
        h["file"].as_str().unwrap_or(""),
        f(&h["file_bytes"]) / super::MIB,
        f(&h["resolve_curl"]["seconds"]),
        f(&h["resolve_curl"]["mib_per_s"]),
        f(&h["fetch_cold"]["seconds"]),
        f(&h["fetch_cold"]["mib_per_s"]),
        f(&h["resolve_speed_vs_fetch"]),
        f(&h["snapshot_download_ours"]["seconds"]),
        f(&h["snapshot_download_nginx"]["seconds"]),
        f(&h["snapshot_ours_vs_nginx"]),
    )
}
