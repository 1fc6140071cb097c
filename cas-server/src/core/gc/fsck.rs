//! fsck: whether index and objects agree. Every recorded xorb's object
//! exists at its length (`full`: and its bytes verify); every recipe's
//! xorbs are recorded and cover its ranges (and hash to its file hash);
//! every ref names a readable commit, every commit's tree is a stored tree
//! whose files are stored; every root's file is stored. `repair` marks
//! bad xorbs damaged (they leave dedup, and the next upload of their
//! content heals them) and drops recipes that name unknown xorbs.

use std::collections::{HashMap, HashSet, VecDeque};

use cas_protocol::xorb::XorbView;
use cas_protocol::{ChunkInfo, FileHash, XorbHash};
use serde::{Deserialize, Serialize};

use crate::core::{blocking, Core, CoreError};
use crate::index::Index;
use crate::store::{KeyPrefix, ObjectKey, ObjectKind, ObjectStore};

/// How deep fsck looks.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct FsckOptions {
    /// Read and verify every xorb's bytes, not only its presence and
    /// length.
    pub full: bool,
}

impl FsckOptions {
    pub fn with_full(mut self, full: bool) -> Self {
        self.full = full;
        self
    }
}

/// One thing fsck found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// The index records a xorb whose object is missing.
    MissingXorb { xorb: XorbHash },
    /// The object is not as long as its header says.
    WrongLength {
        xorb: XorbHash,
        stored: u64,
        expected: u64,
    },
    /// The object's bytes do not verify (found with `full`).
    CorruptXorb { xorb: XorbHash, reason: String },
    /// Marked damaged (found earlier, on a read or by `repair`) and not
    /// yet healed by an upload.
    DamagedXorb { xorb: XorbHash },
    /// A recipe names a xorb the index does not record, or chunks its
    /// xorbs do not have.
    BadRecipe { file: FileHash, reason: String },
    /// A ref names a commit that is missing or does not parse.
    BadCommit { reference: String, reason: String },
    /// A commit's tree cannot be read, or names a file that is not stored.
    BadTree { tree: FileHash, reason: String },
    /// A root names a file that is not stored.
    MissingRoot { file: FileHash },
}

/// What fsck found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FsckReport {
    /// No problem found.
    pub clean: bool,
    pub full: bool,
    pub xorbs: u64,
    pub files: u64,
    pub refs: u64,
    pub commits: u64,
    pub roots: u64,
    pub problems: Vec<Problem>,
    /// Files that cannot be read whole (they need a bad xorb).
    pub damaged_files: Vec<FileHash>,
    /// Repositories (`type/org/name`) with a ref whose history has a
    /// problem.
    pub damaged_repos: Vec<String>,
    /// Xorb objects no index entry names: harmless (an upload that never
    /// finished, a deletion a crash cut short); garbage collection
    /// removes them.
    pub orphans: u64,
}

/// The outcome of the last `fsck` of a data directory, kept beside its
/// index: fsck runs on a stopped server, so the server started next reads
/// it to report the `cas_fsck_last_*` metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsckRecord {
    pub clean: bool,
    pub full: bool,
    pub problems: u64,
    /// When the check finished, in seconds since the Unix epoch.
    pub finished_unix: u64,
}

impl FsckRecord {
    const FILE: &'static str = "fsck-last.json";

    pub fn of(report: &FsckReport) -> Self {
        Self {
            clean: report.clean,
            full: report.full,
            problems: report.problems.len() as u64,
            finished_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// Writes the record into `data_dir` (a temporary renamed over the
    /// last one: a crash leaves the old record or the new one).
    pub fn save(&self, data_dir: &std::path::Path) -> std::io::Result<()> {
        let tmp = data_dir.join(format!("{}.tmp", Self::FILE));
        let bytes = serde_json::to_vec(self).expect("a record serialises");
        std::fs::write(&tmp, bytes)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, data_dir.join(Self::FILE))
    }

    /// The record in `data_dir`; `None` when fsck never ran there (or its
    /// record is unreadable: the metrics then say "never").
    pub fn load(data_dir: &std::path::Path) -> Option<Self> {
        let bytes = std::fs::read(data_dir.join(Self::FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// What `repair` did.
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    /// Xorbs now marked damaged: out of dedup until an upload heals them.
    pub marked_damaged: Vec<XorbHash>,
    /// Recipes dropped from the index (they named unknown xorbs).
    pub dropped_files: Vec<FileHash>,
    /// What is lost until its content is uploaded again.
    pub lost_files: Vec<FileHash>,
    pub damaged_repos: Vec<String>,
    /// The check repair acted on.
    pub fsck: FsckReport,
}

/// `type/org/name` of a ref key `refs/<type>/<org>/<name>/...`.
fn repo_of_ref(key: &ObjectKey) -> String {
    key.as_str()
        .split('/')
        .skip(1)
        .take(3)
        .collect::<Vec<_>>()
        .join("/")
}

impl<O: ObjectStore, I: Index> Core<O, I> {
    /// Checks that index and objects agree; changes nothing.
    pub async fn fsck(&self, options: &FsckOptions) -> Result<FsckReport, CoreError> {
        let mut report = FsckReport {
            full: options.full,
            ..FsckReport::default()
        };
        let xorbs = self.with_index(|i| Ok(i.xorbs()?)).await?;
        report.xorbs = xorbs.len() as u64;
        let mut bad: HashSet<XorbHash> = HashSet::new();
        for x in &xorbs {
            let hash = x.hash;
            let problem = match self.objects.len(&ObjectKey::xorb(&hash)).await? {
                None => Some(Problem::MissingXorb { xorb: hash }),
                Some(len) if len != x.bytes => Some(Problem::WrongLength {
                    xorb: hash,
                    stored: len,
                    expected: x.bytes,
                }),
                Some(len) if options.full => {
                    let bytes = self.read_whole(hash, len).await?;
                    blocking(move || {
                        Ok(XorbView::parse(&bytes)
                            .and_then(|v| v.verify(hash))
                            .err()
                            .map(|e| Problem::CorruptXorb {
                                xorb: hash,
                                reason: e.to_string(),
                            }))
                    })
                    .await?
                }
                Some(_) => None,
            };
            let problem = match problem {
                None if self.with_index(move |i| Ok(i.is_damaged(&hash)?)).await? => {
                    Some(Problem::DamagedXorb { xorb: hash })
                }
                p => p,
            };
            if let Some(p) = problem {
                bad.insert(hash);
                report.problems.push(p);
            }
        }

        let bad_xorbs = bad.clone();
        let (files, recipe_problems, damaged) = self
            .with_index(move |i| check_recipes(i, &bad_xorbs))
            .await?;
        report.files = files.len() as u64;
        report.problems.extend(recipe_problems);
        let damaged_files: HashSet<FileHash> = damaged.into_iter().collect();

        // Refs and their history; each tree checked once.
        let mut trees: HashMap<FileHash, bool> = HashMap::new();
        let mut damaged_repos = HashSet::new();
        for key in self.objects.list(&KeyPrefix::kind(ObjectKind::Ref)).await? {
            let head = match self.head(&key).await {
                Ok(Some((id, _))) => id,
                Ok(None) => continue,
                Err(e) => {
                    report.problems.push(Problem::BadCommit {
                        reference: key.as_str().to_owned(),
                        reason: e.to_string(),
                    });
                    damaged_repos.insert(repo_of_ref(&key));
                    continue;
                }
            };
            report.refs += 1;
            let mut queue = VecDeque::from([head]);
            let mut seen = HashSet::new();
            let mut sound = true;
            while let Some(id) = queue.pop_front() {
                if !seen.insert(id) {
                    continue;
                }
                let commit = match self.read_commit(id).await {
                    Ok(c) => c,
                    Err(e) => {
                        report.problems.push(Problem::BadCommit {
                            reference: key.as_str().to_owned(),
                            reason: e.to_string(),
                        });
                        sound = false;
                        continue;
                    }
                };
                queue.extend(commit.parents.iter().copied());
                let tree = commit.tree;
                let ok = match trees.get(&tree) {
                    Some(ok) => *ok,
                    None => {
                        let ok = self
                            .check_tree_files(tree, &files, &damaged_files, &mut report)
                            .await?;
                        trees.insert(tree, ok);
                        ok
                    }
                };
                sound &= ok;
            }
            report.commits += seen.len() as u64;
            if !sound {
                damaged_repos.insert(repo_of_ref(&key));
            }
        }

        let roots = self.root_files().await?;
        report.roots = roots.len() as u64;
        for root in roots {
            if !files.contains(&root) {
                report.problems.push(Problem::MissingRoot { file: root });
            } else if !trees.contains_key(&root) && self.is_tree(root).await? {
                let ok = self
                    .check_tree_files(root, &files, &damaged_files, &mut report)
                    .await?;
                trees.insert(root, ok);
            }
        }

        let indexed: HashSet<XorbHash> = xorbs.iter().map(|x| x.hash).collect();
        for key in self
            .objects
            .list(&KeyPrefix::kind(ObjectKind::Xorb))
            .await?
        {
            if key
                .hash_bytes()
                .is_some_and(|h| !indexed.contains(&XorbHash::from_bytes(h)))
            {
                report.orphans += 1;
            }
        }
        report.damaged_files = damaged_files.into_iter().collect();
        report.damaged_files.sort();
        report.damaged_repos = damaged_repos.into_iter().collect();
        report.damaged_repos.sort();
        report.clean = report.problems.is_empty();
        Ok(report)
    }

    async fn is_tree(&self, file: FileHash) -> Result<bool, CoreError> {
        self.with_index(move |i| {
            Ok(i.file(&file)?
                .is_some_and(|r| r.kind == cas_protocol::Kind::Tree))
        })
        .await
    }

    /// Whether a tree reads and all its files are stored and readable;
    /// problems go into `report`.
    async fn check_tree_files(
        &self,
        tree: FileHash,
        files: &HashSet<FileHash>,
        damaged: &HashSet<FileHash>,
        report: &mut FsckReport,
    ) -> Result<bool, CoreError> {
        if damaged.contains(&tree) {
            return Ok(false);
        }
        let listing = match self.tree(tree).await {
            Ok(l) => l,
            Err(CoreError::Index(e)) => return Err(e.into()),
            Err(e) => {
                report.problems.push(Problem::BadTree {
                    tree,
                    reason: e.to_string(),
                });
                return Ok(false);
            }
        };
        let mut ok = true;
        for e in &listing.tree.entries {
            if !files.contains(&e.file) {
                report.problems.push(Problem::BadTree {
                    tree,
                    reason: format!(
                        "entry {:?} names file {}, which is not stored",
                        e.path, e.file
                    ),
                });
                ok = false;
            } else if damaged.contains(&e.file) {
                ok = false;
            }
        }
        Ok(ok)
    }

    /// Runs fsck and marks every missing or corrupt xorb damaged: it
    /// leaves dedup, so the next upload of its content stores it again
    /// (and a re-uploaded file gets a recipe that avoids it). Recipes that
    /// name unknown xorbs are dropped. Lists what stays lost until then.
    pub async fn repair(&self, options: &FsckOptions) -> Result<RepairReport, CoreError> {
        let fsck = self.fsck(options).await?;
        let mut marked_damaged = Vec::new();
        let mut dropped_files = Vec::new();
        for p in &fsck.problems {
            match p {
                Problem::MissingXorb { xorb }
                | Problem::WrongLength { xorb, .. }
                | Problem::CorruptXorb { xorb, .. } => {
                    self.mark_damaged(*xorb, "found by repair").await?;
                    marked_damaged.push(*xorb);
                }
                Problem::BadRecipe { file, .. } => dropped_files.push(*file),
                _ => {}
            }
        }
        if !dropped_files.is_empty() {
            let drop = dropped_files.clone();
            self.with_index(move |i| Ok(i.remove(&drop, &[])?)).await?;
        }
        let mut lost_files = fsck.damaged_files.clone();
        lost_files.extend(&dropped_files);
        Ok(RepairReport {
            marked_damaged,
            dropped_files,
            lost_files,
            damaged_repos: fsck.damaged_repos.clone(),
            fsck,
        })
    }
}

/// Every recipe against the xorbs the index records: the files, the
/// problems, and the files that need a bad xorb.
#[allow(clippy::type_complexity)]
fn check_recipes(
    index: &impl Index,
    bad: &HashSet<XorbHash>,
) -> Result<(HashSet<FileHash>, Vec<Problem>, Vec<FileHash>), CoreError> {
    let mut tables: HashMap<XorbHash, Option<Vec<ChunkInfo>>> = HashMap::new();
    let mut problems = Vec::new();
    let mut damaged = Vec::new();
    let hashes = index.file_hashes()?;
    for f in &hashes {
        let Some(recipe) = index.file(f)? else {
            continue;
        };
        for t in &recipe.terms {
            if let std::collections::hash_map::Entry::Vacant(e) = tables.entry(t.xorb) {
                let table = index
                    .xorb(&t.xorb)?
                    .map(|r| r.entries.iter().map(|e| e.info).collect());
                e.insert(table);
            }
        }
        if let Err(e) = recipe.verify(|x| tables.get(x).and_then(|t| t.as_deref())) {
            problems.push(Problem::BadRecipe {
                file: *f,
                reason: e.to_string(),
            });
            damaged.push(*f);
        } else if recipe.terms.iter().any(|t| bad.contains(&t.xorb)) {
            damaged.push(*f);
        }
    }
    Ok((hashes.into_iter().collect(), problems, damaged))
}
