//! The environment the tests of the client binary share: a server with a
//! scratch directory, the client command with a clean environment, bounds
//! on its memory and time, tree snapshots, and a proxy that stalls a
//! transfer at a known point.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{bin, json_of, show, Metrics, ServerProcess};

/// A server on its own data directory plus a scratch directory for inputs,
/// outputs and caches.
pub struct Env {
    pub server: ServerProcess,
    /// Scratch space (traversable by every user, for the tests that drop
    /// privileges).
    pub root: PathBuf,
    /// The key the server checks tokens with ([`Env::with_tokens`]).
    pub key: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Env {
    /// A server without a signing key: loopback clients need no token.
    pub fn start() -> Self {
        Self::new(false, &[])
    }

    /// A server that checks tokens signed with [`Env::key`].
    pub fn with_tokens() -> Self {
        Self::new(true, &[])
    }

    /// A server with tokens that names `public_url` (a proxy in front of
    /// it) in the xorb URLs it hands out.
    pub fn with_tokens_behind(public_url: &str) -> Self {
        Self::new(true, &["--public-url", public_url])
    }

    fn new(tokens: bool, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = root.join("server");
        std::fs::create_dir(&data).unwrap();
        let key = tokens.then(|| {
            let key = root.join("signing.key");
            let mut c = bin("cas-server");
            c.args(["key", "create"]).arg(&key);
            crate::ok(c);
            key
        });
        let mut args = args.to_vec();
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

    /// A token of this server's key from `token create ARGS`.
    pub fn token(&self, args: &[&str]) -> String {
        crate::token(self.key.as_ref().expect("a server with tokens"), args)
    }

    /// `cas-client ARGS...` (the subcommand first) against this server
    /// with a clean environment, no cache, author `tester`, `retries`
    /// retries and `token` if given.
    pub fn client(&self, token: Option<&str>, retries: u32, args: &[&str]) -> Command {
        let mut c = bin("cas-client");
        for k in CLIENT_VARIABLES {
            c.env_remove(k);
        }
        c.current_dir(&self.root)
            .env("CAS_ENDPOINT", self.url())
            .env("CAS_AUTHOR", "tester")
            .env("CAS_RETRIES", retries.to_string())
            .env("CAS_CACHE_DIR", self.root.join("no-cache-here"))
            .args(args)
            .arg("--no-cache");
        if let Some(t) = token {
            c.env("CAS_TOKEN", t);
        }
        c
    }

    pub fn url(&self) -> &str {
        &self.server.url
    }

    /// A fresh, empty directory under the scratch space.
    pub fn dir(&self, name: &str) -> PathBuf {
        let d = self.root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// `cas-client SUB` against this server, with `cache` as its cache
    /// (`None`: `--no-cache`).
    pub fn cas(&self, sub: &str, cache: Option<&Path>) -> Command {
        cas_as(None, self.url(), cache, sub, &self.root)
    }

    /// Uploads `path` and returns the `--json` report.
    pub fn upload(&self, path: &Path) -> Value {
        let mut c = self.cas("upload", None);
        c.arg("--json").arg(path);
        json_of(ok(c))
    }

    /// Writes `data` to `name` in the scratch space and uploads it;
    /// returns the path and the file hash.
    pub fn upload_bytes(&self, name: &str, data: &[u8]) -> (PathBuf, String) {
        let path = self.root.join(name);
        std::fs::write(&path, data).unwrap();
        let hash = self.upload(&path)["roots"][0]["hash"]
            .as_str()
            .unwrap()
            .to_owned();
        (path, hash)
    }

    /// Fetches `hash` to `dest` and returns the `--json` report.
    pub fn fetch(&self, hash: &str, dest: &Path, cache: Option<&Path>) -> Value {
        let mut c = self.cas("fetch", cache);
        c.args(["--json", hash, "-o"]).arg(dest);
        json_of(ok(c))
    }

    pub fn metrics(&self) -> Metrics {
        Metrics::fetch(self.url())
    }

    /// Paths of the xorbs the server stores.
    pub fn stored_xorbs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let top = self.server.data_dir.join("objects/xorbs");
        for prefix in std::fs::read_dir(&top).unwrap() {
            for x in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
                out.push(x.unwrap().path());
            }
        }
        out.sort();
        out
    }
}

/// The client's variables, and those of the proxies and CAs it trusts, a
/// test's own environment must not leak in.
const CLIENT_VARIABLES: [&str; 19] = [
    "CAS_TOKEN",
    "CAS_AUTHOR",
    "CAS_CACHE_SIZE",
    "CAS_CONNECTIONS",
    "CAS_UPLOADS",
    "CAS_LOG",
    "CAS_STALL_TIMEOUT",
    "CAS_VERIFY_SHA256",
    "XDG_CACHE_HOME",
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// `cas-client SUB`, as `user` (uid, gid) when given. The environment is
/// cleared of the client's variables so the caller's shell cannot leak in.
pub fn cas_as(
    user: Option<(u32, u32)>,
    endpoint: &str,
    cache: Option<&Path>,
    sub: &str,
    cwd: &Path,
) -> Command {
    let client = bin("cas-client");
    let mut c = match user {
        None => client,
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid",
                &uid.to_string(),
                "--regid",
                &gid.to_string(),
                "--clear-groups",
            ])
            .arg(client.get_program());
            c
        }
    };
    for k in CLIENT_VARIABLES {
        c.env_remove(k);
    }
    c.current_dir(cwd)
        .env("CAS_ENDPOINT", endpoint)
        .env("CAS_RETRIES", "2")
        .arg(sub);
    match cache {
        Some(d) => {
            c.env("CAS_CACHE_DIR", d);
        }
        None => {
            // Never the caller's own cache, even if --no-cache were ignored.
            c.env("CAS_CACHE_DIR", cwd.join("no-cache-here"))
                .arg("--no-cache");
        }
    }
    c
}

/// Runs `c`, which must succeed; returns its stdout. Unlike
/// [`crate::ok`], the command is killed (and the test fails) past
/// [`MAX_RSS`] or [`MAX_TIME`].
pub fn ok(c: Command) -> Vec<u8> {
    output_within(c, MAX_RSS, MAX_TIME).stdout
}

/// Resident memory a client may use: every test moves tens of MB at most,
/// and the client is meant to work in bounded memory whatever the input.
const MAX_RSS: u64 = 2 << 30;

/// Time any one client command may take: none moves more than tens of MB.
const MAX_TIME: Duration = Duration::from_secs(60);

/// Resident set size of a running process, in bytes.
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Runs `c` to completion, which must succeed, killing it (and failing)
/// if its resident memory passes `max_rss` bytes (a runaway client must
/// not take the machine down with it) or it runs longer than `max_time`.
fn output_within(mut c: Command, max_rss: u64, max_time: Duration) -> Output {
    let started = Instant::now();
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        let now = rss(child.id()).unwrap_or(0);
        if now > max_rss {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{c:?} used {} MiB of memory and was killed", now >> 20);
        }
        if started.elapsed() > max_time {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{c:?} still ran after {max_time:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    assert!(out.status.success(), "{c:?} failed: {}", show(&out));
    out
}

/// Whether this process runs as root (permission bits do not bind it).
pub fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uids = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .expect("Uid line");
    // real, effective, saved, filesystem
    uids.split_whitespace().nth(1) == Some("0")
}

pub fn have_setpriv() -> bool {
    Command::new("setpriv")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whom to run the client as so that permission bits bind it: `Some(None)`
/// as ourselves when not root, `Some(Some(nobody))` through setpriv when
/// root, `None` (with a note) when root without setpriv.
pub fn bound_by_permissions() -> Option<Option<(u32, u32)>> {
    if !is_root() {
        Some(None)
    } else if have_setpriv() {
        Some(Some((65534, 65534)))
    } else {
        eprintln!("note: root without setpriv (util-linux): permission check skipped");
        None
    }
}

pub fn write_mode(path: &Path, data: &[u8], mode: u32) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Every regular file under `dir`: relative path -> (bytes, mode bits).
pub fn snapshot(dir: &Path) -> BTreeMap<String, (Vec<u8>, u32)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (Vec<u8>, u32)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                walk(root, &e.path(), out);
            } else {
                assert!(meta.is_file(), "{} is not a file", e.path().display());
                let rel = e
                    .path()
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned();
                let mode = meta.permissions().mode() & 0o777;
                out.insert(rel, (std::fs::read(e.path()).unwrap(), mode));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// `got` holds exactly the files of `want`, byte for byte and mode for mode
/// (without printing megabytes on a mismatch).
pub fn assert_same_tree(want: &Path, got: &Path) {
    let (w, g) = (snapshot(want), snapshot(got));
    assert_eq!(
        w.keys().collect::<Vec<_>>(),
        g.keys().collect::<Vec<_>>(),
        "file lists of {} and {}",
        want.display(),
        got.display()
    );
    for (path, (bytes, mode)) in &w {
        let (gbytes, gmode) = &g[path];
        assert!(
            bytes == gbytes,
            "{path}: {} bytes expected, got {} different ones",
            bytes.len(),
            gbytes.len()
        );
        assert_eq!(mode, gmode, "{path}: mode {mode:o} expected, got {gmode:o}");
    }
}

pub fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The first file under `dir` (hidden directories included) whose name
/// ends with `journal`: where a fetch records its progress.
pub fn find_journal(dir: &Path) -> Option<PathBuf> {
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name().to_string_lossy().ends_with("journal") {
                return Some(p);
            }
        }
    }
    None
}

/// A forward proxy (what `HTTP_PROXY` and `HTTPS_PROXY` name) that counts
/// what it relays. A plain request's connection goes to the host of its
/// first request's absolute URL; a `CONNECT HOST:PORT` request opens a
/// tunnel to HOST:PORT (how HTTPS goes through a proxy).
pub struct ForwardProxy {
    pub url: String,
    seen: Arc<Seen>,
}

/// What a [`ForwardProxy`] saw. Bytes are counted before they are passed
/// on, so whatever a client has received is counted once it has it.
#[derive(Default)]
struct Seen {
    connections: AtomicU64,
    /// The HOST:PORT of every CONNECT, in order of arrival.
    tunnels: Mutex<Vec<String>>,
    to_origin: AtomicU64,
    to_client: AtomicU64,
}

impl ForwardProxy {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen: Arc<Seen> = Arc::default();
        let s = seen.clone();
        std::thread::spawn(move || {
            for down in listener.incoming().flatten() {
                s.connections.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                std::thread::spawn(move || Self::serve(down, &s));
            }
        });
        Self { url, seen }
    }

    /// Connections accepted so far (tunnels included).
    pub fn connections(&self) -> u64 {
        self.seen.connections.load(Ordering::SeqCst)
    }

    /// The HOST:PORT of every CONNECT so far.
    pub fn tunnels(&self) -> Vec<String> {
        self.seen.tunnels.lock().unwrap().clone()
    }

    /// Bytes relayed so far from clients to origins and back (after the
    /// request line of a plain request, after the CONNECT exchange of a
    /// tunnel).
    pub fn relayed(&self) -> (u64, u64) {
        (
            self.seen.to_origin.load(Ordering::SeqCst),
            self.seen.to_client.load(Ordering::SeqCst),
        )
    }

    fn serve(mut down: TcpStream, seen: &Seen) {
        let Some(line) = read_line(&mut down) else {
            return;
        };
        // "GET http://host:port/path HTTP/1.1": the origin is the host.
        // "CONNECT host:port HTTP/1.1": so is host:port, and the rest of
        // the request's head is for the proxy.
        let mut words = line.split(' ');
        let (method, target) = (words.next(), words.next());
        let up = match (method, target) {
            (Some("CONNECT"), Some(host)) => {
                while read_line(&mut down).is_some_and(|l| !l.trim_end().is_empty()) {}
                seen.tunnels.lock().unwrap().push(host.to_owned());
                let Ok(up) = TcpStream::connect(host) else {
                    let _ = down.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
                    return;
                };
                if down
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .is_err()
                {
                    return;
                }
                up
            }
            (_, Some(url)) => {
                let Some(host) = url
                    .strip_prefix("http://")
                    .and_then(|u| u.split('/').next())
                else {
                    return;
                };
                let Ok(mut up) = TcpStream::connect(host) else {
                    return;
                };
                if up.write_all(line.as_bytes()).is_err() {
                    return;
                }
                up
            }
            _ => return,
        };
        let (down2, up2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
        std::thread::scope(|t| {
            t.spawn(|| pipe(up2, down2, &seen.to_client));
            pipe(down, up, &seen.to_origin);
        });
    }
}

/// One line of a request's head, its `\r\n` included; `None` if the
/// connection ends first.
fn read_line(from: &mut TcpStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        match from.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
    String::from_utf8(line).ok()
}

/// Copies `from` to `to` until either ends, adding every read to `count`
/// before passing it on; then closes `to`.
fn pipe(mut from: TcpStream, mut to: TcpStream, count: &AtomicU64) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        count.fetch_add(n as u64, Ordering::SeqCst);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

/// What a [`Gate`] does at the moment.
#[derive(Default)]
struct GateState {
    /// Answer bytes relayed so far, all connections together.
    passed: u64,
    /// A connection reached the budget and waits.
    stalled: bool,
    /// A request holding the pattern arrived and waits.
    held: bool,
    /// Requests that held the pattern so far.
    hits: usize,
    /// Everything flows from now on.
    open: bool,
    /// Only the first connection to reach the budget stalls; the others
    /// (the client's retries) flow.
    once: bool,
    /// The gate is gone: waiting connections close.
    stop: bool,
}

/// A TCP proxy in front of a server that stops a transfer at a known
/// point: answers flow until `budget` bytes have passed, and requests
/// flow until one contains `hold` (say `POST /v1/dedup`); then it holds
/// every connection that reaches that point until [`release`](Gate::release)
/// (everything flows again) or until it is dropped (they close).
///
/// The server names xorb URLs after the address clients connect to, never
/// after their `Host` header, so starting a gate restarts the server with
/// `--public-url` naming the gate (as a proxy in front of it would be
/// configured), and [`close`](Gate::close) restarts it without; a gate
/// for uploads only ([`holding_nth`](Gate::holding_nth)) leaves it be.
pub struct Gate {
    pub url: String,
    addr: SocketAddr,
    state: Arc<(Mutex<GateState>, Condvar)>,
}

impl Gate {
    /// A gate that stalls answers after `budget` bytes.
    pub fn start(server: &mut ServerProcess, budget: u64) -> Self {
        Self::new(server, budget, None)
    }

    /// A gate that holds the first request containing `pattern`.
    pub fn holding(server: &mut ServerProcess, pattern: &str) -> Self {
        Self::new(server, u64::MAX, Some((pattern.as_bytes().to_vec(), 1)))
    }

    /// A gate in front of `server` as it runs, for uploads (which read no
    /// xorb URL, so the server keeps its flags): the requests containing
    /// `pattern` before the `nth` flow, the `nth` is held.
    pub fn holding_nth(server: &ServerProcess, pattern: &str, nth: usize) -> Self {
        Self::relaying(
            &server.url,
            u64::MAX,
            Some((pattern.as_bytes().to_vec(), nth)),
        )
    }

    /// A gate where one answer stalls for good after `budget` bytes and
    /// every other connection flows: a peer that hangs mid-body.
    pub fn stalling_once(server: &mut ServerProcess, budget: u64) -> Self {
        let gate = Self::new(server, budget, None);
        gate.state.0.lock().unwrap().once = true;
        gate
    }

    /// Removes the gate and restarts the server without it, so that xorb
    /// URLs name the server itself again.
    pub fn close(self, server: &mut ServerProcess) {
        drop(self);
        server.restart_with(&[]);
    }

    fn new(server: &mut ServerProcess, budget: u64, hold: Option<(Vec<u8>, usize)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        server.restart_with(&["--public-url", &format!("http://{addr}")]);
        Self::relay_from(listener, &server.url, budget, hold)
    }

    fn relaying(url: &str, budget: u64, hold: Option<(Vec<u8>, usize)>) -> Self {
        Self::relay_from(TcpListener::bind("127.0.0.1:0").unwrap(), url, budget, hold)
    }

    /// Relays what `listener` accepts to the server at `url`.
    fn relay_from(
        listener: TcpListener,
        url: &str,
        budget: u64,
        hold: Option<(Vec<u8>, usize)>,
    ) -> Self {
        let addr = listener.local_addr().unwrap();
        let target = url.strip_prefix("http://").unwrap().to_owned();
        let state: Arc<(Mutex<GateState>, Condvar)> = Arc::default();
        let s = state.clone();
        std::thread::spawn(move || {
            for down in listener.incoming() {
                if s.0.lock().unwrap().stop {
                    break;
                }
                let (Ok(down), Ok(up)) = (down, TcpStream::connect(&target)) else {
                    continue;
                };
                let (from_client, to_server) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                let (s1, s2, hold) = (s.clone(), s.clone(), hold.clone());
                std::thread::spawn(move || {
                    Self::relay(from_client, to_server, &s1, |st, buf| {
                        let Some((pattern, nth)) = &hold else {
                            return buf.len();
                        };
                        if !st.open && buf.windows(pattern.len()).any(|w| w == &pattern[..]) {
                            st.hits += 1;
                            if st.hits >= *nth {
                                st.held = true;
                                return 0;
                            }
                        }
                        buf.len()
                    })
                });
                std::thread::spawn(move || {
                    Self::relay(up, down, &s2, |st, buf| {
                        if st.open || (st.once && st.stalled) {
                            return buf.len();
                        }
                        let allowed = budget.saturating_sub(st.passed).min(buf.len() as u64);
                        st.passed += allowed;
                        if (allowed as usize) < buf.len() {
                            st.stalled = true;
                        }
                        allowed as usize
                    })
                });
            }
        });
        Self {
            url: format!("http://{addr}"),
            addr,
            state,
        }
    }

    /// Copies `from` to `to`; `admit` says how much of each read may pass
    /// now. The rest waits until the gate opens, or is dropped with the
    /// connection when the gate stops.
    fn relay(
        mut from: TcpStream,
        mut to: TcpStream,
        state: &(Mutex<GateState>, Condvar),
        mut admit: impl FnMut(&mut GateState, &[u8]) -> usize,
    ) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let allowed = admit(&mut state.0.lock().unwrap(), &buf[..n]);
            if to.write_all(&buf[..allowed]).is_err() {
                break;
            }
            if allowed < n {
                state.1.notify_all();
                let st = state
                    .1
                    .wait_while(state.0.lock().unwrap(), |s| !s.open && !s.stop)
                    .unwrap();
                if st.stop || to.write_all(&buf[allowed..n]).is_err() {
                    break;
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    }

    /// Answer bytes relayed so far.
    pub fn passed(&self) -> u64 {
        self.state.0.lock().unwrap().passed
    }

    /// Whether a connection waits at the budget or the held request.
    pub fn stalled(&self) -> bool {
        let st = self.state.0.lock().unwrap();
        st.stalled || st.held
    }

    /// Waits until a connection waits at the gate; false after `timeout`.
    pub fn wait_stalled(&self, timeout: Duration) -> bool {
        let (m, cv) = &*self.state;
        let (st, _) = cv
            .wait_timeout_while(m.lock().unwrap(), timeout, |s| !s.stalled && !s.held)
            .unwrap();
        st.stalled || st.held
    }

    /// Lets everything through from now on.
    pub fn release(&self) {
        self.state.0.lock().unwrap().open = true;
        self.state.1.notify_all();
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.state.0.lock().unwrap().stop = true;
        self.state.1.notify_all();
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}
