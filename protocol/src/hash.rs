//! Hash newtypes and the hash functions of protocol version 1.
//!
//! Every hash is BLAKE3 in `derive_key` mode with its own context string, so a
//! chunk hash, a xorb hash and a file hash can never collide with each other
//! even over identical input bytes. Each kind has its own type so they cannot
//! be mixed up in code either.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// BLAKE3 `derive_key` context of chunk hashes.
pub const CHUNK_CONTEXT: &str = "cas-protocol v1 chunk";
/// BLAKE3 `derive_key` context of xorb hashes.
pub const XORB_CONTEXT: &str = "cas-protocol v1 xorb";
/// BLAKE3 `derive_key` context of file hashes.
pub const FILE_CONTEXT: &str = "cas-protocol v1 file";
/// BLAKE3 `derive_key` context of tree hashes: a tree's listing hashes
/// apart from a regular file with the same bytes, so a hash names exactly
/// one kind of thing.
pub const TREE_CONTEXT: &str = "cas-protocol v2 tree";
/// BLAKE3 `derive_key` context of chunk-range hashes (verification of one term).
pub const RANGE_CONTEXT: &str = "cas-protocol v1 chunk range";

/// Error parsing a hash from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid hash {0:?}: expected 64 lowercase hex digits")]
pub struct ParseHashError(pub String);

macro_rules! hash_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Wraps raw hash bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// The raw hash bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Lowercase hex, the only textual form (it is used in URLs and
            /// cache keys, so it must be canonical).
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.to_hex())
            }
        }

        impl FromStr for $name {
            type Err = ParseHashError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex32(s).map(Self)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl bincode::Encode for $name {
            fn encode<E: bincode::enc::Encoder>(
                &self,
                e: &mut E,
            ) -> Result<(), bincode::error::EncodeError> {
                self.0.encode(e)
            }
        }

        impl<C> bincode::Decode<C> for $name {
            fn decode<D: bincode::de::Decoder<Context = C>>(
                d: &mut D,
            ) -> Result<Self, bincode::error::DecodeError> {
                <[u8; 32] as bincode::Decode<C>>::decode(d).map(Self)
            }
        }

        impl<'de, C> bincode::BorrowDecode<'de, C> for $name {
            fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = C>>(
                d: &mut D,
            ) -> Result<Self, bincode::error::DecodeError> {
                <[u8; 32] as bincode::Decode<C>>::decode(d).map(Self)
            }
        }
    };
}

hash_newtype!(
    /// BLAKE3 (context [`CHUNK_CONTEXT`]) of a chunk's uncompressed bytes.
    ChunkHash
);
hash_newtype!(
    /// Identity of a xorb: derived from its chunk hashes and lengths, never
    /// from its compressed bytes, so recompressing a xorb keeps its hash.
    XorbHash
);
hash_newtype!(
    /// Identity of a file: derived from its ordered chunk hashes and lengths.
    FileHash
);
hash_newtype!(
    /// Hash of a contiguous run of chunks, the unit a client verifies a term by.
    RangeHash
);
hash_newtype!(
    /// SHA-256 of a whole file's bytes: the identity Git LFS and the Hugging
    /// Face Hub use, recorded beside the file hash and checked on fetch.
    Sha256
);

fn parse_hex32(s: &str) -> Result<[u8; 32], ParseHashError> {
    let err = || ParseHashError(s.chars().take(80).collect());
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(err());
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| err())?;
    Ok(out)
}

/// One chunk as the indexes see it: its hash and uncompressed length.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    bincode::Encode,
    bincode::Decode,
)]
pub struct ChunkInfo {
    pub hash: ChunkHash,
    pub len: u32,
}

impl ChunkHash {
    /// Hashes a chunk's uncompressed bytes.
    pub fn of(data: &[u8]) -> Self {
        let mut h = blake3::Hasher::new_derive_key(CHUNK_CONTEXT);
        h.update(data);
        Self(*h.finalize().as_bytes())
    }
}

/// BLAKE3 over the records `chunk hash (32 bytes) || length (u64 LE)`, in order.
struct ListHasher(blake3::Hasher);

impl ListHasher {
    fn new(context: &str) -> Self {
        Self(blake3::Hasher::new_derive_key(context))
    }

    fn push(&mut self, c: &ChunkInfo) {
        self.0.update(c.hash.as_bytes());
        self.0.update(&u64::from(c.len).to_le_bytes());
    }

    fn finish(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

fn chunk_list_hash<'a>(context: &str, chunks: impl IntoIterator<Item = &'a ChunkInfo>) -> [u8; 32] {
    let mut h = ListHasher::new(context);
    chunks.into_iter().for_each(|c| h.push(c));
    h.finish()
}

/// What a file hash names: a regular file, or a tree (a directory listing
/// stored as a file). Recorded when a file is committed and returned with
/// it, never guessed from its bytes; the hash itself depends on it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    Serialize,
    Deserialize,
    bincode::Encode,
    bincode::Decode,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    File,
    Tree,
}

impl Kind {
    fn context(self) -> &'static str {
        match self {
            Self::File => FILE_CONTEXT,
            Self::Tree => TREE_CONTEXT,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Tree => "tree",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A file (or tree) hash computed as the chunks go by.
pub struct FileHasher(ListHasher);

impl Default for FileHasher {
    fn default() -> Self {
        Self::new(Kind::File)
    }
}

impl FileHasher {
    pub fn new(kind: Kind) -> Self {
        Self(ListHasher::new(kind.context()))
    }

    pub fn push(&mut self, chunk: &ChunkInfo) {
        self.0.push(chunk);
    }

    pub fn finish(&self) -> FileHash {
        FileHash(self.0.finish())
    }
}

impl XorbHash {
    /// The hash of a xorb holding exactly these chunks, in this order.
    pub fn from_chunks<'a>(chunks: impl IntoIterator<Item = &'a ChunkInfo>) -> Self {
        Self(chunk_list_hash(XORB_CONTEXT, chunks))
    }
}

impl FileHash {
    /// The hash of a regular file made of these chunks, in order (an empty
    /// file has the hash of the empty list).
    pub fn from_chunks<'a>(chunks: impl IntoIterator<Item = &'a ChunkInfo>) -> Self {
        Self::of_kind(Kind::File, chunks)
    }

    /// The hash of a file of `kind` made of these chunks, in order.
    pub fn of_kind<'a>(kind: Kind, chunks: impl IntoIterator<Item = &'a ChunkInfo>) -> Self {
        Self(chunk_list_hash(kind.context(), chunks))
    }
}

impl RangeHash {
    /// The hash of a run of chunks (one reconstruction term).
    pub fn from_chunks<'a>(chunks: impl IntoIterator<Item = &'a ChunkInfo>) -> Self {
        Self(chunk_list_hash(RANGE_CONTEXT, chunks))
    }
}

/// Incremental SHA-256, so a file is digested while it streams through the
/// chunker. Its state can be saved ([`Sha256Hasher::to_state`]) and taken up
/// again ([`Sha256Hasher::from_state`]), possibly by another process: a
/// mirror interrupted inside a large file resumes hashing where it stopped
/// without reading the bytes before that point again. (`sha2` keeps its
/// state private, so this wraps its public compression function.)
#[derive(Clone)]
pub struct Sha256Hasher {
    state: [u32; 8],
    /// Bytes hashed so far, the buffered ones included.
    len: u64,
    /// The bytes of the block not yet complete (`len % 64` of them).
    buf: [u8; 64],
}

/// The initial hash values of SHA-256 (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// Blocks copied into an aligned batch per call of the compression function.
const SHA256_BATCH: usize = 32;

type Sha256Block = sha2::digest::generic_array::GenericArray<u8, sha2::digest::consts::U64>;

/// Error reading a saved [`Sha256Hasher`] state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a saved SHA-256 state: {0}")]
pub struct Sha256StateError(&'static str);

impl Default for Sha256Hasher {
    fn default() -> Self {
        Self {
            state: SHA256_IV,
            len: 0,
            buf: [0; 64],
        }
    }
}

impl Sha256Hasher {
    /// Length of [`Sha256Hasher::to_state`]: the eight state words, the
    /// byte count and the partial block.
    pub const STATE_LEN: usize = 32 + 8 + 64;

    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn compress(&mut self, blocks: &[u8]) {
        let mut batch = [Sha256Block::default(); SHA256_BATCH];
        for group in blocks.chunks(64 * SHA256_BATCH) {
            let n = group.len() / 64;
            for (b, src) in batch.iter_mut().zip(group.chunks_exact(64)) {
                b.copy_from_slice(src);
            }
            sha2::compress256(&mut self.state, &batch[..n]);
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        let have = (self.len % 64) as usize;
        self.len += data.len() as u64;
        if have > 0 {
            let take = data.len().min(64 - have);
            self.buf[have..have + take].copy_from_slice(&data[..take]);
            data = &data[take..];
            if have + take < 64 {
                return;
            }
            let block = self.buf;
            self.compress(&block);
        }
        let whole = data.len() - data.len() % 64;
        self.compress(&data[..whole]);
        let rest = &data[whole..];
        self.buf[..rest.len()].copy_from_slice(rest);
    }

    pub fn finalize(mut self) -> Sha256 {
        let bits = self.len.wrapping_mul(8);
        let have = (self.len % 64) as usize;
        let pad = if have < 56 { 56 - have } else { 120 - have };
        let mut tail = [0u8; 72];
        tail[0] = 0x80;
        tail[pad..pad + 8].copy_from_slice(&bits.to_be_bytes());
        let len = self.len;
        self.update(&tail[..pad + 8]);
        debug_assert_eq!(self.len % 64, 0);
        self.len = len;
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        Sha256(out)
    }

    /// The state, to be taken up by [`Sha256Hasher::from_state`]: state
    /// words and byte count big-endian, then the partial block (zeros past
    /// its `len % 64` bytes).
    pub fn to_state(&self) -> [u8; Self::STATE_LEN] {
        let mut out = [0u8; Self::STATE_LEN];
        for (o, w) in out[..32].chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out[32..40].copy_from_slice(&self.len.to_be_bytes());
        let have = (self.len % 64) as usize;
        out[40..40 + have].copy_from_slice(&self.buf[..have]);
        out
    }

    /// A hasher in the state `to_state` saved. Refuses a partial block
    /// with bytes past its length (what a damaged state would have).
    pub fn from_state(saved: &[u8]) -> Result<Self, Sha256StateError> {
        if saved.len() != Self::STATE_LEN {
            return Err(Sha256StateError("wrong length"));
        }
        let mut state = [0u32; 8];
        for (w, b) in state.iter_mut().zip(saved[..32].chunks_exact(4)) {
            *w = u32::from_be_bytes(b.try_into().expect("4 bytes"));
        }
        let len = u64::from_be_bytes(saved[32..40].try_into().expect("8 bytes"));
        let have = (len % 64) as usize;
        if saved[40 + have..].iter().any(|&b| b != 0) {
            return Err(Sha256StateError("bytes past the partial block"));
        }
        let mut buf = [0u8; 64];
        buf.copy_from_slice(&saved[40..]);
        Ok(Self { state, len, buf })
    }
}

impl Sha256 {
    /// SHA-256 of a byte string in one call.
    pub fn of(data: &[u8]) -> Self {
        let mut h = Sha256Hasher::new();
        h.update(data);
        h.finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_strictness() {
        let h = ChunkHash::of(b"hello");
        let s = h.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<ChunkHash>().unwrap(), h);
        assert!(s.to_uppercase().parse::<ChunkHash>().is_err());
        assert!(s[..63].parse::<ChunkHash>().is_err());
        assert!(format!("{s}0").parse::<ChunkHash>().is_err());
        assert!("../../etc/passwd".parse::<XorbHash>().is_err());
        assert!("é".repeat(32).parse::<XorbHash>().is_err());
    }

    #[test]
    fn domains_are_separated() {
        let info = ChunkInfo {
            hash: ChunkHash::of(b"x"),
            len: 1,
        };
        let x = XorbHash::from_chunks([&info]);
        let f = FileHash::from_chunks([&info]);
        let r = RangeHash::from_chunks([&info]);
        assert_ne!(x.as_bytes(), f.as_bytes());
        assert_ne!(x.as_bytes(), r.as_bytes());
        assert_ne!(f.as_bytes(), r.as_bytes());
        // A chunk whose bytes are the file hash's input still hashes differently.
        let mut input = info.hash.as_bytes().to_vec();
        input.extend_from_slice(&1u64.to_le_bytes());
        assert_ne!(ChunkHash::of(&input).as_bytes(), f.as_bytes());
        assert_ne!(blake3::hash(b"x").as_bytes(), info.hash.as_bytes());
    }

    #[test]
    fn sha256_matches_known_value() {
        assert_eq!(
            Sha256::of(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    /// The hasher agrees with `sha2` on every length around the block and
    /// padding edges and on random splits, also when its state is saved and
    /// taken up at every split.
    #[test]
    fn sha256_matches_sha2_across_splits_and_saved_states() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let data: Vec<u8> = (0..5000).map(|_| rng.gen()).collect();
        let want = |d: &[u8]| {
            Sha256(
                sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(d)).into(),
            )
        };
        let mut lens: Vec<usize> = (0..=130).collect();
        lens.extend([183, 191, 192, 193, 4095, 4096, 4097, 5000]);
        for len in lens {
            let d = &data[..len];
            assert_eq!(Sha256::of(d), want(d), "length {len}");
            for _ in 0..8 {
                let mut h = Sha256Hasher::new();
                let mut at = 0;
                while at < len {
                    let step = rng.gen_range(0..=(len - at).min(200));
                    h.update(&d[at..at + step]);
                    at += step;
                    h = Sha256Hasher::from_state(&h.to_state()).unwrap();
                    assert_eq!(h.len(), at as u64);
                }
                assert_eq!(h.finalize(), want(d), "length {len}");
            }
        }
    }

    #[test]
    fn damaged_sha256_states_are_refused() {
        let mut h = Sha256Hasher::new();
        h.update(b"abc");
        let s = h.to_state();
        assert!(Sha256Hasher::from_state(&s[..50]).is_err());
        let mut bad = s;
        bad[40 + 3] = 1;
        assert!(Sha256Hasher::from_state(&bad).is_err());
        assert_eq!(
            Sha256Hasher::from_state(&s).unwrap().finalize(),
            Sha256::of(b"abc")
        );
    }

    #[test]
    fn json_form_is_hex_string() {
        let h = FileHash::from_chunks([]);
        let j = serde_json::to_string(&h).unwrap();
        assert_eq!(j, format!("\"{h}\""));
        assert_eq!(serde_json::from_str::<FileHash>(&j).unwrap(), h);
        assert!(serde_json::from_str::<FileHash>("\"zz\"").is_err());
    }
}
