//! Commits: a protocol message (tag `CCMT`) whose id is a hash of its
//! binary form.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::NameError;
use crate::codec::{impl_message, Message};
use crate::hash::FileHash;

/// Largest encoded commit, in either form (JSON escapes included).
pub const MAX_COMMIT_BYTES: usize = 1024 * 1024;
/// Longest commit message, in bytes.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;
/// Longest commit author, in bytes.
pub const MAX_AUTHOR_LEN: usize = 1024;
/// Most parents of one commit.
pub const MAX_PARENTS: usize = 16;
/// Most `extra` fields of one commit.
pub const MAX_EXTRA: usize = 32;
/// Longest `extra` key, in bytes.
pub const MAX_EXTRA_KEY_LEN: usize = 64;
/// Longest `extra` value, in bytes.
pub const MAX_EXTRA_VALUE_LEN: usize = 1024;
/// Shortest commit id prefix a revision may use.
pub const MIN_COMMIT_PREFIX: usize = 4;
/// BLAKE3 `derive_key` context of commit ids.
pub const COMMIT_CONTEXT: &str = "cas-protocol v2 commit";

/// Identity of a commit: the first 20 bytes of BLAKE3 (context
/// [`COMMIT_CONTEXT`]) over its binary form, written as 40 lowercase hex
/// digits, the form every Hub tool takes for a commit id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommitId([u8; 20]);

impl CommitId {
    pub const fn from_bytes(bytes: [u8; 20]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Whether `prefix` (lowercase hex) starts this id's hex form.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.to_hex().starts_with(prefix)
    }
}

/// Whether `s` may abbreviate a commit id: 4 to 40 lowercase hex digits.
pub fn is_commit_prefix(s: &str) -> bool {
    (MIN_COMMIT_PREFIX..=40).contains(&s.len())
        && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommitId({})", self.to_hex())
    }
}

impl FromStr for CommitId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let err = || NameError::new("commit id", s, "expected 40 lowercase hex digits");
        if s.len() != 40 || !is_commit_prefix(s) {
            return Err(err());
        }
        let mut out = [0u8; 20];
        hex::decode_to_slice(s, &mut out).map_err(|_| err())?;
        Ok(Self(out))
    }
}

impl Serialize for CommitId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for CommitId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl bincode::Encode for CommitId {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        e: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        self.0.encode(e)
    }
}

impl<C> bincode::Decode<C> for CommitId {
    fn decode<D: bincode::de::Decoder<Context = C>>(
        d: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        <[u8; 20] as bincode::Decode<C>>::decode(d).map(Self)
    }
}

impl<'de, C> bincode::BorrowDecode<'de, C> for CommitId {
    fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = C>>(
        d: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        <[u8; 20] as bincode::Decode<C>>::decode(d).map(Self)
    }
}

/// One step of a repository's history: the tree a branch pointed at, the
/// commits it came after, who made it, when (Unix seconds) and why, plus
/// sorted `extra` fields (e.g. a mirror's upstream commit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct Commit {
    pub parents: Vec<CommitId>,
    pub tree: FileHash,
    pub message: String,
    pub author: String,
    pub time: u64,
    pub extra: Vec<(String, String)>,
}

impl_message!(Commit, "commit", b"CCMT", MAX_COMMIT_BYTES);

impl Commit {
    /// The commit's id: a hash of its binary form.
    pub fn id(&self) -> CommitId {
        let mut h = blake3::Hasher::new_derive_key(COMMIT_CONTEXT);
        h.update(&self.to_bytes());
        let mut id = [0u8; 20];
        id.copy_from_slice(&h.finalize().as_bytes()[..20]);
        CommitId(id)
    }

    /// The first line of the message.
    pub fn summary(&self) -> &str {
        self.message.lines().next().unwrap_or("")
    }

    fn check(&self) -> Result<(), String> {
        if self.parents.len() > MAX_PARENTS {
            return Err(format!(
                "{} parents, at most {MAX_PARENTS}",
                self.parents.len()
            ));
        }
        for (i, p) in self.parents.iter().enumerate() {
            if self.parents[..i].contains(p) {
                return Err(format!("parent {p} is named twice"));
            }
        }
        if self.message.len() > MAX_MESSAGE_LEN {
            return Err(format!("message longer than {MAX_MESSAGE_LEN} bytes"));
        }
        if self.author.len() > MAX_AUTHOR_LEN {
            return Err(format!("author longer than {MAX_AUTHOR_LEN} bytes"));
        }
        if self.author.chars().any(char::is_control) {
            return Err("author contains a control character".into());
        }
        if self.extra.len() > MAX_EXTRA {
            return Err(format!(
                "{} extra fields, at most {MAX_EXTRA}",
                self.extra.len()
            ));
        }
        for (i, (k, v)) in self.extra.iter().enumerate() {
            let key_ok = !k.is_empty()
                && k.len() <= MAX_EXTRA_KEY_LEN
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !key_ok {
                return Err(format!(
                    "extra key {k:?} is not 1 to {MAX_EXTRA_KEY_LEN} of [A-Za-z0-9._-]"
                ));
            }
            if v.len() > MAX_EXTRA_VALUE_LEN {
                return Err(format!(
                    "extra {k:?} longer than {MAX_EXTRA_VALUE_LEN} bytes"
                ));
            }
            if i > 0 && self.extra[i - 1].0 >= *k {
                return Err(format!("extra key {k:?} is out of order or repeated"));
            }
        }
        Ok(())
    }
}

/// `2026-11-23T06:00:00Z` for seconds since the epoch (proleptic Gregorian,
/// days-from-civil inverted): how commit times and expiries are shown.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::MessageError;

    fn sample() -> Commit {
        Commit {
            parents: vec![CommitId::from_bytes([1; 20])],
            tree: FileHash::from_bytes([2; 32]),
            message: "Upload v2\n\nfine-tuned".into(),
            author: "ada".into(),
            time: 1_760_000_000,
            extra: vec![("upstream".into(), "abc".into())],
        }
    }

    #[test]
    fn commit_ids_are_hashes_of_the_binary_form() {
        let c = sample();
        let id = c.id();
        assert_eq!(id.to_hex().len(), 40);
        assert_eq!(id.to_hex().parse::<CommitId>().unwrap(), id);
        assert!(id.has_prefix(&id.to_hex()[..4]));
        let mut other = c.clone();
        other.time += 1;
        assert_ne!(other.id(), id);
        assert_eq!(Commit::from_bytes(&c.to_bytes()).unwrap(), c);
        assert_eq!(Commit::from_json(c.to_json().as_bytes()).unwrap(), c);
        assert_eq!(c.summary(), "Upload v2");
        for bad in [
            "",
            "ABCD",
            &"a".repeat(39),
            &"g".repeat(40),
            &"a".repeat(41),
        ] {
            assert!(bad.parse::<CommitId>().is_err(), "{bad:?}");
        }
        assert!(is_commit_prefix("abcd") && !is_commit_prefix("abc") && !is_commit_prefix("ABCD"));
    }

    #[test]
    fn commit_limits() {
        let invalid = |c: Commit| {
            assert!(
                matches!(
                    Commit::from_bytes(&c.to_bytes()),
                    Err(MessageError::Invalid { .. })
                ),
                "{c:?}"
            )
        };
        let mut c = sample();
        c.parents = (0..17u8).map(|i| CommitId::from_bytes([i; 20])).collect();
        invalid(c);
        let mut c = sample();
        c.parents = vec![CommitId::from_bytes([1; 20]); 2];
        invalid(c);
        let mut c = sample();
        c.message = "m".repeat(MAX_MESSAGE_LEN + 1);
        invalid(c);
        let mut c = sample();
        c.author = "a\nb".into();
        invalid(c);
        let mut c = sample();
        c.author = "a".repeat(MAX_AUTHOR_LEN + 1);
        invalid(c);
        let mut c = sample();
        c.extra = vec![("b".into(), String::new()), ("a".into(), String::new())];
        invalid(c);
        let mut c = sample();
        c.extra = vec![("a b".into(), String::new())];
        invalid(c);
        let mut c = sample();
        c.extra = (0..33)
            .map(|i| (format!("k{i:02}"), String::new()))
            .collect();
        invalid(c);
        let mut c = sample();
        c.message = "\u{1}".repeat(MAX_MESSAGE_LEN);
        c.author = "\"".repeat(MAX_AUTHOR_LEN);
        c.extra = (0..32)
            .map(|i| {
                (
                    format!("{i:02}{}", "k".repeat(62)),
                    "\u{1}".repeat(MAX_EXTRA_VALUE_LEN),
                )
            })
            .collect();
        c.parents = (0..16u8).map(|i| CommitId::from_bytes([i; 20])).collect();
        // The largest valid commit fits the limit in both forms.
        assert_eq!(Commit::from_bytes(&c.to_bytes()).unwrap(), c);
        assert_eq!(Commit::from_json(c.to_json().as_bytes()).unwrap(), c);
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        // Checked against `date -u -d @N`.
        assert_eq!(utc(1_795_500_000), "2026-11-24T06:00:00Z");
        assert_eq!(utc(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
