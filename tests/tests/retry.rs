//! Transient failures are retried: a fetch started while the server is
//! down succeeds once it comes back on the same address, and an upload
//! whose server restarts between two runs resends nothing that arrived.

use std::process::Stdio;
use std::time::Duration;

use cas_e2e::{bin, ok, ServerProcess};

#[test]
fn fetch_waits_out_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("server");
    let server = ServerProcess::start(&data_dir);
    let url = server.url.clone();
    let addr = url.strip_prefix("http://").unwrap().to_owned();
    let data = cas_bench::random_bytes(4, 2 << 20);
    let file = dir.path().join("f");
    std::fs::write(&file, &data).unwrap();
    let mut upload = bin("cas-client");
    upload
        .args(["upload", "--no-cache", "--endpoint", &url])
        .arg(&file);
    let hash = String::from_utf8(ok(upload)).unwrap();
    let hash = hash.split_whitespace().next().unwrap().to_owned();
    server.kill9();

    // The client starts while nothing listens; the default policy retries
    // for several seconds with backoff.
    let dest = dir.path().join("out");
    let fetch = bin("cas-client")
        .args(["fetch", "--no-cache", "--endpoint", &url, "-o"])
        .arg(&dest)
        .arg(&hash)
        .env("CAS_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _server = ServerProcess::start_with(&data_dir, &["--listen", &addr]);
    let out = fetch.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("retrying"),
        "the client said it retried: {stderr}"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), data);
}

#[test]
fn a_client_gives_up_with_one_clear_line() {
    let out = bin("cas-client")
        .args(["stat", "--endpoint", "http://127.0.0.1:1", "--retries", "2"])
        .arg("0".repeat(64))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap();
    assert!(last.starts_with("cas-client: "), "{stderr}");
    assert!(last.contains("cannot reach http://127.0.0.1:1"), "{stderr}");
    assert_eq!(stderr.matches("retrying").count(), 2, "{stderr}");
}
