//! Half-open ranges over chunk indices and over bytes, as distinct types so a
//! chunk index can never be passed where a byte offset is meant.

use serde::{Deserialize, Serialize};

macro_rules! range_newtype {
    ($(#[$doc:meta])* $name:ident, $int:ty) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize,
            bincode::Encode, bincode::Decode,
        )]
        pub struct $name {
            pub start: $int,
            pub end: $int,
        }

        impl $name {
            /// `[start, end)`; `None` when `end < start`.
            pub fn new(start: $int, end: $int) -> Option<Self> {
                (start <= end).then_some(Self { start, end })
            }

            /// Number of elements; 0 for a range with `end <= start` (which
            /// decoded input may carry until it is validated).
            pub fn len(&self) -> $int {
                self.end.saturating_sub(self.start)
            }

            pub fn is_empty(&self) -> bool {
                self.end <= self.start
            }
        }
    };
}

range_newtype!(
    /// Chunk indices `[start, end)` inside one xorb.
    ChunkRange,
    u32
);
range_newtype!(
    /// Byte offsets `[start, end)` inside a file or a xorb.
    ByteRange,
    u64
);

impl ChunkRange {
    /// As a `usize` range for slicing a chunk table.
    pub fn as_usize(&self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
}

impl ByteRange {
    /// The HTTP `Range` header value for these bytes (`bytes=a-b`, inclusive
    /// end); `None` for an empty range, which HTTP cannot express.
    pub fn to_http_range(&self) -> Option<String> {
        (!self.is_empty()).then(|| format!("bytes={}-{}", self.start, self.end - 1))
    }
}
