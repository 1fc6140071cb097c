//! Xorbs: immutable containers of up to [`MAX_XORB_CHUNKS`] chunks and
//! [`MAX_XORB_UNCOMPRESSED`] bytes, each chunk stored raw or compressed in a
//! self-describing frame, behind an index that maps any chunk range to one
//! contiguous byte range. The byte layout is specified in docs/PROTOCOL.md.
//!
//! Parsing is strict and bounded: every length is checked against the limits
//! before anything is allocated, and malformed input is an [`XorbError`],
//! never a panic.

use crate::chunking::MAX_CHUNK;
use crate::hash::{ChunkHash, ChunkInfo, XorbHash};
use crate::range::{ByteRange, ChunkRange};

/// First bytes of every xorb.
pub const XORB_MAGIC: [u8; 8] = *b"CASXORB\0";
/// Xorb format version.
pub const XORB_VERSION: u32 = 1;
/// Most chunks in one xorb.
pub const MAX_XORB_CHUNKS: usize = 8192;
/// Most uncompressed bytes in one xorb.
pub const MAX_XORB_UNCOMPRESSED: usize = 64 * 1024 * 1024;
/// Fixed part of the header: magic, version, chunk count.
pub const HEADER_FIXED_LEN: usize = 16;
/// Bytes per index entry: chunk hash, uncompressed length, stored length.
pub const INDEX_ENTRY_LEN: usize = 40;
/// Bytes of a frame header: scheme, 3 reserved bytes, two lengths.
pub const FRAME_HEADER_LEN: usize = 12;
/// Largest possible serialized xorb; a server can cap request bodies here.
pub const MAX_XORB_SERIALIZED: usize = HEADER_FIXED_LEN
    + MAX_XORB_CHUNKS * (INDEX_ENTRY_LEN + FRAME_HEADER_LEN)
    + MAX_XORB_UNCOMPRESSED;

pub use crate::compression::{Compression, Scheme};

/// Everything that can be wrong with a xorb (or a run of its frames).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XorbError {
    #[error("xorb truncated: need {need} bytes at offset {offset}, have {have}")]
    Truncated { offset: u64, need: u64, have: u64 },
    #[error("not a xorb: bad magic")]
    BadMagic,
    #[error("unsupported xorb version {0}")]
    UnsupportedVersion(u32),
    #[error("xorb chunk count {0} outside 1..={MAX_XORB_CHUNKS}")]
    ChunkCount(u64),
    #[error("chunk {index}: length {len} outside 1..={MAX_CHUNK}")]
    ChunkLen { index: usize, len: u64 },
    #[error("xorb holds more than {MAX_XORB_UNCOMPRESSED} uncompressed bytes")]
    TooLarge,
    #[error("chunk {index}: stored length {stored} invalid for {scheme:?} of {len} bytes")]
    StoredLen {
        index: usize,
        scheme: Scheme,
        stored: u64,
        len: u64,
    },
    #[error("chunk {index}: unknown compression scheme {scheme}")]
    UnknownScheme { index: usize, scheme: u8 },
    #[error("chunk {index}: frame header disagrees with the index")]
    FrameMismatch { index: usize },
    #[error("chunk {index}: reserved frame header bytes are not zero")]
    Reserved { index: usize },
    #[error("{extra} unexpected bytes after the last frame")]
    TrailingBytes { extra: u64 },
    #[error("chunk {index}: cannot decompress: {reason}")]
    Decompress { index: usize, reason: String },
    #[error("chunk {index}: content hashes to {actual}, index says {expected}")]
    ChunkHashMismatch {
        index: usize,
        expected: ChunkHash,
        actual: ChunkHash,
    },
    #[error("xorb hashes to {actual}, expected {expected}")]
    XorbHashMismatch {
        expected: XorbHash,
        actual: XorbHash,
    },
    #[error("chunk range {start}..{end} outside a xorb of {count} chunks")]
    BadRange { start: u32, end: u32, count: usize },
    #[error("a xorb needs at least one chunk")]
    Empty,
}

/// Little-endian reader over a byte slice that reports truncation as an error.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], XorbError> {
        let have = self.data.len() - self.pos;
        if have < n {
            return Err(XorbError::Truncated {
                offset: self.pos as u64,
                need: n as u64,
                have: have as u64,
            });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, XorbError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
}

/// One index entry: what the chunk is and how many payload bytes it stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub info: ChunkInfo,
    pub stored_len: u32,
}

impl IndexEntry {
    fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + u64::from(self.stored_len)
    }
}

/// One frame: a chunk as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub scheme: Scheme,
    pub len: u32,
    pub payload: &'a [u8],
}

fn check_chunk_len(index: usize, len: u64) -> Result<(), XorbError> {
    if len == 0 || len > MAX_CHUNK as u64 {
        return Err(XorbError::ChunkLen { index, len });
    }
    Ok(())
}

fn check_chunk_count(count: usize) -> Result<(), XorbError> {
    if count == 0 || count > MAX_XORB_CHUNKS {
        return Err(XorbError::ChunkCount(count as u64));
    }
    Ok(())
}

/// Running check of a chunk list against the per-chunk and per-xorb limits.
#[derive(Default)]
struct ChunkListCheck {
    total: u64,
}

impl ChunkListCheck {
    fn push(&mut self, index: usize, len: u32) -> Result<(), XorbError> {
        check_chunk_len(index, len.into())?;
        self.total += u64::from(len);
        if self.total > MAX_XORB_UNCOMPRESSED as u64 {
            return Err(XorbError::TooLarge);
        }
        Ok(())
    }
}

/// Whether a chunk list obeys the xorb limits (count, chunk lengths, total),
/// wherever it comes from: a xorb header or a shard's chunk table.
pub fn check_chunk_list(chunks: &[ChunkInfo]) -> Result<(), XorbError> {
    check_chunk_count(chunks.len())?;
    let mut limits = ChunkListCheck::default();
    chunks
        .iter()
        .enumerate()
        .try_for_each(|(i, c)| limits.push(i, c.len))
}

fn check_lengths(index: usize, scheme: Scheme, len: u64, stored: u64) -> Result<(), XorbError> {
    check_chunk_len(index, len)?;
    let ok = match scheme {
        Scheme::Raw => stored == len,
        _ => stored > 0 && stored < len,
    };
    if !ok {
        return Err(XorbError::StoredLen {
            index,
            scheme,
            stored,
            len,
        });
    }
    Ok(())
}

impl Frame<'_> {
    /// The chunk's uncompressed bytes, appended to `out`; never grows `out`
    /// by more than the frame's declared length.
    pub fn decode_into(&self, index: usize, out: &mut Vec<u8>) -> Result<(), XorbError> {
        let start = out.len();
        out.resize(start + self.len as usize, 0);
        crate::compression::decompress(self.scheme, self.payload, &mut out[start..]).map_err(
            |reason| {
                out.truncate(start);
                XorbError::Decompress { index, reason }
            },
        )
    }

    /// Decodes the chunk and checks it against its expected hash.
    pub fn decode_verified(
        &self,
        index: usize,
        expected: ChunkHash,
        out: &mut Vec<u8>,
    ) -> Result<(), XorbError> {
        let start = out.len();
        self.decode_into(index, out)?;
        let actual = ChunkHash::of(&out[start..]);
        if actual != expected {
            out.truncate(start);
            return Err(XorbError::ChunkHashMismatch {
                index,
                expected,
                actual,
            });
        }
        Ok(())
    }
}

/// Reads consecutive frames from a byte slice, e.g. the bytes an HTTP range
/// request returned for a chunk range. `first_index` only labels errors.
pub struct Frames<'a> {
    cur: Cursor<'a>,
    index: usize,
}

impl<'a> Frames<'a> {
    pub fn new(bytes: &'a [u8], first_index: usize) -> Self {
        Self {
            cur: Cursor {
                data: bytes,
                pos: 0,
            },
            index: first_index,
        }
    }

    /// Bytes of the input read so far: the end of the last frame yielded.
    pub fn consumed(&self) -> usize {
        self.cur.pos
    }

    fn read(&mut self) -> Result<Frame<'a>, XorbError> {
        let index = self.index;
        let h = self.cur.take(FRAME_HEADER_LEN)?;
        let scheme = Scheme::from_u8(h[0]).ok_or(XorbError::UnknownScheme {
            index,
            scheme: h[0],
        })?;
        if h[1..4] != [0, 0, 0] {
            return Err(XorbError::Reserved { index });
        }
        let len = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        let stored = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        check_lengths(index, scheme, len.into(), stored.into())?;
        let payload = self.cur.take(stored as usize)?;
        self.index += 1;
        Ok(Frame {
            scheme,
            len,
            payload,
        })
    }
}

/// Length of the longest prefix of `bytes` made of whole frames (by their
/// headers' stored lengths): what a reader of a streamed range body can hand
/// to [`Frames`] now, keeping the rest until more bytes arrive. Headers are
/// not validated here; [`Frames`] does that.
pub fn whole_frames_len(bytes: &[u8]) -> usize {
    let mut pos = 0usize;
    while let Some(h) = bytes.get(pos..pos + FRAME_HEADER_LEN) {
        let stored = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")) as usize;
        match pos.checked_add(FRAME_HEADER_LEN + stored) {
            Some(end) if end <= bytes.len() => pos = end,
            _ => break,
        }
    }
    pos
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, XorbError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.cur.pos >= self.cur.data.len() {
            return None;
        }
        let r = self.read();
        if r.is_err() {
            self.cur.pos = self.cur.data.len();
        }
        Some(r)
    }
}

/// A structurally valid xorb (magic, limits, index/frame agreement, exact
/// length), borrowed from its bytes. Chunk contents are checked by [`verify`].
///
/// [`verify`]: XorbView::verify
#[derive(Debug)]
pub struct XorbView<'a> {
    bytes: &'a [u8],
    entries: Vec<IndexEntry>,
    offsets: FrameOffsets,
}

impl<'a> XorbView<'a> {
    /// Parses and structurally validates a whole xorb.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, XorbError> {
        let entries = parse_header(bytes)?;
        let offsets = FrameOffsets::new(&entries);
        let pos = offsets.end();
        if (bytes.len() as u64) < pos {
            return Err(XorbError::Truncated {
                offset: bytes.len() as u64,
                need: pos - bytes.len() as u64,
                have: 0,
            });
        }
        if bytes.len() as u64 > pos {
            return Err(XorbError::TrailingBytes {
                extra: bytes.len() as u64 - pos,
            });
        }
        let view = Self {
            bytes,
            entries,
            offsets,
        };
        for (i, e) in view.entries.iter().enumerate() {
            let f = view.frame(i)?;
            if f.len != e.info.len || f.payload.len() != e.stored_len as usize {
                return Err(XorbError::FrameMismatch { index: i });
            }
        }
        Ok(view)
    }

    pub fn chunk_count(&self) -> usize {
        self.entries.len()
    }

    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// The chunk table (hash and length of every chunk) as the index states it.
    pub fn chunks(&self) -> Vec<ChunkInfo> {
        self.entries.iter().map(|e| e.info).collect()
    }

    /// The xorb hash the index implies (trusted only after [`XorbView::verify`]).
    pub fn hash(&self) -> XorbHash {
        XorbHash::from_chunks(self.entries.iter().map(|e| &e.info))
    }

    /// The bytes holding the frames of chunks `range`.
    pub fn byte_range(&self, range: ChunkRange) -> Result<ByteRange, XorbError> {
        self.offsets.range(range)
    }

    /// Frame `i`.
    pub fn frame(&self, i: usize) -> Result<Frame<'a>, XorbError> {
        let start = self.offsets.0[i] as usize;
        let end = self.offsets.0[i + 1] as usize;
        Frames::new(&self.bytes[start..end], i)
            .next()
            .expect("frame range is never empty")
    }

    /// Decompresses and re-hashes every chunk, then checks the xorb hash
    /// against `expected`. Nothing in a xorb is trusted before this.
    pub fn verify(&self, expected: XorbHash) -> Result<(), XorbError> {
        let mut buf = Vec::with_capacity(MAX_CHUNK);
        for (i, e) in self.entries.iter().enumerate() {
            buf.clear();
            self.frame(i)?.decode_verified(i, e.info.hash, &mut buf)?;
        }
        let actual = self.hash();
        if actual != expected {
            return Err(XorbError::XorbHashMismatch { expected, actual });
        }
        Ok(())
    }
}

/// Verifies a xorb as its bytes arrive, in pieces of any size: the header
/// once it is complete, then each frame as soon as its last byte is in
/// (decompressed and re-hashed against the index), so a receiver's
/// verification overlaps the transfer instead of following it. Accepts
/// exactly the xorbs that [`XorbView::parse`] and [`XorbView::verify`]
/// accept (the first fault it reports may differ: it meets a damaged
/// chunk before a truncation the whole-xorb parser checks first), keeping
/// at most one header or one frame of its input.
pub struct StreamVerifier {
    expected: XorbHash,
    /// Bytes of the header, or of a frame split across pieces.
    partial: Vec<u8>,
    entries: Option<Vec<IndexEntry>>,
    next: usize,
    /// Bytes taken so far.
    offset: u64,
    out: Vec<u8>,
}

impl StreamVerifier {
    pub fn new(expected: XorbHash) -> Self {
        Self {
            expected,
            partial: Vec::new(),
            entries: None,
            next: 0,
            offset: 0,
            out: Vec::with_capacity(MAX_CHUNK),
        }
    }

    /// Takes the next bytes of the xorb; verifies every frame they complete.
    pub fn push(&mut self, mut data: &[u8]) -> Result<(), XorbError> {
        self.offset += data.len() as u64;
        while !data.is_empty() {
            let Some(entries) = &self.entries else {
                // The header: 16 bytes say how long the rest of it is.
                let need = if self.partial.len() < HEADER_FIXED_LEN {
                    HEADER_FIXED_LEN
                } else {
                    let count = u32::from_le_bytes(self.partial[12..16].try_into().expect("4"));
                    check_chunk_count(count as usize)?;
                    header_len(count as usize)
                };
                let take = (need - self.partial.len()).min(data.len());
                self.partial.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.partial.len() == need {
                    match parse_header(&self.partial) {
                        Ok(entries) => {
                            self.entries = Some(entries);
                            self.partial.clear();
                        }
                        Err(XorbError::Truncated { .. }) if need == HEADER_FIXED_LEN => {}
                        Err(e) => return Err(e),
                    }
                }
                continue;
            };
            let Some(entry) = entries.get(self.next) else {
                return Err(XorbError::TrailingBytes {
                    extra: data.len() as u64,
                });
            };
            let len = entry.frame_len() as usize;
            if self.partial.is_empty() && data.len() >= len {
                let (frame, rest) = data.split_at(len);
                self.check_frame(frame)?;
                data = rest;
            } else {
                let take = (len - self.partial.len()).min(data.len());
                self.partial.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.partial.len() < len {
                    break;
                }
                let frame = std::mem::take(&mut self.partial);
                let r = self.check_frame(&frame);
                self.partial = frame;
                self.partial.clear();
                r?;
            }
        }
        Ok(())
    }

    /// Checks the whole frame `bytes` of chunk `next` against its index
    /// entry (header, then content hash).
    fn check_frame(&mut self, bytes: &[u8]) -> Result<(), XorbError> {
        let i = self.next;
        let entry = self.entries.as_ref().expect("header parsed")[i];
        let f = Frames::new(bytes, i)
            .next()
            .expect("a frame is never empty")?;
        if f.len != entry.info.len || f.payload.len() != entry.stored_len as usize {
            return Err(XorbError::FrameMismatch { index: i });
        }
        self.out.clear();
        f.decode_verified(i, entry.info.hash, &mut self.out)?;
        self.next += 1;
        Ok(())
    }

    /// Chunks verified so far.
    pub fn verified(&self) -> usize {
        self.next
    }

    /// Ends the input: every frame must have arrived and the index must
    /// hash to the expected xorb hash. Returns the verified index.
    pub fn finish(self) -> Result<Vec<IndexEntry>, XorbError> {
        let truncated = |need: u64| XorbError::Truncated {
            offset: self.offset,
            need,
            have: 0,
        };
        let Some(entries) = self.entries else {
            return Err(truncated(1));
        };
        if self.next < entries.len() {
            let left = FrameOffsets::new(&entries).end() - self.offset;
            return Err(truncated(left));
        }
        let actual = XorbHash::from_chunks(entries.iter().map(|e| &e.info));
        if actual != self.expected {
            return Err(XorbError::XorbHashMismatch {
                expected: self.expected,
                actual,
            });
        }
        Ok(entries)
    }
}

fn header_len(chunks: usize) -> usize {
    HEADER_FIXED_LEN + chunks * INDEX_ENTRY_LEN
}

/// Parses magic, version and index from the start of a xorb; `bytes` may be
/// just a prefix as long as it holds the whole header.
pub fn parse_header(bytes: &[u8]) -> Result<Vec<IndexEntry>, XorbError> {
    let mut cur = Cursor {
        data: bytes,
        pos: 0,
    };
    if cur.take(8)? != XORB_MAGIC {
        return Err(XorbError::BadMagic);
    }
    let version = cur.u32()?;
    if version != XORB_VERSION {
        return Err(XorbError::UnsupportedVersion(version));
    }
    let count = cur.u32()? as usize;
    check_chunk_count(count)?;
    let raw = cur.take(count * INDEX_ENTRY_LEN)?;
    let mut entries = Vec::with_capacity(count);
    let mut limits = ChunkListCheck::default();
    for (index, e) in raw.chunks_exact(INDEX_ENTRY_LEN).enumerate() {
        let hash = ChunkHash::from_bytes(e[..32].try_into().expect("32 bytes"));
        let len = u32::from_le_bytes(e[32..36].try_into().expect("4 bytes"));
        let stored_len = u32::from_le_bytes(e[36..40].try_into().expect("4 bytes"));
        check_chunk_len(index, len.into())?;
        if stored_len > len {
            return Err(XorbError::StoredLen {
                index,
                scheme: Scheme::Raw,
                stored: stored_len.into(),
                len: len.into(),
            });
        }
        limits.push(index, len)?;
        entries.push(IndexEntry {
            info: ChunkInfo { hash, len },
            stored_len,
        });
    }
    Ok(entries)
}

/// Appends the header (magic, version, count, index) of a xorb with these
/// entries: the bytes [`parse_header`] reads.
pub fn encode_header(entries: &[IndexEntry], out: &mut Vec<u8>) {
    out.reserve(header_len(entries.len()));
    out.extend_from_slice(&XORB_MAGIC);
    out.extend_from_slice(&XORB_VERSION.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(e.info.hash.as_bytes());
        out.extend_from_slice(&e.info.len.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
    }
}

/// Serialized length of a xorb with these index entries.
pub fn serialized_len(entries: &[IndexEntry]) -> u64 {
    header_len(entries.len()) as u64 + entries.iter().map(IndexEntry::frame_len).sum::<u64>()
}

/// Where each frame of a xorb starts, from its index entries alone: maps a
/// chunk range to the one contiguous byte range holding its frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameOffsets(Vec<u64>);

impl FrameOffsets {
    pub fn new(entries: &[IndexEntry]) -> Self {
        let mut offsets = Vec::with_capacity(entries.len() + 1);
        let mut pos = header_len(entries.len()) as u64;
        for e in entries {
            offsets.push(pos);
            pos += e.frame_len();
        }
        offsets.push(pos);
        Self(offsets)
    }

    /// The xorb's serialized length.
    pub fn end(&self) -> u64 {
        *self.0.last().expect("never empty")
    }

    /// The bytes holding the frames of chunks `range`.
    pub fn range(&self, range: ChunkRange) -> Result<ByteRange, XorbError> {
        let count = self.0.len() - 1;
        if range.is_empty() || range.end as usize > count {
            return Err(XorbError::BadRange {
                start: range.start,
                end: range.end,
                count,
            });
        }
        Ok(ByteRange {
            start: self.0[range.start as usize],
            end: self.0[range.end as usize],
        })
    }
}

/// A chunk hashed and encoded for a xorb. Building one is pure CPU work that
/// callers may spread over threads before handing the results to a builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChunk {
    pub info: ChunkInfo,
    pub scheme: Scheme,
    pub payload: Vec<u8>,
}

impl EncodedChunk {
    /// Hashes and (if it pays) compresses one chunk.
    pub fn encode(data: &[u8], compression: Compression) -> Result<Self, XorbError> {
        Self::encode_with_hash(data, ChunkHash::of(data), compression)
    }

    /// As [`EncodedChunk::encode`] for a chunk whose hash is already known.
    pub fn encode_with_hash(
        data: &[u8],
        hash: ChunkHash,
        compression: Compression,
    ) -> Result<Self, XorbError> {
        check_chunk_len(0, data.len() as u64)?;
        let info = ChunkInfo {
            hash,
            len: data.len() as u32,
        };
        let (scheme, payload) = crate::compression::encode(data, compression);
        Ok(Self {
            info,
            scheme,
            payload: payload.unwrap_or_else(|| data.to_vec()),
        })
    }
}

/// A finished xorb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltXorb {
    pub hash: XorbHash,
    pub chunks: Vec<ChunkInfo>,
    pub bytes: Vec<u8>,
}

/// Collects encoded chunks until a limit is reached, then serializes them.
#[derive(Debug, Default)]
pub struct XorbBuilder {
    chunks: Vec<EncodedChunk>,
    uncompressed: usize,
}

impl XorbBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Uncompressed bytes collected so far.
    pub fn uncompressed_len(&self) -> usize {
        self.uncompressed
    }

    /// Whether a chunk of `len` bytes still fits.
    pub fn fits(&self, len: usize) -> bool {
        self.chunks.len() < MAX_XORB_CHUNKS && self.uncompressed + len <= MAX_XORB_UNCOMPRESSED
    }

    /// Adds a chunk, or hands it back when the xorb is full.
    pub fn try_push(&mut self, chunk: EncodedChunk) -> Result<(), EncodedChunk> {
        if !self.fits(chunk.info.len as usize) {
            return Err(chunk);
        }
        self.uncompressed += chunk.info.len as usize;
        self.chunks.push(chunk);
        Ok(())
    }

    /// Serializes the xorb; its index comes first so a reader can map chunk
    /// ranges to byte ranges from the header alone.
    pub fn finish(self) -> Result<BuiltXorb, XorbError> {
        self.finish_into(Vec::new())
    }

    /// As [`XorbBuilder::finish`], serializing into `bytes` (cleared first):
    /// a writer that reuses the buffer of a xorb already sent keeps its
    /// pages instead of faulting in 64 MiB of fresh ones per xorb.
    pub fn finish_into(self, mut bytes: Vec<u8>) -> Result<BuiltXorb, XorbError> {
        if self.chunks.is_empty() {
            return Err(XorbError::Empty);
        }
        let n = self.chunks.len();
        let payload: usize = self.chunks.iter().map(|c| c.payload.len()).sum();
        bytes.clear();
        bytes.reserve(header_len(n) + n * FRAME_HEADER_LEN + payload);
        let entries: Vec<IndexEntry> = self
            .chunks
            .iter()
            .map(|c| IndexEntry {
                info: c.info,
                stored_len: c.payload.len() as u32,
            })
            .collect();
        encode_header(&entries, &mut bytes);
        let chunks: Vec<ChunkInfo> = self.chunks.iter().map(|c| c.info).collect();
        // By value: each payload is freed once copied, so finishing a full
        // xorb does not hold two copies of it.
        for c in self.chunks {
            bytes.push(c.scheme as u8);
            bytes.extend_from_slice(&[0, 0, 0]);
            bytes.extend_from_slice(&c.info.len.to_le_bytes());
            bytes.extend_from_slice(&(c.payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&c.payload);
        }
        Ok(BuiltXorb {
            hash: XorbHash::from_chunks(&chunks),
            chunks,
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn build(chunks: &[Vec<u8>], c: Compression) -> BuiltXorb {
        let mut b = XorbBuilder::new();
        for d in chunks {
            b.try_push(EncodedChunk::encode(d, c).unwrap()).unwrap();
        }
        b.finish().unwrap()
    }

    fn sample_chunks() -> Vec<Vec<u8>> {
        vec![
            vec![0u8; 1000],
            (0..=255u8).cycle().take(70_000).collect(),
            b"tiny".to_vec(),
        ]
    }

    #[test]
    fn whole_frames_len_stops_at_a_partial_frame() {
        let x = build(&sample_chunks(), Compression::default());
        let frames = &x.bytes[header_len(3)..];
        assert_eq!(whole_frames_len(frames), frames.len());
        let v = XorbView::parse(&x.bytes).unwrap();
        let first = v.byte_range(ChunkRange { start: 0, end: 1 }).unwrap().len() as usize;
        for cut in 0..frames.len() {
            let n = whole_frames_len(&frames[..cut]);
            assert!(n <= cut);
            assert!(Frames::new(&frames[..n], 0).all(|f| f.is_ok()));
            if cut >= first {
                assert!(n >= first, "cut {cut}: first frame is whole");
            }
        }
    }

    #[test]
    fn round_trip_and_ranges() {
        let chunks = sample_chunks();
        let x = build(&chunks, Compression::default());
        let v = XorbView::parse(&x.bytes).unwrap();
        assert_eq!(v.chunks(), x.chunks);
        assert_eq!(v.hash(), x.hash);
        v.verify(x.hash).unwrap();
        assert!(v.entries()[0].stored_len < 1000, "zeros compress");
        let r = v.byte_range(ChunkRange { start: 1, end: 3 }).unwrap();
        let mut out = Vec::new();
        for (i, f) in Frames::new(&x.bytes[r.start as usize..r.end as usize], 1).enumerate() {
            f.unwrap()
                .decode_verified(i + 1, x.chunks[i + 1].hash, &mut out)
                .unwrap();
        }
        assert_eq!(out, [chunks[1].clone(), chunks[2].clone()].concat());
        assert_eq!(
            FrameOffsets::new(v.entries())
                .range(ChunkRange { start: 1, end: 3 })
                .unwrap(),
            r
        );
        assert!(v.byte_range(ChunkRange { start: 2, end: 4 }).is_err());
        assert!(v.byte_range(ChunkRange { start: 2, end: 2 }).is_err());
    }

    #[test]
    fn same_chunks_compressed_differently_have_the_same_hash() {
        let a = build(&sample_chunks(), Compression::default());
        // A reused buffer's old contents do not leak into the xorb.
        let mut b = XorbBuilder::new();
        for d in sample_chunks() {
            b.try_push(EncodedChunk::encode(&d, Compression::default()).unwrap())
                .unwrap();
        }
        assert_eq!(b.finish_into(vec![7; 100_000]).unwrap(), a);
        let b = build(&sample_chunks(), Compression::Raw);
        assert_ne!(a.bytes, b.bytes);
        assert_eq!(a.hash, b.hash);
        XorbView::parse(&b.bytes).unwrap().verify(a.hash).unwrap();
    }

    #[test]
    fn incompressible_chunks_stay_raw() {
        let mut data = vec![0u8; 50_000];
        let mut x = 0x1234_5678_9abc_def0u64;
        for b in &mut data {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let c = EncodedChunk::encode(&data, Compression::default()).unwrap();
        assert_eq!(c.scheme, Scheme::Raw);
    }

    #[test]
    fn limits_are_enforced_when_building() {
        assert!(EncodedChunk::encode(&[], Compression::Raw).is_err());
        assert!(EncodedChunk::encode(&vec![1; MAX_CHUNK + 1], Compression::Raw).is_err());
        assert_eq!(XorbBuilder::new().finish(), Err(XorbError::Empty));
        let mut b = XorbBuilder::new();
        let c = EncodedChunk::encode(&[1], Compression::Raw).unwrap();
        for _ in 0..MAX_XORB_CHUNKS {
            b.try_push(c.clone()).unwrap();
        }
        assert!(b.try_push(c).is_err());
        let mut b = XorbBuilder::new();
        let big = EncodedChunk::encode(&vec![3; MAX_CHUNK], Compression::Raw).unwrap();
        for _ in 0..MAX_XORB_UNCOMPRESSED / MAX_CHUNK {
            b.try_push(big.clone()).unwrap();
        }
        assert!(b.try_push(big).is_err());
        assert!(b.finish().unwrap().bytes.len() <= MAX_XORB_SERIALIZED);
    }

    #[test]
    fn tampering_is_detected() {
        let x = build(&sample_chunks(), Compression::default());
        // A flipped payload byte of the raw chunk: structure fine, hash wrong.
        let mut bad = x.bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let v = XorbView::parse(&bad).unwrap();
        assert!(matches!(
            v.verify(x.hash),
            Err(XorbError::ChunkHashMismatch { index: 2, .. })
        ));
        // Wrong expected xorb hash.
        let v = XorbView::parse(&x.bytes).unwrap();
        assert!(matches!(
            v.verify(XorbHash::from_bytes([0; 32])),
            Err(XorbError::XorbHashMismatch { .. })
        ));
        // Structural damage.
        assert!(matches!(
            XorbView::parse(&x.bytes[..x.bytes.len() - 1]),
            Err(XorbError::Truncated { .. })
        ));
        let mut extra = x.bytes.clone();
        extra.push(0);
        assert_eq!(
            XorbView::parse(&extra).unwrap_err(),
            XorbError::TrailingBytes { extra: 1 }
        );
        let mut magic = x.bytes.clone();
        magic[0] = b'X';
        assert_eq!(XorbView::parse(&magic).unwrap_err(), XorbError::BadMagic);
        let mut count = x.bytes.clone();
        count[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            XorbView::parse(&count).unwrap_err(),
            XorbError::ChunkCount(u32::MAX.into())
        );
    }

    /// Fed in pieces of any sizes, the streaming verifier accepts exactly
    /// what parse + verify accept, damaged inputs included.
    fn agrees(bytes: &[u8], expected: XorbHash, cuts: &[usize]) -> Result<(), String> {
        let whole =
            XorbView::parse(bytes).and_then(|v| v.verify(expected).map(|()| v.entries().to_vec()));
        let mut v = StreamVerifier::new(expected);
        let mut pos = 0;
        let mut streamed = Ok(());
        for &c in cuts.iter().chain([&bytes.len()]) {
            let c = c.clamp(pos, bytes.len());
            streamed = v.push(&bytes[pos..c]);
            pos = c;
            if streamed.is_err() {
                break;
            }
        }
        let streamed = streamed.and_then(|()| v.finish());
        match (&whole, &streamed) {
            (Ok(a), Ok(b)) if a == b => Ok(()),
            // A damaged chunk in a truncated xorb: the stream meets the
            // damage first, the whole-xorb parser the truncation.
            (Err(_), Err(_)) => Ok(()),
            _ => Err(format!("whole {whole:?}, streamed {streamed:?}")),
        }
    }

    #[test]
    fn stream_verifier_on_fixed_damage() {
        let x = build(&sample_chunks(), Compression::default());
        let cuts = [3, 17, 100, 500, 1200, 80_000];
        agrees(&x.bytes, x.hash, &cuts).unwrap();
        agrees(&x.bytes, XorbHash::from_bytes([1; 32]), &cuts).unwrap();
        agrees(&x.bytes[..x.bytes.len() - 1], x.hash, &cuts).unwrap();
        agrees(&x.bytes[..10], x.hash, &cuts).unwrap();
        agrees(&[], x.hash, &[]).unwrap();
        let mut extra = x.bytes.clone();
        extra.extend_from_slice(b"more");
        agrees(&extra, x.hash, &cuts).unwrap();
        let mut flipped = x.bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        agrees(&flipped, x.hash, &cuts).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn build_parse_verify_round_trip(
            chunks in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 1..3000),
                    (1usize..20_000, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
                ],
                1..20,
            ),
            policy in 0usize..7,
        ) {
            let c = [
                Compression::Raw,
                Compression::Fixed(Scheme::Zstd),
                Compression::Fixed(Scheme::ByteGrouped2Zstd),
                Compression::Fixed(Scheme::ByteGrouped4Zstd),
                Compression::Fixed(Scheme::BytePlanes2),
                Compression::Fixed(Scheme::BytePlanes4),
                Compression::Auto,
            ][policy];
            let x = build(&chunks, c);
            let v = XorbView::parse(&x.bytes).unwrap();
            v.verify(x.hash).unwrap();
            let mut all = Vec::new();
            for i in 0..v.chunk_count() {
                v.frame(i).unwrap().decode_into(i, &mut all).unwrap();
            }
            prop_assert_eq!(all, chunks.concat());
        }

        #[test]
        fn stream_verifier_agrees_with_parse_and_verify(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
            pieces in proptest::collection::vec(0usize..90_000, 0..12),
        ) {
            let x = build(&sample_chunks(), Compression::default());
            let mut bad = x.bytes.clone();
            for (i, b) in flips {
                let i = i.index(bad.len());
                bad[i] ^= b;
            }
            bad.truncate(cut.index(bad.len() + 1).max(bad.len() * 3 / 4));
            let mut cuts = pieces;
            cuts.sort_unstable();
            prop_assert_eq!(agrees(&bad, x.hash, &cuts), Ok(()));
        }

        #[test]
        fn parser_never_panics_on_mutations(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let x = build(&sample_chunks(), Compression::default());
            let mut bad = x.bytes.clone();
            for (i, b) in flips {
                let i = i.index(bad.len());
                bad[i] ^= b;
            }
            bad.truncate(cut.index(bad.len() + 1));
            if let Ok(v) = XorbView::parse(&bad) {
                let _ = v.verify(x.hash);
            }
        }
    }
}
