//! The CAS protocol: everything the client and the server must agree on, as
//! pure functions over bytes (no I/O, no async, no HTTP).
//!
//! - [`chunking`]: FastCDC v2020 with versioned parameters; streaming and parallel.
//! - [`hash`]: domain-separated BLAKE3 hashes of chunks, xorbs, files; SHA-256.
//! - [`xorb`]: the chunk container format, its builder and strict parser;
//!   [`compression`]: its per-chunk schemes (raw, zstd, byte-grouped zstd).
//! - [`shard`], [`tree`], [`messages`]: upload metadata, directory listings,
//!   dedup and reconstruction messages, in bincode and JSON ([`codec`]).
//!
//! docs/PROTOCOL.md specifies every byte.

pub mod chunking;
pub mod codec;
pub mod compression;
pub mod hash;
pub mod messages;
pub mod range;
pub mod shard;
pub mod tree;
pub mod xorb;

pub use codec::{Message, MessageError};
pub use hash::{
    ChunkHash, ChunkInfo, FileHash, FileHasher, RangeHash, Sha256, Sha256Hasher, XorbHash,
};
pub use range::{ByteRange, ChunkRange};

/// Version of the protocol as a whole: chunking, hashing and formats.
pub const PROTOCOL_VERSION: u32 = 1;
