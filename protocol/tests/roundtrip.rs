//! Property tests: every valid message survives both encodings unchanged,
//! and decoding refuses short inputs that announce huge sequences.

use cas_protocol::messages::{
    ChunkLocation, DedupAnswer, DedupQuery, FetchRange, Reconstruction, ReconstructionTerm,
    XorbFetch,
};
use cas_protocol::shard::{FileRecipe, Shard, Term, XorbChunkTable};
use cas_protocol::{
    ByteRange, ChunkHash, ChunkInfo, ChunkRange, FileHash, Kind, Message, MessageError, RangeHash,
    Sha256, XorbHash,
};
use proptest::prelude::*;

fn hash32() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

fn chunk_info() -> impl Strategy<Value = ChunkInfo> {
    (hash32(), 1u32..=262_144).prop_map(|(h, len)| ChunkInfo {
        hash: ChunkHash::from_bytes(h),
        len,
    })
}

fn chunk_table() -> impl Strategy<Value = XorbChunkTable> {
    proptest::collection::vec(chunk_info(), 1..40).prop_map(|chunks| XorbChunkTable {
        hash: XorbHash::from_chunks(&chunks),
        chunks,
    })
}

/// A recipe over some of `tables`, with consistent lengths and file hash.
fn recipe(tables: Vec<XorbChunkTable>) -> impl Strategy<Value = FileRecipe> {
    let n = tables.len();
    proptest::collection::vec(
        (
            0..n,
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
        ),
        0..6,
    )
    .prop_map(move |picks| {
        let mut chunks = Vec::new();
        let terms = picks
            .into_iter()
            .map(|(t, a, b)| {
                let table = &tables[t];
                let (a, b) = (a.index(table.chunks.len()), b.index(table.chunks.len()));
                let (start, end) = (a.min(b), a.max(b) + 1);
                let run = &table.chunks[start..end];
                chunks.extend_from_slice(run);
                Term {
                    xorb: table.hash,
                    chunks: ChunkRange {
                        start: start as u32,
                        end: end as u32,
                    },
                    len: run.iter().map(|c| u64::from(c.len)).sum(),
                }
            })
            .collect::<Vec<_>>();
        FileRecipe {
            hash: FileHash::from_chunks(&chunks),
            sha256: Sha256::of(&chunks.len().to_le_bytes()),
            size: terms.iter().map(|t| t.len).sum(),
            terms,
            kind: Kind::File,
        }
    })
}

fn shard() -> impl Strategy<Value = Shard> {
    proptest::collection::vec(chunk_table(), 1..5).prop_flat_map(|xorbs| {
        proptest::collection::vec(recipe(xorbs.clone()), 0..5).prop_map(move |files| Shard {
            xorbs: xorbs.clone(),
            files,
        })
    })
}

fn reconstruction() -> impl Strategy<Value = Reconstruction> {
    (
        shard(),
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        "[a-z]{1,20}",
    )
        .prop_filter("needs a non-empty file", |(s, ..)| {
            s.files.iter().any(|f| f.size > 0)
        })
        .prop_map(|(s, a, b, host)| {
            let f = s.files.iter().find(|f| f.size > 0).unwrap().clone();
            let (a, b) = (
                a.index(f.size as usize) as u64,
                b.index(f.size as usize) as u64,
            );
            let range = ByteRange {
                start: a.min(b),
                end: a.max(b) + 1,
            };
            // Terms from the one holding range.start to the one holding range.end - 1.
            let mut pos = 0;
            let mut offset = 0;
            let mut terms = Vec::new();
            for t in &f.terms {
                let (t_start, t_end) = (pos, pos + t.len);
                pos = t_end;
                if t_end <= range.start || t_start >= range.end {
                    continue;
                }
                if terms.is_empty() {
                    offset = range.start - t_start;
                }
                let table = s.xorbs.iter().find(|x| x.hash == t.xorb).unwrap();
                terms.push(ReconstructionTerm {
                    xorb: t.xorb,
                    chunks: t.chunks,
                    len: t.len,
                    range_hash: RangeHash::from_chunks(&table.chunks[t.chunks.as_usize()]),
                });
            }
            let fetch = terms
                .iter()
                .map(|t| XorbFetch {
                    xorb: t.xorb,
                    url: format!("https://{host}.example/v1/xorbs/{}", t.xorb),
                    ranges: vec![FetchRange {
                        chunks: t.chunks,
                        bytes: ByteRange {
                            start: 16,
                            end: 16 + t.len + 12,
                        },
                    }],
                })
                .collect();
            Reconstruction {
                file: f.hash,
                file_size: f.size,
                range,
                offset_into_first_term: offset,
                terms,
                fetch,
            }
        })
}

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) -> Result<(), TestCaseError> {
    prop_assert_eq!(&M::from_bytes(&m.to_bytes()).unwrap(), m);
    prop_assert_eq!(&M::from_json(m.to_json().as_bytes()).unwrap(), m);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn shards_round_trip(s in shard()) {
        for f in &s.files {
            f.verify(|h| s.xorbs.iter().find(|x| x.hash == *h).map(|x| &x.chunks[..])).unwrap();
        }
        round_trip(&s)?;
    }

    #[test]
    fn reconstructions_round_trip(r in reconstruction()) {
        round_trip(&r)?;
    }

    #[test]
    fn dedup_messages_round_trip(
        hashes in proptest::collection::vec(hash32(), 0..100),
        found in proptest::collection::vec(proptest::option::of((hash32(), 0u32..8192)), 0..100),
    ) {
        round_trip(&DedupQuery { chunks: hashes.into_iter().map(ChunkHash::from_bytes).collect() })?;
        round_trip(&DedupAnswer {
            found: found
                .into_iter()
                .map(|o| o.map(|(x, index)| ChunkLocation { xorb: XorbHash::from_bytes(x), index }))
                .collect(),
        })?;
    }

    #[test]
    fn truncated_messages_are_refused(s in shard(), cut in any::<prop::sample::Index>()) {
        let bytes = s.to_bytes();
        let cut = cut.index(bytes.len());
        prop_assert!(Shard::from_bytes(&bytes[..cut]).is_err());
    }
}

#[test]
fn short_input_cannot_claim_a_large_allocation() {
    // A dedup answer announcing 10 million entries in 13 bytes: refused by
    // the decode budget before any allocation of that size.
    let mut bytes = b"CDDA".to_vec();
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.push(252);
    bytes.extend_from_slice(&10_000_000u32.to_le_bytes());
    let err = DedupAnswer::from_bytes(&bytes).unwrap_err();
    assert!(matches!(err, MessageError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("limit"), "{err}");
}
