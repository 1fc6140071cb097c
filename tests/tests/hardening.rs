//! The client at the edges, tried as a hostile or unlucky user would:
//! tree entries and neighbours named like temporaries, names of 255 bytes,
//! two fetches to one place at once, fetches killed at every step and run
//! again with the same command, a full or read-only cache, a file rewritten
//! while it is uploaded, a server that lies about sizes, empty directories,
//! and a shared cache under a strict umask.
//!
//! Each test runs the real binaries; each failed on the client before the
//! hardening it checks.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cas_e2e::client::{assert_same_tree, cas_as, find_journal, ok, u, write_mode, Env, Gate};
use cas_e2e::{assert_same_bytes, fails, json_of, show};
use serde_json::Value;

/// Long enough for anything these tests wait for; only reached on failure.
const PATIENCE: Duration = Duration::from_secs(60);

fn root_hash(up: &Value) -> String {
    up["roots"][0]["hash"].as_str().unwrap().to_owned()
}

/// The hash `up` gave the input file whose path ends with `name`.
fn file_hash(up: &Value, name: &str) -> String {
    up["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with(name))
        .unwrap_or_else(|| panic!("no {name} in {up}"))["hash"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Xorb bytes the server sent since `before`. A fetch reads a little on
/// its own (the head of the file, to see whether it is a tree, and a
/// tree's listing): "nothing downloaded" means less than any file here.
fn served_since(env: &Env, before: &cas_e2e::Metrics) -> u64 {
    env.metrics().xorb_bytes_out() - before.xorb_bytes_out()
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
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

    /// Waits for a line on stderr containing `text`.
    fn wait_for_line(&mut self, text: &str) {
        let deadline = Instant::now() + PATIENCE;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.contains(text);
                    self.seen.push(l);
                    if hit {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        panic!("no line with {text:?} on stderr: {:?}", self.seen);
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

    /// Waits for a successful end; returns the `--json` report.
    fn succeeds(self) -> Value {
        let (status, out, err) = self.finish();
        assert!(status.success(), "{status}: {err:?}");
        json_of(out)
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

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// `fetch --json HASH -o DEST` through `endpoint`.
fn fetch_cmd(env: &Env, endpoint: &str, hash: &str, dest: &Path, extra: &[&str]) -> Command {
    let mut c = cas_as(None, endpoint, None, "fetch", &env.root);
    c.args(["--json", hash, "-o"]).arg(dest).args(extra);
    c
}

/// `c` run as the last arguments of `program args...`, with the same
/// environment and directory.
fn prefixed(c: &Command, program: &str, args: &[&OsStr]) -> Command {
    let mut w = Command::new(program);
    w.args(args).arg(c.get_program()).args(c.get_args());
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

/// `c` run by `sh -c SCRIPT`, which ends with `exec "$@"`.
fn wrapped(c: &Command, script: &str) -> Command {
    prefixed(c, "sh", &["-c".as_ref(), script.as_ref(), "sh".as_ref()])
}

/// `c` in a private mount namespace where `dir` is a fresh tmpfs mounted
/// with `options` (gone when the command ends, even if the test fails).
fn on_tmpfs(c: &Command, dir: &Path, options: &str) -> Command {
    let probe = Command::new("unshare")
        .args(["--mount", "--map-root-user", "true"])
        .status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "this test needs `unshare --mount --map-root-user` (util-linux, user namespaces) \
         to give the client a real small filesystem"
    );
    let script = format!("mount -t tmpfs -o {options} cas-test \"$1\" && shift && exec \"$@\"");
    // A user namespace too, so that this works without root.
    let args = ["--mount", "--map-root-user", "sh", "-c", &script, "sh"].map(OsStr::new);
    prefixed(c, "unshare", &[&args[..], &[dir.as_os_str()]].concat())
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

// ------------------------------------------------ 1. temporaries and names

/// A tree holding `X`, `X.part` and `X.part.journal` (names the client
/// once used for its temporaries) comes back exact, fresh and over an
/// existing copy with `--force`, and nothing is left beside it.
#[test]
fn tree_entries_named_like_temporaries_come_back_exact() {
    let env = Env::start();
    let src = env.dir("src");
    let big = cas_bench::random_bytes(1, 9_000_000); // journaled when fetched
    for (name, data) in [
        ("X", &b"the real X\n"[..]),
        ("X.part", b"a file named X.part\n"),
        ("X.part.journal", b"a file named X.part.journal\n"),
        ("big", &big),
        ("big.part", b"not a temporary\n"),
        ("big.part.journal", b"cas-fetch 1 0000 9000000\n0 9000000\n"),
    ] {
        write_mode(&src.join(name), data, 0o644);
    }
    let tree = root_hash(&env.upload(&src));
    let out = env.root.join("out");
    env.fetch(&tree, &out, None);
    assert_same_tree(&src, &out);
    assert_eq!(names(&env.root), ["out", "server", "src"]);

    let mut c = env.cas("fetch", None);
    c.args(["--force", &tree, "-o"]).arg(&out);
    ok(c);
    assert_same_tree(&src, &out);
    assert_eq!(names(&env.root), ["out", "server", "src"]);
}

/// `-o victim` never touches `victim.part` or `victim.part.journal`.
#[test]
fn unrelated_neighbours_are_never_touched() {
    let env = Env::start();
    let data = cas_bench::random_bytes(2, 9_000_000);
    let (_, hash) = env.upload_bytes("data.bin", &data);
    let out = env.dir("out");
    std::fs::write(out.join("victim.part"), b"mine").unwrap();
    std::fs::write(out.join("victim.part.journal"), b"mine too").unwrap();
    env.fetch(&hash, &out.join("victim"), None);
    assert_same_bytes(&data, &out.join("victim"));
    assert_eq!(std::fs::read(out.join("victim.part")).unwrap(), b"mine");
    assert_eq!(
        std::fs::read(out.join("victim.part.journal")).unwrap(),
        b"mine too"
    );
    assert_eq!(
        names(&out),
        ["victim", "victim.part", "victim.part.journal"]
    );
}

/// Names of 255 bytes (the most Linux allows, and the tree rules accept)
/// are fetched, in a tree and as `-o`.
#[test]
fn names_of_255_bytes_are_fetched() {
    let env = Env::start();
    let src = env.dir("src");
    let long = format!("{}.bin", "n".repeat(251));
    let accented = format!("{}x", "é".repeat(127));
    assert_eq!((long.len(), accented.len()), (255, 255));
    let big = cas_bench::random_bytes(3, 9_000_000);
    write_mode(&src.join(&long), b"small\n", 0o644);
    write_mode(&src.join("sub").join(&long), &big, 0o600);
    write_mode(&src.join(&accented), b"accented\n", 0o644);
    let up = env.upload(&src);
    let out = env.root.join("out");
    env.fetch(&root_hash(&up), &out, None);
    assert_same_tree(&src, &out);

    let single = env.dir("single").join(&long);
    env.fetch(&file_hash(&up, &format!("sub/{long}")), &single, None);
    assert_same_bytes(&big, &single);
    assert_eq!(names(single.parent().unwrap()), [long]);
}

/// The client's work directory for a destination, found as the one new
/// name beside `dest` while a fetch to it is stalled.
fn work_dir_of(env: &mut Env, hash: &str, dest: &Path) -> PathBuf {
    let parent = dest.parent().unwrap();
    let before = names(parent);
    let gate = Gate::start(&mut env.server, 1 << 20);
    let run = Running::spawn(fetch_cmd(env, &gate.url, hash, dest, &[]));
    assert!(gate.wait_stalled(PATIENCE), "the fetch never stalled");
    let new: Vec<String> = names(parent)
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    run.kill9();
    gate.close(&mut env.server);
    assert_eq!(new.len(), 1, "{new:?}");
    let work = parent.join(&new[0]);
    assert!(work.is_dir(), "{} is not a directory", work.display());
    work
}

/// When the work directory's name is taken by something the client did
/// not create, the fetch refuses, naming it, and changes nothing.
#[test]
fn a_work_directory_name_taken_by_another_is_refused() {
    let mut env = Env::start();
    let data = cas_bench::random_bytes(4, 9_000_000);
    let (_, hash) = env.upload_bytes("data.bin", &data);
    let out = env.dir("out");
    let dest = out.join("f.bin");
    let work = work_dir_of(&mut env, &hash, &dest);
    std::fs::remove_dir_all(&work).unwrap();

    // A file of someone else's, then a directory.
    std::fs::write(&work, b"someone's notes").unwrap();
    let err = fails(fetch_cmd(&env, env.url(), &hash, &dest, &["--force"]));
    assert!(
        err.contains(&*work.to_string_lossy()) && err.contains("work directory"),
        "{err}"
    );
    assert_eq!(std::fs::read(&work).unwrap(), b"someone's notes");
    assert!(!dest.exists());
    std::fs::remove_file(&work).unwrap();
    std::fs::create_dir(&work).unwrap();
    std::fs::write(work.join("lock"), b"theirs").unwrap();
    let err = fails(fetch_cmd(&env, env.url(), &hash, &dest, &["--force"]));
    assert!(err.contains("work directory"), "{err}");
    assert_eq!(names(&work), ["lock"]);
    assert_eq!(std::fs::read(work.join("lock")).unwrap(), b"theirs");
    assert!(!dest.exists());

    // Once it is gone, the same command works and leaves nothing behind.
    std::fs::remove_dir_all(&work).unwrap();
    env.fetch(&hash, &dest, None);
    assert_same_bytes(&data, &dest);
    assert_eq!(names(&out), ["f.bin"]);
}

// ------------------------------------------------- 2. one writer at a time

/// Two fetches to one destination at once: the second waits for the
/// first (saying so), then judges what the first left: a different file
/// is an error without `--force` and is replaced whole with it; the same
/// file is kept. Never a splice.
#[test]
fn concurrent_fetches_to_one_destination_wait_for_each_other() {
    let mut env = Env::start();
    let a = cas_bench::random_bytes(5, 9_000_000);
    let b = cas_bench::random_bytes(6, 9_000_000);
    let (_, ha) = env.upload_bytes("a.bin", &a);
    let (_, hb) = env.upload_bytes("b.bin", &b);
    let out = env.dir("out");
    for (second, force, want) in [(&hb, false, &a), (&hb, true, &b), (&ha, false, &a)] {
        let dest = out.join(format!("f-{force}-{}", &second[..8]));
        let gate = Gate::start(&mut env.server, 4 << 20);
        let first = Running::spawn(fetch_cmd(&env, &gate.url, &ha, &dest, &[]));
        assert!(gate.wait_stalled(PATIENCE), "the first fetch never stalled");
        let extra: &[&str] = if force { &["--force"] } else { &[] };
        let mut waiting = Running::spawn(fetch_cmd(&env, env.url(), second, &dest, extra));
        waiting.wait_for_line("waiting");
        gate.release();
        first.succeeds();
        if second == &hb && !force {
            let err = waiting.fails();
            assert!(err.contains("differs"), "{err}");
        } else {
            waiting.succeeds();
        }
        assert_same_bytes(want, &dest);
        gate.close(&mut env.server);
    }
    assert_eq!(names(&out).len(), 3, "{:?}", names(&out));
}

// --------------------------------------------- 3. resume with one command

/// A tree fetch killed while its last file was half fetched: the small
/// files and `m.bin` are complete, `z.bin` has one of its two units
/// journaled.
struct Interrupted {
    env: Env,
    src: PathBuf,
    out: PathBuf,
    tree: String,
    z_half: u64,
}

fn interrupted_tree_fetch() -> Interrupted {
    let mut env = Env::start();
    let half = 8_000_000;
    let z_first = cas_bench::random_bytes(10, half);
    env.upload_bytes("z-first-half", &z_first);
    let src = env.dir("src");
    let mut before_z = 0;
    for i in 0..5u64 {
        let data = cas_bench::random_bytes(20 + i, 50_000 + i as usize);
        before_z += data.len();
        write_mode(&src.join(format!("a{i}.txt")), &data, 0o644);
    }
    let m = cas_bench::random_bytes(30, 9_000_000);
    before_z += m.len();
    write_mode(&src.join("m.bin"), &m, 0o640);
    let mut z = z_first;
    z.extend(cas_bench::random_bytes(11, half));
    write_mode(&src.join("z.bin"), &z, 0o644);
    let tree = root_hash(&env.upload(&src));

    // One file at a time, in path order: the gate stalls half-way through
    // z.bin's second unit.
    let budget = (before_z + half + half / 2) as u64;
    let gate = Gate::start(&mut env.server, budget);
    let out = env.root.join("out");
    let run = Running::spawn(fetch_cmd(
        &env,
        &gate.url,
        &tree,
        &out,
        &["--connections", "1"],
    ));
    let started = Instant::now();
    loop {
        let journaled = find_journal(&out)
            .and_then(|j| std::fs::read_to_string(j).ok())
            .is_some_and(|t| t.lines().count() >= 2);
        if journaled && gate.stalled() {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "no unit of z.bin journaled ({} bytes relayed)",
            gate.passed()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    run.kill9();
    gate.close(&mut env.server);
    assert!(
        !out.join("z.bin").exists(),
        "nothing unverified under its name"
    );
    assert!(out.join("m.bin").is_file());
    Interrupted {
        env,
        src,
        out,
        tree,
        z_half: half as u64,
    }
}

/// The same command finishes an interrupted tree fetch: complete files are
/// kept, the half-fetched one resumes from its journal, and only what was
/// missing travels.
#[test]
fn interrupted_tree_fetch_finishes_with_the_same_command() {
    let Interrupted {
        env,
        src,
        out,
        tree,
        z_half,
    } = interrupted_tree_fetch();
    let m_inode = std::fs::metadata(out.join("m.bin")).unwrap().ino();
    let f = json_of(ok(fetch_cmd(
        &env,
        env.url(),
        &tree,
        &out,
        &["--connections", "1"],
    )));
    eprintln!("{f}");
    assert_same_tree(&src, &out);
    assert_eq!(u(&f["kept_files"]), 6, "{f}");
    // One of z.bin's two units (about half of it) was journaled; only the
    // other travels.
    let (resumed, net) = (u(&f["resumed_bytes"]), u(&f["network_bytes"]));
    assert!(resumed > z_half / 2 && resumed < z_half * 3 / 2, "{f}");
    assert!(net > 0 && net + resumed < 2 * z_half + (1 << 20), "{f}");
    assert_eq!(std::fs::metadata(out.join("m.bin")).unwrap().ino(), m_inode);
    assert_eq!(names(&env.root), ["out", "server", "src", "z-first-half"]);
}

/// A complete file that was changed after the interruption (same size,
/// same mtime, other bytes) is found before anything is downloaded: an
/// error naming it without `--force`; with it, that file alone is
/// replaced.
#[test]
fn a_changed_file_is_found_before_anything_is_downloaded() {
    let Interrupted {
        env,
        src,
        out,
        tree,
        ..
    } = interrupted_tree_fetch();
    let victim = out.join("a2.txt");
    let meta = std::fs::metadata(&victim).unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 1;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap();
    f.write_all_at(&bytes, 0).unwrap();
    f.set_modified(meta.modified().unwrap()).unwrap();
    drop(f);
    let journal = std::fs::read(find_journal(&out).unwrap()).unwrap();

    let m0 = env.metrics();
    let err = fails(fetch_cmd(&env, env.url(), &tree, &out, &[]));
    assert!(err.contains("a2.txt") && err.contains("differs"), "{err}");
    let served = served_since(&env, &m0);
    assert!(served < 20_000, "{served} bytes: no file was downloaded");
    assert_eq!(std::fs::read(find_journal(&out).unwrap()).unwrap(), journal);

    let f = json_of(ok(fetch_cmd(&env, env.url(), &tree, &out, &["--force"])));
    assert_same_tree(&src, &out);
    assert_eq!(u(&f["kept_files"]), 5, "{f}");
}

/// A fetch stopped after its last unit was journaled but before the
/// rename (here: the rename fails because a directory took the name
/// meanwhile) completes on the next run without downloading anything.
#[test]
fn a_fetch_stopped_before_its_rename_completes_on_the_next_run() {
    let mut env = Env::start();
    let (data, hash) = two_unit_file(&env, "f.bin", 40, 8_000_000);
    let out = env.dir("out");
    let dest = out.join("f.bin");
    let gate = Gate::start(&mut env.server, 12_000_000);
    let run = Running::spawn(fetch_cmd(&env, &gate.url, &hash, &dest, &[]));
    assert!(gate.wait_stalled(PATIENCE), "the fetch never stalled");
    std::fs::create_dir(&dest).unwrap();
    gate.release();
    let err = run.fails();
    assert!(err.contains("f.bin"), "{err}");
    std::fs::remove_dir(&dest).unwrap();

    let m0 = env.metrics();
    let f = env.fetch(&hash, &dest, None);
    assert_same_bytes(&data, &dest);
    assert_eq!(u(&f["network_bytes"]), 0, "{f}");
    assert_eq!(u(&f["resumed_bytes"]), data.len() as u64, "{f}");
    let served = served_since(&env, &m0);
    assert!(
        served < 300_000,
        "{served} bytes: the file was not downloaded"
    );
    assert_eq!(names(&out), ["f.bin"]);
}

/// Running a finished fetch again downloads nothing and exits 0; with
/// `--force` after a change, only the changed file travels and the others
/// stay as they are (same inodes).
#[test]
fn rerunning_a_finished_fetch_downloads_nothing() {
    let env = Env::start();
    let src = env.dir("src");
    let big = cas_bench::random_bytes(50, 9_000_000);
    write_mode(&src.join("big.bin"), &big, 0o644);
    write_mode(&src.join("sub/small.txt"), b"small\n", 0o600);
    write_mode(&src.join("empty"), b"", 0o644);
    write_mode(&src.join("same-as-empty"), b"", 0o755);
    let up = env.upload(&src);
    let tree = root_hash(&up);
    let out = env.root.join("out");
    env.fetch(&tree, &out, None);
    let file = env.dir("file").join("big.bin");
    env.fetch(&file_hash(&up, "big.bin"), &file, None);

    let m0 = env.metrics();
    let again = env.fetch(&tree, &out, None);
    let file_again = env.fetch(&file_hash(&up, "big.bin"), &file, None);
    for f in [&again, &file_again] {
        assert_eq!(u(&f["network_bytes"]) + u(&f["cache_bytes"]), 0, "{f}");
    }
    assert_eq!(u(&again["kept_files"]), 4, "{again}");
    assert_eq!(u(&file_again["kept_files"]), 1, "{file_again}");
    let served = served_since(&env, &m0);
    assert!(
        served < 600_000,
        "{served} bytes: big.bin was not downloaded"
    );
    assert_same_tree(&src, &out);
    assert_same_bytes(&big, &file);

    std::fs::write(out.join("sub/small.txt"), b"changed, and longer\n").unwrap();
    let big_inode = std::fs::metadata(out.join("big.bin")).unwrap().ino();
    let err = fails(fetch_cmd(&env, env.url(), &tree, &out, &[]));
    assert!(
        err.contains("small.txt") && err.contains("differs"),
        "{err}"
    );
    let f = json_of(ok(fetch_cmd(&env, env.url(), &tree, &out, &["--force"])));
    assert_same_tree(&src, &out);
    assert_eq!(u(&f["kept_files"]), 3, "{f}");
    assert!(u(&f["network_bytes"]) < 1000, "{f}");
    assert_eq!(
        std::fs::metadata(out.join("big.bin")).unwrap().ino(),
        big_inode
    );
    assert_eq!(names(&env.root), ["file", "out", "server", "src"]);
}

// ------------------------------------------------------------- 4. caches

/// Fetches a file with its cache on a fresh tmpfs mounted with `options`;
/// the fetch must succeed with the right bytes. Returns the report and
/// the warnings about the cache.
fn fetch_with_cache_on_tmpfs(options: &str, seed: u64) -> (Value, usize) {
    let env = Env::start();
    let (data, hash) = two_unit_file(&env, "f.bin", seed, 3_000_000);
    let cache = env.dir("cache");
    let dest = env.root.join("out.bin");
    let mut c = cas_as(None, env.url(), Some(&cache), "fetch", &env.root);
    c.args(["--json", &hash, "-o"]).arg(&dest);
    let (status, out, err) = Running::spawn(on_tmpfs(&c, &cache, options)).finish();
    assert!(status.success(), "{status}: {err:?}");
    assert_same_bytes(&data, &dest);
    let warnings = err
        .iter()
        .filter(|l| l.contains("continuing without caching"))
        .count();
    (json_of(out), warnings)
}

/// A cache on a filesystem too small for what is fetched (two units, so
/// several cache writes fail): the fetch succeeds with one warning.
#[test]
fn a_full_cache_never_fails_a_fetch() {
    let (report, warnings) = fetch_with_cache_on_tmpfs("size=256k", 60);
    assert_eq!(warnings, 1, "{report}");
    assert!(u(&report["network_bytes"]) > 0, "{report}");
}

/// A read-only cache: the same.
#[test]
fn a_read_only_cache_never_fails_a_fetch() {
    let (report, warnings) = fetch_with_cache_on_tmpfs("ro", 70);
    assert_eq!(warnings, 1, "{report}");
}

/// Under umask 077 every file of a setgid (shared) cache, the chunk
/// location log included, is still group-readable and -writable.
#[test]
fn a_shared_cache_stays_shared_under_umask_077() {
    let env = Env::start();
    let cache = env.dir("cache");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o2775)).unwrap();
    let src = env.root.join("f.bin");
    std::fs::write(&src, cas_bench::random_bytes(80, 2_000_000)).unwrap();
    let strict = |c: Command| wrapped(&c, "umask 077 && exec \"$@\"");
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
    let mut env = Env::start();
    let path = env.root.join("growing-log.bin");
    let size = 128u64 << 20;
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap(); // zeros
                              // An old mtime, so the rewrite moves it whatever the clock's granularity.
    f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
    drop(f);
    let gate = Gate::holding(&mut env.server, "POST /v1/dedup");
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
    let env = Env::start();
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
