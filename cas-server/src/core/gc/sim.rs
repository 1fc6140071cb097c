//! A seeded, bounded randomized simulation of a running server over the
//! in-memory stores: uploads (dedup answer, xorb, shard, root or commit,
//! each a separate step, so other work and time pass in between), branch
//! and root deletes, and gc runs planned and executed as separate steps
//! (dry or real, with random grace periods), under a simulated clock.
//!
//! After every step, every rooted file reads back byte-identical and
//! every rooted tree reads back verified. A request fails only when the
//! lease it relied on had expired (the client was slower than the lease
//! term): then a shard is refused, never committed over a deleted xorb.
//! At the end, with every root gone and the term over, gc frees every
//! xorb and file.
//!
//! `CAS_GC_SIM_SEED=N` reruns one seed; a failure prints its seed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use cas_protocol::messages::{ChunkLocation, DedupQuery};
use cas_protocol::repo::{RefKind, RefName, RepoId, RepoType};
use cas_protocol::shard::{FileRecipe, Shard, Term, XorbChunkTable};
use cas_protocol::xorb::{BuiltXorb, Compression, EncodedChunk, XorbBuilder};
use cas_protocol::{
    ByteRange, ChunkHash, ChunkInfo, ChunkRange, Encoding, FileHash, Kind, Message, Sha256,
};
use futures_util::TryStreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{GcOptions, GcPlan};
use crate::core::refs::{Change, ChangeRequest};
use crate::core::{Clock, Core, CoreError};
use crate::index::{Index, MemIndex};
use crate::store::{KeyPrefix, MemStore, ObjectKind, ObjectStore};

type MemCore = Core<MemStore, MemIndex>;

/// The lease term, in simulated time.
const TERM: Duration = Duration::from_millis(1000);
const TERM_MS: u64 = 1000;
/// Distinct chunk contents files are made of (few: much dedup).
const CHUNKS: usize = 24;
const STEPS: usize = 2500;
/// Uploads in flight at once, at most.
const UPLOADS: usize = 4;
/// Rooted files at most (each is read back after every step).
const MAX_ROOTED: usize = 12;
const BRANCHES: usize = 3;

fn chunk(id: usize) -> Vec<u8> {
    (0..256u32)
        .map(|i| (i as u8).wrapping_mul(id as u8 | 1).wrapping_add(id as u8))
        .collect()
}

/// What a file is made of, and what it hashes to.
struct Content {
    chunks: Vec<usize>,
    bytes: Vec<u8>,
    infos: Vec<ChunkInfo>,
}

impl Content {
    fn new(chunks: Vec<usize>) -> Self {
        let parts: Vec<Vec<u8>> = chunks.iter().map(|&c| chunk(c)).collect();
        let infos = parts
            .iter()
            .map(|p| ChunkInfo {
                hash: ChunkHash::of(p),
                len: p.len() as u32,
            })
            .collect();
        Self {
            chunks,
            bytes: parts.concat(),
            infos,
        }
    }

    fn hash(&self) -> FileHash {
        FileHash::from_chunks(&self.infos)
    }
}

enum Stage {
    /// Ask which chunks are stored.
    Dedup,
    /// Upload a xorb of the chunks dedup did not find.
    Xorb(Vec<Option<ChunkLocation>>),
    /// Commit the shard.
    Shard(Vec<Option<ChunkLocation>>, Option<BuiltXorb>),
    /// Root the file (a root, or a commit to a branch), committed then.
    Root(u64),
}

struct Upload {
    content: Content,
    stage: Stage,
    /// When the dedup answer (the first lease) was given.
    asked_ms: u64,
}

/// What a branch's history names: its regular files (with their bytes)
/// and its trees.
type History = (BTreeMap<FileHash, Vec<u8>>, BTreeSet<FileHash>);

struct Sim {
    core: MemCore,
    clock: Clock,
    rng: StdRng,
    repo: RepoId,
    uploads: Vec<Upload>,
    /// Roots: file and its bytes.
    roots: BTreeMap<FileHash, Vec<u8>>,
    branches: BTreeMap<usize, History>,
    plan: Option<GcPlan>,
    step: usize,
    /// What happened, counted (printed at the end).
    counts: BTreeMap<&'static str, u64>,
}

/// Prints the seed when a simulation panics.
struct SeedOnPanic(u64);

impl Drop for SeedOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "gc simulation failed: rerun with CAS_GC_SIM_SEED={}",
                self.0
            );
        }
    }
}

impl Sim {
    async fn new(seed: u64) -> Self {
        let clock = Clock::manual(1_000_000);
        let core =
            MemCore::new(MemStore::default(), MemIndex::default()).with_leases(TERM, clock.clone());
        let repo = RepoId::new(RepoType::Model, "org", "sim").unwrap();
        core.create_repo(&repo).await.unwrap();
        Self {
            core,
            clock,
            rng: StdRng::seed_from_u64(seed),
            repo,
            uploads: vec![],
            roots: BTreeMap::new(),
            branches: BTreeMap::new(),
            plan: None,
            step: 0,
            counts: BTreeMap::new(),
        }
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    fn branch(n: usize) -> RefName {
        RefName::new(&format!("b{n}")).unwrap()
    }

    fn rooted(&self) -> usize {
        self.roots.len() + self.branches.values().map(|b| b.0.len()).sum::<usize>()
    }

    async fn step(&mut self) {
        self.step += 1;
        match self.rng.gen_range(0..100) {
            0..=39 => self.advance_upload().await,
            40..=43 => {
                if !self.uploads.is_empty() {
                    let i = self.rng.gen_range(0..self.uploads.len());
                    self.uploads.swap_remove(i);
                    self.count("upload abandoned");
                }
            }
            44..=53 => self.delete_root().await,
            54..=58 => self.delete_branch().await,
            59..=74 => self.gc().await,
            _ => {
                let ms = self.rng.gen_range(0..TERM_MS / 2);
                self.clock.advance(Duration::from_millis(ms));
            }
        }
    }

    async fn advance_upload(&mut self) {
        if self.uploads.is_empty() || (self.uploads.len() < UPLOADS && self.rng.gen_bool(0.3)) {
            let n = self.rng.gen_range(1..=3);
            let chunks = (0..n).map(|_| self.rng.gen_range(0..CHUNKS)).collect();
            self.uploads.push(Upload {
                content: Content::new(chunks),
                stage: Stage::Dedup,
                asked_ms: 0,
            });
        }
        let i = self.rng.gen_range(0..self.uploads.len());
        let mut up = self.uploads.swap_remove(i);
        let now = self.now();
        let seed_step = self.step;
        let stage = std::mem::replace(&mut up.stage, Stage::Dedup);
        up.stage = match stage {
            Stage::Dedup => {
                let query = DedupQuery {
                    chunks: up.content.infos.iter().map(|c| c.hash).collect(),
                };
                up.asked_ms = now;
                Stage::Xorb(self.core.dedup(query).await.unwrap().found)
            }
            Stage::Xorb(found) => {
                let mut b = XorbBuilder::new();
                let mut packed = BTreeSet::new();
                for (c, f) in up.content.chunks.iter().zip(&found) {
                    if f.is_none() && packed.insert(*c) {
                        b.try_push(EncodedChunk::encode(&chunk(*c), Compression::Raw).unwrap())
                            .unwrap();
                    }
                }
                let built = if b.is_empty() {
                    None
                } else {
                    let x = b.finish().unwrap();
                    self.core
                        .put_xorb(x.hash, Bytes::from(x.bytes.clone()))
                        .await
                        .unwrap();
                    Some(x)
                };
                Stage::Shard(found, built)
            }
            Stage::Shard(found, built) => {
                let recipe = recipe(&up.content, &found, built.as_ref());
                let shard = Shard {
                    xorbs: built.iter().map(XorbChunkTable::from).collect(),
                    files: vec![recipe],
                };
                match self
                    .core
                    .commit_shard(shard.to_bytes().into(), Encoding::Binary)
                    .await
                {
                    Ok(_) => Stage::Root(now),
                    Err(e) => {
                        assert!(
                            matches!(e, CoreError::UnknownXorb(_)),
                            "step {seed_step}: shard refused: {e}"
                        );
                        assert!(
                            now >= up.asked_ms + TERM_MS,
                            "step {seed_step}: a shard committed {} ms after its dedup answer (lease term {TERM_MS}) was refused: {e}",
                            now - up.asked_ms
                        );
                        self.count("shard refused (lease expired)");
                        return;
                    }
                }
            }
            Stage::Root(committed_ms) => {
                self.root(&up.content, committed_ms).await;
                return;
            }
        };
        self.uploads.push(up);
    }

    /// The last stage: a root or a commit to a branch.
    async fn root(&mut self, content: &Content, committed_ms: u64) {
        let now = self.now();
        let file = content.hash();
        let step = self.step;
        let expired = now >= committed_ms + TERM_MS;
        if self.rooted() >= MAX_ROOTED {
            self.count("upload dropped (enough roots)");
            return;
        }
        if self.rng.gen_bool(0.5) {
            match self.core.put_root(file).await {
                Ok(_) => {
                    self.roots.insert(file, content.bytes.clone());
                    self.count("root");
                }
                Err(e) => {
                    assert!(
                        expired,
                        "step {step}: root of a file committed {} ms ago failed: {e}",
                        now - committed_ms
                    );
                    assert!(matches!(e, CoreError::NotFound(_)), "{e}");
                    self.count("root refused (lease expired)");
                }
            }
            return;
        }
        let b = self.rng.gen_range(0..BRANCHES);
        let req = ChangeRequest {
            branch: Self::branch(b),
            changes: vec![Change::Put {
                path: format!("f{}", &file.to_string()[..12]),
                file,
                size: content.bytes.len() as u64,
            }],
            message: "sim".into(),
            author: "sim".into(),
            parent: None,
        };
        match self.core.commit_changes(&self.repo, req).await {
            Ok(info) => {
                let entry = self.branches.entry(b).or_default();
                entry.0.insert(file, content.bytes.clone());
                entry.1.insert(info.commit.tree);
                self.count("commit");
            }
            Err(e) => {
                assert!(
                    expired,
                    "step {step}: commit of a file committed {} ms ago failed: {e}",
                    now - committed_ms
                );
                assert!(matches!(e, CoreError::InvalidChange(_)), "{e}");
                self.count("commit refused (lease expired)");
            }
        }
    }

    async fn delete_root(&mut self) {
        if self.roots.is_empty() {
            return;
        }
        let i = self.rng.gen_range(0..self.roots.len());
        let file = *self.roots.keys().nth(i).unwrap();
        self.core.delete_root(file).await.unwrap();
        self.roots.remove(&file);
        self.count("root deleted");
    }

    async fn delete_branch(&mut self) {
        let Some(&b) = self.branches.keys().next() else {
            return;
        };
        let b = if self.rng.gen_bool(0.5) {
            b
        } else {
            *self.branches.keys().last().unwrap()
        };
        self.core
            .delete_ref(&self.repo, RefKind::Branch, &Self::branch(b))
            .await
            .unwrap();
        self.branches.remove(&b);
        self.count("branch deleted");
    }

    async fn gc(&mut self) {
        let step = self.step;
        match self.plan.take() {
            None => {
                let grace = [0, TERM_MS / 2, TERM_MS, 2 * TERM_MS][self.rng.gen_range(0..4)];
                let options = GcOptions::default().with_grace(Duration::from_millis(grace));
                self.plan = Some(self.core.gc_plan(&options).await.unwrap_or_else(|e| {
                    panic!("step {step}: a plan failed: {e}");
                }));
                self.count("gc planned");
            }
            Some(_) if self.rng.gen_bool(0.2) => self.count("gc dry run"),
            Some(plan) => {
                let stale = self.now() >= plan.started_ms + TERM_MS;
                match plan.execute(&self.core).await {
                    Ok(r) => {
                        assert!(!stale, "step {step}: a stale plan was executed");
                        *self.counts.entry("xorbs deleted").or_default() += r.deleted.xorbs;
                        *self.counts.entry("xorbs condemned").or_default() += r.condemned.xorbs;
                        *self.counts.entry("xorbs kept for a lease").or_default() +=
                            r.skipped_leased;
                        self.count("gc executed");
                    }
                    Err(CoreError::Conflict(_)) if stale => self.count("gc plan stale"),
                    Err(e) => panic!("step {step}: executing a plan failed: {e}"),
                }
            }
        }
    }

    /// Every rooted file reads back byte-identical, every rooted tree
    /// reads back verified.
    async fn check(&self) {
        let step = self.step;
        let files = self
            .roots
            .iter()
            .chain(self.branches.values().flat_map(|b| &b.0));
        for (file, bytes) in files {
            assert_eq!(
                &read(&self.core, *file)
                    .await
                    .unwrap_or_else(|e| panic!("step {step}: rooted file {file}: {e}")),
                bytes,
                "step {step}: rooted file {file}"
            );
        }
        for tree in self.branches.values().flat_map(|b| &b.1) {
            read(&self.core, *tree)
                .await
                .unwrap_or_else(|e| panic!("step {step}: rooted tree {tree}: {e}"));
        }
    }

    /// Drops every root, lets every lease expire, and collects twice:
    /// nothing is left.
    async fn finish(mut self) {
        self.uploads.clear();
        for f in std::mem::take(&mut self.roots).into_keys() {
            self.core.delete_root(f).await.unwrap();
        }
        for b in std::mem::take(&mut self.branches).into_keys() {
            self.core
                .delete_ref(&self.repo, RefKind::Branch, &Self::branch(b))
                .await
                .unwrap();
        }
        self.clock.advance(TERM + Duration::from_millis(1));
        let zero = GcOptions::default().with_grace(Duration::ZERO);
        for _ in 0..2 {
            self.core.gc(&zero, false).await.unwrap();
        }
        let objects = &self.core.objects;
        let xorbs = objects
            .list(&KeyPrefix::kind(ObjectKind::Xorb))
            .await
            .unwrap();
        let marks = objects
            .list(&KeyPrefix::kind(ObjectKind::Condemned))
            .await
            .unwrap();
        assert!(xorbs.is_empty() && marks.is_empty(), "{xorbs:?} {marks:?}");
        assert!(self.core.index.xorbs().unwrap().is_empty());
        assert!(self.core.index.file_hashes().unwrap().is_empty());
        let plan = self.core.gc_plan(&zero).await.unwrap();
        assert!(plan.xorbs.is_empty() && plan.dead_files.is_empty());
        eprintln!("{:?}", self.counts);
    }
}

/// The recipe of an upload: each chunk where dedup found it, or in the
/// xorb the upload built.
fn recipe(
    content: &Content,
    found: &[Option<ChunkLocation>],
    built: Option<&BuiltXorb>,
) -> FileRecipe {
    let terms = content
        .infos
        .iter()
        .zip(found)
        .map(|(info, f)| {
            let (xorb, index) = match f {
                Some(loc) => (loc.xorb, loc.index),
                None => {
                    let x = built.expect("a xorb for what dedup did not find");
                    let i = x.chunks.iter().position(|c| c.hash == info.hash).unwrap();
                    (x.hash, i as u32)
                }
            };
            Term {
                xorb,
                chunks: ChunkRange {
                    start: index,
                    end: index + 1,
                },
                len: u64::from(info.len),
            }
        })
        .collect();
    FileRecipe {
        hash: content.hash(),
        sha256: Sha256::of(&content.bytes),
        size: content.bytes.len() as u64,
        terms,
        kind: Kind::File,
    }
}

async fn read(core: &MemCore, file: FileHash) -> Result<Vec<u8>, CoreError> {
    let recipe = core.recipe(file).await?;
    let range = ByteRange {
        start: 0,
        end: recipe.size,
    };
    let parts: Vec<Bytes> = core.file_stream(recipe, range).try_collect().await?;
    Ok(parts.concat())
}

async fn run(seed: u64) {
    let _seed = SeedOnPanic(seed);
    let mut sim = Sim::new(seed).await;
    for _ in 0..STEPS {
        sim.step().await;
        sim.check().await;
    }
    sim.finish().await;
}

/// Thousands of interleaved steps per seed; no rooted file is ever
/// unreadable, and all is freed at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_uploads_deletes_and_gc_never_lose_rooted_data() {
    let seeds: Vec<u64> = match std::env::var("CAS_GC_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("CAS_GC_SIM_SEED is a number")],
        Err(_) => vec![1, 2, 3],
    };
    for seed in seeds {
        run(seed).await;
    }
}
