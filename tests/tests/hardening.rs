//! The client at the edges, tried as a hostile or unlucky user would:
//! tree entries and neighbours named like temporaries, names of 255 bytes,
//! two fetches to one place at once, fetches killed at every step and run
//! again with the same command, a full or read-only cache, a file rewritten
//! while it is uploaded, a server that lies about sizes, empty directories,
//! and a shared cache under a strict umask.
//!
//! Each test runs the real binaries; each failed on the client before the
//! hardening it checks.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cas_e2e::client::{cas_as, ok, u, write_mode, Env, Gate};
use cas_e2e::{assert_same_bytes, fails, json_of, show};
use serde_json::Value;

/// Long enough for anything these tests wait for; only reached on failure.
const PATIENCE: Duration = Duration::from_secs(60);

fn root_hash(up: &Value) -> String {
    up["roots"][0]["hash"].as_str().unwrap().to_owned()
}

/// A running client whose stderr is read line by line as it comes.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(mut c: Command) -> Self {
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for the end: exit status, stdout, every stderr line.
    fn finish(mut self) -> (std::process::ExitStatus, Vec<u8>, Vec<String>) {
        let mut out = Vec::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        let status = self.child.wait().unwrap();
        self.seen.extend(self.lines.iter());
        (status, out, self.seen)
    }

    /// Waits for a failure; returns its one `cas-client:` line.
    fn fails(self) -> String {
        let (status, _, err) = self.finish();
        assert_eq!(status.code(), Some(1), "{err:?}");
        let errors: Vec<&String> = err
            .iter()
            .filter(|l| l.starts_with("cas-client: "))
            .collect();
        assert_eq!(errors.len(), 1, "{err:?}");
        errors[0].clone()
    }
}

/// `c` run by `sh -c SCRIPT sh ARGS... PROGRAM PROGRAM-ARGS...` with the
/// same environment and directory: the script ends with `exec "$@"`.
fn wrapped(c: &Command, script: &str, args: &[&Path]) -> Command {
    let mut w = Command::new("sh");
    w.arg("-c").arg(script).arg("sh").args(args);
    w.arg(c.get_program()).args(c.get_args());
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => w.env(k, v),
            None => w.env_remove(k),
        };
    }
    if let Some(d) = c.get_current_dir() {
        w.current_dir(d);
    }
    w
}

/// `c` in a private mount namespace where `dir` is a fresh tmpfs mounted
/// with `options` (gone when the command ends, even if the test fails).
fn on_tmpfs(c: &Command, dir: &Path, options: &str) -> Command {
    let script = format!("mount -t tmpfs -o {options} cas-test \"$1\" && shift && exec \"$@\"");
    let inner = wrapped(c, &script, &[dir]);
    let mut w = Command::new("unshare");
    // A user namespace too, so that this works without root.
    w.args(["--mount", "--map-root-user"])
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => w.env(k, v),
            None => w.env_remove(k),
        };
    }
    if let Some(d) = c.get_current_dir() {
        w.current_dir(d);
    }
    let probe = Command::new("unshare")
        .args(["--mount", "--map-root-user", "true"])
        .status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "this test needs `unshare --mount --map-root-user` (util-linux, user namespaces) \
         to give the client a real small filesystem"
    );
    w
}

/// A file of `pre` bytes uploaded alone, then `pre` + `more` uploaded: the
/// second file's reconstruction spans two xorbs, so it is fetched (and
/// journaled) as two units. Returns the second file's bytes and hash.
fn two_unit_file(env: &Env, name: &str, seed: u64, half: usize) -> (Vec<u8>, String) {
    let a = cas_bench::random_bytes(seed, half);
    env.upload_bytes(&format!("{name}.first-half"), &a);
    let mut b = a;
    b.extend(cas_bench::random_bytes(seed + 1, half));
    let (_, hash) = env.upload_bytes(name, &b);
    (b, hash)
}

// ------------------------------------------------------------- 4. caches

/// Counts the warnings about the cache among `stderr` lines.
fn cache_warnings(stderr: &[String]) -> usize {
    stderr
        .iter()
        .filter(|l| l.contains("continuing without caching"))
        .count()
}

/// A cache on a filesystem too small for what is fetched: the fetch
/// succeeds with one warning, however many cache writes fail.
#[test]
fn a_full_cache_never_fails_a_fetch() {
    let env = Env::new();
    let (data, hash) = two_unit_file(&env, "f.bin", 60, 3_000_000);
    let cache = env.dir("cache");
    let dest = env.root.join("out.bin");
    let mut c = cas_as(None, env.url(), Some(&cache), "fetch", &env.root);
    c.args(["--json", &hash, "-o"]).arg(&dest);
    let run = Running::spawn(on_tmpfs(&c, &cache, "size=256k"));
    let (status, out, err) = run.finish();
    assert!(status.success(), "{status}: {err:?}");
    assert_same_bytes(&data, &dest);
    assert_eq!(cache_warnings(&err), 1, "{err:?}");
    assert!(u(&json_of(out)["network_bytes"]) > 0);
}

/// A read-only cache: the same.
#[test]
fn a_read_only_cache_never_fails_a_fetch() {
    let env = Env::new();
    let (data, hash) = two_unit_file(&env, "f.bin", 70, 3_000_000);
    let cache = env.dir("cache");
    let dest = env.root.join("out.bin");
    let mut c = cas_as(None, env.url(), Some(&cache), "fetch", &env.root);
    c.args(["--json", &hash, "-o"]).arg(&dest);
    let run = Running::spawn(on_tmpfs(&c, &cache, "ro"));
    let (status, _, err) = run.finish();
    assert!(status.success(), "{status}: {err:?}");
    assert_same_bytes(&data, &dest);
    assert_eq!(cache_warnings(&err), 1, "{err:?}");
}

/// Under umask 077 every file of a setgid (shared) cache, the chunk
/// location log included, is still group-readable and -writable.
#[test]
fn a_shared_cache_stays_shared_under_umask_077() {
    let env = Env::new();
    let cache = env.dir("cache");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o2775)).unwrap();
    let src = env.root.join("f.bin");
    std::fs::write(&src, cas_bench::random_bytes(80, 2_000_000)).unwrap();
    let strict = |c: Command| wrapped(&c, "umask 077 && exec \"$@\"", &[]);
    let mut c = cas_as(None, env.url(), Some(&cache), "upload", &env.root);
    c.arg("--json").arg(&src);
    let hash = root_hash(&json_of(ok(strict(c))));
    let mut c = cas_as(None, env.url(), Some(&cache), "fetch", &env.root);
    c.args([&hash, "-o"]).arg(env.root.join("out.bin"));
    ok(strict(c));

    let mut files = 0;
    let mut stack = vec![cache.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
            if p.is_dir() {
                assert_eq!(mode, 0o2775, "{}", p.display());
                stack.push(p);
            } else {
                assert_eq!(mode, 0o664, "{}", p.display());
                files += 1;
            }
        }
    }
    assert!(files >= 2, "a cache entry and the location log");
}

// ------------------------------------------------------------- 5. uploads

/// A file rewritten in place (same size, other bytes) while the upload
/// reads it: the upload fails naming it, and commits nothing. The reader
/// is stopped at a known point by holding the first dedup query, which
/// blocks the pipeline behind it after at most 96 MiB of the file.
#[test]
fn a_file_rewritten_while_it_is_uploaded_is_refused() {
    let env = Env::new();
    let path = env.root.join("growing-log.bin");
    let size = 128u64 << 20;
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap(); // zeros
                              // An old mtime, so the rewrite moves it whatever the clock's granularity.
    f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
    drop(f);
    let gate = Gate::holding(env.url(), "POST /v1/dedup");
    let mut c = cas_as(None, &gate.url, None, "upload", &env.root);
    c.arg(&path);
    let run = Running::spawn(c);
    assert!(gate.wait_stalled(PATIENCE), "no dedup query was sent");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let ones = vec![1u8; 1 << 20];
    for mib in 100..128u64 {
        f.write_all_at(&ones, mib << 20).unwrap();
    }
    drop(f);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
    let m0 = env.metrics();
    gate.release();
    let err = run.fails();
    assert!(
        err.contains("growing-log.bin") && err.contains("changed while"),
        "{err}"
    );
    assert_eq!(env.metrics().requests("shard"), m0.requests("shard"));
}

/// Empty directories cannot be stored in a tree (trees hold regular
/// files): each is reported like a skipped symlink, with its reason, in
/// the report and on stderr.
#[test]
fn empty_directories_are_reported() {
    let env = Env::new();
    let src = env.dir("src");
    write_mode(&src.join("keep/a.txt"), b"a\n", 0o644);
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::create_dir_all(src.join("nested/deeper")).unwrap();
    std::os::unix::fs::symlink("keep/a.txt", src.join("link")).unwrap();
    let mut c = env.cas("upload", None);
    c.arg("--json").arg(&src);
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let up = json_of(out.stdout);
    let stderr = String::from_utf8(out.stderr).unwrap();
    let skipped = up["skipped"].as_array().unwrap();
    let reason_of = |name: &str| {
        let s = skipped
            .iter()
            .find(|s| s["path"].as_str().unwrap().ends_with(name))
            .unwrap_or_else(|| panic!("{name} not in {up}"));
        s["reason"].as_str().unwrap().to_owned()
    };
    for name in ["empty", "nested/deeper"] {
        assert!(reason_of(name).contains("empty directory"), "{up}");
        let line = stderr
            .lines()
            .find(|l| l.contains("skipped") && l.ends_with(name))
            .unwrap_or_else(|| panic!("no warning for {name}: {stderr}"));
        assert!(line.contains("empty directory"), "{line}");
    }
    assert!(reason_of("link").contains("symlink"), "{up}");
    assert_eq!(skipped.len(), 3, "{up}");
}

// ------------------------------------------------------ 6. lying answers

/// A fake server that describes a 100-byte file starting with the tree
/// tag honestly for its first bytes and then claims a reconstruction of a
/// terabyte: a client that sized its buffer from the answer would abort.
struct Liar {
    url: String,
    hash: String,
}

impl Liar {
    fn start() -> Self {
        use cas_protocol::messages::{FetchRange, Reconstruction, ReconstructionTerm, XorbFetch};
        use cas_protocol::tree::Tree;
        use cas_protocol::xorb::{Compression, EncodedChunk, XorbBuilder, XorbView};
        use cas_protocol::{ByteRange, ChunkRange, FileHash, Message, RangeHash};

        let mut data = <Tree as Message>::TAG.to_vec();
        data.resize(100, b'.');
        let chunks = cas_protocol::chunking::chunk_and_hash(&data);
        let file = FileHash::from_chunks(&chunks);
        let mut b = XorbBuilder::new();
        b.try_push(EncodedChunk::encode(&data, Compression::Raw).unwrap())
            .unwrap();
        let xorb = b.finish().unwrap();
        let one = ChunkRange { start: 0, end: 1 };
        let bytes = XorbView::parse(&xorb.bytes)
            .unwrap()
            .byte_range(one)
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let rec = |size: u64| Reconstruction {
            file,
            file_size: size,
            range: ByteRange {
                start: 0,
                end: if size == 100 { 4 } else { size },
            },
            offset_into_first_term: 0,
            terms: vec![ReconstructionTerm {
                xorb: xorb.hash,
                chunks: one,
                len: size,
                range_hash: RangeHash::from_chunks(&chunks),
            }],
            fetch: vec![XorbFetch {
                xorb: xorb.hash,
                url: format!("{url}/xorb"),
                ranges: vec![FetchRange { chunks: one, bytes }],
            }],
        };
        let honest = rec(100).to_bytes();
        let lying = rec(1 << 40).to_bytes();
        let info = serde_json::json!({
            "hash": file.to_string(),
            "size": 100,
            "sha256": cas_protocol::Sha256::of(&data).to_string(),
            "chunks": 1,
            "terms": 1,
        })
        .to_string();
        let frames = xorb.bytes[bytes.start as usize..bytes.end as usize].to_vec();
        let content_range = format!(
            "bytes {}-{}/{}",
            bytes.start,
            bytes.end - 1,
            xorb.bytes.len()
        );
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                let (status, extra, body): (&str, String, &[u8]) = if head.contains("/v1/files/") {
                    ("200 OK", String::new(), info.as_bytes())
                } else if head.contains("/v1/reconstructions/") {
                    let asked_head = head.contains("range: bytes=0-3\r\n");
                    (
                        "200 OK",
                        String::new(),
                        if asked_head { &honest } else { &lying },
                    )
                } else {
                    (
                        "206 Partial Content",
                        format!("content-range: {content_range}\r\n"),
                        &frames,
                    )
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(body);
            }
        });
        Self {
            url,
            hash: file.to_string(),
        }
    }
}

/// The client checks a reconstruction against what it asked before it
/// allocates anything for it: a lying answer is one clear error, not an
/// abort.
#[test]
fn a_lying_server_never_sizes_an_allocation() {
    let liar = Liar::start();
    let dir = tempfile::tempdir().unwrap();
    for sub in ["stat", "fetch"] {
        let mut c = cas_as(None, &liar.url, None, sub, dir.path());
        c.arg(&liar.hash);
        if sub == "fetch" {
            c.arg("-o").arg(dir.path().join("out"));
        }
        let err = fails(c);
        assert!(err.contains("unusable answer"), "{err}");
    }
}
