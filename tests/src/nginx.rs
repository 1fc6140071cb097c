//! nginx running docs/nginx/cas-cache.conf (rendered, nothing added) in
//! front of one cas-server or several (the scale-out layout of
//! docs/DEPLOYMENT.md: one `server` line per node in its upstream).
//!
//! Needs nginx (`scripts/setup-debian` installs it); without it a test
//! fails with that instruction instead of passing vacuously.

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

/// docs/nginx/cas-cache.conf with its placeholders filled in.
fn render(listen: &str, origins: &[&str], prefix: &Path, cache_dir: &Path) -> String {
    const ORIGIN: &str = "server @ORIGIN@;";
    assert!(TEMPLATE.contains(ORIGIN), "the upstream names {ORIGIN}");
    let servers: Vec<String> = origins.iter().map(|o| format!("server {o};")).collect();
    let conf = TEMPLATE
        .replace("@LISTEN@", listen)
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
        let exe = nginx_bin();
        std::fs::create_dir_all(prefix).unwrap();
        let cache_dir = prefix.join("cache");
        let conf = prefix.join("nginx.conf");
        let listen = format!("127.0.0.1:{port}");
        std::fs::write(&conf, render(&listen, origins, prefix, &cache_dir)).unwrap();
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
            url: format!("http://{listen}"),
        };
        nginx.wait_ready();
        nginx
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let agent = agent();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("nginx exited ({status}) at start:\n{}", self.logs());
            }
            let last = match agent.get(format!("{}/healthz", self.url)).call() {
                Ok(r) => {
                    let (status, text) = body(r);
                    if status == 200 && text.trim_ascii() == b"ok" {
                        return;
                    }
                    format!("{status} {}", String::from_utf8_lossy(&text))
                }
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "nginx did not answer /healthz within 10 s (last: {last}):\n{}",
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
