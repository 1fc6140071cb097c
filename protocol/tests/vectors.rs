//! Golden test vectors. The vectors section of docs/PROTOCOL.md is generated
//! by `vectors()` below from inputs anyone can reproduce (BLAKE3 XOF output,
//! zeros, short strings); this test fails when code and document disagree.
//! After an intentional protocol change, regenerate with
//! `UPDATE_VECTORS=1 cargo test -p cas-protocol --test vectors` and review
//! the diff.

use std::fmt::Write;

use cas_protocol::chunking::{chunk_and_hash, AVG_CHUNK, MAX_CHUNK, MIN_CHUNK};
use cas_protocol::messages::{
    ChunkLocation, DedupAnswer, DedupQuery, FetchRange, Reconstruction, ReconstructionTerm,
    XorbFetch,
};
use cas_protocol::repo::{Commit, RefName};
use cas_protocol::shard::{FileRecipe, Shard, Term, XorbChunkTable};
use cas_protocol::tree::{Tree, TreeEntry};
use cas_protocol::xorb::{Compression, EncodedChunk, Scheme, XorbBuilder, XorbView};
use cas_protocol::{
    ByteRange, ChunkHash, ChunkInfo, ChunkRange, FileHash, Kind, Message, RangeHash, Sha256,
    XorbHash,
};

const BEGIN: &str = "<!-- vectors:begin -->";
const END: &str = "<!-- vectors:end -->";

/// `len` bytes of BLAKE3 extended output of `seed` (plain hash mode).
fn xof(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// zstd frame (level 19, produced once by libzstd 1.5) of 4096 bytes of
/// b"ab" repeated: fixed here so the vector does not depend on the
/// compressor's version; any conforming zstd decoder reads it.
const ZSTD_FRAME_HEX: &str = "28b52ffd60000f4d00001061620100fbcf7758";

/// Byte-grouped frames, produced once by this implementation's writer (one
/// zstd block per plane): 150 words `[i % 3, 0x3c]` in 2 planes, and 80
/// words `[i % 5, i % 2, 0x80, 0x3c]` plus tail `01 02 03` in 4 planes.
const BG2_FRAME_HEX: &str = "28b52ffd602c00e40000a800010200010200010200010200010200010200010201003da69309dd0000a83c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c01007d0a98";
const BG4_FRAME_HEX: &str = "28b52ffd604300dc0000a00001020304000102030400010203040001020304010072d26402d40000a000010001000100010001000100010001000100010100220126d40000a080808080808080808080808080808080808080800100220126ed0000b83c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c0102030100220126";

/// Byte-plane payloads, produced once by this implementation's writer:
/// 300 words `[noise, 0x3c + i % 2]` (noise plane raw, the other a zstd
/// frame), and 80 words `[noise, noise, 0x80, 0x3c]` plus tail `01 02 03`
/// (two raw planes, two frames).
const PLANES2_HEX: &str = "2c0100002500000048f5a7a166df09fd66ca9aaea7bfe638837a35d982786aa1b35c9342d094d411431e56262153794f9a0b17db0c55c12b7197e4f4d9d0a01067f26fda0c5aa61f9ffef033482848428b035a4d57f608052fa2268b09a3bec753e8af0bf5facaec9ef374211dcf28ab576918ec946db4e270b3171a5ef34d47cfe037aab15ee7cdae73bb6890fe67a786ec6c3059ac7b508f21f9d3d0270c68773ceb0dd50ab504caced80b26b4e2c5e1ae7831e29c8672e0a866ae0f3875b40c8730d2f39eee05959de625c29f3240a03b57d3f5a02cbc11bac2c6fc791c0e692e177e0731475b866307d72369110ba2e1aa32698904aa80fa00325558299b28d2feeab1b571964a22eb1ae91a1ef9e66b33bdbaf22c8a74489db38bb7562f183a263881877305d32acdd7735fe885779fdc7f28b52ffd602c00dd0000a03c3d3c3d3c3d3c3d3c3d3c3d3c3d3c3d3c3d3c3d01002a4e9d4c";
const PLANES4_HEX: &str = "500000005000000024000000240000000fa7f4cb3f5210aea5998638c938dd9f9c5300610c7e67d43998aeacf0a66441462d0f013ed68be9a6a6844cd55bc2590b3161ed796713c835c23b74a6e11ed314e7549d4498176c57ebce062912cf927578872a1ae944149af70d5ac1213c754f5b443c8b34f2f99cd5601f2a83eb5cd21555b066022709699362ddae35a06b9500946ac90c4a67c3de86ec8e46afd9410699307764e7e269bd249ef64147ea28b52ffd2050dd0000a8808080808080808080808080808080808080808080010021012628b52ffd2050dd0000a83c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c0100210126010203";

fn planes2_chunk() -> Vec<u8> {
    let noise = xof("byte planes 2", 300);
    (0..300)
        .flat_map(|i| [noise[i], 0x3c + (i % 2) as u8])
        .collect()
}

fn planes4_chunk() -> Vec<u8> {
    let noise = xof("byte planes 4", 160);
    (0..80)
        .flat_map(|i| [noise[2 * i], noise[2 * i + 1], 0x80, 0x3c])
        .chain([1, 2, 3])
        .collect()
}

/// A xorb of chunks given as (bytes, scheme, payload hex).
fn pinned_xorb(chunks: &[(Vec<u8>, Scheme, &str)]) -> cas_protocol::xorb::BuiltXorb {
    let mut b = XorbBuilder::new();
    for (data, scheme, hex_payload) in chunks {
        b.try_push(EncodedChunk {
            info: ChunkInfo {
                hash: ChunkHash::of(data),
                len: data.len() as u32,
            },
            scheme: *scheme,
            payload: hex::decode(hex_payload).unwrap(),
        })
        .unwrap();
    }
    let x = b.finish().unwrap();
    XorbView::parse(&x.bytes).unwrap().verify(x.hash).unwrap();
    x
}

fn bg2_chunk() -> Vec<u8> {
    (0..150u32).flat_map(|i| [(i % 3) as u8, 0x3c]).collect()
}

fn bg4_chunk() -> Vec<u8> {
    (0..80u32)
        .flat_map(|i| [(i % 5) as u8, (i % 2) as u8, 0x80, 0x3c])
        .chain([1, 2, 3])
        .collect()
}

fn vectors() -> String {
    let mut s = String::new();
    let w = &mut s;
    let (gear, _) = fastcdc::v2020::get_gear_with_seed(0);
    let gear_bytes: Vec<u8> = gear.iter().flat_map(|g| g.to_le_bytes()).collect();
    let (mask_s, mask_l) =
        fastcdc::v2020::select_masks(AVG_CHUNK, fastcdc::v2020::Normalization::Level1);
    writeln!(w, "### Chunking\n").unwrap();
    writeln!(
        w,
        "- MIN = {MIN_CHUNK}, AVG = {AVG_CHUNK}, MAX = {MAX_CHUNK}"
    )
    .unwrap();
    writeln!(w, "- MASK_S = 0x{mask_s:016x}, MASK_L = 0x{mask_l:016x}").unwrap();
    writeln!(w, "- GEAR[0..4] = {:016x?}", &gear[..4]).unwrap();
    writeln!(
        w,
        "- BLAKE3(GEAR as 256 u64 LE) = {}",
        blake3::hash(&gear_bytes).to_hex()
    )
    .unwrap();

    let t1 = xof("cas-protocol test vector 1", 1_000_000);
    let c1 = chunk_and_hash(&t1);
    let lens: Vec<u32> = c1.iter().map(|c| c.len).collect();
    writeln!(
        w,
        "- T1 = first 1000000 bytes of BLAKE3-XOF(\"cas-protocol test vector 1\")"
    )
    .unwrap();
    writeln!(w, "- chunk lengths of T1: {lens:?}").unwrap();
    let zeros: Vec<u32> = chunk_and_hash(&vec![0u8; 600_000])
        .iter()
        .map(|c| c.len)
        .collect();
    writeln!(w, "- chunk lengths of 600000 zero bytes: {zeros:?}").unwrap();
    let short: Vec<u32> = chunk_and_hash(&t1[..MIN_CHUNK + 1])
        .iter()
        .map(|c| c.len)
        .collect();
    writeln!(
        w,
        "- chunk lengths of the first {} bytes of T1: {short:?}",
        MIN_CHUNK + 1
    )
    .unwrap();

    writeln!(w, "\n### Hashes\n").unwrap();
    writeln!(w, "- chunk hash of \"abc\" = {}", ChunkHash::of(b"abc")).unwrap();
    writeln!(w, "- chunk hash of T1's first chunk = {}", c1[0].hash).unwrap();
    writeln!(
        w,
        "- file hash of the empty file = {}",
        FileHash::from_chunks([])
    )
    .unwrap();
    writeln!(w, "- file hash of T1 = {}", FileHash::from_chunks(&c1)).unwrap();
    writeln!(
        w,
        "- tree hash of T1 (T1's bytes as a tree listing) = {}",
        FileHash::of_kind(Kind::Tree, &c1)
    )
    .unwrap();
    writeln!(
        w,
        "- xorb hash of T1's chunks = {}",
        XorbHash::from_chunks(&c1)
    )
    .unwrap();
    writeln!(
        w,
        "- range hash of T1's first two chunks = {}",
        RangeHash::from_chunks(&c1[..2])
    )
    .unwrap();
    writeln!(w, "- SHA-256 of T1 = {}", Sha256::of(&t1)).unwrap();

    writeln!(w, "\n### Xorb\n").unwrap();
    let mut b = XorbBuilder::new();
    for chunk in [&b"hello"[..], b"xorb"] {
        b.try_push(EncodedChunk::encode(chunk, Compression::Raw).unwrap())
            .unwrap();
    }
    let ab: Vec<u8> = b"ab".iter().copied().cycle().take(4096).collect();
    let frame = hex::decode(ZSTD_FRAME_HEX).unwrap();
    let z = EncodedChunk {
        info: ChunkInfo {
            hash: ChunkHash::of(&ab),
            len: 4096,
        },
        scheme: Scheme::Zstd,
        payload: frame,
    };
    b.try_push(z).unwrap();
    for (data, scheme, hex_payload) in [
        (bg2_chunk(), Scheme::ByteGrouped2Zstd, BG2_FRAME_HEX),
        (bg4_chunk(), Scheme::ByteGrouped4Zstd, BG4_FRAME_HEX),
    ] {
        b.try_push(EncodedChunk {
            info: ChunkInfo {
                hash: ChunkHash::of(&data),
                len: data.len() as u32,
            },
            scheme,
            payload: hex::decode(hex_payload).unwrap(),
        })
        .unwrap();
    }
    let x = b.finish().unwrap();
    XorbView::parse(&x.bytes).unwrap().verify(x.hash).unwrap();
    writeln!(
        w,
        "Chunks \"hello\" (raw), \"xorb\" (raw), \"ab\" x 2048 as the zstd frame \
         `{ZSTD_FRAME_HEX}`, then 150 words `[i % 3, 0x3c]` (i = 0, 1, ...) as the \
         byte-grouped-2 frame `{BG2_FRAME_HEX}`, then 80 words `[i % 5, i % 2, 0x80, 0x3c]` \
         and the tail bytes `01 02 03` as the byte-grouped-4 frame `{BG4_FRAME_HEX}`:\n"
    )
    .unwrap();
    writeln!(w, "- xorb hash = {}", x.hash).unwrap();
    writeln!(w, "- xorb bytes ({}) =", x.bytes.len()).unwrap();
    hex_block(w, &x.bytes);

    let p = pinned_xorb(&[
        (planes2_chunk(), Scheme::BytePlanes2, PLANES2_HEX),
        (planes4_chunk(), Scheme::BytePlanes4, PLANES4_HEX),
    ]);
    writeln!(
        w,
        "\nByte planes: with `noise2` the first 300 bytes of BLAKE3 XOF output of \
         \"byte planes 2\" and `noise4` the first 160 of \"byte planes 4\", the chunks \
         300 words `[noise2[i], 0x3c + i % 2]` as the byte-planes-2 payload (plane 0 raw, \
         plane 1 a zstd frame) `{PLANES2_HEX}` and 80 words \
         `[noise4[2i], noise4[2i + 1], 0x80, 0x3c]` with the tail bytes `01 02 03` as the \
         byte-planes-4 payload (planes 0 and 1 raw, 2 and 3 zstd frames) `{PLANES4_HEX}`:\n"
    )
    .unwrap();
    writeln!(w, "- xorb hash = {}", p.hash).unwrap();
    writeln!(w, "- xorb bytes ({}) =", p.bytes.len()).unwrap();
    hex_block(w, &p.bytes);

    writeln!(w, "\n### Messages (binary form)\n").unwrap();
    let xh = x.hash;
    let shard = Shard {
        xorbs: vec![XorbChunkTable {
            hash: xh,
            chunks: x.chunks.clone(),
        }],
        files: vec![FileRecipe {
            hash: FileHash::from_chunks(&x.chunks[..2]),
            sha256: Sha256::of(b"helloxorb"),
            size: 9,
            terms: vec![Term {
                xorb: xh,
                chunks: ChunkRange { start: 0, end: 2 },
                len: 9,
            }],
            kind: Kind::File,
        }],
    };
    message(w, "Shard (the xorb above, file \"helloxorb\")", &shard);
    let tree = Tree::new(vec![
        TreeEntry {
            path: "b/c.bin".into(),
            mode: 0o755,
            size: 9,
            file: shard.files[0].hash,
        },
        TreeEntry {
            path: "a.txt".into(),
            mode: 0o644,
            size: 0,
            file: FileHash::from_chunks([]),
        },
    ]);
    message(w, "Tree (a.txt empty, b/c.bin = helloxorb)", &tree);
    let q = DedupQuery {
        chunks: vec![x.chunks[0].hash, ChunkHash::of(b"abc")],
    };
    message(w, "Dedup query (\"hello\", \"abc\")", &q);
    let a = DedupAnswer {
        found: vec![Some(ChunkLocation { xorb: xh, index: 0 }), None],
    };
    message(w, "Dedup answer", &a);
    let view = XorbView::parse(&x.bytes).unwrap();
    let r = Reconstruction {
        file: shard.files[0].hash,
        file_size: 9,
        range: ByteRange { start: 2, end: 9 },
        offset_into_first_term: 2,
        terms: vec![ReconstructionTerm {
            xorb: xh,
            chunks: ChunkRange { start: 0, end: 2 },
            len: 9,
            range_hash: RangeHash::from_chunks(&x.chunks[..2]),
        }],
        fetch: vec![XorbFetch {
            xorb: xh,
            url: format!("http://127.0.0.1:8080/v1/xorbs/{xh}"),
            ranges: vec![FetchRange {
                chunks: ChunkRange { start: 0, end: 2 },
                bytes: view.byte_range(ChunkRange { start: 0, end: 2 }).unwrap(),
            }],
        }],
    };
    message(w, "Reconstruction of bytes 2..9 of helloxorb", &r);

    writeln!(w, "### Names and commits\n").unwrap();
    for name in ["main", "feature/x", "100%"] {
        let key = RefName::new(name).unwrap().key_segment();
        writeln!(w, "- ref name `{name}` as a key segment: `{key}`").unwrap();
    }
    let tree_hash = FileHash::of_kind(Kind::Tree, &chunk_and_hash(&tree.to_bytes()));
    writeln!(w, "- tree hash of the tree above = {tree_hash}\n").unwrap();
    let root = Commit {
        parents: vec![],
        tree: tree_hash,
        message: "Upload helloxorb".into(),
        author: "ada".into(),
        time: 1_760_000_000,
        extra: vec![],
    };
    message(w, "Commit (no parent, the tree above)", &root);
    writeln!(w, "Its id: `{}`\n", root.id()).unwrap();
    let child = Commit {
        parents: vec![root.id()],
        message: "Mirror\n\nsecond line".into(),
        time: 1_760_000_060,
        extra: vec![("upstream".into(), "9f3c".into())],
        ..root.clone()
    };
    message(
        w,
        "Commit (after the one above, with an extra field)",
        &child,
    );
    writeln!(w, "Its id: `{}`", child.id()).unwrap();
    s
}

fn message<M: Message>(w: &mut String, title: &str, m: &M) {
    let bytes = m.to_bytes();
    assert!(M::from_bytes(&bytes).is_ok(), "{title} must be valid");
    writeln!(w, "{title}, {} bytes:", bytes.len()).unwrap();
    hex_block(w, &bytes);
    writeln!(w, "JSON: `{}`\n", m.to_json()).unwrap();
}

fn hex_block(w: &mut String, bytes: &[u8]) {
    writeln!(w, "```").unwrap();
    for line in bytes.chunks(32) {
        writeln!(w, "{}", hex::encode(line)).unwrap();
    }
    writeln!(w, "```").unwrap();
}

#[test]
fn protocol_md_vectors_match_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");
    let doc = std::fs::read_to_string(path).expect("docs/PROTOCOL.md exists");
    let (head, rest) = doc.split_once(BEGIN).expect("vectors begin marker");
    let (old, tail) = rest.split_once(END).expect("vectors end marker");
    let new = format!("\n{}", vectors());
    if old != new {
        if std::env::var_os("UPDATE_VECTORS").is_some() {
            std::fs::write(path, format!("{head}{BEGIN}{new}{END}{tail}")).unwrap();
        } else {
            panic!("docs/PROTOCOL.md test vectors differ from the code; expected:\n{new}");
        }
    }
}

#[test]
fn vector_frames_decode() {
    let frame = hex::decode(ZSTD_FRAME_HEX).unwrap();
    let ab: Vec<u8> = b"ab".iter().copied().cycle().take(4096).collect();
    assert_eq!(zstd::bulk::decompress(&frame, 4096).unwrap(), ab);
    // A byte-grouped payload is one zstd frame of the planes.
    let planes = zstd::bulk::decompress(&hex::decode(BG2_FRAME_HEX).unwrap(), 300).unwrap();
    let mut expected = Vec::new();
    cas_protocol::compression::group(&bg2_chunk(), 2, &mut expected);
    assert_eq!(planes, expected);
    let mut out = vec![0; 323];
    cas_protocol::compression::decompress(
        Scheme::ByteGrouped4Zstd,
        &hex::decode(BG4_FRAME_HEX).unwrap(),
        &mut out,
    )
    .unwrap();
    assert_eq!(out, bg4_chunk());
    // Byte planes: the header's lengths, raw planes as they are, and each
    // frame decoding to its plane.
    for (data, scheme, hex_payload, raw) in [
        (
            planes2_chunk(),
            Scheme::BytePlanes2,
            PLANES2_HEX,
            &[true, false][..],
        ),
        (
            planes4_chunk(),
            Scheme::BytePlanes4,
            PLANES4_HEX,
            &[true, true, false, false],
        ),
    ] {
        let payload = hex::decode(hex_payload).unwrap();
        let w = raw.len();
        let m = data.len() / w;
        let mut grouped = Vec::new();
        cas_protocol::compression::group(&data, w, &mut grouped);
        let mut pos = 4 * w;
        for (j, &is_raw) in raw.iter().enumerate() {
            let n = u32::from_le_bytes(payload[4 * j..4 * j + 4].try_into().unwrap()) as usize;
            let plane = &grouped[j * m..(j + 1) * m];
            let stored = &payload[pos..pos + n];
            if is_raw {
                assert_eq!(stored, plane, "plane {j}");
            } else {
                assert!(n < m);
                assert_eq!(
                    zstd::bulk::decompress(stored, m).unwrap(),
                    plane,
                    "plane {j}"
                );
            }
            pos += n;
        }
        assert_eq!(&payload[pos..], &data[m * w..]);
        let mut out = vec![0; data.len()];
        cas_protocol::compression::decompress(scheme, &payload, &mut out).unwrap();
        assert_eq!(out, data);
    }
}
