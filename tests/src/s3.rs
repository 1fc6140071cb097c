//! SeaweedFS as the S3 bucket of the tests: `weed server -s3` on free
//! loopback ports over a scratch directory, started and stopped (by its
//! PID) by the test, and cas-server nodes that share its bucket.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{agent, bin, free_port, ServerProcess};

/// The bucket every test creates in its own SeaweedFS.
pub const BUCKET: &str = "cas";

/// The `weed` binary: `$CAS_WEED`, else where scripts/setup-seaweedfs
/// installs it. Panics with instructions when it is missing: a test that
/// silently skipped would prove nothing.
pub fn weed_path() -> PathBuf {
    let path = std::env::var_os("CAS_WEED").map_or_else(
        || {
            let home = std::env::var_os("HOME").expect("HOME");
            Path::new(&home).join(".cache/cas-seaweedfs/bin/weed")
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup-seaweedfs (or set CAS_WEED)",
        path.display()
    );
    path
}

/// A running SeaweedFS (master, volume, filer and S3 gateway in one
/// process); SIGKILLed when dropped.
pub struct Weed {
    child: Option<Child>,
    dir: PathBuf,
    /// master, volume, filer, s3 HTTP ports; each gRPC port is separate.
    ports: [u16; 8],
    _scratch: Option<tempfile::TempDir>,
}

impl Weed {
    /// Starts SeaweedFS in a fresh directory and creates [`BUCKET`].
    pub fn start() -> Self {
        let scratch = tempfile::tempdir().unwrap();
        let mut w = Self {
            child: None,
            dir: scratch.path().to_owned(),
            ports: std::array::from_fn(|_| free_port()),
            _scratch: Some(scratch),
        };
        // A free port is free only when picked: a test running beside this
        // one may bind it first, and weed then exits. Fresh ports, again.
        let mut tries = 1;
        while let Err(e) = w.spawn() {
            assert!(tries < 4, "{e}");
            tries += 1;
            w.kill();
            w.ports = std::array::from_fn(|_| free_port());
        }
        let (status, body) = crate::body(
            agent()
                .put(format!("{}/{BUCKET}", w.endpoint()))
                .send_empty()
                .unwrap(),
        );
        assert_eq!(
            status,
            200,
            "create bucket: {}",
            String::from_utf8_lossy(&body)
        );
        w
    }

    /// Starts weed on [`Self::ports`] and waits until it serves; an error
    /// (with weed's log) if it exits or is not ready within a minute.
    fn spawn(&mut self) -> Result<(), String> {
        let p = self.ports;
        let log = std::fs::File::create(self.dir.join("weed.log")).unwrap();
        let child = Command::new(weed_path())
            .arg("server")
            .arg(format!("-dir={}", self.dir.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3"])
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-volume.port={}", p[1]))
            .arg(format!("-filer.port={}", p[2]))
            .arg(format!("-s3.port={}", p[3]))
            .arg(format!("-master.port.grpc={}", p[4]))
            .arg(format!("-volume.port.grpc={}", p[5]))
            .arg(format!("-filer.port.grpc={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-iam=false",
                "-master.telemetry=false",
                // A restart would wait ~19 s for an election otherwise.
                "-master.resumeState=false",
                "-volume.max=0",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn weed");
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60))
    }

    /// Waits until the S3 gateway answers a listing of the buckets and the
    /// volume server has joined the master (before that, a restarted
    /// SeaweedFS lists objects but answers 500 to reading them).
    fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        let a = agent();
        let file = self.dir.join("weed.log");
        let log = || std::fs::read_to_string(&file).unwrap_or_default();
        loop {
            let child = self.child.as_mut().expect("spawned");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Err(format!("SeaweedFS exited ({status}); log:\n{}", log()));
            }
            let s3 = a
                .get(format!("{}/", self.endpoint()))
                .call()
                .is_ok_and(|r| r.status().as_u16() == 200);
            let volumes = s3
                && a.get(format!("http://127.0.0.1:{}/dir/status", self.ports[0]))
                    .call()
                    .is_ok_and(|r| {
                        let (status, text) = crate::body(r);
                        status == 200 && String::from_utf8_lossy(&text).contains("\"DataNodes\"")
                    });
            if volumes {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "SeaweedFS did not start in {limit:?}; log:\n{}",
                    log()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[3])
    }

    /// SIGKILL: the bucket is unreachable until [`restart`](Self::restart).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // It leaves its unix sockets behind, named by port
        // (/tmp/seaweedfs-<service>[-grpc]-<port>.sock).
        let ends: Vec<String> = self.ports.iter().map(|p| format!("-{p}.sock")).collect();
        for entry in std::fs::read_dir("/tmp").into_iter().flatten().flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("seaweedfs-") && ends.iter().any(|e| name.ends_with(e.as_str())) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Starts it again on the same directory and ports.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn() {
            panic!("{e}");
        }
    }

    /// Keys in the bucket under `prefix` (a plain, unsigned ListObjectsV2:
    /// SeaweedFS without identities serves anonymous requests).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let url = format!(
            "{}/{BUCKET}?list-type=2&max-keys=1000&prefix={prefix}",
            self.endpoint()
        );
        let (status, body) = crate::body(agent().get(url).call().unwrap());
        assert_eq!(status, 200);
        let xml = String::from_utf8(body).unwrap();
        xml.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }

    /// A cas-server on `data_dir` (its index) over `s3://cas/<prefix>`.
    pub fn node(&self, data_dir: &Path, prefix: &str, extra_args: &[&str]) -> ServerProcess {
        let mut cmd = bin("cas-server");
        self.s3_env(&mut cmd);
        let store = format!("s3://{BUCKET}/{prefix}");
        let endpoint = self.endpoint();
        let mut args = vec!["--store", &store, "--s3-endpoint", &endpoint];
        args.extend_from_slice(extra_args);
        ServerProcess::spawn_cmd(cmd, data_dir, &args)
    }

    /// The AWS environment a node or an admin command needs.
    pub fn s3_env(&self, cmd: &mut Command) {
        cmd.env("AWS_ACCESS_KEY_ID", "cas-test")
            .env("AWS_SECRET_ACCESS_KEY", "cas-test-secret")
            .env("AWS_REGION", "us-east-1")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_PROFILE");
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy that relays one direction at most `rate` bytes a second
/// (so a transfer is still running when the test kills something behind
/// it) and counts the bytes it slowed. Connections close with either side.
pub struct Throttle {
    pub url: String,
    relayed: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Throttle {
    /// Slows the answers (a fetch).
    pub fn start(upstream: &str, rate: u64) -> Self {
        Self::new(upstream, rate, false)
    }

    /// Slows the requests (an upload's bodies).
    pub fn uploads(upstream: &str, rate: u64) -> Self {
        Self::new(upstream, rate, true)
    }

    fn new(upstream: &str, rate: u64, requests: bool) -> Self {
        use std::net::TcpStream;
        use std::sync::atomic::AtomicU64;
        use std::sync::Arc;
        let upstream = upstream
            .strip_prefix("http://")
            .expect("http URL")
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let relayed = Arc::new(AtomicU64::new(0));
        let count = relayed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (c_in, s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (slow_up, slow_down) = match requests {
                    true => (Some((rate, count.clone())), None),
                    false => (None, Some((rate, count.clone()))),
                };
                std::thread::spawn(move || pump(c_in, s_out, slow_up));
                std::thread::spawn(move || pump(server, client, slow_down));
            }
        });
        Self { url, relayed }
    }

    /// Bytes relayed so far in the slowed direction.
    pub fn relayed(&self) -> u64 {
        self.relayed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Copies `from` to `to` until either closes, then closes both ways;
/// with `slow`, at most `rate` bytes a second, counted.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    slow: Option<(u64, std::sync::Arc<std::sync::atomic::AtomicU64>)>,
) {
    use std::io::{Read, Write};
    let piece = slow
        .as_ref()
        .map_or(64 << 10, |(rate, _)| (rate / 20).max(1) as usize);
    let mut buf = vec![0u8; piece];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some((_, count)) = &slow {
            count.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}
