//! nginx running docs/nginx/cas-cache.conf (rendered, nothing added) in
//! front of one cas-server or several (the scale-out layout of
//! docs/DEPLOYMENT.md: one `server` line per node in its upstream).
//!
//! With [`Tls`], nginx terminates TLS as the template's TLS lines say
//! (uncommented), with a throwaway CA and a certificate for 127.0.0.1 that
//! `openssl` makes at test time.
//!
//! Needs nginx and openssl (`scripts/setup-debian` installs them); without
//! them a test fails with that instruction instead of passing vacuously.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{agent, body};

/// The template under test, shared with docs/DEPLOYMENT.md.
pub const TEMPLATE: &str = include_str!("../../docs/nginx/cas-cache.conf");

/// The nginx binary, or a failure that says how to get it.
pub fn nginx_bin() -> PathBuf {
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nginx")).collect())
        .unwrap_or_default();
    [PathBuf::from("/usr/sbin/nginx")]
        .into_iter()
        .chain(on_path)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nginx is not installed: run scripts/setup-debian \
                 (tests/tests/cdn.rs runs the server behind nginx)"
            )
        })
}

/// A throwaway certificate authority and a server certificate it signed
/// for `127.0.0.1`, made by `openssl` in a directory of the test's.
pub struct Tls {
    /// The CA's certificate (PEM): what a client must trust.
    pub ca: PathBuf,
    /// The server's certificate and key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Tls {
    /// Makes the CA and the server certificate under `dir` (created).
    pub fn throwaway(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName = IP:127.0.0.1\n\
             basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\n\
             extendedKeyUsage = serverAuth\n",
        )
        .unwrap();
        const EC: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        openssl(
            dir,
            &format!(
                "req -x509 {EC} -days 1 -subj /CN=cas-test-CA \
                 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign \
                 -keyout ca.key -out ca.pem"
            ),
        );
        openssl(
            dir,
            &format!("req {EC} -subj /CN=127.0.0.1 -keyout server.key -out server.csr"),
        );
        openssl(
            dir,
            "x509 -req -days 1 -set_serial 2 -in server.csr -CA ca.pem -CAkey ca.key \
             -extfile server.ext -out server.pem",
        );
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    }
}

/// Runs `openssl ARGS` (split at whitespace) in `dir`; must succeed.
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args.split_whitespace())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}): run scripts/setup-debian (TLS tests make their certificates with it)")
        });
    assert!(
        out.status.success(),
        "openssl {args}: {}",
        crate::show(&out)
    );
}

/// The template's TLS lines, commented out as shipped.
const TLS_CERT: &str = "# ssl_certificate     /etc/ssl/cas/fullchain.pem;";
const TLS_KEY: &str = "# ssl_certificate_key /etc/ssl/cas/privkey.pem;";

/// docs/nginx/cas-cache.conf with its placeholders filled in and, with
/// `tls`, its TLS lines uncommented and naming `tls`'s files.
fn render(
    listen: &str,
    origins: &[&str],
    prefix: &Path,
    cache_dir: &Path,
    tls: Option<&Tls>,
) -> String {
    const ORIGIN: &str = "server @ORIGIN@;";
    assert!(TEMPLATE.contains(ORIGIN), "the upstream names {ORIGIN}");
    let servers: Vec<String> = origins.iter().map(|o| format!("server {o};")).collect();
    let mut conf = TEMPLATE.to_owned();
    let mut listen = listen.to_owned();
    if let Some(tls) = tls {
        for line in [TLS_CERT, TLS_KEY] {
            assert!(TEMPLATE.contains(line), "the template shows {line}");
        }
        conf = conf
            .replace(
                TLS_CERT,
                &format!("ssl_certificate     {};", tls.cert.display()),
            )
            .replace(
                TLS_KEY,
                &format!("ssl_certificate_key {};", tls.key.display()),
            );
        listen.push_str(" ssl");
    }
    let conf = conf
        .replace("@LISTEN@", &listen)
        .replace(ORIGIN, &servers.join("\n        "))
        // (the comments name it too)
        .replace("@ORIGIN@", origins[0])
        .replace("@PREFIX@", prefix.to_str().unwrap())
        .replace("@CACHE_DIR@", cache_dir.to_str().unwrap())
        .replace("@CACHE_MAX_SIZE@", "1g");
    assert!(!conf.contains('@'), "unreplaced placeholder in\n{conf}");
    conf
}

/// nginx in the foreground on a free loopback port, everything it writes
/// under `prefix`; stopped when dropped.
pub struct Nginx {
    child: Child,
    exe: PathBuf,
    conf: PathBuf,
    prefix: PathBuf,
    cache_dir: PathBuf,
    pub url: String,
}

impl Nginx {
    /// Renders the template for `port` in front of `origin` (`HOST:PORT`),
    /// starts nginx and waits until `/healthz` answers through it.
    pub fn start(port: u16, origin: &str, prefix: &Path) -> Self {
        Self::balancing(port, &[origin], prefix)
    }

    /// As [`start`](Self::start) with the nodes `origins` as the upstream's
    /// servers (nginx balances across them and skips a dead one).
    pub fn balancing(port: u16, origins: &[&str], prefix: &Path) -> Self {
        Self::launch(port, origins, prefix, None)
    }

    /// As [`start`](Self::start), serving HTTPS with `tls`'s certificate
    /// (`url` is `https://127.0.0.1:PORT`).
    pub fn with_tls(port: u16, origin: &str, prefix: &Path, tls: &Tls) -> Self {
        Self::launch(port, &[origin], prefix, Some(tls))
    }

    fn launch(port: u16, origins: &[&str], prefix: &Path, tls: Option<&Tls>) -> Self {
        let exe = nginx_bin();
        std::fs::create_dir_all(prefix).unwrap();
        let cache_dir = prefix.join("cache");
        let conf = prefix.join("nginx.conf");
        let listen = format!("127.0.0.1:{port}");
        std::fs::write(&conf, render(&listen, origins, prefix, &cache_dir, tls)).unwrap();
        let stderr = File::create(prefix.join("stderr")).unwrap();
        let child = Command::new(&exe)
            .arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let mut nginx = Self {
            child,
            exe,
            conf,
            prefix: prefix.to_owned(),
            cache_dir,
            url: format!(
                "{}://{listen}",
                if tls.is_some() { "https" } else { "http" }
            ),
        };
        if tls.is_some() {
            // No TLS in the tests' HTTP agent: nginx is ready once it has
            // written its pid file, which it does after binding its port
            // (and after loading the certificate; either failing, it exits).
            let pid = nginx.child.id().to_string();
            let pid_file = nginx.prefix.join("nginx.pid");
            nginx.wait_ready(|| match std::fs::read_to_string(&pid_file) {
                Ok(s) if s.trim() == pid => Ok(()),
                Ok(s) => Err(format!("nginx.pid holds {s:?}, not {pid}")),
                Err(e) => Err(format!("nginx.pid: {e}")),
            });
        } else {
            let (agent, healthz) = (agent(), format!("{}/healthz", nginx.url));
            nginx.wait_ready(|| match agent.get(&healthz).call() {
                Ok(r) => match body(r) {
                    (200, text) if text.trim_ascii() == b"ok" => Ok(()),
                    (status, text) => Err(format!("{status} {}", String::from_utf8_lossy(&text))),
                },
                Err(e) => Err(e.to_string()),
            });
        }
        nginx
    }

    /// Waits until `ready` says so (or what it says last is an error).
    fn wait_ready(&mut self, ready: impl Fn() -> Result<(), String>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("nginx exited ({status}) at start:\n{}", self.logs());
            }
            let last = match ready() {
                Ok(()) => return,
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "nginx was not ready within 10 s (last: {last}):\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What nginx wrote to stderr and its error log.
    pub fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.prefix.join(name)).unwrap_or_default();
        format!(
            "stderr:\n{}\nerror.log:\n{}",
            read("stderr"),
            read("error.log")
        )
    }

    /// Every file in the proxy cache.
    pub fn cached_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.cache_dir, &mut out);
        out.sort();
        out
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM through nginx itself (pid file from the config): a
        // SIGKILLed master would leave its workers serving the port.
        let _ = Command::new(&self.exe)
            .arg("-p")
            .arg(&self.prefix)
            .arg("-c")
            .arg(&self.conf)
            .args(["-s", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
