//! Names and history: repositories (`org/name`, of type model or dataset),
//! branch and tag names ([`RefName`]), and commits ([`Commit`]), the
//! immutable records of which tree a branch pointed at, after which
//! commits, by whom and why.
//!
//! Names are untrusted input that ends up in store keys, URLs and file
//! names, so each has one validating constructor and no other way in:
//! repository names follow the Hugging Face Hub's rules, branch and tag
//! names a subset of git's `check-ref-format`.
//!
//! - [`commit`]: the commit message (tag `CCMT`) and its id;
//! - [`api`]: the JSON shapes of the server's repository routes, which
//!   client and server agree on.

pub mod api;
pub mod commit;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use api::{
    CommitInfo, CommitRequest, LogPage, RefEntry, RepoDeletion, RepoDetails, RepoInfo, RepoList,
    TagRequest,
};
pub use commit::{is_commit_prefix, utc, Commit, CommitId};

/// Longest organisation or repository name, in characters (the Hub's limit).
pub const MAX_REPO_NAME_LEN: usize = 96;
/// Longest branch or tag name, in bytes of its key form ([`RefName::key_segment`]).
pub const MAX_REF_NAME_LEN: usize = 255;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {shown:?}: {reason}")]
pub struct NameError {
    pub what: &'static str,
    /// The refused input, cut to 100 characters.
    pub shown: String,
    pub reason: String,
}

impl NameError {
    fn new(what: &'static str, input: &str, reason: impl Into<String>) -> Self {
        Self {
            what,
            shown: input.chars().take(100).collect(),
            reason: reason.into(),
        }
    }
}

/// What a repository holds: a model or a dataset, like the Hub's types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RepoType {
    Model,
    Dataset,
}

impl RepoType {
    pub const ALL: [RepoType; 2] = [RepoType::Model, RepoType::Dataset];

    /// `model` or `dataset`: the JSON form and the store key segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Dataset => "dataset",
        }
    }

    /// `models` or `datasets`: the URL segment (the Hub's `/datasets/` prefix).
    pub fn url_segment(self) -> &'static str {
        match self {
            Self::Model => "models",
            Self::Dataset => "datasets",
        }
    }

    pub fn from_url_segment(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.url_segment() == s)
    }
}

impl fmt::Display for RepoType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for RepoType {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| NameError::new("repository type", s, "expected model or dataset"))
    }
}

/// Checks an organisation or repository name against the Hub's rules:
/// 1..=96 characters of `[A-Za-z0-9._-]`, not starting or ending with `.`
/// or `-`, without `--` or `..`. Such a name is always a safe path
/// component, URL segment and store key segment.
pub fn check_repo_name(what: &'static str, s: &str) -> Result<(), NameError> {
    let err = |reason: &str| Err(NameError::new(what, s, reason));
    if s.is_empty() || s.len() > MAX_REPO_NAME_LEN {
        return err("must be 1 to 96 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return err("only letters, digits, '.', '_' and '-' are allowed");
    }
    if s.starts_with(['.', '-']) || s.ends_with(['.', '-']) {
        return err("must not start or end with '.' or '-'");
    }
    if s.contains("--") || s.contains("..") {
        return err("must not contain '--' or '..'");
    }
    Ok(())
}

/// A repository: its type and `org/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RepoId {
    repo_type: RepoType,
    org: String,
    name: String,
}

impl RepoId {
    pub fn new(repo_type: RepoType, org: &str, name: &str) -> Result<Self, NameError> {
        check_repo_name("organisation", org)?;
        check_repo_name("repository name", name)?;
        Ok(Self {
            repo_type,
            org: org.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Parses `org/name`, `models/org/name` or `datasets/org/name`; the
    /// first form is of `default_type`.
    pub fn parse(s: &str, default_type: RepoType) -> Result<Self, NameError> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [org, name] => Self::new(default_type, org, name),
            [t, org, name] => match RepoType::from_url_segment(t) {
                Some(ty) => Self::new(ty, org, name),
                None => Err(NameError::new(
                    "repository",
                    s,
                    "expected ORG/NAME, models/ORG/NAME or datasets/ORG/NAME",
                )),
            },
            _ => Err(NameError::new(
                "repository",
                s,
                "expected ORG/NAME, models/ORG/NAME or datasets/ORG/NAME",
            )),
        }
    }

    pub fn repo_type(&self) -> RepoType {
        self.repo_type
    }

    pub fn org(&self) -> &str {
        &self.org
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `org/name`, the Hub's repository id (without the type).
    pub fn path(&self) -> String {
        format!("{}/{}", self.org, self.name)
    }

    /// `models/org/name` or `datasets/org/name`: the URL form.
    pub fn url_path(&self) -> String {
        format!(
            "{}/{}/{}",
            self.repo_type.url_segment(),
            self.org,
            self.name
        )
    }
}

/// `org/name` for a model, `datasets/org/name` for a dataset: what
/// [`RepoId::parse`] reads back with the model default, as the Hub writes them.
impl fmt::Display for RepoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.repo_type {
            RepoType::Model => write!(f, "{}/{}", self.org, self.name),
            RepoType::Dataset => write!(f, "datasets/{}/{}", self.org, self.name),
        }
    }
}

/// JSON form: `{"type": "model", "id": "org/name"}` (the Hub's `id`).
#[derive(Serialize, Deserialize)]
struct RepoIdJson {
    #[serde(rename = "type")]
    repo_type: RepoType,
    id: String,
}

impl Serialize for RepoId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        RepoIdJson {
            repo_type: self.repo_type,
            id: self.path(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for RepoId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let j = RepoIdJson::deserialize(d)?;
        let (org, name) =
            j.id.split_once('/')
                .ok_or_else(|| serde::de::Error::custom("repository id is not ORG/NAME"))?;
        Self::new(j.repo_type, org, name).map_err(serde::de::Error::custom)
    }
}

/// Branch or tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefKind {
    Branch,
    Tag,
}

impl RefKind {
    /// `heads` or `tags`: the store key segment (git's names).
    pub fn dir(self) -> &'static str {
        match self {
            Self::Branch => "heads",
            Self::Tag => "tags",
        }
    }
}

impl fmt::Display for RefKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Branch => "branch",
            Self::Tag => "tag",
        })
    }
}

/// A branch or tag name, valid by git's `check-ref-format` rules (a
/// subset, plus two of ours): not empty; no control characters, space or
/// any of `~^:?*[\`; no `..` or `@{`; not `@`; no empty component, no
/// component starting with `.` or ending with `.lock`; not starting with
/// `-` or `/`, not ending with `/` or `.`; not 40 hex digits (that names a
/// commit); at most 255 bytes in its key form. It may contain `/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RefName(String);

impl RefName {
    pub fn new(s: &str) -> Result<Self, NameError> {
        let err = |reason: &str| Err(NameError::new("branch or tag name", s, reason));
        if s.is_empty() {
            return err("empty");
        }
        if let Some(c) = s
            .chars()
            .find(|c| c.is_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\'))
        {
            return err(&format!("contains {c:?}"));
        }
        if s.contains("..") || s.contains("@{") || s == "@" {
            return err("contains '..' or '@{', or is '@'");
        }
        if s.starts_with(['-', '/']) || s.ends_with(['/', '.']) {
            return err("starts with '-' or '/', or ends with '/' or '.'");
        }
        for c in s.split('/') {
            if c.is_empty() || c.starts_with('.') || c.ends_with(".lock") {
                return err("has an empty component, one starting with '.' or ending with '.lock'");
            }
        }
        if s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return err("40 hex digits name a commit, not a branch or tag");
        }
        let name = Self(s.to_owned());
        if name.key_segment().len() > MAX_REF_NAME_LEN {
            return err("longer than 255 bytes (each '/' and '%' counting 3)");
        }
        Ok(name)
    }

    /// The default branch.
    pub fn main() -> Self {
        Self("main".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as ONE store key segment (a file name): `%` becomes `%25`
    /// and `/` becomes `%2F`, so `a` and `a/b` can both exist.
    pub fn key_segment(&self) -> String {
        self.0.replace('%', "%25").replace('/', "%2F")
    }

    /// The inverse of [`key_segment`](Self::key_segment), validating.
    pub fn from_key_segment(segment: &str) -> Result<Self, NameError> {
        let bad = || NameError::new("ref key", segment, "not an encoded ref name");
        let mut out = String::with_capacity(segment.len());
        let mut rest = segment;
        while let Some(i) = rest.find('%') {
            out.push_str(&rest[..i]);
            match rest.get(i..i + 3) {
                Some("%25") => out.push('%'),
                Some("%2F") => out.push('/'),
                _ => return Err(bad()),
            }
            rest = &rest[i + 3..];
        }
        out.push_str(rest);
        let name = Self::new(&out)?;
        if name.key_segment() != segment {
            return Err(bad());
        }
        Ok(name)
    }
}

impl fmt::Display for RefName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for RefName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

impl Serialize for RefName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RefName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names_follow_the_hub() {
        for ok in [
            "a",
            "gpt2",
            "Meta-Llama-3.1",
            "x_y",
            "a.b-c",
            &"a".repeat(96),
        ] {
            assert!(check_repo_name("n", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".a",
            "a.",
            "-a",
            "a-",
            "a--b",
            "a..b",
            "a/b",
            "a b",
            "é",
            "..",
            &"a".repeat(97),
        ] {
            assert!(check_repo_name("n", bad).is_err(), "{bad:?}");
        }
        let m = RepoId::parse("org/name", RepoType::Model).unwrap();
        assert_eq!(
            (m.repo_type(), m.org(), m.name()),
            (RepoType::Model, "org", "name")
        );
        assert_eq!(m.to_string(), "org/name");
        let d = RepoId::parse("datasets/org/x", RepoType::Model).unwrap();
        assert_eq!(d.repo_type(), RepoType::Dataset);
        assert_eq!(d.to_string(), "datasets/org/x");
        assert_eq!(d.url_path(), "datasets/org/x");
        assert_eq!(
            RepoId::parse("org/x", RepoType::Dataset).unwrap(),
            d,
            "the default type applies to ORG/NAME"
        );
        assert_eq!(
            RepoId::parse("models/o/n", RepoType::Dataset)
                .unwrap()
                .repo_type(),
            RepoType::Model
        );
        for bad in ["../x", "a/b/c", "x", "a/", "/a", "a/b/c/d", "org/../x"] {
            assert!(RepoId::parse(bad, RepoType::Model).is_err(), "{bad:?}");
        }
        let j = serde_json::to_string(&d).unwrap();
        assert_eq!(j, r#"{"type":"dataset","id":"org/x"}"#);
        assert_eq!(serde_json::from_str::<RepoId>(&j).unwrap(), d);
        assert!(serde_json::from_str::<RepoId>(r#"{"type":"model","id":"../x"}"#).is_err());
    }

    #[test]
    fn ref_names_follow_git() {
        for ok in [
            "main",
            "v1.0",
            "feature/x",
            "a/b/c",
            "release-2024",
            "cafe",
            "é",
            "x@y",
            "100%",
        ] {
            assert_eq!(RefName::new(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "..",
            "a..b",
            "a b",
            "a~1",
            "a^",
            "a:b",
            "a?",
            "a*",
            "a[",
            "a\\b",
            "a\tb",
            "a\u{7f}",
            "@",
            "a@{1}",
            "-x",
            "/x",
            "x/",
            "x.",
            "a//b",
            "a/.b",
            ".a",
            "a.lock",
            "a.lock/b",
            &"f".repeat(40),
        ] {
            assert!(RefName::new(bad).is_err(), "{bad:?}");
        }
        assert!(RefName::new(&"a".repeat(255)).is_ok());
        assert!(RefName::new(&"a".repeat(256)).is_err());
        assert!(RefName::new("a/".repeat(64).trim_end_matches('/')).is_ok());
        assert!(RefName::new("a/".repeat(90).trim_end_matches('/')).is_err());
        // One key segment each; `a` and `a/b` do not collide.
        for (name, key) in [
            ("a", "a"),
            ("a/b", "a%2Fb"),
            ("100%", "100%25"),
            ("x%2Fy", "x%252Fy"),
        ] {
            let n = RefName::new(name).unwrap();
            assert_eq!(n.key_segment(), key);
            assert_eq!(RefName::from_key_segment(key).unwrap(), n);
        }
        for bad in ["a/b", "a%2fb", "a%", "a%41", ".."] {
            assert!(RefName::from_key_segment(bad).is_err(), "{bad:?}");
        }
    }
}
