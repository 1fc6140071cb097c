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

/// Incremental SHA-256, so a file is digested while it streams through the chunker.
#[derive(Clone, Default)]
pub struct Sha256Hasher(sha2::Sha256);

impl Sha256Hasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        sha2::Digest::update(&mut self.0, data);
    }

    pub fn finalize(self) -> Sha256 {
        Sha256(sha2::Digest::finalize(self.0).into())
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

    #[test]
    fn json_form_is_hex_string() {
        let h = FileHash::from_chunks([]);
        let j = serde_json::to_string(&h).unwrap();
        assert_eq!(j, format!("\"{h}\""));
        assert_eq!(serde_json::from_str::<FileHash>(&j).unwrap(), h);
        assert!(serde_json::from_str::<FileHash>("\"zz\"").is_err());
    }
}
