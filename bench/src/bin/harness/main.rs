//! `harness`: the whole system against the tools people use today, in one
//! run. Generates seeded workloads (a safetensors model in three versions,
//! a parquet-like dataset in two, a tree of small files in two), starts the
//! release `cas-server` and an nginx (static files for curl and aria2c, and
//! a WebDAV PUT sink for the upload baseline), then per version measures
//! `cas-client upload`, `fetch` with a cold cache and with the previous
//! version cached, against curl PUT, curl GET, `aria2c -x 16 -s 16` +
//! `sha256sum` and `sha256sum` alone; and `cas-client hash` against
//! `hf_xet.hash_files`; on the model's v1, the Hugging Face–compatible API
//! against `cas-client fetch` and a static nginx Hub ([`hub`]). Writes a
//! Markdown table into docs/BENCHMARKS.md
//! (between harness markers) and JSON into docs/benchmarks.json.
//!
//! `--shaped` runs the same comparisons with server and nginx in one network
//! namespace and the clients in another, joined by a veth pair limited to
//! 1 Gbit/s (tc tbf) on both ends.
//!
//! Run: `scripts/setup-bench && cargo build --release --workspace &&
//! target/release/harness` (see docs/BENCHMARKS.md).

mod hub;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cas_bench::{dataset, model};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// Model size in MiB (16 MiB bf16 tensors).
    #[arg(long, default_value_t = 1024)]
    model_mib: u64,
    /// Model shard size in MiB.
    #[arg(long, default_value_t = 256)]
    shard_mib: u64,
    /// Dataset size in MiB.
    #[arg(long, default_value_t = 512)]
    dataset_mib: u64,
    /// Dataset file size in MiB.
    #[arg(long, default_value_t = 128)]
    dataset_file_mib: u64,
    /// Number of small files (1-16 KiB each).
    #[arg(long, default_value_t = 5000)]
    small_files: u64,
    /// The sizes: 4 GiB model in 1 GiB shards, 2 GiB dataset,
    /// 20,000 small files (overrides the size flags; about 30 minutes).
    #[arg(long)]
    full: bool,
    /// Workloads to run, comma-separated: model, dataset, small.
    #[arg(long, default_value = "model,dataset,small")]
    only: String,
    /// Run over a 1 Gbit/s veth link between two network namespaces
    /// (needs root, iproute2 and the tbf qdisc).
    #[arg(long)]
    shaped: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where workloads, server data and downloads go (default: a temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Markdown file whose harness section is replaced.
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    doc: PathBuf,
    /// JSON results file (one key per mode).
    #[arg(long, default_value = "docs/benchmarks.json")]
    json: PathBuf,
    /// Print results only; do not write the doc or the JSON.
    #[arg(long)]
    no_write: bool,
}

const MIB: f64 = 1048576.0;

/// One measured child process.
struct Run {
    seconds: f64,
    rss_kib: u64,
    stdout: String,
}

/// Where things run: the server side and the client side (both the host's
/// loopback, or two network namespaces).
struct Env {
    bin: PathBuf,
    tmp: PathBuf,
    server_ns: Option<String>,
    client_ns: Option<String>,
    host: String,
    token: Option<String>,
}

impl Env {
    fn command(ns: &Option<String>, program: &str) -> Command {
        match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    /// Runs `args` on the client side under GNU time; fails on non-zero exit.
    fn measure(&self, args: &[String]) -> Result<Run> {
        let rss = self.tmp.join("time.out");
        let mut c = Self::command(&self.client_ns, "/usr/bin/time");
        c.args(["-f", "%M", "-o"]).arg(&rss).args(args);
        c.stdin(Stdio::null());
        let t = Instant::now();
        let out = c.output().with_context(|| format!("run {args:?}"))?;
        let seconds = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!(
                "{args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
        let rss_kib = fs::read_to_string(&rss)?
            .lines()
            .rev()
            .find_map(|l| l.trim().parse().ok())
            .unwrap_or(0);
        Ok(Run {
            seconds,
            rss_kib,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        })
    }

    fn sh(&self, script: &str) -> Result<Run> {
        self.measure(&["sh".into(), "-c".into(), script.into()])
    }

    fn client(&self, endpoint: &str, sub: &str, rest: &[String]) -> Vec<String> {
        let mut v = vec![
            self.bin.join("cas-client").display().to_string(),
            sub.into(),
            "--endpoint".into(),
            endpoint.into(),
        ];
        if let Some(t) = &self.token {
            v.extend(["--token".into(), t.clone()]);
        }
        v.extend(rest.iter().cloned());
        v
    }
}

/// A child stopped when dropped: SIGTERM first (nginx's master then stops
/// its workers; SIGKILL would orphan them), SIGKILL after 5 s.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port(host: &str) -> Result<u16> {
    Ok(TcpListener::bind((host, 0))?.local_addr()?.port())
}

fn start_server(env: &Env, data: &Path) -> Result<(Guard, String)> {
    let mut c = Env::command(
        &env.server_ns,
        &env.bin.join("cas-server").display().to_string(),
    );
    c.args([
        "--listen",
        &format!("{}:0", env.host),
        "--log",
        "warn",
        "--data-dir",
    ])
    .arg(data)
    .stdout(Stdio::piped())
    .stderr(fs::File::create(env.tmp.join("cas-server.log"))?);
    if env.token.is_some() {
        c.arg("--signing-key-file").arg(env.tmp.join("signing.key"));
    }
    let mut child = c
        .spawn()
        .context("start cas-server (cargo build --release --workspace)")?;
    let mut reader = BufReader::new(child.stdout.take().context("stdout")?);
    let guard = Guard(child);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let base = line
        .trim()
        .strip_prefix("cas-server listening on ")
        .with_context(|| format!("server banner: {line:?}"))?
        .to_owned();
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    Ok((guard, base))
}

/// nginx serving `root` under `/files/`, a PUT sink under `/put/`, and
/// the `extra` server-level locations.
fn start_nginx(env: &Env, root: &Path, port: u16, extra: &str) -> Result<(Guard, String)> {
    let dir = env.tmp.join("nginx");
    fs::create_dir_all(dir.join("logs"))?;
    fs::create_dir_all(dir.join("put"))?;
    let conf = format!(
        "user root root;\nworker_processes 2;\nerror_log {d}/logs/error.log warn;\nevents {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 100000;\n\
         client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  types {{ }}\n  default_type application/octet-stream;\n\
         server {{\n    listen {h}:{port};\n    location /files/ {{ alias {r}/; }}\n\
         location /put/ {{ root {d}; dav_methods PUT DELETE; create_full_put_path on;\n\
         client_max_body_size 0; client_body_buffer_size 1m; }}\n{extra}  }}\n}}\n",
        d = dir.display(),
        h = env.host,
        r = root.display(),
    );
    fs::write(dir.join("nginx.conf"), conf)?;
    let mut c = Env::command(&env.server_ns, "nginx");
    c.arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("logs/error.log"))
        .arg("-g")
        .arg(format!(
            "daemon off; master_process on; pid {}/nginx.pid;",
            dir.display()
        ))
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("logs/stderr.log"))?);
    let guard = Guard(c.spawn().context("start nginx (scripts/setup-bench)")?);
    let base = format!("http://{}:{port}", env.host);
    for _ in 0..100 {
        let probe = Env::command(&env.client_ns, "curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("{base}/files/"),
            ])
            .output()?;
        if probe.status.success() {
            return Ok((guard, base));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bail!(
        "nginx did not start: {}",
        fs::read_to_string(dir.join("logs/stderr.log")).unwrap_or_default()
    )
}

/// Files under `dir`, relative, sorted.
fn list_files(dir: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push((
                    e.path().strip_prefix(dir)?.to_path_buf(),
                    e.metadata()?.len(),
                ));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn du(dir: &Path) -> u64 {
    list_files(dir).map_or(0, |f| f.iter().map(|(_, n)| n).sum())
}

fn vm_hwm_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn rm(p: &Path) {
    let _ = fs::remove_dir_all(p);
    let _ = fs::remove_file(p);
}

struct Workload {
    name: &'static str,
    /// Directory of each version (v1, v2, ...), under the nginx root.
    versions: Vec<PathBuf>,
}

fn generate(args: &Args, root: &Path) -> Result<Vec<Workload>> {
    let mut out = Vec::new();
    for name in args.only.split(',').map(str::trim) {
        let t = Instant::now();
        let w = match name {
            "model" => {
                let versions: Vec<PathBuf> =
                    (1..=3).map(|v| root.join(format!("model/v{v}"))).collect();
                for (i, d) in versions.iter().enumerate() {
                    if !d.join("config.json").exists() {
                        model::write_model(
                            d,
                            args.model_mib << 20,
                            args.shard_mib << 20,
                            i as u32 + 1,
                            args.seed,
                        )?;
                    }
                }
                Workload {
                    name: "model",
                    versions,
                }
            }
            "dataset" => {
                let versions: Vec<PathBuf> = (1..=2)
                    .map(|v| root.join(format!("dataset/v{v}")))
                    .collect();
                for (i, d) in versions.iter().enumerate() {
                    if !d.exists() {
                        dataset::write_table(
                            d,
                            args.dataset_mib << 20,
                            args.dataset_file_mib << 20,
                            i as u32 + 1,
                            args.seed,
                        )?;
                    }
                }
                Workload {
                    name: "dataset",
                    versions,
                }
            }
            "small" => {
                let versions: Vec<PathBuf> =
                    (1..=2).map(|v| root.join(format!("small/v{v}"))).collect();
                for (i, d) in versions.iter().enumerate() {
                    if !d.exists() {
                        dataset::write_small_files(d, args.small_files, i as u32 + 1, args.seed)?;
                    }
                }
                Workload {
                    name: "small",
                    versions,
                }
            }
            other => bail!("unknown workload {other:?} (model, dataset, small)"),
        };
        eprintln!(
            "harness: generated {name} in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        out.push(w);
    }
    Ok(out)
}

fn json_of(run: &Run) -> Result<Value> {
    serde_json::from_str(run.stdout.trim()).with_context(|| format!("JSON from {:?}", run.stdout))
}

fn op(run: &Run, bytes: u64) -> Value {
    json!({
        "seconds": run.seconds,
        "mib_per_s": bytes as f64 / MIB / run.seconds.max(1e-9),
        "peak_rss_kib": run.rss_kib,
    })
}

/// Writes a curl config for `files` (relative to `dir`), GET or PUT.
fn curl_config(
    path: &Path,
    files: &[(PathBuf, u64)],
    url: &str,
    dir: &Path,
    put: bool,
) -> Result<()> {
    let mut s = String::new();
    for (f, _) in files {
        let rel = f.display();
        if put {
            s.push_str(&format!(
                "upload-file = \"{}\"\nurl = \"{url}/{rel}\"\n",
                dir.join(f).display()
            ));
        } else {
            s.push_str(&format!(
                "url = \"{url}/{rel}\"\noutput = \"{}\"\n",
                dir.join(f).display()
            ));
        }
    }
    fs::write(path, s)?;
    Ok(())
}

fn aria_list(path: &Path, files: &[(PathBuf, u64)], url: &str) -> Result<()> {
    let mut s = String::new();
    for (f, _) in files {
        s.push_str(&format!("{url}/{}\n  out={}\n", f.display(), f.display()));
    }
    fs::write(path, s)?;
    Ok(())
}

/// Runs all versions of one workload; returns its JSON.
fn run_workload(env: &Env, w: &Workload, root: &Path, shaped: bool) -> Result<Value> {
    let work = env.tmp.join(w.name);
    rm(&work);
    fs::create_dir_all(&work)?;
    let data = work.join("server");
    let (server, endpoint) = start_server(env, &data)?;
    let port = if shaped { 18080 } else { free_port(&env.host)? };
    let extra = match w.name {
        "model" => hub::nginx_locations(env, &w.versions[0]),
        _ => String::new(),
    };
    let (_nginx, nginx) = start_nginx(env, root, port, &extra)?;
    let out = work.join("out");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let mut versions = Vec::new();
    let mut prev_cache: Option<PathBuf> = None;
    for (i, dir) in w.versions.iter().enumerate() {
        let v = i + 1;
        let files = list_files(dir)?;
        let bytes: u64 = files.iter().map(|(_, n)| n).sum();
        let rel = dir.strip_prefix(root)?.display().to_string();
        eprintln!(
            "harness: {} v{v}: {} files, {:.0} MiB",
            w.name,
            files.len(),
            bytes as f64 / MIB
        );

        // cas upload
        let up = env.measure(
            &env.client(
                &endpoint,
                "upload",
                &[
                    s(&["--json", "--no-cache"]),
                    vec![dir.display().to_string()],
                ]
                .concat(),
            ),
        )?;
        let uj = json_of(&up)?;
        let hash = uj["roots"][0]["hash"]
            .as_str()
            .context("root hash")?
            .to_owned();
        let stored = du(&data.join("objects"));

        // baseline: curl PUT of the same bytes
        let cfg = work.join("put.curl");
        curl_config(&cfg, &files, &format!("{nginx}/put/{rel}"), dir, true)?;
        let put = env.measure(&s(&["curl", "-sSf", "-K", &cfg.display().to_string()]))?;
        rm(&env.tmp.join("nginx/put"));
        fs::create_dir_all(env.tmp.join("nginx/put"))?;

        // cas fetch, cold cache, then with the previous version's cache
        let fetch = |cache: &Path| -> Result<Run> {
            let r = env.measure(&env.client(
                &endpoint,
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
            Ok(r)
        };
        let cache = work.join(format!("cache-v{v}"));
        let cold = fetch(&cache)?;
        let cj = json_of(&cold)?;
        let warm = match &prev_cache {
            Some(pc) => {
                let r = fetch(pc)?;
                rm(pc);
                Some(r)
            }
            None => None,
        };
        prev_cache = Some(cache);

        // baseline: curl GET, one stream
        let cfg = work.join("get.curl");
        curl_config(&cfg, &files, &format!("{nginx}/files/{rel}"), &out, false)?;
        let curl = env.measure(&s(&[
            "curl",
            "-sSf",
            "--create-dirs",
            "-K",
            &cfg.display().to_string(),
        ]))?;
        rm(&out);

        // baseline: aria2c -x 16 -s 16, then sha256sum
        let list = work.join("aria2.list");
        aria_list(&list, &files, &format!("{nginx}/files/{rel}"))?;
        let aria = env.measure(&s(&[
            "aria2c",
            "-q",
            "-x",
            "16",
            "-s",
            "16",
            "--allow-overwrite=true",
            "--auto-file-renaming=false",
            "-d",
            &out.display().to_string(),
            "-i",
            &list.display().to_string(),
        ]))?;
        let sums = format!(
            "cd '{}' && find . -type f -print0 | sort -z | xargs -0 sha256sum > /dev/null",
            out.display()
        );
        let aria_sum = env.sh(&sums)?;
        rm(&out);

        // sha256sum alone on the source files (CPU yardstick)
        let sha = env.sh(&format!(
            "cd '{}' && find . -type f -print0 | sort -z | xargs -0 sha256sum > /dev/null",
            dir.display()
        ))?;

        let aria_total = aria.seconds + aria_sum.seconds;
        let mut m = json!({
            "version": v,
            "files": files.len(),
            "bytes": bytes,
            "upload": op(&up, bytes),
            "upload_report": {
                "sent_bytes": uj["sent_bytes"], "new_bytes": uj["new_bytes"],
                "dedup_ratio": uj["dedup_ratio"], "xorbs": uj["xorbs"],
            },
            "server_stored_bytes": stored,
            "curl_put": op(&put, bytes),
            "fetch_cold": op(&cold, bytes),
            "fetch_cold_network_bytes": cj["network_bytes"],
            "curl_get": op(&curl, bytes),
            "aria2c": op(&aria, bytes),
            "aria2c_sha256sum_seconds": aria_total,
            "sha256sum": op(&sha, bytes),
            "ratios": {
                "upload_vs_curl_put": up.seconds / put.seconds,
                "fetch_cold_vs_curl": cold.seconds / curl.seconds,
                "fetch_cold_vs_aria2c_sha256sum": cold.seconds / aria_total,
            },
        });
        if let Some(r) = &warm {
            let wj = json_of(r)?;
            m["fetch_cached_prev"] = op(r, bytes);
            m["fetch_cached_prev_network_bytes"] = wj["network_bytes"].clone();
            m["fetch_cached_prev_cache_bytes"] = wj["cache_bytes"].clone();
            m["ratios"]["fetch_cached_prev_vs_aria2c_sha256sum"] = json!(r.seconds / aria_total);
            m["ratios"]["fetch_cached_prev_vs_curl"] = json!(r.seconds / curl.seconds);
        }
        if w.name == "model" && v == 1 {
            m["hub"] = hub::compare(env, &endpoint, &nginx, dir, &work)?;
        }
        eprintln!(
            "harness: {} v{v}: upload {:.2} s (curl PUT {:.2}), fetch cold {:.2} s{} (curl {:.2}, aria2c+sha256sum {:.2}), sha256sum {:.2}",
            w.name,
            up.seconds,
            put.seconds,
            cold.seconds,
            warm.as_ref().map_or(String::new(), |r| format!(", prev cached {:.2} s", r.seconds)),
            curl.seconds,
            aria_total,
            sha.seconds
        );
        versions.push(m);
    }
    if let Some(pc) = prev_cache {
        rm(&pc);
    }
    let server_rss = vm_hwm_kib(server.0.id());
    drop(server);

    // chunk + hash, local: v1's files
    let hash = if shaped {
        Value::Null
    } else {
        let files = list_files(&w.versions[0])?;
        let bytes: u64 = files.iter().map(|(_, n)| n).sum();
        let paths: Vec<String> = files
            .iter()
            .map(|(f, _)| w.versions[0].join(f).display().to_string())
            .collect();
        let list = work.join("paths.json");
        fs::write(&list, serde_json::to_string(&paths)?)?;
        let mut a = vec![
            env.bin.join("cas-client").display().to_string(),
            "hash".into(),
        ];
        a.extend(paths.iter().cloned());
        let ours = env.measure(&a)?;
        let hf = env.measure(&s(&[
            "python3",
            "-c",
            &format!(
                "import json, hf_xet; hf_xet.hash_files(json.load(open('{}')))",
                list.display()
            ),
        ]))?;
        let sha = env.sh(&format!(
            "cd '{}' && find . -type f -print0 | sort -z | xargs -0 sha256sum > /dev/null",
            w.versions[0].display()
        ))?;
        eprintln!(
            "harness: {} hash: cas-client {:.2} s, hf_xet {:.2} s, sha256sum {:.2} s",
            w.name, ours.seconds, hf.seconds, sha.seconds
        );
        json!({
            "bytes": bytes,
            "cas_client_hash": op(&ours, bytes),
            "hf_xet_hash_files": op(&hf, bytes),
            "sha256sum": op(&sha, bytes),
            "ratio_cas_vs_hf_xet": ours.seconds / hf.seconds,
            "ratio_cas_vs_sha256sum": ours.seconds / sha.seconds,
        })
    };
    rm(&work);
    Ok(json!({
        "name": w.name,
        "versions": versions,
        "server_peak_rss_kib": server_rss,
        "hash": hash,
    }))
}

/// Network namespaces joined by a shaped veth pair; removed when dropped.
struct Shaped;

const NS_SERVER: &str = "casb-srv";
const NS_CLIENT: &str = "casb-cli";

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn delete_namespaces() {
    for ns in [NS_SERVER, NS_CLIENT] {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
}

impl Shaped {
    fn new() -> Result<Self> {
        // Leftovers of an interrupted run.
        delete_namespaces();
        ip(&["netns", "add", NS_SERVER])?;
        let me = Shaped;
        ip(&["netns", "add", NS_CLIENT])?;
        ip(&[
            "link", "add", "casb-s", "type", "veth", "peer", "name", "casb-c",
        ])?;
        ip(&["link", "set", "casb-s", "netns", NS_SERVER])?;
        ip(&["link", "set", "casb-c", "netns", NS_CLIENT])?;
        for (ns, dev, addr) in [
            (NS_SERVER, "casb-s", "10.77.0.1/24"),
            (NS_CLIENT, "casb-c", "10.77.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            let tc = Command::new("ip")
                .args([
                    "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                ])
                .args(["rate", "1gbit", "burst", "256kb", "latency", "50ms"])
                .output()?;
            if !tc.status.success() {
                bail!(
                    "tc tbf on {dev}: {}",
                    String::from_utf8_lossy(&tc.stderr).trim()
                );
            }
        }
        Ok(me)
    }
}

impl Drop for Shaped {
    fn drop(&mut self) {
        delete_namespaces();
    }
}

fn mib(b: u64) -> String {
    let m = b as f64 / MIB;
    if m >= 1024.0 {
        format!("{:.2} GiB", m / 1024.0)
    } else if m >= 10.0 {
        format!("{m:.0} MiB")
    } else {
        format!("{m:.1} MiB")
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The Markdown of one run.
fn markdown(r: &Value) -> String {
    let mut s = String::new();
    let w = |s: &mut String, l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    w(
        &mut s,
        format!(
            "Run of {} ({}), `{}`:",
            r["date"].as_str().unwrap_or(""),
            r["mode"].as_str().unwrap_or(""),
            r["command"].as_str().unwrap_or("")
        ),
    );
    w(&mut s, String::new());
    w(&mut s, "| workload | ver | size | upload | sent | dedup | stored on server | fetch, cold cache | fetch, prev. version cached | downloaded cold / cached | client peak RSS up / cold / cached |".into());
    w(
        &mut s,
        "|---|---|---|---|---|---|---|---|---|---|---|".into(),
    );
    for wl in r["workloads"].as_array().into_iter().flatten() {
        for v in wl["versions"].as_array().into_iter().flatten() {
            let bytes = u(&v["bytes"]);
            let warm = &v["fetch_cached_prev"];
            w(&mut s, format!(
                "| {} | v{} | {} ({} files) | {:.2} s ({:.0} MiB/s) | {} | {:.1}% | {} | {:.2} s ({:.0} MiB/s) | {} | {} / {} | {} / {} / {} MiB |",
                wl["name"].as_str().unwrap_or(""),
                v["version"],
                mib(bytes),
                v["files"],
                f(&v["upload"]["seconds"]),
                f(&v["upload"]["mib_per_s"]),
                mib(u(&v["upload_report"]["sent_bytes"])),
                100.0 * f(&v["upload_report"]["dedup_ratio"]),
                mib(u(&v["server_stored_bytes"])),
                f(&v["fetch_cold"]["seconds"]),
                f(&v["fetch_cold"]["mib_per_s"]),
                if warm.is_null() { "—".into() } else { format!("{:.2} s ({:.0} MiB/s)", f(&warm["seconds"]), f(&warm["mib_per_s"])) },
                mib(u(&v["fetch_cold_network_bytes"])),
                if warm.is_null() { "—".into() } else { mib(u(&v["fetch_cached_prev_network_bytes"])) },
                u(&v["upload"]["peak_rss_kib"]) / 1024,
                u(&v["fetch_cold"]["peak_rss_kib"]) / 1024,
                if warm.is_null() { "—".into() } else { (u(&warm["peak_rss_kib"]) / 1024).to_string() },
            ));
        }
    }
    w(&mut s, String::new());
    w(&mut s, "Baselines on the same files in the same session, and ratios (ours / baseline; below 1 means cas is faster):".into());
    w(&mut s, String::new());
    w(&mut s, "| workload | ver | curl PUT | **upload / PUT** | curl GET (1 stream) | aria2c -x16 -s16 + sha256sum | sha256sum alone | **cold / curl** | **cold / aria2c+sha** | **cached / aria2c+sha** |".into());
    w(&mut s, "|---|---|---|---|---|---|---|---|---|---|".into());
    for wl in r["workloads"].as_array().into_iter().flatten() {
        for v in wl["versions"].as_array().into_iter().flatten() {
            let ra = &v["ratios"];
            let cached = &ra["fetch_cached_prev_vs_aria2c_sha256sum"];
            w(&mut s, format!(
                "| {} | v{} | {:.2} s | **{:.2}** | {:.2} s | {:.2} s ({:.2} + {:.2}) | {:.2} s | **{:.2}** | **{:.2}** | {} |",
                wl["name"].as_str().unwrap_or(""),
                v["version"],
                f(&v["curl_put"]["seconds"]),
                f(&ra["upload_vs_curl_put"]),
                f(&v["curl_get"]["seconds"]),
                f(&v["aria2c_sha256sum_seconds"]),
                f(&v["aria2c"]["seconds"]),
                f(&v["aria2c_sha256sum_seconds"]) - f(&v["aria2c"]["seconds"]),
                f(&v["sha256sum"]["seconds"]),
                f(&ra["fetch_cold_vs_curl"]),
                f(&ra["fetch_cold_vs_aria2c_sha256sum"]),
                if cached.is_null() { "—".into() } else { format!("**{:.2}**", f(cached)) },
            ));
        }
    }
    w(&mut s, String::new());
    let rss: Vec<String> = r["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|wl| {
            format!(
                "{} {} MiB",
                wl["name"].as_str().unwrap_or(""),
                u(&wl["server_peak_rss_kib"]) / 1024
            )
        })
        .collect();
    w(
        &mut s,
        format!(
            "Server peak RSS (VmHWM, one server per workload): {}.",
            rss.join(", ")
        ),
    );
    let hashes: Vec<&Value> = r["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|wl| !wl["hash"].is_null())
        .collect();
    if !hashes.is_empty() {
        w(&mut s, String::new());
        w(&mut s, "Chunk + hash of v1's files, local (hf_xet computes no SHA-256; `cas-client hash` does):".into());
        w(&mut s, String::new());
        w(&mut s, "| workload | bytes | `cas-client hash` | `hf_xet.hash_files` | `sha256sum` | **cas / hf_xet** | **cas / sha256sum** | RSS cas / hf_xet |".into());
        w(&mut s, "|---|---|---|---|---|---|---|---|".into());
        for wl in hashes {
            let h = &wl["hash"];
            w(&mut s, format!(
                "| {} | {} | {:.2} s ({:.0} MiB/s) | {:.2} s ({:.0} MiB/s) | {:.2} s | **{:.2}** | **{:.2}** | {} / {} MiB |",
                wl["name"].as_str().unwrap_or(""),
                mib(u(&h["bytes"])),
                f(&h["cas_client_hash"]["seconds"]),
                f(&h["cas_client_hash"]["mib_per_s"]),
                f(&h["hf_xet_hash_files"]["seconds"]),
                f(&h["hf_xet_hash_files"]["mib_per_s"]),
                f(&h["sha256sum"]["seconds"]),
                f(&h["ratio_cas_vs_hf_xet"]),
                f(&h["ratio_cas_vs_sha256sum"]),
                u(&h["cas_client_hash"]["peak_rss_kib"]) / 1024,
                u(&h["hf_xet_hash_files"]["peak_rss_kib"]) / 1024,
            ));
        }
    }
    for wl in r["workloads"].as_array().into_iter().flatten() {
        for v in wl["versions"].as_array().into_iter().flatten() {
            if !v["hub"].is_null() {
                w(&mut s, String::new());
                s.push_str(&hub::markdown(&v["hub"]));
            }
        }
    }
    s
}

fn replace_section(doc: &Path, tag: &str, body: &str) -> Result<()> {
    let text = fs::read_to_string(doc).with_context(|| format!("read {}", doc.display()))?;
    let (b, e) = (
        format!("<!-- {tag}:begin -->"),
        format!("<!-- {tag}:end -->"),
    );
    let new = match (text.find(&b), text.find(&e)) {
        (Some(i), Some(j)) if i < j => format!("{}{b}\n{body}{}", &text[..i], &text[j..]),
        _ => format!(
            "{}\n{b}\n{body}{e}\n",
            text.trim_end_matches('\n').to_owned() + "\n"
        ),
    };
    fs::write(doc, new)?;
    Ok(())
}

fn today() -> String {
    Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.full {
        args.model_mib = 4096;
        args.shard_mib = 1024;
        args.dataset_mib = 2048;
        args.dataset_file_mib = 256;
        args.small_files = 20_000;
    }
    let bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .to_owned();
    for tool in ["nginx", "curl", "aria2c", "sha256sum", "python3"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()?
            .stdout
            .is_empty()
        {
            bail!("{tool} not found: run scripts/setup-bench");
        }
    }
    let tmp_holder;
    let tmp = match &args.work_dir {
        Some(d) => {
            fs::create_dir_all(d)?;
            d.canonicalize()?
        }
        None => {
            tmp_holder = tempfile::Builder::new()
                .prefix("cas-harness")
                .tempdir_in(std::env::temp_dir())?;
            tmp_holder.path().to_path_buf()
        }
    };
    let root = tmp.join("workloads");
    let run_dir = tmp.join("run");
    rm(&run_dir);
    fs::create_dir_all(&run_dir)?;
    // nginx workers run as nobody/www-data: let them read the workloads.
    let _ = Command::new("chmod").args(["a+rx"]).arg(&tmp).status();

    let workloads = generate(&args, &root)?;
    let _ = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&root)
        .status();

    let shaped = if args.shaped {
        Some(Shaped::new().context("set up network namespaces")?)
    } else {
        None
    };
    let mut env = Env {
        bin: bin.clone(),
        tmp: run_dir.clone(),
        server_ns: None,
        client_ns: None,
        host: "127.0.0.1".into(),
        token: None,
    };
    if shaped.is_some() {
        env.server_ns = Some(NS_SERVER.into());
        env.client_ns = Some(NS_CLIENT.into());
        env.host = "10.77.0.1".into();
        // Non-loopback peers need tokens.
        let key = run_dir.join("signing.key");
        let cas = bin.join("cas-server");
        let st = Command::new(&cas)
            .args(["key", "create"])
            .arg(&key)
            .output()?;
        if !st.status.success() {
            bail!(
                "cas-server key create: {}",
                String::from_utf8_lossy(&st.stderr)
            );
        }
        let t = Command::new(&cas)
            .args([
                "token",
                "create",
                "--scope",
                "read",
                "--scope",
                "write",
                "--ttl",
                "24h",
                "--signing-key-file",
            ])
            .arg(&key)
            .output()?;
        env.token = Some(
            String::from_utf8_lossy(&t.stdout)
                .split_whitespace()
                .next()
                .context("token")?
                .to_owned(),
        );
    }

    let started = Instant::now();
    let mut results = Vec::new();
    for w in &workloads {
        results.push(run_workload(&env, w, &root, shaped.is_some())?);
    }
    drop(shaped);
    let mode = if args.shaped { "shaped" } else { "loopback" };
    let command = std::env::args()
        .enumerate()
        .map(|(i, a)| {
            if i == 0 {
                "target/release/harness".into()
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    let report = json!({
        "date": today(),
        "mode": mode,
        "command": command,
        "link": if args.shaped { "veth between two network namespaces, tc tbf 1gbit burst 256kb latency 50ms on both ends; token auth" } else { "loopback" },
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "seed": args.seed,
        "sizes": {
            "model_mib": args.model_mib, "shard_mib": args.shard_mib,
            "dataset_mib": args.dataset_mib, "dataset_file_mib": args.dataset_file_mib,
            "small_files": args.small_files,
        },
        "seconds": started.elapsed().as_secs_f64(),
        "workloads": results,
    });
    let md = markdown(&report);
    println!("{md}");
    if !args.no_write {
        let tag = if args.shaped {
            "harness-shaped"
        } else {
            "harness"
        };
        replace_section(&args.doc, tag, &md)?;
        let mut all: Value = fs::read_to_string(&args.json)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_else(|| json!({}));
        all[mode] = report;
        let mut fh = fs::File::create(&args.json)?;
        writeln!(fh, "{}", serde_json::to_string_pretty(&all)?)?;
        eprintln!(
            "harness: wrote {} and {}",
            args.doc.display(),
            args.json.display()
        );
    }
    eprintln!("harness: done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
