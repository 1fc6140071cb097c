//! `cas-client hash`: local chunk + hash of files, checked against the
//! protocol library and against coreutils' sha256sum.

use std::process::Command;

use cas_e2e::bin;
use cas_protocol::chunking::chunk_and_hash;
use cas_protocol::FileHash;
use serde_json::Value;

fn hash_json(path: &std::path::Path) -> Value {
    let out = bin("cas-client")
        .arg("hash")
        .arg("--json")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn hash_matches_library_and_sha256sum() {
    let dir = tempfile::tempdir().unwrap();
    // 40 MB: several parallel regions, weights then incompressible bytes.
    let mut data = cas_bench::bf16_weights(1, 24_000_000);
    data.extend(cas_bench::random_bytes(2, 16_000_000));
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, &data).unwrap();

    let v = hash_json(&path);
    let chunks = chunk_and_hash(&data);
    assert_eq!(v["file_hash"], FileHash::from_chunks(&chunks).to_string());
    assert_eq!(v["chunks"], chunks.len());
    assert_eq!(v["size"], data.len());
    let sum = Command::new("sha256sum").arg(&path).output().unwrap();
    let sum = String::from_utf8(sum.stdout).unwrap();
    assert_eq!(
        v["sha256"].as_str().unwrap(),
        sum.split_whitespace().next().unwrap()
    );
}

#[test]
fn hash_of_empty_file_and_text_output() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty");
    std::fs::write(&path, b"").unwrap();
    let v = hash_json(&path);
    assert_eq!(v["file_hash"], FileHash::from_chunks([]).to_string());
    assert_eq!(v["chunks"], 0);

    let out = bin("cas-client").arg("hash").arg(&path).output().unwrap();
    let line = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[0], FileHash::from_chunks([]).to_string());
    assert_eq!(fields[2], "0");
}

#[test]
fn hash_reports_each_bad_path_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    std::fs::write(&good, b"data").unwrap();
    let missing = dir.path().join("missing");
    let out = bin("cas-client")
        .arg("hash")
        .args([&missing, &good, &dir.path().to_path_buf()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stdout.lines().count(), 1, "the good file is still hashed");
    assert!(stdout.contains("good"));
    assert!(
        stderr.contains("missing") && stderr.contains("No such file"),
        "{stderr}"
    );
    assert!(stderr.contains("not a regular file"), "{stderr}");
}

/// `--no-sha256` hashes chunks only: same file hashes, no SHA-256 in the
/// JSON, `-` in its column; many files (hashed several at a time) are
/// printed in the order given.
#[test]
fn hash_without_sha256_keeps_file_hashes_and_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    let mut expected = Vec::new();
    for i in 0..60u64 {
        // Mostly small files, a few over the size that splits work.
        let len = if i % 20 == 7 {
            3_000_000
        } else {
            100 + i as usize * 997
        };
        let data = cas_bench::random_bytes(i, len);
        let path = dir.path().join(format!("f{i:02}"));
        std::fs::write(&path, &data).unwrap();
        expected.push(FileHash::from_chunks(&chunk_and_hash(&data)).to_string());
        paths.push(path);
    }
    paths.reverse();
    expected.reverse();

    let out = bin("cas-client")
        .args(["hash", "--no-sha256", "--json"])
        .args(&paths)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), paths.len());
    for ((v, path), want) in lines.iter().zip(&paths).zip(&expected) {
        assert_eq!(v["path"], path.to_str().unwrap());
        assert_eq!(v["file_hash"], want.as_str());
        assert!(v.get("sha256").is_none(), "{v}");
    }

    let out = bin("cas-client")
        .args(["hash", "--no-sha256"])
        .args(&paths)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for ((line, path), want) in text.lines().zip(&paths).zip(&expected) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[0], want.as_str());
        assert_eq!(fields[1], "-");
        assert_eq!(fields[3], path.to_str().unwrap());
    }
}
