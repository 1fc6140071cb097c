//! The network between client and server misbehaves: an answer that stops
//! mid-body is dropped after `--stall-timeout` and its range fetched again,
//! and the proxies the environment names (`HTTP_PROXY`, `HTTPS_PROXY`,
//! `NO_PROXY`) are used or bypassed as they say. An https server whose
//! certificate comes from a private CA is reached when `SSL_CERT_FILE` or
//! `SSL_CERT_DIR` names that CA, and refused in one line when not.
//!
//! The https tests need nginx and openssl (`scripts/setup-debian`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cas_e2e::client::{cas_as, ok, Env, ForwardProxy, Gate};
use cas_e2e::nginx::{nginx_bin, Nginx, Tls};
use cas_e2e::{assert_same_bytes, fails, free_port, json_of};

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

/// A server with tokens behind nginx, which serves it over HTTPS with a
/// certificate for 127.0.0.1 from a throwaway CA (the server's xorb URLs
/// name nginx too), and a forward proxy beside them. Fields drop in order:
/// nginx stops before its directory goes.
struct Https {
    _nginx: Nginx,
    proxy: ForwardProxy,
    env: Env,
    tls: Tls,
    /// `https://127.0.0.1:PORT`, and the `127.0.0.1:PORT` a tunnel to it names.
    endpoint: String,
    authority: String,
    token: String,
}

impl Https {
    fn start() -> Self {
        nginx_bin(); // before anything starts: fail with the instruction
        let authority = format!("127.0.0.1:{}", free_port());
        let endpoint = format!("https://{authority}");
        let env = Env::with_tokens_behind(&endpoint);
        let tls = Tls::throwaway(&env.root.join("tls"));
        let port = authority.rsplit(':').next().unwrap().parse().unwrap();
        let origin = env.url().strip_prefix("http://").unwrap();
        let nginx = Nginx::with_tls(port, origin, &env.root.join("nginx"), &tls);
        assert_eq!(nginx.url, endpoint);
        let token = env.token(&["--scope", "write", "--scope", "read"]);
        Self {
            _nginx: nginx,
            proxy: ForwardProxy::start(),
            env,
            tls,
            endpoint,
            authority,
            token,
        }
    }

    /// `cas-client SUB` against the https endpoint with a token,
    /// `HTTPS_PROXY` naming the proxy and `SSL_CERT_FILE` the CA.
    fn cas(&self, sub: &str) -> Command {
        let mut c = cas_as(None, &self.endpoint, None, sub, &self.env.root);
        c.env("CAS_TOKEN", &self.token)
            .env("HTTPS_PROXY", &self.proxy.url)
            .env("SSL_CERT_FILE", &self.tls.ca);
        c
    }

    /// Uploads `data` through the proxy; returns its file hash.
    fn upload(&self, data: &[u8]) -> String {
        let src = self.env.root.join("weights.bin");
        std::fs::write(&src, data).unwrap();
        let mut up = self.cas("upload");
        up.arg("--json").arg(&src);
        json_of(ok(up))["roots"][0]["hash"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// `cas-client fetch HASH -o DEST` (see [`cas`](Self::cas)).
    fn fetch(&self, hash: &str, dest: &Path) -> Command {
        let mut c = self.cas("fetch");
        c.args([hash, "-o"]).arg(dest);
        c
    }

    fn out(&self, name: &str) -> PathBuf {
        self.env.root.join(name)
    }
}

/// `HTTPS_PROXY` carries an upload and a fetch to an https endpoint
/// through CONNECT tunnels to it (all of their bytes, byte-identical at
/// the end); with `NO_PROXY` naming the host the proxy sees nothing, and
/// `SSL_CERT_DIR` naming a directory with the CA works as `SSL_CERT_FILE`.
#[test]
fn https_goes_through_the_proxys_tunnel_and_no_proxy_bypasses_it() {
    let site = Https::start();
    let data = cas_bench::random_bytes(13, 3 << 20);
    let size = data.len() as u64;

    let hash = site.upload(&data);
    let tunnels = site.proxy.tunnels();
    assert!(!tunnels.is_empty(), "the upload did not use HTTPS_PROXY");
    assert!(
        tunnels.iter().all(|t| *t == site.authority),
        "tunnels to {tunnels:?}, not only to {}",
        site.authority
    );
    let (to_origin, _) = site.proxy.relayed();
    assert!(
        to_origin >= size,
        "the upload's {size} bytes did not all go through the tunnel: {to_origin}"
    );

    let dest = site.out("via-proxy.bin");
    ok(site.fetch(&hash, &dest));
    assert_same_bytes(&data, &dest);
    let after_fetch = site.proxy.tunnels();
    assert!(
        after_fetch.len() > tunnels.len(),
        "the fetch did not use HTTPS_PROXY"
    );
    assert!(after_fetch.iter().all(|t| *t == site.authority));
    let (_, to_client) = site.proxy.relayed();
    assert!(
        to_client >= size,
        "the fetch's {size} bytes did not all come through the tunnel: {to_client}"
    );

    let ca_dir = site.env.dir("ca-dir");
    std::fs::copy(&site.tls.ca, ca_dir.join("private-ca.pem")).unwrap();
    let connections = site.proxy.connections();
    let dest = site.out("direct.bin");
    let mut direct = site.fetch(&hash, &dest);
    direct
        .env("NO_PROXY", "127.0.0.1")
        .env_remove("SSL_CERT_FILE")
        .env("SSL_CERT_DIR", &ca_dir);
    ok(direct);
    assert_same_bytes(&data, &dest);
    assert_eq!(
        site.proxy.connections(),
        connections,
        "NO_PROXY=127.0.0.1 still went through the proxy"
    );
}

/// Without the CA, the fetch fails on the server's certificate in one line
/// that says what to do, after one attempt (a certificate does not get
/// better by asking again); a CA file that does not exist or holds no
/// certificate is one line naming `SSL_CERT_FILE`, before anything is sent.
#[test]
fn an_untrusted_certificate_or_an_unusable_ca_file_fails_in_one_line() {
    let site = Https::start();
    let data = cas_bench::random_bytes(14, 1 << 20);
    let hash = site.upload(&data);
    let dest = site.out("out.bin");

    let tunnels = site.proxy.tunnels().len();
    let mut untrusted = site.fetch(&hash, &dest);
    untrusted.env_remove("SSL_CERT_FILE");
    let line = fails(untrusted);
    assert!(line.contains("invalid peer certificate"), "{line}");
    assert!(line.contains("SSL_CERT_FILE"), "no hint at the fix: {line}");
    assert_eq!(
        site.proxy.tunnels().len(),
        tunnels + 1,
        "the refused certificate was tried again"
    );
    assert!(!dest.exists());

    let connections = site.proxy.connections();
    let missing = site.out("no-such-ca.pem");
    for (ca, says) in [
        (&missing, "No such file"),
        (&site.tls.key, "no PEM certificate"),
    ] {
        let mut c = site.fetch(&hash, &dest);
        c.env("SSL_CERT_FILE", ca);
        let line = fails(c);
        assert!(line.contains("SSL_CERT_FILE"), "{line}");
        assert!(line.contains(ca.to_str().unwrap()), "{line}");
        assert!(line.contains(says), "{line}");
    }
    assert_eq!(site.proxy.connections(), connections, "sent anyway");
    assert!(!dest.exists());
}
