//! Helpers for the end-to-end tests in tests/: they run the real binaries
//! that `cargo build --workspace --bins` put next to the test executables,
//! and speak the HTTP API with a minimal uploader and fetcher written
//! straight from docs/API.md and docs/PROTOCOL.md.

pub mod client;
pub mod hub;
pub mod nginx;
pub mod s3;
pub mod standin;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use cas_protocol::chunking::chunk_and_hash;
use cas_protocol::messages::{DedupAnswer, DedupQuery, Reconstruction};
use cas_protocol::shard::{FileRecipe, Shard, Term, XorbChunkTable};
use cas_protocol::xorb::{BuiltXorb, Compression, EncodedChunk, Frames, XorbBuilder};
use cas_protocol::{ChunkRange, FileHash, Kind, Message, RangeHash, Sha256, XorbHash};

/// A command for one of the workspace's binaries (`cas-client`, `cas-server`).
///
/// Panics with instructions when the binary has not been built: a test that
/// silently skipped would prove nothing.
pub fn bin(name: &str) -> Command {
    Command::new(bin_path(name))
}

/// The path of one of the workspace's binaries (see [`bin`]).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target profile dir");
    let path: PathBuf = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `cas-server` on a free loopback port; killed when dropped.
pub struct ServerProcess {
    child: Child,
    pub url: String,
    pub data_dir: PathBuf,
}

impl ServerProcess {
    /// Starts the real binary on `data_dir` and waits until it listens.
    pub fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[])
    }

    /// As [`start`](Self::start) with more flags; a `--listen` among them
    /// replaces the default free port.
    pub fn start_with(data_dir: &Path, extra_args: &[&str]) -> Self {
        Self::spawn(bin("cas-server"), data_dir, extra_args)
    }

    /// As [`start_with`](Self::start_with), under the open-file limits that
    /// `ulimit` sets with `ulimit_args` (e.g. `-n 256` for both limits,
    /// `-Sn 256` for the soft one).
    pub fn start_with_ulimit(data_dir: &Path, extra_args: &[&str], ulimit_args: &str) -> Self {
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(format!("ulimit {ulimit_args} && exec \"$0\" \"$@\""))
            .arg(bin_path("cas-server"));
        Self::spawn(sh, data_dir, extra_args)
    }

    /// As [`start_with`](Self::start_with) with a prepared `cas-server`
    /// command (its environment, e.g. S3 credentials).
    pub fn spawn_cmd(cmd: Command, data_dir: &Path, extra_args: &[&str]) -> Self {
        Self::spawn(cmd, data_dir, extra_args)
    }

    fn spawn(mut cmd: Command, data_dir: &Path, extra_args: &[&str]) -> Self {
        if !extra_args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .args(["--log", "warn", "--data-dir"])
            .arg(data_dir)
            .args(extra_args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn cas-server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read stdout");
        let url = line
            .trim()
            .strip_prefix("cas-server listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Self {
            child,
            url,
            data_dir: data_dir.to_owned(),
        }
    }

    /// Stops this server and starts the binary again on the same data
    /// directory with `extra_args` (on a new port: `url` changes).
    pub fn restart_with(&mut self, extra_args: &[&str]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let data_dir = self.data_dir.clone();
        *self = Self::start_with(&data_dir, extra_args);
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of /proc/<pid>/status in bytes, e.g. `VmRSS` (resident
    /// memory now) or `VmHWM` (its peak).
    pub fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix(" kB")?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in\n{status}"));
        kib * 1024
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP agent that returns 4xx/5xx responses instead of errors.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// A response's status and whole body.
pub fn body(mut r: ureq::http::Response<ureq::Body>) -> (u16, Vec<u8>) {
    let status = r.status().as_u16();
    let bytes = r
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .expect("read body");
    (status, bytes)
}

/// The body of a response whose status is one of `ok`; anything else
/// (including a transport error) is an error naming `what`.
fn expect_status(
    r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ok: &[u16],
    what: &str,
) -> Result<Vec<u8>, String> {
    let (status, bytes) = body(r.map_err(|e| format!("{what}: {e}"))?);
    if !ok.contains(&status) {
        return Err(format!(
            "{what}: {status} {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    Ok(bytes)
}

/// Result of [`upload`].
#[derive(Debug)]
pub struct Uploaded {
    pub files: Vec<FileHash>,
    pub xorbs_sent: usize,
    pub chunks_deduped: usize,
}

/// Uploads files the way the protocol intends: chunk, ask which chunks the
/// server has, pack only new ones into xorbs, PUT them, POST one shard.
pub fn upload(base: &str, files: &[&[u8]]) -> Result<Uploaded, String> {
    upload_as(base, files, Kind::File)
}

/// As [`upload`], registering every file as `kind`.
pub fn upload_as(base: &str, files: &[&[u8]], kind: Kind) -> Result<Uploaded, String> {
    upload_with(base, files, kind, Sha256::of)
}

/// As [`upload_as`], claiming `sha256(data)` as each file's SHA-256 (a
/// forger's claim, in tests of what the server believes).
pub fn upload_with(
    base: &str,
    files: &[&[u8]],
    kind: Kind,
    sha256: impl Fn(&[u8]) -> Sha256,
) -> Result<Uploaded, String> {
    let agent = agent();
    let chunked: Vec<_> = files.iter().map(|d| chunk_and_hash(d)).collect();
    let all: Vec<_> = chunked.iter().flatten().map(|c| c.hash).collect();
    let mut known = HashMap::new();
    for batch in all.chunks(cas_protocol::messages::MAX_DEDUP_BATCH) {
        let q = DedupQuery {
            chunks: batch.to_vec(),
        };
        let r = agent
            .post(format!("{base}/v1/dedup"))
            .send(&q.to_bytes()[..]);
        let bytes = expect_status(r, &[200], "dedup")?;
        let a = DedupAnswer::from_bytes(&bytes).map_err(|e| e.to_string())?;
        for (h, loc) in batch.iter().zip(a.found) {
            if let Some(l) = loc {
                known.insert(*h, (l.xorb, l.index));
            }
        }
    }
    let chunks_deduped = all.iter().filter(|h| known.contains_key(h)).count();
    // Pack new chunks; xorb positions are assigned as they are packed.
    let mut built: Vec<BuiltXorb> = Vec::new();
    let mut pending: Vec<(cas_protocol::ChunkHash, usize)> = Vec::new(); // chunk -> position
    let mut builder = XorbBuilder::new();
    let mut finish = |builder: XorbBuilder, pending: &mut Vec<_>, known: &mut HashMap<_, _>| {
        let x = builder.finish().expect("non-empty");
        for (h, i) in pending.drain(..) {
            known.insert(h, (x.hash, i as u32));
        }
        built.push(x);
    };
    for (data, chunks) in files.iter().zip(&chunked) {
        let mut pos = 0;
        for c in chunks {
            let bytes = &data[pos..pos + c.len as usize];
            pos += c.len as usize;
            if known.contains_key(&c.hash) || pending.iter().any(|(h, _)| *h == c.hash) {
                continue;
            }
            let mut enc = EncodedChunk::encode_with_hash(bytes, c.hash, Compression::default())
                .expect("chunk");
            if let Err(back) = builder.try_push(enc) {
                finish(std::mem::take(&mut builder), &mut pending, &mut known);
                enc = back;
                builder.try_push(enc).expect("fits an empty xorb");
            }
            pending.push((c.hash, builder.len() - 1));
        }
    }
    if !builder.is_empty() {
        finish(builder, &mut pending, &mut known);
    }
    for x in &built {
        let r = agent
            .put(format!("{base}/v1/xorbs/{}", x.hash))
            .send(&x.bytes[..]);
        expect_status(r, &[201, 200], "xorb put")?;
    }
    let recipes: Vec<FileRecipe> = files
        .iter()
        .zip(&chunked)
        .map(|(d, chunks)| recipe(chunks, &known, kind, sha256(d)))
        .collect();
    let shard = Shard {
        xorbs: built.iter().map(XorbChunkTable::from).collect(),
        files: recipes.clone(),
    };
    let r = agent
        .post(format!("{base}/v1/shards"))
        .send(&shard.to_bytes()[..]);
    expect_status(r, &[200], "shard")?;
    Ok(Uploaded {
        files: recipes.iter().map(|r| r.hash).collect(),
        xorbs_sent: built.len(),
        chunks_deduped,
    })
}

fn recipe(
    chunks: &[cas_protocol::ChunkInfo],
    known: &HashMap<cas_protocol::ChunkHash, (XorbHash, u32)>,
    kind: Kind,
    sha256: Sha256,
) -> FileRecipe {
    let mut terms: Vec<Term> = Vec::new();
    for c in chunks {
        let (xorb, i) = known[&c.hash];
        match terms.last_mut() {
            Some(t) if t.xorb == xorb && t.chunks.end == i => {
                t.chunks.end += 1;
                t.len += u64::from(c.len);
            }
            _ => terms.push(Term {
                xorb,
                chunks: ChunkRange {
                    start: i,
                    end: i + 1,
                },
                len: u64::from(c.len),
            }),
        }
    }
    FileRecipe {
        hash: FileHash::of_kind(kind, chunks),
        sha256,
        size: chunks.iter().map(|c| u64::from(c.len)).sum(),
        terms,
        kind,
    }
}

/// Fetches a file (or `range`, an HTTP `Range` value) by reconstruction and
/// range GETs, verifying every term against its range hash.
pub fn fetch(base: &str, file: &FileHash, range: Option<&str>) -> Result<Vec<u8>, String> {
    let agent = agent();
    let mut req = agent
        .get(format!("{base}/v1/reconstructions/{file}"))
        .header("Accept", "application/octet-stream");
    if let Some(r) = range {
        req = req.header("Range", r);
    }
    let bytes = expect_status(req.call(), &[200], "reconstruction")?;
    let rec = Reconstruction::from_bytes(&bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut cache: HashMap<(XorbHash, u64), Vec<u8>> = HashMap::new();
    for t in &rec.terms {
        let (f, fr) = rec.fetch_range(t).ok_or("term without fetch range")?;
        let frames = match cache.entry((f.xorb, fr.bytes.start)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let range = fr.bytes.to_http_range().expect("non-empty");
                let r = agent.get(&f.url).header("Range", range).call();
                e.insert(expect_status(r, &[206], "xorb get")?)
            }
        };
        let mut data = Vec::new();
        let mut infos = Vec::new();
        let skip = (t.chunks.start - fr.chunks.start) as usize;
        for (k, frame) in Frames::new(frames, fr.chunks.start as usize)
            .enumerate()
            .skip(skip)
            .take(t.chunks.len() as usize)
        {
            let frame = frame.map_err(|e| e.to_string())?;
            let start = data.len();
            frame.decode_into(k, &mut data).map_err(|e| e.to_string())?;
            infos.push(cas_protocol::ChunkInfo {
                hash: cas_protocol::ChunkHash::of(&data[start..]),
                len: (data.len() - start) as u32,
            });
        }
        if RangeHash::from_chunks(&infos) != t.range_hash {
            return Err(format!("xorb {} failed verification", f.xorb));
        }
        out.extend_from_slice(&data);
    }
    let start = rec.offset_into_first_term as usize;
    Ok(out[start..start + rec.range.len() as usize].to_vec())
}

// ---- helpers shared by the tests that drive the client binary ----

/// A finished command's status and output, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout[..out.stdout.len().min(4000)]),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `c`, which must succeed; returns its stdout.
pub fn ok(mut c: Command) -> Vec<u8> {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{c:?} failed: {}", show(&out));
    out.stdout
}

/// Parses a `--json` stdout, showing it on failure.
pub fn json_of(stdout: Vec<u8>) -> serde_json::Value {
    serde_json::from_slice(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&stdout)))
}

/// Runs `c`, which must fail with exit code 1 and end with exactly one
/// `cas-client: ...` line; returns that line.
pub fn fails(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{c:?}: {}", show(&out));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("cas-client: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    assert_eq!(stderr.lines().last(), Some(errors[0]), "{stderr}");
    eprintln!("{c:?}\n  -> {}", errors[0]);
    errors[0].to_owned()
}

/// The Prometheus text of `/metrics`.
pub struct Metrics(pub String);

impl Metrics {
    /// The metrics of the server at `url`.
    pub fn fetch(url: &str) -> Self {
        let (status, text) = body(agent().get(format!("{url}/metrics")).call().unwrap());
        assert_eq!(status, 200);
        Metrics(String::from_utf8(text).unwrap())
    }

    /// The value of the sample named exactly `name` (labels included).
    pub fn get(&self, name: &str) -> u64 {
        self.find(name)
            .unwrap_or_else(|| panic!("metric {name} missing in\n{}", self.0))
    }

    /// A labelled counter: 0 until its first increment adds the sample.
    pub fn count(&self, name: &str) -> u64 {
        self.find(name).unwrap_or(0)
    }

    fn find(&self, name: &str) -> Option<u64> {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    pub fn xorb_bytes_out(&self) -> u64 {
        self.get("cas_xorb_bytes_out_total")
    }

    /// Requests to `route` answered with `status`.
    pub fn answered(&self, route: &str, status: u16) -> u64 {
        let name = format!("cas_requests_total{{route=\"{route}\",status=\"{status}\"}} ");
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(&name)?.parse().ok())
            .unwrap_or(0)
    }

    /// Requests to `route`, any status.
    pub fn requests(&self, route: &str) -> u64 {
        let prefix = format!("cas_requests_total{{route=\"{route}\",");
        self.0
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|rest| rest.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }
}

/// `path` holds exactly `want` (without printing megabytes on failure).
pub fn assert_same_bytes(want: &[u8], path: &Path) {
    let got = std::fs::read(path).unwrap();
    assert!(
        want == &got[..],
        "{}: {} bytes expected, got {} different ones",
        path.display(),
        want.len(),
        got.len()
    );
}

/// Incompressible bytes from a seed (xorshift, no repeats): chunks come
/// out as large as they can, and no two seeds share content by accident.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    std::io::Read::read_exact(&mut Noise::new(seed), &mut out).expect("endless");
    out
}

/// The bytes of [`noise`] as an endless [`std::io::Read`] (`.take(n)`
/// it), for objects too large to hold.
pub struct Noise(u64);

impl Noise {
    pub fn new(seed: u64) -> Self {
        Noise(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
}

impl std::io::Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let x = &mut self.0;
        for b in buf.iter_mut() {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            *b = (*x >> 24) as u8;
        }
        Ok(buf.len())
    }
}

/// A token signed with the key in `key`, from `cas-server token create
/// ARGS` (for example `--scope read --repo org/*`).
pub fn token(key: &Path, args: &[&str]) -> String {
    let mut c = bin("cas-server");
    c.args(["token", "create", "--signing-key-file"])
        .arg(key)
        .args(args);
    String::from_utf8(ok(c)).unwrap().trim().to_owned()
}
