//! Ingest: xorb uploads (verified before they are stored), dedup queries,
//! and shard commits (checked against stored xorbs, then indexed at once).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use cas_protocol::messages::{DedupAnswer, DedupQuery};
use cas_protocol::shard::{FileRecipe, Shard};
use cas_protocol::xorb::{IndexEntry, XorbView};
use cas_protocol::{ChunkInfo, Encoding, Message, Sha256, XorbHash};

use super::lease::Leased;
use super::{blocking, Core, CoreError, Records, ShardCommit, XorbUpload};
use crate::index::{Index, XorbRecord};
use crate::store::{ObjectKey, ObjectStore};

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// Verifies a xorb completely (parse, decompress, re-hash every chunk,
    /// check the xorb hash), stores it, then indexes it. A xorb that is
    /// already stored is accepted without being rewritten (`created` is
    /// false, also when another upload of it stored it meanwhile), unless
    /// it is damaged: then the verified upload replaces the object (a
    /// repair).
    pub async fn put_xorb(&self, hash: XorbHash, body: Bytes) -> Result<XorbUpload, CoreError> {
        if let Some(up) = self.stored_xorb(hash).await? {
            return Ok(up);
        }
        let verify_body = body.clone();
        let entries = blocking(move || {
            let view = XorbView::parse(&verify_body)?;
            view.verify(hash)?;
            Ok(view.entries().to_vec())
        })
        .await?;
        self.store_verified_xorb(hash, body, entries).await
    }

    /// The answer to an upload of a xorb that is stored and not damaged
    /// (nothing to read, verify or write), or `None`. A stored one is
    /// leased: the uploader's shard will name it.
    pub async fn stored_xorb(&self, hash: XorbHash) -> Result<Option<XorbUpload>, CoreError> {
        let hold = self.leases.hold([Leased::Xorb(hash)]).await;
        let (known, damaged) = self
            .with_index(move |i| Ok((i.xorb(&hash)?, i.is_damaged(&hash)?)))
            .await?;
        let up = known.filter(|_| !damaged).map(|r| XorbUpload {
            xorb: hash,
            created: false,
            chunks: r.entries.len(),
            bytes: r.object_len(),
        });
        if up.is_some() {
            hold.keep();
        }
        Ok(up)
    }

    /// Stores and indexes a xorb whose every chunk and whose hash the
    /// caller has verified (a [`cas_protocol::xorb::StreamVerifier`] as it
    /// arrived, or [`Core::put_xorb`]); `entries` is its verified index.
    pub(crate) async fn store_verified_xorb(
        &self,
        hash: XorbHash,
        body: Bytes,
        entries: Vec<IndexEntry>,
    ) -> Result<XorbUpload, CoreError> {
        // Held from before the object is written (gc would take it for
        // an orphan) until its shard commits (leased).
        let hold = self.leases.hold([Leased::Xorb(hash)]).await;
        let damaged = self.with_index(move |i| Ok(i.is_damaged(&hash)?)).await?;
        let record = XorbRecord { entries };
        let bytes = body.len() as u64;
        let key = ObjectKey::xorb(&hash);
        if damaged {
            self.objects.delete(&key).await?;
        }
        // Of concurrent uploads of one xorb, all may pass the index check
        // above; the store says which one wrote it.
        let created = self.objects.put(&key, body).await?;
        let chunks = record.entries.len();
        self.with_index(move |i| Ok(i.add_xorb(&hash, &record)?))
            .await?;
        if damaged {
            tracing::info!(xorb = %hash, "damaged xorb repaired by an upload");
        }
        hold.keep();
        Ok(XorbUpload {
            xorb: hash,
            created: created && !damaged,
            chunks,
            bytes,
        })
    }

    /// Which queried chunks are stored, and where. The xorbs named are
    /// leased: the client will reference them without uploading them.
    pub async fn dedup(&self, query: DedupQuery) -> Result<DedupAnswer, CoreError> {
        let leases = self.leases.clone();
        self.with_index(move |i| {
            // Read and leased in one step: gc withdraws a xorb from dedup
            // either before the read or after the lease (and then sees it).
            let _fence = leases.read_fence();
            let found: Vec<_> = query
                .chunks
                .iter()
                .map(|h| i.chunk(h))
                .collect::<Result<_, _>>()?;
            leases.lease(found.iter().flatten().map(|l| Leased::Xorb(l.xorb)));
            Ok(DedupAnswer { found })
        })
        .await
    }

    /// Checks a shard (in either encoding) against the stored xorbs and
    /// commits its files atomically; nothing changes if any check fails.
    /// The shard object is always stored in the binary form.
    ///
    /// The xorbs and files it names are held from before the check and
    /// leased after a commit: a garbage collection run leaves them alone
    /// until a root or a repository commit names the files. A xorb gc
    /// deleted before the hold fails the check ([`CoreError::UnknownXorb`]).
    ///
    /// A committed recipe is immutable: a file the store has keeps its
    /// recipe and SHA-256, with two exceptions that cannot change its bytes
    /// (the file hash fixes them): a recipe that needs a damaged xorb is
    /// replaced by the new one (a repair), and a disputed SHA-256 is
    /// settled by computing it from the stored bytes (the true one stays or
    /// replaces the recorded one; a false claim fails the whole shard).
    pub async fn commit_shard(
        &self,
        body: Bytes,
        encoding: Encoding,
    ) -> Result<ShardCommit, CoreError> {
        let decode_body = body.clone();
        let shard =
            Arc::new(blocking(move || Ok(Shard::decode_as(&decode_body, encoding)?)).await?);
        let hold = self
            .leases
            .hold(
                shard
                    .named_xorbs()
                    .map(Leased::Xorb)
                    .chain(shard.files.iter().map(|f| Leased::File(f.hash))),
            )
            .await;
        if self.shares_store() {
            // Xorbs another node stored: indexed from the bucket.
            let named: HashSet<XorbHash> = shard.named_xorbs().collect();
            for h in named {
                self.index_stored_xorb(h).await?;
            }
        }
        let s = shard.clone();
        self.with_index(move |index| check_shard(index, &s)).await?;
        let body = match encoding {
            Encoding::Binary => body,
            Encoding::Json => Bytes::from(shard.to_bytes()),
        };
        let _decide = self.commits.lock().await;
        let s = shard.clone();
        let decisions: Vec<Decision> = self
            .with_index(move |i| s.files.iter().map(|f| decide(i, f)).collect())
            .await?;
        let mut write = Vec::new();
        let (mut new_files, mut repaired_files, mut corrected_files) = (0, 0, 0);
        for (f, d) in shard.files.iter().zip(decisions) {
            match d {
                Decision::New => new_files += 1,
                Decision::Keep => continue,
                Decision::Repair => repaired_files += 1,
                Decision::Dispute(stored) => {
                    let truth = self.file_sha256(Arc::new(f.clone())).await?;
                    if truth != f.sha256 {
                        return Err(CoreError::Sha256Mismatch {
                            file: f.hash,
                            stored,
                            claimed: f.sha256,
                        });
                    }
                    tracing::warn!(file = %f.hash, %stored, %truth, "recorded SHA-256 was wrong; corrected from the file's bytes");
                    corrected_files += 1;
                }
            }
            write.push(f.clone());
        }
        let id = blake3::hash(&body);
        self.objects
            .put(&ObjectKey::shard(id.as_bytes()), body)
            .await?;
        self.catch_up.saw(*id.as_bytes());
        let commit = ShardCommit {
            shard: id.to_hex().to_string(),
            files: shard.files.len(),
            new_files,
            repaired_files,
            corrected_files,
            xorbs: shard.xorbs.len(),
        };
        self.with_index(move |i| Ok(i.add_files(&write)?)).await?;
        hold.keep();
        self.metrics.files.fetch_add(new_files as u64, Relaxed);
        Ok(commit)
    }
}

/// What a shard commit does with one of its (verified) recipes.
enum Decision {
    /// The store does not have the file: record it.
    New,
    /// The store has it with the same SHA-256 and a readable recipe.
    Keep,
    /// The stored recipe needs a damaged xorb: record the new one.
    Repair,
    /// The stored SHA-256 (this one) differs from the claim: settle it.
    Dispute(Sha256),
}

fn decide(index: &impl Index, f: &FileRecipe) -> Result<Decision, CoreError> {
    let Some(old) = index.file(&f.hash)? else {
        return Ok(Decision::New);
    };
    if old.sha256 != f.sha256 {
        return Ok(Decision::Dispute(old.sha256));
    }
    for t in &old.terms {
        if index.is_damaged(&t.xorb)? || index.xorb(&t.xorb)?.is_none() {
            return Ok(Decision::Repair);
        }
    }
    Ok(Decision::Keep)
}

/// Every xorb the shard names is stored (a table's hash was checked against
/// its chunks when the shard decoded, so the stored xorb has exactly those
/// chunks); every recipe's terms lie inside stored xorbs and hash to the
/// recipe's file hash.
fn check_shard(index: &impl Index, shard: &Shard) -> Result<(), CoreError> {
    let mut records = Records::new(index);
    for h in shard.named_xorbs() {
        records.get(h)?;
    }
    let tables: HashMap<XorbHash, Vec<ChunkInfo>> = records
        .map
        .into_iter()
        .map(|(h, r)| (h, r.entries.iter().map(|e| e.info).collect()))
        .collect();
    for f in &shard.files {
        f.verify(|h| tables.get(h).map(Vec::as_slice))
            .map_err(|source| CoreError::InvalidRecipe {
                file: f.hash,
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{FetchGrain, RangeRequest};
    use crate::index::MemIndex;
    use crate::store::MemStore;
    use cas_protocol::shard::{Term, XorbChunkTable};
    use cas_protocol::xorb::{BuiltXorb, Compression, EncodedChunk, XorbBuilder};
    use cas_protocol::{ChunkRange, FileHash, Kind};

    type MemCore = Core<MemStore, MemIndex>;

    fn chunk(n: u8) -> Vec<u8> {
        (0..4000u32).map(|i| (i as u8).wrapping_mul(n)).collect()
    }

    fn xorb(chunks: &[u8]) -> BuiltXorb {
        let mut b = XorbBuilder::new();
        for &n in chunks {
            b.try_push(EncodedChunk::encode(&chunk(n), Compression::Raw).unwrap())
                .unwrap();
        }
        b.finish().unwrap()
    }

    /// The recipe of a file made of chunks `chunks.start..chunks.end` of `x`.
    fn recipe(x: &BuiltXorb, chunks: ChunkRange, sha256: Sha256) -> FileRecipe {
        let infos = &x.chunks[chunks.as_usize()];
        FileRecipe {
            hash: FileHash::from_chunks(infos),
            sha256,
            size: infos.iter().map(|c| u64::from(c.len)).sum(),
            terms: vec![Term {
                xorb: x.hash,
                chunks,
                len: infos.iter().map(|c| u64::from(c.len)).sum(),
            }],
            kind: Kind::File,
        }
    }

    async fn commit(
        core: &MemCore,
        x: Option<&BuiltXorb>,
        f: &FileRecipe,
    ) -> Result<ShardCommit, CoreError> {
        let shard = Shard {
            xorbs: x.map(XorbChunkTable::from).into_iter().collect(),
            files: vec![f.clone()],
        };
        core.commit_shard(shard.to_bytes().into(), Encoding::Binary)
            .await
    }

    async fn read(core: &MemCore, f: &FileRecipe) -> Result<Vec<u8>, CoreError> {
        use futures_util::TryStreamExt;
        let recipe = core.recipe(f.hash).await?;
        let range = cas_protocol::ByteRange {
            start: 0,
            end: recipe.size,
        };
        let parts: Vec<Bytes> = core.file_stream(recipe, range).try_collect().await?;
        Ok(parts.concat())
    }

    fn data(chunks: &[u8]) -> Vec<u8> {
        chunks.iter().flat_map(|&n| chunk(n)).collect()
    }

    /// A later shard cannot change a committed file's SHA-256: a false
    /// claim fails the shard and the record stays; a false first record is
    /// corrected by the first true claim (the server computes the truth).
    #[tokio::test]
    async fn recipes_are_immutable_and_sha256_disputes_are_settled_by_the_bytes() {
        let core = MemCore::new(MemStore::default(), MemIndex::default());
        let x = xorb(&[1, 2]);
        core.put_xorb(x.hash, x.bytes.clone().into()).await.unwrap();
        let all = ChunkRange { start: 0, end: 2 };
        let truth = Sha256::of(&data(&[1, 2]));
        let forged = Sha256::of(b"forged");
        let honest = recipe(&x, all, truth);
        let lie = FileRecipe {
            sha256: forged,
            ..honest.clone()
        };

        // Forged first, then the truth: corrected.
        let c = commit(&core, Some(&x), &lie).await.unwrap();
        assert_eq!((c.new_files, c.corrected_files), (1, 0));
        assert_eq!(core.file_info(lie.hash).await.unwrap().sha256, forged);
        let c = commit(&core, None, &honest).await.unwrap();
        assert_eq!((c.new_files, c.corrected_files), (0, 1));
        assert_eq!(core.file_info(honest.hash).await.unwrap().sha256, truth);

        // A lie about a true record fails and changes nothing.
        let err = commit(&core, None, &lie).await.unwrap_err();
        assert!(matches!(err, CoreError::Sha256Mismatch { .. }), "{err}");
        assert_eq!(core.file_info(honest.hash).await.unwrap().sha256, truth);

        // The same claim again is a no-op, counted once.
        let c = commit(&core, None, &honest).await.unwrap();
        assert_eq!((c.files, c.new_files), (1, 0));
        assert_eq!(core.metrics().files.load(Relaxed), 1);
    }

    /// A damaged xorb leaves dedup, blocks shards and reads that need it,
    /// and is repaired by a re-upload of the same xorb.
    #[tokio::test]
    async fn a_reuploaded_xorb_repairs_its_damaged_copy() {
        let core = MemCore::new(MemStore::default(), MemIndex::default());
        let x = xorb(&[3, 4]);
        core.put_xorb(x.hash, x.bytes.clone().into()).await.unwrap();
        let f = recipe(
            &x,
            ChunkRange { start: 0, end: 2 },
            Sha256::of(&data(&[3, 4])),
        );
        commit(&core, Some(&x), &f).await.unwrap();
        core.objects
            .delete(&ObjectKey::xorb(&x.hash))
            .await
            .unwrap();
        assert!(matches!(
            core.xorb_len(x.hash).await,
            Err(CoreError::Damaged { file: None, .. })
        ));
        assert!(core.index.is_damaged(&x.hash).unwrap());
        let q = DedupQuery {
            chunks: vec![x.chunks[0].hash],
        };
        assert_eq!(core.dedup(q.clone()).await.unwrap().found, vec![None]);
        assert!(matches!(
            core.reconstruct(f.hash, None::<RangeRequest>, FetchGrain::Xorb, |x, _| x
                .to_string())
                .await,
            Err(CoreError::Damaged { .. })
        ));
        assert!(matches!(
            commit(&core, None, &f).await,
            Err(CoreError::DamagedXorb(h)) if h == x.hash
        ));
        let up = core.put_xorb(x.hash, x.bytes.clone().into()).await.unwrap();
        assert!(!up.created, "a repair is not a new xorb");
        assert!(!core.index.is_damaged(&x.hash).unwrap());
        assert!(core.dedup(q).await.unwrap().found[0].is_some());
        assert_eq!(read(&core, &f).await.unwrap(), data(&[3, 4]));
    }

    /// A file whose recipe needs a damaged xorb gets the recipe of a later
    /// upload of the same file (same hash, same bytes) packed elsewhere.
    #[tokio::test]
    async fn a_reuploaded_file_gets_a_readable_recipe() {
        let core = MemCore::new(MemStore::default(), MemIndex::default());
        let x = xorb(&[5, 6]);
        core.put_xorb(x.hash, x.bytes.clone().into()).await.unwrap();
        let sha = Sha256::of(&data(&[5, 6]));
        let old = recipe(&x, ChunkRange { start: 0, end: 2 }, sha);
        commit(&core, Some(&x), &old).await.unwrap();
        core.mark_damaged(x.hash, "test").await.unwrap();
        // The same chunks, packed after another one: another xorb.
        let y = xorb(&[9, 5, 6]);
        core.put_xorb(y.hash, y.bytes.clone().into()).await.unwrap();
        let new = recipe(&y, ChunkRange { start: 1, end: 3 }, sha);
        assert_eq!(new.hash, old.hash);
        let c = commit(&core, Some(&y), &new).await.unwrap();
        assert_eq!((c.new_files, c.repaired_files), (0, 1));
        assert_eq!(read(&core, &old).await.unwrap(), data(&[5, 6]));
        // An undamaged recipe is not replaced by another one.
        let z = xorb(&[7, 5, 6]);
        core.put_xorb(z.hash, z.bytes.clone().into()).await.unwrap();
        let other = recipe(&z, ChunkRange { start: 1, end: 3 }, sha);
        let c = commit(&core, Some(&z), &other).await.unwrap();
        assert_eq!((c.new_files, c.repaired_files), (0, 0));
        let kept = core.recipe(old.hash).await.unwrap();
        assert_eq!(kept.terms[0].xorb, y.hash);
    }
}
