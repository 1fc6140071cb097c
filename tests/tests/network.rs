//! The network between client and server misbehaves: an answer that stops
//! mid-body is dropped after `--stall-timeout` and its range fetched again,
//! and the proxies the environment names (`HTTP_PROXY`, `NO_PROXY`) are
//! used or bypassed as they say.

use std::time::Instant;

use cas_e2e::assert_same_bytes;
use cas_e2e::client::{cas_as, ok, Env, ForwardProxy, Gate};

/// A fetch through a peer that stops sending half-way through one answer
/// (and keeps the connection open) finishes: the stalled connection is
/// dropped after the stall timeout and its range asked for again.
#[test]
fn a_stalled_answer_is_dropped_and_its_range_fetched_again() {
    let mut env = Env::start();
    let data = cas_bench::random_bytes(11, 8 << 20);
    let (_, hash) = env.upload_bytes("model.bin", &data);
    let gate = Gate::stalling_once(&mut env.server, 1 << 20);
    let dest = env.root.join("out.bin");
    let mut c = cas_as(None, &gate.url, None, "fetch", &env.root);
    c.env("CAS_STALL_TIMEOUT", "2s")
        .args(["--json", &hash, "-o"])
        .arg(&dest);
    let started = Instant::now();
    ok(c);
    let seconds = started.elapsed().as_secs_f64();
    assert!(gate.stalled(), "no answer stalled: the test proves nothing");
    assert_same_bytes(&data, &dest);
    // The stalled connection never delivers its rest: the fetch finished
    // because it gave up on it, after 2 s rather than the default 30 s.
    assert!(
        seconds < 25.0,
        "the stall timeout of 2s was not used: {seconds:.1} s"
    );
}

/// `HTTP_PROXY` carries uploads and fetches; `NO_PROXY` naming the server
/// bypasses it.
#[test]
fn the_environments_proxy_is_used_and_no_proxy_bypasses_it() {
    let env = Env::start();
    let proxy = ForwardProxy::start();
    let data = cas_bench::random_bytes(12, 3 << 20);
    let src = env.root.join("weights.bin");
    std::fs::write(&src, &data).unwrap();

    let mut up = env.cas("upload", None);
    up.env("HTTP_PROXY", &proxy.url).arg(&src);
    let out = String::from_utf8(ok(up)).unwrap();
    let hash = out.split_whitespace().next().unwrap().to_owned();
    let through_upload = proxy.connections();
    assert!(through_upload > 0, "the upload did not use HTTP_PROXY");

    let dest = env.root.join("via-proxy.bin");
    let mut fetch = env.cas("fetch", None);
    fetch
        .env("HTTP_PROXY", &proxy.url)
        .args([&hash, "-o"])
        .arg(&dest);
    ok(fetch);
    assert_same_bytes(&data, &dest);
    let through_fetch = proxy.connections();
    assert!(
        through_fetch > through_upload,
        "the fetch did not use HTTP_PROXY"
    );

    let dest = env.root.join("direct.bin");
    let mut direct = env.cas("fetch", None);
    direct
        .env("HTTP_PROXY", &proxy.url)
        .env("NO_PROXY", "127.0.0.1")
        .args([&hash, "-o"])
        .arg(&dest);
    ok(direct);
    assert_same_bytes(&data, &dest);
    assert_eq!(
        proxy.connections(),
        through_fetch,
        "NO_PROXY=127.0.0.1 still went through the proxy"
    );
}
