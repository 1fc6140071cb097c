//! Hostile clients against the real `cas-server` binary: bodies that
//! trickle or never come, idle and slow-header sockets, held-open bodies,
//! answers never read, clients that hang up after sending a xorb, racing duplicate uploads and
//! forged `Host` headers. Each test synchronises on what the server says
//! (its answers, /metrics, /proc) and bounds its waits generously.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use cas_e2e::{agent, body, upload, Metrics, ServerProcess};
use cas_protocol::chunking::chunk_and_hash;
use cas_protocol::messages::{DedupAnswer, DedupQuery, Reconstruction};
use cas_protocol::xorb::{BuiltXorb, Compression, EncodedChunk, XorbBuilder};
use cas_protocol::Message;

const MIB: usize = 1 << 20;

/// A socket to the server at `url` (`http://ADDR`), its reads bounded so
/// that a server that never answers fails the test instead of hanging it.
fn connect(url: &str) -> TcpStream {
    let s = TcpStream::connect(url.strip_prefix("http://").unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    s
}

/// Writes a request head with `headers` (each ending in CRLF).
fn head(s: &mut TcpStream, method: &str, path: &str, headers: &str) -> std::io::Result<()> {
    write!(s, "{method} {path} HTTP/1.1\r\nHost: cas\r\n{headers}\r\n")
}

/// The whole answer the server sends before it closes (or a read fails).
fn answer(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

/// The status of an answer, or 0 when there is none (connection closed).
fn status_of(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3)?.parse().ok())
        .unwrap_or(0)
}

/// Polls `cond` until it holds (every 20 ms, for at most 60 s).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(60), "never: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A valid xorb of about `len` random bytes (incompressible: verification
/// hashes every byte).
fn xorb_of(seed: u64, len: usize) -> BuiltXorb {
    let data = cas_bench::random_bytes(seed, len);
    let mut b = XorbBuilder::new();
    let mut pos = 0;
    for c in chunk_and_hash(&data) {
        let bytes = &data[pos..pos + c.len as usize];
        pos += c.len as usize;
        b.try_push(EncodedChunk::encode_with_hash(bytes, c.hash, Compression::default()).unwrap())
            .expect("fits one xorb");
    }
    b.finish().unwrap()
}

/// Eight uploads that trickle a byte every 200 ms take every upload slot
/// (the default eight) and eight more send nothing after their heads; a
/// normal upload still completes: the silent ones never get a slot and the
/// tricklers are cut off by the body timeout with 408.
#[test]
fn slow_bodies_do_not_block_a_normal_upload() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with(dir.path(), &["--body-timeout", "2s"]);
    let url = server.url.clone();
    let path = format!("/v1/xorbs/{}", xorb_of(1, 1000).hash);
    let mut clients = Vec::new();
    for trickle in [true, false] {
        for _ in 0..8 {
            let (url, path) = (url.clone(), path.clone());
            clients.push(thread::spawn(move || {
                let mut s = connect(&url);
                head(&mut s, "PUT", &path, "Content-Length: 100000\r\n").unwrap();
                while trickle && s.write_all(b"x").is_ok() {
                    thread::sleep(Duration::from_millis(200));
                }
                answer(&mut s)
            }));
        }
    }
    wait_for("the tricklers hold every upload slot", || {
        Metrics::fetch(&url).get("cas_upload_slots_in_use") == 8
    });

    let (done, result) = mpsc::channel();
    let data = cas_bench::random_bytes(2, 3 * MIB);
    thread::spawn(move || done.send(upload(&url, &[&data]).map(|u| u.xorbs_sent)));
    let sent = result
        .recv_timeout(Duration::from_secs(60))
        .expect("a normal upload completes while slow clients hold connections");
    assert_eq!(sent, Ok(1));
    for c in clients {
        let a = c.join().unwrap();
        assert_eq!(status_of(&a), 408, "{a}");
        assert!(a.contains("request_timeout"), "{a}");
    }
}

/// Under a hard limit of 256 open files, 400 idle sockets do not stop
/// `/healthz` or an upload: the connection cap stays below the limit, and
/// at the cap the idlest connection makes room for a new one.
#[test]
fn idle_sockets_do_not_stop_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with_ulimit(
        dir.path(),
        &["--idle-timeout", "10m", "--header-timeout", "10m"],
        "-n 256",
    );
    let idle: Vec<TcpStream> = (0..400).map(|_| connect(&server.url)).collect();
    let a: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let (status, text) = body(
        a.get(format!("{}/healthz", server.url))
            .call()
            .expect("/healthz answers"),
    );
    assert_eq!((status, text), (200, b"ok\n".to_vec()));
    let data = cas_bench::random_bytes(3, MIB);
    upload(&server.url, &[&data]).unwrap();
    let m = Metrics::fetch(&server.url);
    assert!(m.get("cas_connections_evicted_total") > 0, "{}", m.0);
    assert!(m.get("cas_open_connections") < 256);
    drop(idle);
}

/// A soft open-file limit below the hard one is raised at start.
#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with_ulimit(dir.path(), &[], "-Sn 256");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3], fields[4], "soft = hard: {line}");
}

/// Twelve shard bodies of 100 MiB (declared 128 MiB) and fifty dedup
/// bodies of 1 MB, all held open, never take the server past its body
/// budget of 256 MiB (plus what it needs without them), and repeated
/// rounds of large bodies do not make it grow.
#[test]
fn held_open_bodies_stay_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with(
        dir.path(),
        &[
            "--body-budget",
            "256MiB",
            "--body-timeout",
            "2s",
            "--queue-timeout",
            "5m",
        ],
    );
    let url = server.url.clone();
    assert_eq!(
        body(agent().get(format!("{url}/healthz")).call().unwrap()).0,
        200
    );
    let baseline = server.status_bytes("VmRSS");

    let piece = Arc::new(vec![0xa5u8; MIB]);
    let send = |path: &'static str, declared: usize, sent: usize| {
        let (url, piece) = (url.clone(), piece.clone());
        thread::spawn(move || {
            let mut s = connect(&url);
            let mut left = sent;
            let headers = format!("Content-Length: {declared}\r\nConnection: close\r\n");
            let mut w = head(&mut s, "POST", path, &headers);
            while w.is_ok() && left > 0 {
                let n = left.min(piece.len());
                w = s.write_all(&piece[..n]);
                left -= n;
            }
            status_of(&answer(&mut s))
        })
    };
    let mut held: Vec<_> = (0..12)
        .map(|_| send("/v1/shards", 128 * MIB, 100 * MIB))
        .collect();
    held.extend((0..50).map(|_| send("/v1/dedup", 1_100_000, 1_000_000)));
    for h in held {
        // Each was read as far as it went, then timed out.
        assert_eq!(h.join().unwrap(), 408);
    }
    let peak = server.status_bytes("VmHWM");
    eprintln!("baseline {} MiB, peak {} MiB", baseline >> 20, peak >> 20);
    assert!(
        peak < baseline + 256 * MIB as u64 + 64 * MIB as u64,
        "peak RSS {} MiB with a 256 MiB budget (baseline {} MiB)",
        peak >> 20,
        baseline >> 20
    );

    // Whole bodies, round after round: memory goes back each time.
    let mut after = Vec::new();
    for _ in 0..4 {
        let round: Vec<_> = (0..2)
            .map(|_| send("/v1/shards", 100 * MIB, 100 * MIB))
            .collect();
        for r in round {
            assert_eq!(r.join().unwrap(), 400, "junk is not a shard");
        }
        after.push(server.status_bytes("VmRSS"));
    }
    eprintln!(
        "RSS after each round (MiB): {:?}",
        after.iter().map(|b| b >> 20).collect::<Vec<_>>()
    );
    assert!(
        after[3] <= after[0] + 16 * MIB as u64,
        "RSS grows round after round: {after:?}"
    );
    assert!(
        after[0] < baseline + 64 * MIB as u64,
        "RSS does not fall back after the bodies: {after:?}, baseline {baseline}"
    );
    let m = Metrics::fetch(&url);
    assert_eq!(
        m.get("cas_body_bytes_reserved"),
        0,
        "every reservation returned"
    );
}

/// A keep-alive connection with no request on it is closed after the idle
/// timeout.
#[test]
fn an_idle_keep_alive_connection_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with(
        dir.path(),
        &["--idle-timeout", "1s", "--header-timeout", "1m"],
    );
    let mut s = connect(&server.url);
    head(&mut s, "GET", "/healthz", "").unwrap();
    let mut got = [0u8; 512];
    let n = s.read(&mut got).unwrap();
    let first = String::from_utf8_lossy(&got[..n]);
    assert!(
        first.starts_with("HTTP/1.1 200") && first.ends_with("ok\n"),
        "{first}"
    );
    // The connection stays open for more requests, then closes.
    match s.read(&mut got) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("connection still open after the idle timeout: {other:?}"),
    }
    assert_eq!(
        Metrics::fetch(&server.url).get("cas_idle_timeouts_total"),
        1
    );
}

/// A request head sent a byte every 100 ms is cut off after the header
/// timeout, before it is complete; it is never answered.
#[test]
fn a_slow_request_head_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with(
        dir.path(),
        &["--header-timeout", "1s", "--idle-timeout", "1m"],
    );
    let mut s = connect(&server.url);
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: cas\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(100)
    );
    let mut cut = false;
    for b in request.bytes() {
        if s.write_all(&[b]).is_err() {
            cut = true;
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let a = answer(&mut s);
    assert!(cut && status_of(&a) == 0, "head was not cut off: {a:?}");
    assert_eq!(
        Metrics::fetch(&server.url).get("cas_header_timeouts_total"),
        1
    );
}

/// A client that asks for a 40 MiB xorb and never reads the answer does
/// not hold its connection forever: once the socket buffers are full, the
/// write is dropped after the body timeout.
#[test]
fn an_unread_answer_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with(dir.path(), &["--body-timeout", "1s"]);
    let x = xorb_of(7, 40 * MIB);
    let url = format!("{}/v1/xorbs/{}", server.url, x.hash);
    assert_eq!(body(agent().put(&url).send(&x.bytes[..]).unwrap()).0, 201);
    let mut s = connect(&server.url);
    head(&mut s, "GET", &format!("/v1/xorbs/{}", x.hash), "").unwrap();
    wait_for("the stalled answer is dropped", || {
        Metrics::fetch(&server.url).get("cas_write_timeouts_total") == 1
    });
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.len() < x.bytes.len(), "{} bytes arrived", got.len());
}

/// A client that sends a whole xorb and hangs up at once still gets it
/// stored and indexed: it shows up in dedup answers (which read the index,
/// so it cannot show there before it is indexed) and is counted once.
#[test]
fn a_xorb_whose_body_arrived_is_stored_after_the_client_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let x = xorb_of(4, 40 * MIB);
    let mut s = connect(&server.url);
    head(
        &mut s,
        "PUT",
        &format!("/v1/xorbs/{}", x.hash),
        &format!("Content-Length: {}\r\n", x.bytes.len()),
    )
    .unwrap();
    s.write_all(&x.bytes).unwrap();
    s.shutdown(Shutdown::Both).unwrap();
    drop(s);

    let query = DedupQuery {
        chunks: vec![x.chunks[0].hash, x.chunks[x.chunks.len() - 1].hash],
    };
    wait_for("the xorb is indexed", || {
        let r = agent()
            .post(format!("{}/v1/dedup", server.url))
            .send(&query.to_bytes()[..]);
        let (status, bytes) = body(r.unwrap());
        assert_eq!(status, 200);
        let a = DedupAnswer::from_bytes(&bytes).unwrap();
        a.found
            .iter()
            .all(|f| f.as_ref().is_some_and(|l| l.xorb == x.hash))
    });
    let head = agent()
        .head(format!("{}/v1/xorbs/{}", server.url, x.hash))
        .call()
        .unwrap();
    assert_eq!(head.status(), 200);
    // Counted right after it is indexed.
    wait_for("the xorb is counted", || {
        Metrics::fetch(&server.url).get("cas_xorbs") == 1
    });
}

/// Sixteen clients upload the same xorb at once: one stores it (201), the
/// others learn it exists (200), and the metrics count one xorb.
#[test]
fn concurrent_duplicate_uploads_count_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let x = Arc::new(xorb_of(5, 8 * MIB));
    let start = Arc::new(Barrier::new(16));
    let puts: Vec<_> = (0..16)
        .map(|_| {
            let (x, start, url) = (x.clone(), start.clone(), server.url.clone());
            thread::spawn(move || {
                let a = agent();
                start.wait();
                let r = a
                    .put(format!("{url}/v1/xorbs/{}", x.hash))
                    .send(&x.bytes[..]);
                body(r.unwrap()).0
            })
        })
        .collect();
    let mut statuses: Vec<u16> = puts.into_iter().map(|p| p.join().unwrap()).collect();
    statuses.sort();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 201),
        "{statuses:?}"
    );
    let m = Metrics::fetch(&server.url);
    assert_eq!(m.get("cas_xorbs"), 1);
    assert_eq!(m.get("cas_stored_bytes"), x.bytes.len() as u64);
}

/// Without --public-url, xorb URLs name the address the client reached,
/// whatever its `Host` header says.
#[test]
fn a_forged_host_does_not_reach_xorb_urls() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let data = cas_bench::random_bytes(6, MIB);
    let file = upload(&server.url, &[&data]).unwrap().files[0];
    let mut s = connect(&server.url);
    write!(
        s,
        "GET /v1/reconstructions/{file} HTTP/1.1\r\nHost: evil.example:666\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let a = answer(&mut s);
    assert_eq!(status_of(&a), 200, "{a}");
    let json = a.split_once("\r\n\r\n").unwrap().1;
    let r = Reconstruction::from_json(json.as_bytes()).unwrap();
    assert!(!r.fetch.is_empty());
    for f in &r.fetch {
        assert!(
            f.url.starts_with(&format!("{}/v1/xorbs/", server.url)),
            "{}",
            f.url
        );
    }
    assert!(!a.contains("evil.example"));
}
