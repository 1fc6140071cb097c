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
//!
//! From file bytes to a verified xorb and a file recipe:
//!
//! ```
//! use cas_protocol::chunking::chunks;
//! use cas_protocol::shard::{FileRecipe, Shard, Term, XorbChunkTable};
//! use cas_protocol::xorb::{Compression, EncodedChunk, XorbBuilder, XorbView};
//! use cas_protocol::{ChunkRange, FileHash, Kind, Message, Sha256};
//!
//! let file: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
//! let mut builder = XorbBuilder::new();
//! for range in chunks(&file) {
//!     let chunk = EncodedChunk::encode(&file[range], Compression::Auto).unwrap();
//!     builder.try_push(chunk).unwrap(); // Err(chunk) would mean "xorb full"
//! }
//! let xorb = builder.finish().unwrap();
//!
//! // What a server does before storing it: parse, decompress, re-hash.
//! XorbView::parse(&xorb.bytes).unwrap().verify(xorb.hash).unwrap();
//!
//! let n = xorb.chunks.len() as u32;
//! let recipe = FileRecipe {
//!     hash: FileHash::from_chunks(&xorb.chunks),
//!     sha256: Sha256::of(&file),
//!     size: file.len() as u64,
//!     terms: vec![Term { xorb: xorb.hash, chunks: ChunkRange { start: 0, end: n }, len: file.len() as u64 }],
//!     kind: Kind::File,
//! };
//! recipe.verify(|h| (*h == xorb.hash).then_some(&xorb.chunks[..])).unwrap();
//! let shard = Shard { xorbs: vec![XorbChunkTable::from(&xorb)], files: vec![recipe] };
//! assert_eq!(Shard::from_bytes(&shard.to_bytes()).unwrap(), shard);
//! ```

pub mod chunking;
pub mod codec;
pub mod compression;
pub mod hash;
pub mod messages;
pub mod range;
pub mod shard;
pub mod tree;
pub mod xorb;

pub use codec::{Encoding, Message, MessageError};
pub use hash::{
    ChunkHash, ChunkInfo, FileHash, FileHasher, Kind, RangeHash, Sha256, Sha256Hasher, XorbHash,
};
pub use range::{ByteRange, ChunkRange};

/// Version of the protocol as a whole: chunking, hashing and formats.
pub const PROTOCOL_VERSION: u32 = 2;
