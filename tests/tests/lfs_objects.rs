//! Large Git LFS objects through the basic transfer, sent as a stock
//! client sends them (the batch API, then one streamed `PUT` of the whole
//! object, generated on the fly and never written to disk) to the real
//! `cas-server` with a signing key: the server ingests an object far
//! larger than the memory it may hold, an upload cut short and retried
//! stores nothing twice, nor does an upload sent again after it succeeded,
//! nor two identical uploads at once; the object reads back whole.

use std::io::Read;

use cas_e2e::{agent, body, client, Noise};
use cas_protocol::hash::Sha256Hasher;
use cas_protocol::Sha256;
use serde_json::{json, Value};

/// The large object: far more than the bound on the server's memory below,
/// small enough for a debug build in CI.
const OBJECT_BYTES: u64 = 320 << 20;
/// What the server's peak memory may grow by while it ingests the object:
/// holding it whole would take all of `OBJECT_BYTES`. (An ingest holds a
/// xorb being built, 16 MiB, and a queue of body pieces; the peak grew
/// 74 MiB on a debug build, index and allocator included.)
const MEMORY_BOUND: u64 = OBJECT_BYTES / 2;

/// A server with tokens, and the LFS endpoint of one repository on it.
struct Lfs {
    env: client::Env,
    token: String,
}

impl Lfs {
    fn new() -> Self {
        let env = client::Env::with_tokens();
        let token = env.token(&["--scope", "read", "--scope", "write"]);
        Self { env, token }
    }

    /// A batch request for one object; the answer's object.
    fn batch(&self, operation: &str, oid: &Sha256, size: u64) -> Value {
        let r = agent()
            .post(format!(
                "{}/org/big.git/info/lfs/objects/batch",
                self.env.url()
            ))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "application/vnd.git-lfs+json")
            .send(
                json!({"operation": operation, "transfers": ["basic"],
                       "objects": [{"oid": oid.to_string(), "size": size}]})
                .to_string(),
            )
            .unwrap();
        let (status, bytes) = body(r);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        let answer: Value = serde_json::from_slice(&bytes).unwrap();
        answer["objects"][0].clone()
    }

    /// The upload URL the batch API gives for an object it lacks.
    fn upload_url(&self, oid: &Sha256, size: u64) -> String {
        let object = self.batch("upload", oid, size);
        object["actions"]["upload"]["href"]
            .as_str()
            .unwrap_or_else(|| panic!("no upload action: {object}"))
            .to_owned()
    }

    /// Bytes of the xorbs the server stores.
    fn stored_bytes(&self) -> u64 {
        self.env
            .stored_xorbs()
            .iter()
            .map(|x| std::fs::metadata(x).unwrap().len())
            .sum()
    }

    fn peak_memory(&self) -> u64 {
        self.env.server.status_bytes("VmHWM")
    }
}

/// `PUT`s `size` bytes from `data` to `url` as git-lfs does (with
/// `Content-Length`, no credentials: the URL is the capability); the
/// status and JSON answer, or the transport error.
fn put(url: &str, size: u64, mut data: impl Read) -> Result<(u16, Value), ureq::Error> {
    let r = agent()
        .put(url)
        .header("Content-Length", size.to_string())
        .header("Content-Type", "application/octet-stream")
        .send(ureq::SendBody::from_reader(&mut data))?;
    let (status, bytes) = body(r);
    let answer = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{status}: {e}: {}", String::from_utf8_lossy(&bytes)));
    Ok((status, answer))
}

/// The SHA-256 of everything `data` yields.
fn sha256_of(mut data: impl Read) -> (Sha256, u64) {
    let mut h = Sha256Hasher::new();
    let mut buf = vec![0; 1 << 20];
    let mut n = 0;
    loop {
        match data.read(&mut buf).unwrap() {
            0 => return (h.finalize(), n),
            k => {
                h.update(&buf[..k]);
                n += k as u64;
            }
        }
    }
}

/// A client that dies after sending `n` bytes of `data`.
struct CutShort<R>(std::io::Take<R>);

impl<R: Read> Read for CutShort<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(buf)? {
            0 => Err(std::io::Error::other("the client died")),
            n => Ok(n),
        }
    }
}

#[test]
fn a_large_object_streams_in_bounded_memory_and_retries_store_nothing_twice() {
    let lfs = Lfs::new();
    let object = || Noise::new(17).take(OBJECT_BYTES);
    let (oid, _) = sha256_of(object());
    let url = lfs.upload_url(&oid, OBJECT_BYTES);
    let peak_before = lfs.peak_memory();

    // The client dies halfway: no object, but the xorbs stored so far
    // stay (the body is ingested as it arrives, a queue of pieces ahead).
    let cut = put(
        &url,
        OBJECT_BYTES,
        CutShort(Noise::new(17).take(OBJECT_BYTES / 2)),
    );
    assert!(cut.is_err(), "{cut:?}");
    let after_cut = lfs.stored_bytes();
    assert!(after_cut >= OBJECT_BYTES / 4, "{after_cut} bytes stored");

    // git-lfs retries the whole PUT: the half already stored is not
    // stored again.
    let (status, put1) = put(&url, OBJECT_BYTES, object()).unwrap();
    assert_eq!(status, 200, "{put1}");
    assert_eq!(put1["created"], true, "{put1}");
    assert_eq!(put1["sha256"], oid.to_string());
    let stored = lfs.stored_bytes();
    eprintln!(
        "{OBJECT_BYTES} bytes: {after_cut} stored before the cut, {} by the retry, {stored} in all",
        put1["bytes_stored"]
    );
    // Noise does not compress: the store holds the object once, plus
    // frame and xorb headers.
    assert!(
        (OBJECT_BYTES..OBJECT_BYTES + OBJECT_BYTES / 100).contains(&stored),
        "{stored} bytes stored for a {OBJECT_BYTES}-byte object"
    );

    let grew = lfs.peak_memory().saturating_sub(peak_before);
    eprintln!(
        "server peak RSS {} MiB before, grew {} MiB over the uploads",
        peak_before >> 20,
        grew >> 20
    );
    assert!(
        grew < MEMORY_BOUND,
        "the server's peak RSS grew {grew} bytes ingesting a {OBJECT_BYTES}-byte object"
    );

    // The answer was lost and the client sends it all again: accepted,
    // nothing stored.
    let xorbs = lfs.env.stored_xorbs();
    let (status, again) = put(&url, OBJECT_BYTES, object()).unwrap();
    assert_eq!((status, &again["created"]), (200, &json!(false)), "{again}");
    assert_eq!(lfs.env.stored_xorbs(), xorbs);
    // The batch API now has it: no upload action.
    let listed = lfs.batch("upload", &oid, OBJECT_BYTES);
    assert!(listed.get("actions").is_none(), "{listed}");

    // It reads back whole through the download action.
    let object = lfs.batch("download", &oid, OBJECT_BYTES);
    let href = object["actions"]["download"]["href"].as_str().unwrap();
    let r = agent().get(href).call().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256_of(r.into_body().into_reader()), (oid, OBJECT_BYTES));
}

#[test]
fn two_identical_uploads_at_once_store_the_object_once() {
    const SIZE: u64 = 48 << 20;
    let lfs = Lfs::new();
    let (oid, _) = sha256_of(Noise::new(5).take(SIZE));
    let url = lfs.upload_url(&oid, SIZE);
    let answers: Vec<Value> = std::thread::scope(|s| {
        let puts: Vec<_> = (0..2)
            .map(|_| s.spawn(|| put(&url, SIZE, Noise::new(5).take(SIZE)).unwrap()))
            .collect();
        puts.into_iter()
            .map(|p| {
                let (status, answer) = p.join().unwrap();
                assert_eq!(status, 200, "{answer}");
                answer
            })
            .collect()
    });
    let created: Vec<&Value> = answers.iter().map(|a| &a["created"]).collect();
    assert!(
        created.contains(&&json!(true)) && created.contains(&&json!(false)),
        "{answers:?}"
    );
    let stored = lfs.stored_bytes();
    assert!(
        (SIZE..SIZE + SIZE / 100).contains(&stored),
        "{stored} bytes stored for a {SIZE}-byte object sent twice at once"
    );
}
