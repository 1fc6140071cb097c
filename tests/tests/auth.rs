//! Tokens, scopes and capability URLs against the real binaries: a server
//! with a signing key refuses API calls without a valid token of the right
//! scope (401/403 with one clear client line), serves the xorb grant URLs
//! of reconstructions to anyone holding them but plain xorb reads only
//! with a read token, and a server without a key serves loopback only.

use std::net::{IpAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use cas_e2e::{agent, bin, body, token, ServerProcess};

fn run(mut c: Command) -> Output {
    c.output().unwrap()
}

/// `cas-server token create` with `key` and `args`.
fn token_create(key: &Path, args: &[&str]) -> Output {
    run({
        let mut c = bin("cas-server");
        c.args(["token", "create", "--signing-key-file"])
            .arg(key)
            .args(args);
        c
    })
}

fn client(url: &str, token: Option<&str>, args: &[&str], cwd: &Path) -> Output {
    let mut c = bin("cas-client");
    c.args(args)
        .args(["--no-cache", "--endpoint", url])
        .current_dir(cwd);
    c.env_remove("CAS_TOKEN");
    if let Some(t) = token {
        c.env("CAS_TOKEN", t);
    }
    run(c)
}

fn last_line(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .last()
        .unwrap_or("")
        .to_owned()
}

/// The command failed (exit 1) and its last line says `why`.
fn refused(o: &Output, why: &str) {
    assert_eq!(o.status.code(), Some(1), "{}", last_line(o));
    assert!(last_line(o).contains(why), "{why}: {}", last_line(o));
}

#[test]
fn tokens_and_scopes_guard_the_api_and_xorb_urls_are_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("signing.key");
    let out = run({
        let mut c = bin("cas-server");
        c.args(["key", "create"]).arg(&key);
        c
    });
    assert!(out.status.success());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Never overwrites a key.
    let again = run({
        let mut c = bin("cas-server");
        c.args(["key", "create"]).arg(&key);
        c
    });
    assert!(!again.status.success());

    let server = ServerProcess::start_with(
        &dir.path().join("server"),
        &["--signing-key-file", key.to_str().unwrap()],
    );
    let url = server.url.as_str();
    let read = token(&key, &["--scope", "read", "--ttl", "1h"]);
    let write = token(&key, &["--scope", "write", "--ttl", "1h"]);
    let both = token(&key, &["--scope", "read", "--scope", "write"]);
    let short = token(&key, &["--scope", "read", "--ttl", "1s"]);
    let data = cas_bench::random_bytes(7, 3 << 20);
    let file = dir.path().join("f.bin");
    std::fs::write(&file, &data).unwrap();
    let f = file.to_str().unwrap();

    // Upload: no token -> 401, read token -> 403, write token -> ok.
    let o = client(url, None, &["upload", f], dir.path());
    refused(&o, "401 unauthorized: a bearer token is required");
    let o = client(url, Some(&read), &["upload", f], dir.path());
    refused(&o, "403 forbidden: token lacks the write scope");
    let o = client(url, Some(&write), &["upload", f], dir.path());
    assert!(o.status.success(), "{}", last_line(&o));
    let hash = String::from_utf8(o.stdout).unwrap();
    let hash = hash.split_whitespace().next().unwrap().to_owned();

    // Fetch: the write-only token cannot read; read and read+write can.
    let o = client(
        url,
        Some(&write),
        &["fetch", &hash, "-o", "w.bin"],
        dir.path(),
    );
    refused(&o, "403 forbidden: token lacks the read scope");
    assert!(!dir.path().join("w.bin").exists());
    for (t, name) in [(&read, "r.bin"), (&both, "b.bin")] {
        let o = client(url, Some(t), &["fetch", &hash, "-o", name], dir.path());
        assert!(o.status.success(), "{}", last_line(&o));
        assert_eq!(std::fs::read(dir.path().join(name)).unwrap(), data);
    }

    // A forged or tampered token is invalid; an old one says it expired.
    let mut tampered = read.clone();
    tampered.replace_range(10..11, if &read[10..11] == "0" { "1" } else { "0" });
    for bad in [tampered.as_str(), "cas1.00.00", "not-a-token"] {
        let o = client(url, Some(bad), &["stat", &hash], dir.path());
        refused(&o, "401 unauthorized: invalid token");
    }
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let o = client(url, Some(&short), &["stat", &hash], dir.path());
    refused(&o, "401 unauthorized: token expired at 20");

    // Grant URLs are capabilities: anyone holding one reads it without a
    // token. A plain xorb read needs a read token; writing needs a write
    // token; the API around them does too.
    let a = agent();
    let rec = a
        .get(format!("{url}/v1/reconstructions/{hash}"))
        .header("Authorization", format!("Bearer {read}"))
        .call()
        .unwrap();
    let (status, rec) = body(rec);
    assert_eq!(status, 200);
    let rec: serde_json::Value = serde_json::from_slice(&rec).unwrap();
    let grant_url = rec["fetch"][0]["url"].as_str().unwrap().to_owned();
    let xorb_url = format!(
        "{url}/v1/xorbs/{}",
        rec["fetch"][0]["xorb"].as_str().unwrap()
    );
    assert!(
        grant_url.starts_with(&format!("{xorb_url}/0-")),
        "{grant_url}"
    );
    let (status, bytes) = body(a.get(&grant_url).call().unwrap());
    assert_eq!(status, 200, "capability read without a token");
    assert!(bytes.starts_with(b"CASXORB\0"));
    assert_eq!(body(a.get(&xorb_url).call().unwrap()).0, 401);
    let as_writer = a
        .get(&xorb_url)
        .header("Authorization", format!("Bearer {write}"))
        .call()
        .unwrap();
    assert_eq!(body(as_writer).0, 403, "a plain read needs the read scope");
    let as_reader = a
        .get(&xorb_url)
        .header("Authorization", format!("Bearer {read}"))
        .call()
        .unwrap();
    assert_eq!(
        as_reader.headers().get("cache-control").unwrap(),
        "private, max-age=31536000, immutable",
        "no shared cache keeps a read its token allowed"
    );
    assert_eq!(body(as_reader).1, bytes);
    let put = a.put(&xorb_url).send(&bytes[..]).unwrap();
    assert_eq!(put.status().as_u16(), 401, "writing a xorb needs a token");
    assert_eq!(
        put.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap()),
        Some("Bearer")
    );
    let (status, _) = body(
        a.get(format!("{url}/v1/reconstructions/{hash}"))
            .call()
            .unwrap(),
    );
    assert_eq!(status, 401);
    let unknown = format!("{url}/v1/xorbs/{}", "ab".repeat(32));
    let unknown_read = a
        .get(&unknown)
        .header("Authorization", format!("Bearer {read}"))
        .call()
        .unwrap();
    assert_eq!(body(unknown_read).0, 404);
    assert_eq!(body(a.get(format!("{url}/healthz")).call().unwrap()).0, 200);
}

#[test]
fn token_commands_and_keys_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, "abcd\n").unwrap();
    let o = run({
        let mut c = bin("cas-server");
        c.args(["token", "create", "--scope", "read", "--signing-key-file"])
            .arg(&key);
        c
    });
    refused(&o, "at least 32 bytes");
    let o = run({
        let mut c = bin("cas-server");
        c.args(["token", "create", "--scope", "read"])
            .env_remove("CAS_SIGNING_KEY_FILE");
        c
    });
    refused(&o, "needs --signing-key-file");
    let o = run({
        let mut c = bin("cas-server");
        c.args(["--listen", "127.0.0.1:0", "--signing-key-file"])
            .arg(&key);
        c.arg("--data-dir").arg(dir.path().join("d"));
        c
    });
    assert_eq!(
        o.status.code(),
        Some(1),
        "a server with a bad key does not start"
    );
}

fn key_create(path: &Path) -> Output {
    run({
        let mut c = bin("cas-server");
        c.args(["key", "create"]).arg(path);
        c
    })
}

/// The one `cas-server: ...` line a failed command printed.
fn error_line(o: &Output) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr.trim_end().to_owned()
}

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    assert!(key_create(&key).status.success());
    let server = ServerProcess::start_with(
        &dir.path().join("server"),
        &["--signing-key-file", key.to_str().unwrap()],
    );
    let read = token(&key, &["--scope", "read"]);
    let missing = format!("{}/v1/files/{}", server.url, "ab".repeat(32));
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = agent()
            .get(&missing)
            .header("Authorization", format!("{scheme} {read}"))
            .call()
            .unwrap();
        assert_eq!(body(r).0, 404, "{scheme}: authorized, and no such file");
    }
    let r = agent()
        .get(&missing)
        .header("Authorization", format!("Basic {read}"))
        .call()
        .unwrap();
    assert_eq!(body(r).0, 401);
}

#[test]
fn token_lifetimes_that_overflow_or_are_absurd_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    assert!(key_create(&key).status.success());
    for ttl in [
        "18446744073709551615",
        "18446744073709551615s",
        "3651d",
        "99999999h",
    ] {
        let o = token_create(&key, &["--scope", "read", "--ttl", ttl]);
        assert_eq!(o.status.code(), Some(2), "--ttl {ttl}: {o:?}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            stderr.contains("longer than the longest token lifetime, 3650d"),
            "--ttl {ttl}: {stderr}"
        );
        assert!(o.stdout.is_empty(), "no token for --ttl {ttl}");
    }
    // Ten years is fine, and says until when.
    let o = token_create(&key, &["--scope", "read", "--ttl", "3650d"]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("valid until 20"));
}

#[test]
fn key_create_errors_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir/k");
    let o = key_create(&missing);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        error_line(&o),
        format!(
            "cas-server: cannot create key file {}: No such file or directory (os error 2)",
            missing.display()
        )
    );

    let key = dir.path().join("k");
    assert!(key_create(&key).status.success());
    let before = std::fs::read(&key).unwrap();
    let o = key_create(&key);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        error_line(&o),
        format!(
            "cas-server: {} already exists; key create never overwrites a key",
            key.display()
        )
    );
    assert_eq!(std::fs::read(&key).unwrap(), before, "the key is untouched");
}

/// A local address that is not loopback, if this machine has one.
fn non_loopback_ip() -> Option<IpAddr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    // No packet is sent: connect only picks the outgoing interface.
    s.connect("10.255.255.254:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn without_a_key_only_loopback_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = bin("cas-server")
        .args(["--listen", "0.0.0.0:0", "--log", "info", "--data-dir"])
        .arg(dir.path())
        .env_remove("CAS_SIGNING_KEY_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port = line.trim().rsplit(':').next().unwrap().to_owned();
    let local = body(
        agent()
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .call()
            .unwrap(),
    );
    assert_eq!(local.0, 200);
    match non_loopback_ip() {
        Some(ip) => {
            let (status, b) = body(
                agent()
                    .get(format!("http://{ip}:{port}/healthz"))
                    .call()
                    .unwrap(),
            );
            assert_eq!(status, 403, "{}", String::from_utf8_lossy(&b));
            assert!(String::from_utf8_lossy(&b).contains("loopback clients only"));
        }
        None => {
            eprintln!("no non-loopback interface here; the refusal is covered by auth unit tests")
        }
    }
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("serving loopback clients only"), "{log}");
}
