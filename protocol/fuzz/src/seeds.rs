//! Writes valid sample inputs into corpus/<target>/ so the fuzzers start
//! from well-formed xorbs, shards, trees and commits. Run: `cargo run --bin seeds`.

use cas_protocol::chunking::chunks;
use cas_protocol::repo::{Commit, CommitId};
use cas_protocol::shard::{FileRecipe, Shard, Term, XorbChunkTable};
use cas_protocol::tree::{Tree, TreeEntry};
use cas_protocol::xorb::{Compression, EncodedChunk, Scheme, XorbBuilder};
use cas_protocol::{ChunkRange, FileHash, Kind, Message, Sha256};
use std::fs;

fn main() {
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 / 13) as u8).collect();
    let mut b = XorbBuilder::new();
    for r in chunks(&data) {
        for piece in data[r].chunks(9000) {
            b.try_push(EncodedChunk::encode(piece, Compression::default()).unwrap()).unwrap();
        }
    }
    b.try_push(EncodedChunk::encode(b"raw tail", Compression::Raw).unwrap()).unwrap();
    // Word-structured chunks in the byte-grouped and byte-plane schemes.
    let words: Vec<u8> = (0..3000u32).flat_map(|i| [(i * 7) as u8, (i % 3) as u8, 0x80, 0x3c]).collect();
    for scheme in [Scheme::ByteGrouped2Zstd, Scheme::ByteGrouped4Zstd, Scheme::BytePlanes2, Scheme::BytePlanes4] {
        b.try_push(EncodedChunk::encode(&words[..9001], Compression::Fixed(scheme)).unwrap()).unwrap();
    }
    let xorb = b.finish().unwrap();
    let n = xorb.chunks.len() as u32;
    let recipe = FileRecipe {
        hash: FileHash::from_chunks(&xorb.chunks),
        sha256: Sha256::of(&data),
        size: xorb.chunks.iter().map(|c| u64::from(c.len)).sum(),
        terms: vec![Term { xorb: xorb.hash, chunks: ChunkRange { start: 0, end: n }, len: xorb.chunks.iter().map(|c| u64::from(c.len)).sum() }],
        kind: Kind::File,
    };
    let shard = Shard {
        xorbs: vec![XorbChunkTable { hash: xorb.hash, chunks: xorb.chunks.clone() }],
        files: vec![recipe],
    };
    let tree = Tree::new(vec![
        TreeEntry { path: "config.json".into(), mode: 0o644, size: 10, file: FileHash::from_chunks([]) },
        TreeEntry { path: "weights/model.safetensors".into(), mode: 0o755, size: shard.files[0].size, file: shard.files[0].hash },
    ]);
    write("xorb", "valid", &xorb.bytes);
    write("shard", "valid.bin", &shard.to_bytes());
    write("shard", "valid.json", shard.to_json().as_bytes());
    write("tree", "valid.bin", &tree.to_bytes());
    write("tree", "valid.json", tree.to_json().as_bytes());
    let commit = Commit {
        parents: vec![CommitId::from_bytes([7; 20])],
        tree: shard.files[0].hash,
        message: "Upload v2\n\nfine-tuned".into(),
        author: "ada".into(),
        time: 1_760_000_000,
        extra: vec![("upstream".into(), "9f3c".into())],
    };
    write("commit", "valid.bin", &commit.to_bytes());
    write("commit", "valid.json", commit.to_json().as_bytes());
    write("commit", "ref.txt", b"feature/x");
    write("commit", "repo.txt", b"datasets/org/name");
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = format!("corpus/{target}");
    fs::create_dir_all(&dir).unwrap();
    fs::write(format!("{dir}/{name}"), bytes).unwrap();
}
