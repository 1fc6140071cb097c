//! End-to-end tests of the real `cas-server` binary: uploads with dedup,
//! reconstruction with ranges, cacheable xorb reads, hostile input, and
//! durability under kill -9.

use cas_e2e::{agent, body, fetch, upload, ServerProcess};
use cas_protocol::messages::Reconstruction;
use cas_protocol::shard::{FileRecipe, Shard, Term, XorbChunkTable};
use cas_protocol::xorb::{Compression, EncodedChunk, XorbBuilder, XorbView};
use cas_protocol::{ChunkRange, FileHash, Kind, Message, Sha256, XorbHash};
use serde_json::Value;

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

/// A status and a JSON error body with the given code.
fn assert_error(resp: (u16, Vec<u8>), status: u16, code: &str) {
    let v = json(&resp.1);
    assert_eq!(
        (resp.0, v["error"].as_str().unwrap()),
        (status, code),
        "{v}"
    );
    assert!(!v["message"].as_str().unwrap().is_empty());
}

/// One request over a fresh TCP connection, for bodies an HTTP client
/// would not send (a length it does not deliver, a body past a limit).
fn raw(base: &str, method: &str, path: &str, header: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let addr = base.strip_prefix("http://").unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{header}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8_lossy(&resp);
    let status = text[9..12].parse().unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    (status, body.as_bytes().to_vec())
}

fn metric(base: &str, name: &str) -> u64 {
    let (_, text) = body(agent().get(format!("{base}/metrics")).call().unwrap());
    let text = String::from_utf8(text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

#[test]
fn upload_dedup_and_reconstruct_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let base = &server.url;
    let v1 = cas_bench::bf16_weights(7, 3_000_000);
    let v2 = cas_bench::edited(&v1, 8, 3, 0.05);
    let small = b"config: tiny\n".to_vec();

    let up = upload(base, &[&v1, &small, &[]]).unwrap();
    assert_eq!(up.chunks_deduped, 0);
    let (h1, h_small, h_empty) = (up.files[0], up.files[1], up.files[2]);
    // v2 shares most chunks with v1: the server already has them.
    let up2 = upload(base, &[&v2]).unwrap();
    assert!(
        up2.chunks_deduped * 2 > cas_protocol::chunking::chunk_and_hash(&v2).len(),
        "most chunks dedup"
    );
    // The same bytes again: nothing new is sent at all.
    let again = upload(base, &[&v1]).unwrap();
    assert_eq!((again.xorbs_sent, again.files[0]), (0, h1));
    assert!(metric(base, "cas_dedup_hits_total") > 0);

    assert_eq!(fetch(base, &h1, None).unwrap(), v1);
    assert_eq!(fetch(base, &up2.files[0], None).unwrap(), v2);
    assert_eq!(fetch(base, &h_small, None).unwrap(), small);
    assert_eq!(fetch(base, &h_empty, None).unwrap(), b"");
    for (range, want) in [
        ("bytes=0-7", &v1[..8]),
        ("bytes=1000000-1999999", &v1[1_000_000..2_000_000]),
        ("bytes=2999990-", &v1[2_999_990..]),
        ("bytes=-5", &v1[v1.len() - 5..]),
        ("bytes=0-99999999", &v1[..]),
    ] {
        assert_eq!(fetch(base, &h1, Some(range)).unwrap(), want, "{range}");
    }
    // A small range needs only the chunks around it.
    let (status, bytes) = body(
        agent()
            .get(format!("{base}/v1/reconstructions/{h1}"))
            .header("Range", "bytes=1500000-1500009")
            .call()
            .unwrap(),
    );
    assert_eq!(status, 200);
    let r = Reconstruction::from_json(&bytes).unwrap();
    assert!(r.terms.iter().map(|t| t.len).sum::<u64>() <= 2 * 262_144);

    let (status, info) = body(agent().get(format!("{base}/v1/files/{h1}")).call().unwrap());
    let info = json(&info);
    assert_eq!(status, 200);
    assert_eq!(info["size"], v1.len());
    assert_eq!(info["sha256"], Sha256::of(&v1).to_string());

    let recon = |h: &FileHash, range: &str| {
        body(
            agent()
                .get(format!("{base}/v1/reconstructions/{h}"))
                .header("Range", range)
                .call()
                .unwrap(),
        )
    };
    assert_error(recon(&h1, "bytes=3000000-"), 416, "range_not_satisfiable");
    assert_error(recon(&h_empty, "bytes=0-"), 416, "range_not_satisfiable");
    assert_error(recon(&h1, "bytes=5-1"), 416, "range_not_satisfiable");
    assert_error(recon(&h1, "bytes=0-1,4-5"), 400, "bad_range");
    assert_error(recon(&h1, "items=0-1"), 400, "bad_range");
    assert_error(
        recon(&FileHash::from_bytes([0; 32]), "bytes=0-"),
        404,
        "not_found",
    );
    assert!(metric(base, "cas_files") >= 4);
}

fn one_xorb(chunks: &[&[u8]]) -> cas_protocol::xorb::BuiltXorb {
    let mut b = XorbBuilder::new();
    for c in chunks {
        b.try_push(EncodedChunk::encode(c, Compression::default()).unwrap())
            .unwrap();
    }
    b.finish().unwrap()
}

#[test]
fn xorb_reads_are_cacheable_http() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let x = one_xorb(&[&cas_bench::random_bytes(1, 100_000), b"second chunk"]);
    let url = format!("{}/v1/xorbs/{}", server.url, x.hash);
    let a = agent();
    let put = body(a.put(&url).send(&x.bytes[..]).unwrap());
    assert_eq!(put.0, 201);
    assert_eq!(json(&put.1)["created"], true);
    let put = body(a.put(&url).send(&x.bytes[..]).unwrap());
    assert_eq!(
        (put.0, json(&put.1)["created"].clone()),
        (200, Value::Bool(false))
    );

    let r = a.get(&url).call().unwrap();
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", x.hash));
    assert_eq!(
        r.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(body(r), (200, x.bytes.clone()));

    let r = a.head(&url).call().unwrap();
    assert_eq!(
        r.headers()["content-length"].to_str().unwrap(),
        x.bytes.len().to_string()
    );
    assert_eq!(body(r), (200, vec![]));

    let n = x.bytes.len();
    let r = a.get(&url).header("Range", "bytes=10-19").call().unwrap();
    assert_eq!(
        r.headers()["content-range"].to_str().unwrap(),
        format!("bytes 10-19/{n}")
    );
    assert_eq!(body(r), (206, x.bytes[10..20].to_vec()));
    let r = a.get(&url).header("Range", "bytes=-3").call().unwrap();
    assert_eq!(body(r), (206, x.bytes[n - 3..].to_vec()));
    let r = a
        .get(&url)
        .header("Range", format!("bytes={n}-"))
        .call()
        .unwrap();
    assert_eq!(
        r.headers()["content-range"].to_str().unwrap(),
        format!("bytes */{n}")
    );
    assert_error(body(r), 416, "range_not_satisfiable");
    assert_error(
        body(a.get(&url).header("Range", "bytes=abc").call().unwrap()),
        400,
        "bad_range",
    );

    let r = a.get(&url).header("If-None-Match", &etag).call().unwrap();
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
    assert_eq!(body(r), (304, vec![]));
    let r = a
        .get(&url)
        .header("If-None-Match", "\"other\"")
        .call()
        .unwrap();
    assert_eq!(body(r).0, 200);
    assert_eq!(
        metric(&server.url, "cas_xorb_bytes_out_total"),
        (2 * n + 10 + 3) as u64
    );
}

#[test]
fn hostile_input_gets_4xx_json_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let base = &server.url;
    let a = agent();
    let x = one_xorb(&[b"alpha", b"beta"]);
    let put = |hash: &str, bytes: &[u8]| {
        body(
            a.put(format!("{base}/v1/xorbs/{hash}"))
                .send(bytes)
                .unwrap(),
        )
    };

    // Valid xorb under the wrong hash, a flipped payload byte, truncation,
    // trailing garbage, not a xorb at all.
    let other = XorbHash::from_bytes([1; 32]).to_string();
    assert_error(put(&other, &x.bytes), 400, "hash_mismatch");
    let mut flipped = x.bytes.clone();
    *flipped.last_mut().unwrap() ^= 1;
    assert_error(put(&x.hash.to_string(), &flipped), 400, "hash_mismatch");
    assert_error(
        put(&x.hash.to_string(), &x.bytes[..x.bytes.len() - 1]),
        400,
        "invalid_xorb",
    );
    assert_error(
        put(&x.hash.to_string(), &[&x.bytes[..], b"junk"].concat()),
        400,
        "invalid_xorb",
    );
    assert_error(put(&x.hash.to_string(), b"hello"), 400, "invalid_xorb");
    assert_error(put(&x.hash.to_string(), b""), 400, "invalid_xorb");
    // Nothing of it was stored.
    assert_error(
        body(a.get(format!("{base}/v1/xorbs/{}", x.hash)).call().unwrap()),
        404,
        "not_found",
    );
    assert_error(
        body(a.get(format!("{base}/v1/xorbs/{other}")).call().unwrap()),
        404,
        "not_found",
    );
    assert_eq!(metric(base, "cas_xorbs"), 0);
    assert_eq!(metric(base, "cas_xorbs_rejected_total"), 6);

    // Bad hashes in paths.
    for h in [
        "abc",
        "..%2F..%2Fetc%2Fpasswd",
        &"A".repeat(64),
        &"g".repeat(64),
        &format!("{}0", x.hash),
    ] {
        assert_error(
            body(a.get(format!("{base}/v1/xorbs/{h}")).call().unwrap()),
            400,
            "bad_hash",
        );
        assert_error(
            body(a.get(format!("{base}/v1/files/{h}")).call().unwrap()),
            400,
            "bad_hash",
        );
    }
    assert_error(
        body(a.get(format!("{base}/v1/xorbs/a/../b")).call().unwrap()),
        404,
        "not_found",
    );
    let r = a
        .delete(format!("{base}/v1/xorbs/{}", x.hash))
        .call()
        .unwrap();
    assert_eq!(r.headers()["allow"], "PUT, GET, HEAD");
    assert_error(body(r), 405, "method_not_allowed");

    // Oversized bodies: refused from the declared length before reading it,
    // and when a chunked body grows past the limit.
    let limit = cas_protocol::xorb::MAX_XORB_SERIALIZED;
    let xorb_path = format!("/v1/xorbs/{}", x.hash);
    assert_error(
        raw(
            base,
            "PUT",
            &xorb_path,
            &format!("Content-Length: {}", limit + 1),
            &[],
        ),
        413,
        "payload_too_large",
    );
    assert_error(
        raw(
            base,
            "POST",
            "/v1/dedup",
            "Content-Length: 99999999999",
            &[],
        ),
        413,
        "payload_too_large",
    );
    let mut chunked = format!("{:x}\r\n", limit + 1).into_bytes();
    chunked.resize(chunked.len() + limit + 1, 0);
    assert_error(
        raw(
            base,
            "PUT",
            &xorb_path,
            "Transfer-Encoding: chunked",
            &chunked,
        ),
        413,
        "payload_too_large",
    );

    // Malformed messages.
    let post = |path: &str, ct: &str, bytes: &[u8]| {
        body(
            a.post(format!("{base}{path}"))
                .header("Content-Type", ct)
                .send(bytes)
                .unwrap(),
        )
    };
    assert_error(
        post(
            "/v1/dedup",
            "application/octet-stream",
            b"CDDQ\x01\0\0\0\xfd\xff\xff\xff\xff\xff\xff\xff\xff",
        ),
        400,
        "invalid_message",
    );
    assert_error(
        post(
            "/v1/dedup",
            "application/json",
            b"{\"chunks\": [\"zz\"], \"version\": 1}",
        ),
        400,
        "invalid_message",
    );
    assert_error(
        post("/v1/dedup", "application/json", b"{not json"),
        400,
        "invalid_message",
    );
    assert_error(
        post("/v1/shards", "application/octet-stream", b"garbage"),
        400,
        "invalid_message",
    );
    assert_error(
        post(
            "/v1/shards",
            "application/json",
            b"{\"version\": 99, \"xorbs\": [], \"files\": []}",
        ),
        400,
        "invalid_message",
    );

    // Shards: an unknown xorb, a wrong file hash; neither registers anything,
    // not even the valid file committed alongside.
    assert_eq!(put(&x.hash.to_string(), &x.bytes).0, 201);
    let good = FileRecipe {
        hash: FileHash::from_chunks(&x.chunks),
        sha256: Sha256::of(b"alphabeta"),
        size: 9,
        terms: vec![Term {
            xorb: x.hash,
            chunks: ChunkRange { start: 0, end: 2 },
            len: 9,
        }],
        kind: Kind::File,
    };
    let mut wrong_hash = good.clone();
    wrong_hash.terms = vec![
        Term {
            xorb: x.hash,
            chunks: ChunkRange { start: 1, end: 2 },
            len: 4,
        },
        Term {
            xorb: x.hash,
            chunks: ChunkRange { start: 0, end: 1 },
            len: 5,
        },
    ];
    let mut unknown = good.clone();
    unknown.terms[0].xorb = XorbHash::from_bytes([2; 32]);
    let mut outside = good.clone();
    outside.terms = vec![Term {
        xorb: x.hash,
        chunks: ChunkRange { start: 1, end: 3 },
        len: 9,
    }];
    let mut bad_table = XorbChunkTable {
        hash: x.hash,
        chunks: x.chunks.clone(),
    };
    bad_table.chunks.swap(0, 1);
    bad_table.hash = XorbHash::from_chunks(&bad_table.chunks);
    for (files, xorbs, code) in [
        (vec![good.clone(), wrong_hash], vec![], "invalid_recipe"),
        (vec![good.clone(), unknown], vec![], "unknown_xorb"),
        (vec![good.clone(), outside], vec![], "invalid_recipe"),
        (vec![good.clone()], vec![bad_table], "unknown_xorb"),
    ] {
        let shard = Shard { xorbs, files };
        assert_error(
            post("/v1/shards", "application/octet-stream", &shard.to_bytes()),
            400,
            code,
        );
    }
    assert_error(
        body(
            a.get(format!("{base}/v1/files/{}", good.hash))
                .call()
                .unwrap(),
        ),
        404,
        "not_found",
    );
    assert_eq!(metric(base, "cas_files"), 0);
    // The same shard, valid, in JSON: accepted.
    let shard = Shard {
        xorbs: vec![XorbChunkTable {
            hash: x.hash,
            chunks: x.chunks.clone(),
        }],
        files: vec![good.clone()],
    };
    let (status, resp) = post("/v1/shards", "application/json", shard.to_json().as_bytes());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(fetch(base, &good.hash, None).unwrap(), b"alphabeta");

    // Nothing above was a server error.
    let (_, text) = body(a.get(format!("{base}/metrics")).call().unwrap());
    assert!(!String::from_utf8(text).unwrap().contains("status=\"5"));
}

/// Every object under its final name is whole: it parses, verifies against
/// the hash it is named by, and no temp file is left.
fn assert_objects_whole(data_dir: &std::path::Path) -> usize {
    let mut n = 0;
    for shard_dir in std::fs::read_dir(data_dir.join("objects/xorbs")).unwrap() {
        for f in std::fs::read_dir(shard_dir.unwrap().path()).unwrap() {
            let path = f.unwrap().path();
            let hash: XorbHash = path.file_name().unwrap().to_str().unwrap().parse().unwrap();
            let bytes = std::fs::read(&path).unwrap();
            XorbView::parse(&bytes)
                .and_then(|v| v.verify(hash))
                .unwrap_or_else(|e| panic!("{path:?}: {e}"));
            n += 1;
        }
    }
    n
}

#[test]
fn kill_9_during_uploads_loses_nothing_committed() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut committed: Vec<(FileHash, Vec<u8>)> = Vec::new();
    for round in 0..6u64 {
        let server = ServerProcess::start(dir.path());
        let base = server.url.clone();
        // A restart clears what the kill left half-written in tmp/.
        assert_eq!(
            std::fs::read_dir(dir.path().join("objects/tmp"))
                .unwrap()
                .count(),
            0
        );
        // Everything committed before must have survived the last kill.
        for (h, data) in &committed {
            assert_eq!(&fetch(&base, h, None).unwrap(), data, "round {round}");
        }
        let uploader = std::thread::spawn(move || {
            let mut done = Vec::new();
            for i in 0..1000u64 {
                let data =
                    cas_bench::random_bytes(round * 1000 + i, 700_000 + (i as usize % 5) * 100_000);
                match upload(&base, &[&data]) {
                    Ok(up) => done.push((up.files[0], data)),
                    Err(_) => break, // the server died under us
                }
            }
            done
        });
        std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(150..900)));
        server.kill9();
        let done = uploader.join().unwrap();
        eprintln!(
            "round {round}: {} uploads committed before kill -9",
            done.len()
        );
        committed.extend(done);
        assert_objects_whole(dir.path());
    }
    assert!(
        committed.len() >= 6,
        "uploads got through between kills: {}",
        committed.len()
    );
    let server = ServerProcess::start(dir.path());
    for (h, data) in &committed {
        assert_eq!(&fetch(&server.url, h, None).unwrap(), data);
    }
    assert!(assert_objects_whole(dir.path()) >= committed.len());
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = ServerProcess::start(dir.path());
    let out = cas_e2e::bin("cas-server")
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("cas-server: cannot open index") && stderr.contains("lock"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(
        body(
            agent()
                .get(format!("{}/healthz", first.url))
                .call()
                .unwrap()
        ),
        (200, b"ok\n".to_vec())
    );
}

#[test]
fn defaults_and_env_twins() {
    use std::io::{BufRead, BufReader};
    // No flags: data in ./cas-data; the address comes from CAS_LISTEN (the
    // default 127.0.0.1:8080 may be taken on a test machine).
    let cwd = tempfile::tempdir().unwrap();
    let mut child = cas_e2e::bin("cas-server")
        .current_dir(cwd.path())
        .env("CAS_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("cas-server listening on ")
        .unwrap()
        .to_owned();
    assert_eq!(
        body(agent().get(format!("{url}/healthz")).call().unwrap()).0,
        200
    );
    assert!(cwd.path().join("cas-data/index").is_dir());
    assert!(cwd.path().join("cas-data/objects/xorbs").is_dir());
    child.kill().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    child.wait().unwrap();
    assert!(
        log.contains("local filesystem") && log.contains("RocksDB"),
        "{log}"
    );

    let help = cas_e2e::bin("cas-server").arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for flag in [
        "--listen",
        "CAS_LISTEN",
        "--data-dir",
        "CAS_DATA_DIR",
        "--public-url",
        "--max-concurrent-uploads",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

/// A xorb's chunks are verified while its body arrives: with half of a
/// body sent, chunks of that half are already checked (and nothing is
/// stored); the rest completes the upload. A body damaged early is
/// refused once it has been read to its end, and stores nothing.
#[test]
fn xorb_chunks_are_verified_while_the_body_arrives() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let base = &server.url;
    let data = cas_bench::random_bytes(7, 6 << 20);
    let pieces: Vec<&[u8]> = data.chunks(60_000).collect();
    let x = one_xorb(&pieces);
    let verified = "cas_xorb_chunks_verified_total";
    assert_eq!(metric(base, verified), 0);

    let addr = base.strip_prefix("http://").unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "PUT /v1/xorbs/{} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        x.hash,
        x.bytes.len()
    )
    .unwrap();
    let half = x.bytes.len() / 2;
    s.write_all(&x.bytes[..half]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while metric(base, verified) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no chunk verified before the body ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let early = metric(base, verified);
    assert!(
        early < pieces.len() as u64,
        "{early} of {} chunks",
        pieces.len()
    );
    assert_eq!(metric(base, "cas_xorbs"), 0);
    s.write_all(&x.bytes[half..]).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
    assert_eq!(metric(base, verified), pieces.len() as u64);
    assert_eq!(metric(base, "cas_xorbs"), 1);

    // Chunk 3 damaged: verification stops there, the upload is refused.
    let y = one_xorb(&pieces[..40]);
    let mut bad = y.bytes.clone();
    let view = XorbView::parse(&y.bytes).unwrap();
    let at = view
        .byte_range(ChunkRange { start: 3, end: 4 })
        .unwrap()
        .end as usize
        - 1;
    bad[at] ^= 1;
    let before = metric(base, verified);
    let (status, _) = raw(
        base,
        "PUT",
        &format!("/v1/xorbs/{}", y.hash),
        &format!("Content-Length: {}", bad.len()),
        &bad,
    );
    assert_eq!(status, 400);
    assert_eq!(metric(base, verified) - before, 3);
    assert_eq!(metric(base, "cas_xorbs_rejected_total"), 1);
    assert_eq!(metric(base, "cas_xorbs"), 1);
}
