//! The client library against the real server: `FileReader` random access
//! (reading a safetensors header moves a tiny fraction of the file), and
//! uploads that dedup against the local chunk location log, including a
//! forged log that the server's recipe check catches.

use std::io::SeekFrom;

use cas_client::{Client, ClientConfig};
use cas_e2e::{bin, ok, Metrics, ServerProcess};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

fn xorb_bytes_out(url: &str) -> u64 {
    Metrics::fetch(url).xorb_bytes_out()
}

#[test]
fn file_reader_reads_only_what_it_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"));
    let model = dir.path().join("model");
    let files =
        cas_bench::model::write_model(&model, 2 * cas_bench::model::TENSOR_BYTES, 1 << 30, 1, 5)
            .unwrap();
    let data = std::fs::read(&files[0]).unwrap();
    let mut upload = bin("cas-client");
    upload
        .args(["upload", "--no-cache", "--endpoint", &server.url])
        .arg(&files[0]);
    let hash = String::from_utf8(ok(upload)).unwrap();
    let hash: cas_protocol::FileHash = hash.split_whitespace().next().unwrap().parse().unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut config = ClientConfig::new(server.url.clone());
        config.cache_dir = Some(dir.path().join("cache"));
        let client = Client::new(config).unwrap();

        // The safetensors header: its length, then the JSON.
        let before = xorb_bytes_out(&server.url);
        let mut r = client.open(hash).await.unwrap().with_block_size(4096);
        assert_eq!(r.size(), data.len() as u64);
        let n = r.read_u64_le().await.unwrap() as usize;
        let mut header = vec![0; n];
        r.read_exact(&mut header).await.unwrap();
        assert_eq!(header, data[8..8 + n]);
        let json: serde_json::Value = serde_json::from_slice(&header).unwrap();
        assert_eq!(json["layers.0.weight"]["dtype"], "BF16");
        let moved = xorb_bytes_out(&server.url) - before;
        assert!(
            moved > 0 && moved < 1024 * 1024,
            "reading a {n}-byte header moved {moved} xorb bytes of a {} byte file",
            data.len()
        );

        // Random seeks and reads, including across block and chunk edges.
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut r = client.open(hash).await.unwrap();
        for _ in 0..40 {
            let start = rng.gen_range(0..data.len() as u64);
            let len = rng.gen_range(1..3 << 20);
            let pos = r.seek(SeekFrom::Start(start)).await.unwrap();
            assert_eq!(pos, start);
            let mut buf = vec![0; len];
            let mut got = 0;
            while got < len {
                let k = r.read(&mut buf[got..]).await.unwrap();
                if k == 0 {
                    break;
                }
                got += k;
            }
            let end = (start as usize + len).min(data.len());
            assert_eq!(&buf[..got], &data[start as usize..end], "at {start}+{len}");
        }
        // End-relative seeks and EOF.
        assert_eq!(
            r.seek(SeekFrom::End(-3)).await.unwrap(),
            data.len() as u64 - 3
        );
        let mut tail = Vec::new();
        r.read_to_end(&mut tail).await.unwrap();
        assert_eq!(tail, data[data.len() - 3..]);
        assert!(r
            .seek(SeekFrom::Current(-(data.len() as i64) - 1))
            .await
            .is_err());
    });
}

#[test]
fn upload_dedups_locally_and_survives_forged_hints() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"));
    let v1 = cas_bench::random_bytes(1, 3 << 20);
    let v2 = cas_bench::edited(&v1, 2, 3, 0.05);
    let (p1, p2) = (dir.path().join("v1"), dir.path().join("v2"));
    std::fs::write(&p1, &v1).unwrap();
    std::fs::write(&p2, &v2).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut config = ClientConfig::new(server.url.clone());
        config.cache_dir = Some(dir.path().join("cache"));
        let client = Client::new(config).unwrap();
        let first = client.upload(std::slice::from_ref(&p1)).await.unwrap();
        assert_eq!(first.cache_chunks, 0);
        // The second time every chunk is known locally: nothing to ask.
        let again = client.upload(std::slice::from_ref(&p1)).await.unwrap();
        assert_eq!((again.cache_chunks, again.new_chunks), (again.chunks, 0));
        assert_eq!(again.roots[0].hash, first.roots[0].hash);

        // Forge the log: every chunk "lives" where the next one does.
        let log = client.cache().unwrap().locations(&server.url);
        let known: Vec<_> = log.load().into_iter().collect();
        assert!(known.len() > 2);
        let forged: Vec<_> = known
            .iter()
            .zip(known.iter().cycle().skip(1))
            .map(|((h, _), (_, l))| (*h, *l))
            .collect();
        log.record(&forged);
        let up = client.upload(std::slice::from_ref(&p2)).await.unwrap();
        assert_eq!(
            up.cache_chunks, 0,
            "the retry planned without the forged log"
        );
        let got = client.read(up.roots[0].hash, None).await.unwrap();
        assert_eq!(got, v2);
    });
}
