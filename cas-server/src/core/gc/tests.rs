//! Garbage collection over the in-memory stores.

use std::time::Duration;

use bytes::Bytes;
use cas_protocol::shard::{FileRecipe, Shard, Term, XorbChunkTable};
use cas_protocol::xorb::{BuiltXorb, Compression, EncodedChunk, XorbBuilder};
use cas_protocol::{ChunkRange, Encoding, FileHash, Kind, Message, Sha256};

use super::*;
use crate::core::{Clock, Core, CoreError};
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

/// How long leases last in these tests.
const TERM: Duration = Duration::from_secs(3600);

/// A core whose clock moves only when a test says so.
fn core() -> (MemCore, Clock) {
    let clock = Clock::manual(1_000_000);
    let core =
        MemCore::new(MemStore::default(), MemIndex::default()).with_leases(TERM, clock.clone());
    (core, clock)
}

/// Past every lease taken so far.
fn after_leases(clock: &Clock) {
    clock.advance(TERM + Duration::from_millis(1));
}

/// A root keeps its file and xorb; once removed, a run condemns the xorb
/// (out of dedup, still stored), a run after the grace period deletes it;
/// a xorb still partly used is kept and its dead fraction reported.
#[tokio::test]
async fn roots_keep_and_two_runs_free() {
    let (core, clock) = core();
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
    after_leases(&clock);
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
    let (core, clock) = core();
    let a = xorb(&[7, 8]);
    let all = ChunkRange { start: 0, end: 2 };
    file(&core, &a, all).await;
    after_leases(&clock);
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

fn query(x: &BuiltXorb) -> cas_protocol::messages::DedupQuery {
    cas_protocol::messages::DedupQuery {
        chunks: vec![x.chunks[0].hash],
    }
}

async fn stored(core: &MemCore, x: &BuiltXorb) -> bool {
    core.objects
        .len(&ObjectKey::xorb(&x.hash))
        .await
        .unwrap()
        .is_some()
}

/// A dedup answer, an upload and an unrooted shard commit each protect
/// what they name for the lease term: gc (with no grace at all) neither
/// condemns nor removes it; after the term it does.
#[tokio::test]
async fn leases_protect_dedup_answers_uploads_and_unrooted_commits() {
    let (core, clock) = core();
    // A dedup answer: c's file was committed long ago and is dead, but a
    // client was just told c holds its chunk.
    let c = xorb(&[14, 15]);
    file(&core, &c, ChunkRange { start: 0, end: 2 }).await;
    after_leases(&clock);
    assert!(core.dedup(query(&c)).await.unwrap().found[0].is_some());
    // An unrooted commit (its files and xorb).
    let a = xorb(&[11, 12]);
    let fa = file(&core, &a, ChunkRange { start: 0, end: 2 }).await;
    // An upload whose shard is not committed yet.
    let b = xorb(&[13]);
    core.put_xorb(b.hash, Bytes::from(b.bytes.clone()))
        .await
        .unwrap();

    for _ in 0..2 {
        let report = core
            .gc_plan(&zero_grace())
            .await
            .unwrap()
            .execute(&core)
            .await
            .unwrap();
        assert_eq!(
            report.condemned.xorbs + report.deleted.xorbs,
            0,
            "{report:?}"
        );
        assert_eq!(report.files_leased, 1, "fa is kept");
    }
    for x in [&a, &b, &c] {
        assert!(stored(&core, x).await);
        assert!(core.dedup(query(x)).await.unwrap().found[0].is_some());
    }
    assert!(core.file_info(fa.hash).await.is_ok());

    // The client roots fa in time: it survives the term.
    core.put_root(fa.hash).await.unwrap();
    after_leases(&clock);
    let report = core
        .gc_plan(&zero_grace())
        .await
        .unwrap()
        .execute(&core)
        .await
        .unwrap();
    assert_eq!(report.condemned.xorbs, 2, "b and c: {report:?}");
    let report = core
        .gc_plan(&zero_grace())
        .await
        .unwrap()
        .execute(&core)
        .await
        .unwrap();
    assert_eq!(report.deleted.xorbs, 2);
    assert!(stored(&core, &a).await);
    assert!(!stored(&core, &b).await && !stored(&core, &c).await);
    assert!(core.fsck(&FsckOptions::default()).await.unwrap().clean);
}

/// The fence between gc's deletion and a shard commit: a commit that
/// comes first keeps its xorb (the plan to delete it is not carried
/// out); one that comes after the deletion is refused, never committed
/// over a missing xorb.
#[tokio::test]
async fn deletion_and_commit_exclude_each_other() {
    let (core, clock) = core();
    let a = xorb(&[21, 22]);
    let all = ChunkRange { start: 0, end: 2 };
    let f = file(&core, &a, all).await;
    after_leases(&clock);
    let report = core
        .gc_plan(&zero_grace())
        .await
        .unwrap()
        .execute(&core)
        .await
        .unwrap();
    assert_eq!((report.condemned.xorbs, report.files_removed), (1, 1));
    after_leases(&clock);

    // Planned to delete; then the file is committed again (naming the
    // condemned xorb) and rooted before the plan is carried out.
    let plan = core.gc_plan(&zero_grace()).await.unwrap();
    assert_eq!(plan.delete.xorbs, 1);
    let shard = Shard {
        xorbs: vec![],
        files: vec![f.clone()],
    };
    core.commit_shard(shard.to_bytes().into(), Encoding::Binary)
        .await
        .unwrap();
    core.put_root(f.hash).await.unwrap();
    let report = plan.execute(&core).await.unwrap();
    assert_eq!((report.deleted.xorbs, report.skipped_leased), (0, 1));
    // The next run finds it referenced again: recovered into dedup.
    let plan = core.gc_plan(&zero_grace()).await.unwrap();
    assert_eq!(plan.recover.xorbs, 1);
    plan.execute(&core).await.unwrap();
    assert!(core.dedup(query(&a)).await.unwrap().found[0].is_some());

    // Deleted first: a shard naming it is refused.
    core.delete_root(f.hash).await.unwrap();
    after_leases(&clock);
    for _ in 0..2 {
        core.gc_plan(&zero_grace())
            .await
            .unwrap()
            .execute(&core)
            .await
            .unwrap();
    }
    assert!(!stored(&core, &a).await);
    let err = core
        .commit_shard(shard.to_bytes().into(), Encoding::Binary)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CoreError::UnknownXorb(h) if h == a.hash),
        "{err}"
    );
    assert!(core.put_root(f.hash).await.is_err(), "its file is gone too");
    assert!(core.fsck(&FsckOptions::default()).await.unwrap().clean);
}
