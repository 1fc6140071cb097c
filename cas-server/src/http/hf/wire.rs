//! The JSON shapes of the Hub API as `huggingface_hub` 2.4 parses them
//! (`hf_api.py`: `ModelInfo`, `DatasetInfo`, `RepoFile`, `RepoFolder`,
//! `GitRefs`, `GitCommitInfo`), built from our repositories.
//!
//! Every file is described as a Git LFS file, as the Hub describes large
//! files: `lfs.oid` is its SHA-256 (what the client names its cached blob
//! after and checks a local copy against) and `oid` the git blob id of
//! the LFS pointer a git checkout would hold. No `xetHash` is ever sent:
//! with one, the client would take its Xet download path.

use cas_protocol::repo::{utc, Commit, CommitId, RefEntry, RefKind, RepoInfo, RepoType};
use cas_protocol::tree::TreeEntry;
use cas_protocol::{FileHash, Sha256};
use serde::Serialize;
use sha1::Digest;

/// The Git LFS pointer file of a file with this SHA-256 and size (the
/// spec's canonical form).
fn lfs_pointer(sha256: &Sha256, size: u64) -> String {
    format!("version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n")
}

/// A file's LFS description: the pointer's git blob id and length.
pub struct Lfs {
    pub sha256: Sha256,
    pub size: u64,
    blob_id: String,
    pointer_size: usize,
}

impl Lfs {
    pub fn new(sha256: Sha256, size: u64) -> Self {
        let pointer = lfs_pointer(&sha256, size);
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {}\0", pointer.len()));
        h.update(&pointer);
        Self {
            sha256,
            size,
            blob_id: hex::encode(h.finalize()),
            pointer_size: pointer.len(),
        }
    }
}

#[derive(Serialize)]
pub struct LfsJson<'a> {
    oid: &'a Sha256,
    size: u64,
    #[serde(rename = "pointerSize")]
    pointer_size: usize,
}

/// A sibling's LFS part, as `model_info(files_metadata=True)` reads it.
#[derive(Serialize)]
struct SiblingLfs<'a> {
    sha256: &'a Sha256,
    size: u64,
    #[serde(rename = "pointerSize")]
    pointer_size: usize,
}

/// One node of a tree listing or a paths-info answer.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum PathInfo<'a> {
    File {
        oid: &'a str,
        size: u64,
        path: &'a str,
        lfs: LfsJson<'a>,
    },
    Directory {
        oid: String,
        path: &'a str,
    },
}

impl<'a> PathInfo<'a> {
    pub fn file(entry: &'a TreeEntry, lfs: &'a Lfs) -> Self {
        PathInfo::File {
            oid: &lfs.blob_id,
            size: entry.size,
            path: &entry.path,
            lfs: LfsJson {
                oid: &lfs.sha256,
                size: lfs.size,
                pointer_size: lfs.pointer_size,
            },
        }
    }

    /// A directory of the tree `tree`; its id is derived from both, like
    /// a git tree id stands for one directory's contents.
    pub fn directory(tree: &FileHash, path: &'a str) -> Self {
        let mut h = blake3::Hasher::new_derive_key("cas hub directory id");
        h.update(tree.as_bytes());
        h.update(path.as_bytes());
        PathInfo::Directory {
            oid: hex::encode(&h.finalize().as_bytes()[..20]),
            path,
        }
    }
}

#[derive(Serialize)]
pub struct Sibling<'a> {
    rfilename: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(rename = "blobId", skip_serializing_if = "Option::is_none")]
    blob_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lfs: Option<SiblingLfs<'a>>,
}

impl<'a> Sibling<'a> {
    /// A file of the revision; with `lfs` (`files_metadata=True`), its
    /// size, blob id and LFS part too.
    pub fn new(entry: &'a TreeEntry, lfs: Option<&'a Lfs>) -> Self {
        Self {
            rfilename: &entry.path,
            size: lfs.map(|_| entry.size),
            blob_id: lfs.map(|l| l.blob_id.as_str()),
            lfs: lfs.map(|l| SiblingLfs {
                sha256: &l.sha256,
                size: l.size,
                pointer_size: l.pointer_size,
            }),
        }
    }
}

/// `model_info` / `dataset_info` / `repo_info`.
#[derive(Serialize)]
pub struct RepoJson<'a> {
    #[serde(rename = "_id")]
    object_id: String,
    id: String,
    #[serde(rename = "modelId", skip_serializing_if = "Option::is_none")]
    model_id: Option<String>,
    author: &'a str,
    sha: Option<CommitId>,
    #[serde(rename = "createdAt")]
    created_at: String,
    #[serde(rename = "lastModified", skip_serializing_if = "Option::is_none")]
    last_modified: Option<String>,
    private: bool,
    gated: bool,
    disabled: bool,
    downloads: u64,
    likes: u64,
    tags: [&'a str; 0],
    siblings: Vec<Sibling<'a>>,
}

impl<'a> RepoJson<'a> {
    /// `info` at `commit` (none for a repository without commits).
    pub fn new(
        info: &'a RepoInfo,
        commit: Option<(CommitId, &Commit)>,
        private: bool,
        siblings: Vec<Sibling<'a>>,
    ) -> Self {
        let repo = &info.repo;
        Self {
            object_id: repo.url_path(),
            id: repo.path(),
            model_id: (repo.repo_type() == RepoType::Model).then(|| repo.path()),
            author: repo.org(),
            sha: commit.map(|(id, _)| id),
            created_at: utc(info.created),
            last_modified: commit.map(|(_, c)| utc(c.time)),
            private,
            gated: false,
            disabled: false,
            downloads: 0,
            likes: 0,
            tags: [],
            siblings,
        }
    }
}

#[derive(Serialize)]
pub struct GitRef {
    name: String,
    #[serde(rename = "ref")]
    full: String,
    #[serde(rename = "targetCommit")]
    target: CommitId,
}

/// `list_repo_refs`: branches and tags; the Hub's `converts` and pull
/// requests do not exist here (empty).
#[derive(Serialize)]
pub struct Refs {
    branches: Vec<GitRef>,
    converts: [GitRef; 0],
    tags: Vec<GitRef>,
    #[serde(rename = "pullRequests")]
    pull_requests: [GitRef; 0],
}

impl Refs {
    pub fn new(branches: Vec<RefEntry>, tags: Vec<RefEntry>) -> Self {
        let refs = |entries: Vec<RefEntry>, kind: RefKind| {
            entries
                .into_iter()
                .map(|r| GitRef {
                    full: format!("refs/{}/{}", kind.dir(), r.name),
                    name: r.name.to_string(),
                    target: r.commit,
                })
                .collect()
        };
        Self {
            branches: refs(branches, RefKind::Branch),
            converts: [],
            tags: refs(tags, RefKind::Tag),
            pull_requests: [],
        }
    }
}

#[derive(Serialize)]
struct Author<'a> {
    user: &'a str,
}

/// One entry of `list_repo_commits`: the first line of the message is its
/// title, the rest (after blank lines) its message.
#[derive(Serialize)]
pub struct CommitJson<'a> {
    id: CommitId,
    authors: Vec<Author<'a>>,
    date: String,
    title: &'a str,
    message: &'a str,
}

impl<'a> CommitJson<'a> {
    pub fn new(id: CommitId, c: &'a Commit) -> Self {
        let (title, message) = c.message.split_once('\n').unwrap_or((&c.message, ""));
        Self {
            id,
            authors: if c.author.is_empty() {
                vec![]
            } else {
                vec![Author { user: &c.author }]
            },
            date: utc(c.time),
            title,
            message: message.trim_start_matches('\n'),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blob id and pointer size the Hub reports for an LFS file: git's
    /// blob id of the canonical pointer file (`git hash-object` of it).
    #[test]
    fn lfs_pointer_blob_ids_match_git() {
        let sha: Sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
            .parse()
            .unwrap();
        let lfs = Lfs::new(sha, 4);
        let pointer = lfs_pointer(&sha, 4);
        assert_eq!(
            pointer,
            "version https://git-lfs.github.com/spec/v1\noid sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\nsize 4\n"
        );
        assert_eq!(lfs.pointer_size, pointer.len());
        // printf '%s' "$pointer" | git hash-object --stdin
        assert_eq!(lfs.blob_id, "0a706d97bc88b3596fb2e3d7556ef2761d5d64b1");
    }

    #[test]
    fn commit_titles_and_messages() {
        let c = |m: &str| Commit {
            parents: vec![],
            tree: FileHash::from_bytes([0; 32]),
            message: m.into(),
            author: "ada".into(),
            time: 0,
            extra: vec![],
        };
        let j = |m: &str| serde_json::to_value(CommitJson::new(c(m).id(), &c(m))).unwrap();
        let v = j("Upload v2\n\nfine-tuned");
        assert_eq!(
            (v["title"].as_str(), v["message"].as_str()),
            (Some("Upload v2"), Some("fine-tuned"))
        );
        assert_eq!(v["authors"][0]["user"], "ada");
        assert_eq!(v["date"], "1970-01-01T00:00:00Z");
        assert_eq!(j("one line")["message"], "");
    }
}
