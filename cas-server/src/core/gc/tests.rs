//! Garbage collection over the in-memory stores.

use std::time::Duration;

use bytes::Bytes;
use cas_protocol::shard::{FileRecipe, Shard, Term, XorbChunkTable};
use cas_protocol::xorb::{BuiltXorb, Compression, EncodedChunk, XorbBuilder};
use cas_protocol::{ChunkRange, Encoding, FileHash, Kind, Message, Sha256};

use super::*;
use crate::core::Core;
use crate::index::{Index, MemIndex};
use crate::store::{MemStore, ObjectKey, ObjectStore};

type MemCore = Core<MemStore, MemIndex>;

fn chunk(seed: u8) -> Vec<u8> {
    (0..3000u32)
        .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
        .collect()
}

fn xorb(seeds: &[u8]) -> BuiltXorb {
    let mut b = XorbBuilder::new();
    for &s in seeds {
        b.try_push(EncodedChunk::encode(&chunk(s), Compression::Raw).unwrap())
            .unwrap();
    }
    b.finish().unwrap()
}

/// Stores a xorb and commits one file made of its chunks `range`.
async fn file(core: &MemCore, x: &BuiltXorb, range: ChunkRange) -> FileRecipe {
    core.put_xorb(x.hash, Bytes::from(x.bytes.clone()))
        .await
        .unwrap();
    let infos = &x.chunks[range.as_usize()];
    let data: Vec<u8> = infos
        .iter()
        .flat_map(|c| {
            let i = x.chunks.iter().position(|d| d.hash == c.hash).unwrap();
            chunk(x_seed(x, i))
        })
        .collect();
    let recipe = FileRecipe {
        hash: FileHash::from_chunks(infos),
        sha256: Sha256::of(&data),
        size: data.len() as u64,
        terms: vec![Term {
            xorb: x.hash,
            chunks: range,
            len: data.len() as u64,
        }],
        kind: Kind::File,
    };
    let shard = Shard {
        xorbs: vec![XorbChunkTable::from(x)],
        files: vec![recipe.clone()],
    };
    core.commit_shard(shard.to_bytes().into(), Encoding::Binary)
        .await
        .unwrap();
    recipe
}

/// The seed of chunk `i` of a xorb built by [`xorb`] (found by content).
fn x_seed(x: &BuiltXorb, i: usize) -> u8 {
    (0..=255u8)
        .find(|&s| cas_protocol::ChunkHash::of(&chunk(s)) == x.chunks[i].hash)
        .unwrap()
}

fn zero_grace() -> GcOptions {
    GcOptions::default().with_grace(Duration::ZERO)
}

/// A root keeps its file and xorb; once removed, a run condemns the xorb
/// (out of dedup, still stored), a run after the grace period deletes it;
/// a xorb still partly used is kept and its dead fraction reported.
#[tokio::test]
async fn roots_keep_and_two_runs_free() {
    let core = MemCore::new(MemStore::default(), MemIndex::default());
    let a = xorb(&[1, 2]);
    let b = xorb(&[3, 4, 5, 6]);
    let fa = file(&core, &a, ChunkRange { start: 0, end: 2 }).await;
    let fb = file(&core, &b, ChunkRange { start: 0, end: 1 }).await;
    core.put_root(fa.hash).await.unwrap();
    core.put_root(fb.hash).await.unwrap();

    let plan = core.gc_plan(&GcOptions::default()).await.unwrap();
    assert!(plan.xorbs.is_empty() && plan.dead_files.is_empty());
    assert_eq!(plan.live.xorbs, 2);
    assert_eq!(plan.partial.len(), 1, "b has unused chunks");
    assert_eq!(plan.partial[0].xorb, b.hash);
    assert!(plan.partial[0].dead_fraction > 0.7);

    core.delete_root(fa.hash).await.unwrap();
    assert!(core.delete_root(fa.hash).await.is_err(), "removed once");
    let plan = core.gc_plan(&zero_grace()).await.unwrap();
    assert_eq!(plan.dead_files, vec![fa.hash]);
    assert_eq!(plan.condemn.xorbs, 1);
    assert_eq!(plan.condemn.bytes, a.bytes.len() as u64);
    let report = plan.execute(&core).await.unwrap();
    assert_eq!(report.condemned.xorbs, 1);
    assert_eq!(report.files_removed, 1);
    let q = cas_protocol::messages::DedupQuery {
        chunks: vec![a.chunks[0].hash],
    };
    assert_eq!(core.dedup(q).await.unwrap().found, vec![None]);
    assert!(core
        .objects
        .len(&ObjectKey::xorb(&a.hash))
        .await
        .unwrap()
        .is_some());

    let plan = core.gc_plan(&zero_grace()).await.unwrap();
    assert_eq!(plan.delete.bytes, a.bytes.len() as u64);
    plan.execute(&core).await.unwrap();
    assert!(core
        .objects
        .len(&ObjectKey::xorb(&a.hash))
        .await
        .unwrap()
        .is_none());
    assert!(core.index.xorb(&a.hash).unwrap().is_none());
    assert!(core.fsck(&FsckOptions::default()).await.unwrap().clean);
    let plan = core.gc_plan(&zero_grace()).await.unwrap();
    assert!(plan.xorbs.is_empty(), "nothing left to do");
}

/// A condemned xorb whose content is committed and rooted again is
/// recovered, not deleted.
#[tokio::test]
async fn a_condemned_xorb_referenced_again_is_recovered() {
    let core = MemCore::new(MemStore::default(), MemIndex::default());
    let a = xorb(&[7, 8]);
    let all = ChunkRange { start: 0, end: 2 };
    file(&core, &a, all).await;
    core.gc_plan(&GcOptions::default())
        .await
        .unwrap()
        .execute(&core)
        .await
        .unwrap();
    let f = file(&core, &a, all).await;
    core.put_root(f.hash).await.unwrap();
    let plan = core.gc_plan(&zero_grace()).await.unwrap();
    assert_eq!(plan.recover.xorbs, 1);
    assert_eq!(plan.delete.xorbs, 0);
    plan.execute(&core).await.unwrap();
    let q = cas_protocol::messages::DedupQuery {
        chunks: vec![a.chunks[0].hash],
    };
    assert!(core.dedup(q).await.unwrap().found[0].is_some());
    let plan = core.gc_plan(&zero_grace()).await.unwrap();
    assert!(plan.xorbs.is_empty());
}
