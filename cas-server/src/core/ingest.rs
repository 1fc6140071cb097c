//! Ingest: xorb uploads (verified before they are stored), dedup queries,
//! and shard commits (checked against stored xorbs, then indexed at once).

use std::collections::HashMap;

use bytes::Bytes;
use cas_protocol::messages::{DedupAnswer, DedupQuery};
use cas_protocol::shard::Shard;
use cas_protocol::xorb::XorbView;
use cas_protocol::{ChunkInfo, Encoding, Message, XorbHash};

use super::{blocking, Core, CoreError, Records, ShardCommit, XorbUpload};
use crate::index::{Index, XorbRecord};
use crate::store::{ObjectKey, ObjectKind, ObjectStore};

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// Verifies a xorb completely (parse, decompress, re-hash every chunk,
    /// check the xorb hash), stores it, then indexes it. A xorb that is
    /// already stored is accepted without being rewritten (`created` is
    /// false), also when another upload of it stored it meanwhile.
    pub async fn put_xorb(&self, hash: XorbHash, body: Bytes) -> Result<XorbUpload, CoreError> {
        if let Some(r) = self.with_index(move |i| Ok(i.xorb(&hash)?)).await? {
            return Ok(XorbUpload {
                xorb: hash,
                created: false,
                chunks: r.entries.len(),
                bytes: r.object_len(),
            });
        }
        let verify_body = body.clone();
        let record = blocking(move || {
            let view = XorbView::parse(&verify_body)?;
            view.verify(hash)?;
            Ok(XorbRecord {
                entries: view.entries().to_vec(),
            })
        })
        .await?;
        let (chunks, bytes) = (record.entries.len(), body.len() as u64);
        // Of concurrent uploads of one xorb, all may pass the index check
        // above; the store says which one wrote it.
        let created = self
            .objects
            .put(&ObjectKey::new(ObjectKind::Xorb, hash.as_bytes()), body)
            .await?;
        let upload = XorbUpload {
            xorb: hash,
            created,
            chunks,
            bytes,
        };
        self.with_index(move |i| Ok(i.add_xorb(&hash, &record)?))
            .await?;
        Ok(upload)
    }

    /// Which queried chunks are stored, and where.
    pub async fn dedup(&self, query: DedupQuery) -> Result<DedupAnswer, CoreError> {
        self.with_index(move |i| {
            let found = query
                .chunks
                .iter()
                .map(|h| i.chunk(h))
                .collect::<Result<_, _>>()?;
            Ok(DedupAnswer { found })
        })
        .await
    }

    /// Checks a shard (in either encoding) against the stored xorbs and
    /// commits its files atomically; nothing changes if any check fails.
    /// The shard object is always stored in the binary form.
    pub async fn commit_shard(
        &self,
        body: Bytes,
        encoding: Encoding,
    ) -> Result<ShardCommit, CoreError> {
        let (shard, body) = self
            .with_index(move |index| {
                let shard = Shard::decode_as(&body, encoding)?;
                check_shard(index, &shard)?;
                let body = match encoding {
                    Encoding::Binary => body,
                    Encoding::Json => Bytes::from(shard.to_bytes()),
                };
                Ok((shard, body))
            })
            .await?;
        let id = blake3::hash(&body);
        self.objects
            .put(&ObjectKey::new(ObjectKind::Shard, id.as_bytes()), body)
            .await?;
        let commit = ShardCommit {
            shard: id.to_hex().to_string(),
            files: shard.files.len(),
            xorbs: shard.xorbs.len(),
        };
        self.with_index(move |i| Ok(i.add_files(&shard.files)?))
            .await?;
        Ok(commit)
    }
}

/// Every xorb the shard names is stored (a table's hash was checked against
/// its chunks when the shard decoded, so the stored xorb has exactly those
/// chunks); every recipe's terms lie inside stored xorbs and hash to the
/// recipe's file hash.
fn check_shard(index: &impl Index, shard: &Shard) -> Result<(), CoreError> {
    let mut records = Records::new(index);
    let named = shard.xorbs.iter().map(|t| t.hash);
    for h in named.chain(
        shard
            .files
            .iter()
            .flat_map(|f| f.terms.iter().map(|t| t.xorb)),
    ) {
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
