//! The contract every [`Index`] keeps, as one suite each implementation
//! runs against a fresh, empty index.

use cas_protocol::messages::ChunkLocation;
use cas_protocol::shard::{FileRecipe, Term};
use cas_protocol::xorb::{Compression, EncodedChunk, XorbBuilder, XorbView};
use cas_protocol::{ChunkHash, ChunkRange, FileHash, Kind, Sha256};

use super::{Index, Totals, XorbRecord, XorbSummary};

/// What [`run`] wrote, for [`check_written`] after a reopen.
pub struct Written {
    xorb: cas_protocol::xorb::BuiltXorb,
    record: XorbRecord,
    recipe: FileRecipe,
}

/// Writes one xorb and one file, checks every read; panics on the first
/// broken promise.
pub fn run(index: &impl Index) -> Written {
    let mut b = XorbBuilder::new();
    for d in [&b"one"[..], b"two"] {
        b.try_push(EncodedChunk::encode(d, Compression::Raw).unwrap())
            .unwrap();
    }
    let xorb = b.finish().unwrap();
    let record = XorbRecord {
        entries: XorbView::parse(&xorb.bytes).unwrap().entries().to_vec(),
    };
    assert_eq!(record.object_len(), xorb.bytes.len() as u64);
    let recipe = FileRecipe {
        hash: FileHash::from_chunks(&xorb.chunks),
        sha256: Sha256::of(b"onetwo"),
        size: 6,
        terms: vec![Term {
            xorb: xorb.hash,
            chunks: ChunkRange { start: 0, end: 2 },
            len: 6,
        }],
        kind: Kind::File,
    };
    assert_eq!(index.totals().unwrap(), Totals::default());
    assert_eq!(index.xorb(&xorb.hash).unwrap(), None);
    assert_eq!(index.file(&recipe.hash).unwrap(), None);
    index.add_xorb(&xorb.hash, &record).unwrap();
    index.add_files(std::slice::from_ref(&recipe)).unwrap();
    let written = Written {
        xorb,
        record,
        recipe,
    };
    check_written(index, &written);
    damage(index, &written);
    lifecycle(index, &written);
    written
}

/// Listings name what is recorded; a withdrawn xorb leaves dedup but
/// stays recorded; removed files and xorbs are gone (with their chunk
/// entries and damaged marks) and can be recorded again.
fn lifecycle(index: &impl Index, w: &Written) {
    let h = w.xorb.hash;
    let summary = XorbSummary {
        hash: h,
        bytes: w.xorb.bytes.len() as u64,
        chunks: 2,
    };
    assert_eq!(index.xorbs().unwrap(), vec![summary]);
    assert_eq!(index.file_hashes().unwrap(), vec![w.recipe.hash]);
    index.withdraw_xorb(&h).unwrap();
    assert_eq!(index.chunk(&w.xorb.chunks[0].hash).unwrap(), None);
    assert_eq!(index.xorb(&h).unwrap(), Some(w.record.clone()));
    assert!(!index.is_damaged(&h).unwrap());
    index.add_xorb(&h, &w.record).unwrap();
    assert!(index.chunk(&w.xorb.chunks[0].hash).unwrap().is_some());

    index.mark_damaged(&h).unwrap();
    index.remove(&[w.recipe.hash], &[h]).unwrap();
    assert_eq!(index.xorb(&h).unwrap(), None);
    assert_eq!(index.file(&w.recipe.hash).unwrap(), None);
    assert_eq!(index.chunk(&w.xorb.chunks[1].hash).unwrap(), None);
    assert!(!index.is_damaged(&h).unwrap());
    assert_eq!(index.xorbs().unwrap(), vec![]);
    assert_eq!(index.file_hashes().unwrap(), vec![]);
    assert_eq!(index.totals().unwrap(), Totals::default());
    index.remove(&[w.recipe.hash], &[h]).unwrap();
    index.add_xorb(&h, &w.record).unwrap();
    index.add_files(std::slice::from_ref(&w.recipe)).unwrap();
}

/// A damaged xorb stays recorded but leaves dedup; storing it again heals
/// it and brings its chunks back.
fn damage(index: &impl Index, w: &Written) {
    let h = w.xorb.hash;
    assert!(!index.is_damaged(&h).unwrap());
    assert!(index.mark_damaged(&h).unwrap());
    assert!(!index.mark_damaged(&h).unwrap(), "marked once");
    assert!(index.is_damaged(&h).unwrap());
    assert_eq!(index.chunk(&w.xorb.chunks[0].hash).unwrap(), None);
    assert_eq!(index.xorb(&h).unwrap(), Some(w.record.clone()));
    assert!(!index
        .mark_damaged(&cas_protocol::XorbHash::from_bytes([3; 32]))
        .unwrap());
    index.add_xorb(&h, &w.record).unwrap();
    assert!(!index.is_damaged(&h).unwrap());
}

/// What [`run`] wrote is all there.
pub fn check_written(index: &impl Index, w: &Written) {
    assert_eq!(index.xorb(&w.xorb.hash).unwrap(), Some(w.record.clone()));
    assert_eq!(
        index.chunk(&w.xorb.chunks[1].hash).unwrap(),
        Some(ChunkLocation {
            xorb: w.xorb.hash,
            index: 1
        })
    );
    assert_eq!(index.file(&w.recipe.hash).unwrap(), Some(w.recipe.clone()));
    assert_eq!(
        index.file_by_sha256(&w.recipe.sha256).unwrap(),
        Some(w.recipe.hash)
    );
    assert_eq!(index.file_by_sha256(&Sha256::of(b"absent")).unwrap(), None);
    assert_eq!(index.chunk(&ChunkHash::of(b"absent")).unwrap(), None);
    assert_eq!(
        index.totals().unwrap(),
        Totals {
            xorbs: 1,
            xorb_bytes: w.xorb.bytes.len() as u64,
            files: 1
        }
    );
}
