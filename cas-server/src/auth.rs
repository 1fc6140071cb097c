//! Who may call what.
//!
//! With a signing key, API calls carry bearer tokens: HMAC-SHA256-signed
//! claims `{"scopes": [...], "exp": unix seconds}`, written
//! `cas1.<claims hex>.<mac hex>` (the MAC covers `cas1.<claims hex>`).
//! Uploading (dedup, xorb PUT, shard commit) needs the `write` scope,
//! reading recipes (reconstructions, file info) the `read` scope. Claims
//! may limit a token to repositories (`"repos": ["org/*", ...]`): the
//! [`Grant`] a request gets says which. Reads of xorb bytes named in
//! reconstructions need no token: their URLs are grants, capabilities for
//! one byte range of one xorb that carry a MAC of it
//! ([`SigningKey::url_mac`]; see docs/SECURITY.md), which is what lets a
//! CDN cache them. So are the URLs of a file's bytes that the Hub API
//! redirects to (a MAC of the file hash). A plain xorb GET needs a read
//! token not limited to repositories. Without a key the server serves
//! loopback clients only.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use cas_protocol::repo::{check_repo_name, NameError, RepoId, RepoType};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;

pub use cas_protocol::repo::utc;

const PREFIX: &str = "cas1";
/// Shortest accepted key.
pub const MIN_KEY_BYTES: usize = 32;
/// Longest token considered (a header may be longer; it is then invalid).
pub const MAX_TOKEN_LEN: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
    /// Operating the store (garbage collection runs); implies neither
    /// reading nor writing data.
    Admin,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        })
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Scope::Read),
            "write" => Ok(Scope::Write),
            "admin" => Ok(Scope::Admin),
            _ => Err(format!("unknown scope {s:?} (read, write or admin)")),
        }
    }
}

/// The repositories a token is limited to: `org/name` or `org/*`,
/// optionally prefixed by `models/` or `datasets/` (without a prefix it
/// matches both types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoPattern {
    repo_type: Option<RepoType>,
    org: String,
    /// `None`: every repository of `org`.
    name: Option<String>,
}

impl RepoPattern {
    pub fn matches(&self, repo: &RepoId) -> bool {
        self.repo_type.is_none_or(|t| t == repo.repo_type())
            && self.org == repo.org()
            && self.name.as_deref().is_none_or(|n| n == repo.name())
    }
}

impl std::str::FromStr for RepoPattern {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let parts: Vec<&str> = s.split('/').collect();
        let (repo_type, org, name) = match parts.as_slice() {
            [org, name] => (None, *org, *name),
            [t, org, name] => match RepoType::from_url_segment(t) {
                Some(t) => (Some(t), *org, *name),
                None => (None, "", ""),
            },
            _ => (None, "", ""),
        };
        if org.is_empty() {
            return Err(NameError {
                what: "repository pattern",
                shown: s.chars().take(100).collect(),
                reason: "expected ORG/NAME or ORG/*, optionally after models/ or datasets/".into(),
            });
        }
        check_repo_name("organisation", org)?;
        if name != "*" {
            check_repo_name("repository name", name)?;
        }
        Ok(Self {
            repo_type,
            org: org.to_owned(),
            name: (name != "*").then(|| name.to_owned()),
        })
    }
}

impl fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(t) = self.repo_type {
            write!(f, "{}/", t.url_segment())?;
        }
        write!(f, "{}/{}", self.org, self.name.as_deref().unwrap_or("*"))
    }
}

impl Serialize for RepoPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RepoPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a token grants, until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub scopes: Vec<Scope>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// The repositories the token is limited to; absent: not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repos: Option<Vec<RepoPattern>>,
}

/// What an allowed request may touch: everything, or only the
/// repositories a token's patterns match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    repos: Option<Vec<RepoPattern>>,
}

impl Grant {
    /// Not limited to repositories.
    pub fn all() -> Self {
        Self::default()
    }

    /// Whether the request may see `repo`.
    pub fn allows(&self, repo: &RepoId) -> bool {
        self.repos
            .as_ref()
            .is_none_or(|ps| ps.iter().any(|p| p.matches(repo)))
    }

    /// Whether the grant is limited to repositories.
    pub fn is_limited(&self) -> bool {
        self.repos.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("invalid token")]
    Invalid,
    #[error("token expired at {}", utc(*.0))]
    Expired(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: a signing key is at least {MIN_KEY_BYTES} bytes written as hex")]
    Format(String),
}

/// The server's HMAC key.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl SigningKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = vec![0u8; MIN_KEY_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
        Self(k)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }

    /// Reads a key file: hex text (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        match hex::decode(text.trim()) {
            Ok(k) if k.len() >= MIN_KEY_BYTES => Ok(Self(k)),
            _ => Err(KeyError::Format(path.display().to_string())),
        }
    }

    fn mac(&self, signed: &str) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(signed.as_bytes());
        m
    }

    /// The MAC that makes a URL a capability: `purpose` names what the URL
    /// grants (e.g. `content`: one file's bytes) and `subject` the thing
    /// granted (e.g. a file hash), so a MAC for one purpose never passes for
    /// another. HMAC-SHA256 truncated to [`URL_MAC_BYTES`], written as hex.
    /// Deterministic: every reader of one file gets the same URL, so a
    /// cache in front keeps one copy. The message cannot be mistaken for a
    /// token's (which starts `cas1.`).
    pub fn url_mac(&self, purpose: &str, subject: &str) -> String {
        let tag = self.mac(&url_mac_message(purpose, subject)).finalize();
        hex::encode(&tag.into_bytes()[..URL_MAC_BYTES])
    }

    /// Whether `mac` is [`url_mac`](Self::url_mac) of `purpose` and
    /// `subject` (lowercase hex only: one URL per capability, so one cache
    /// entry), compared in constant time.
    pub fn verify_url_mac(&self, purpose: &str, subject: &str, mac: &str) -> bool {
        if !mac.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return false;
        }
        match hex::decode(mac) {
            Ok(tag) if tag.len() == URL_MAC_BYTES => self
                .mac(&url_mac_message(purpose, subject))
                .verify_truncated_left(&tag)
                .is_ok(),
            _ => false,
        }
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let body = format!(
            "{PREFIX}.{}",
            hex::encode(serde_json::to_vec(claims).expect("json"))
        );
        let tag = hex::encode(self.mac(&body).finalize().into_bytes());
        format!("{body}.{tag}")
    }

    /// The claims of a token this key signed that has not expired at `now`.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Invalid);
        }
        let (body, tag) = token.rsplit_once('.').ok_or(TokenError::Invalid)?;
        let claims_hex = body
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('.'))
            .ok_or(TokenError::Invalid)?;
        let tag = hex::decode(tag).map_err(|_| TokenError::Invalid)?;
        // Constant-time comparison.
        self.mac(body)
            .verify_slice(&tag)
            .map_err(|_| TokenError::Invalid)?;
        let claims: Claims = hex::decode(claims_hex)
            .ok()
            .and_then(|j| serde_json::from_slice(&j).ok())
            .ok_or(TokenError::Invalid)?;
        if claims.exp <= now {
            return Err(TokenError::Expired(claims.exp));
        }
        Ok(claims)
    }
}

/// Bytes of a URL capability's MAC: 128 bits, past any guessing.
pub const URL_MAC_BYTES: usize = 16;

fn url_mac_message(purpose: &str, subject: &str) -> String {
    format!("url:{purpose}:{subject}")
}

/// The server's access policy.
#[derive(Debug, Clone)]
pub enum Access {
    /// No key: loopback peers only, no tokens.
    LoopbackOnly,
    Tokens(SigningKey),
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// 401: no bearer token.
    #[error("a bearer token is required")]
    NoToken,
    /// 401: a bad token or an expired one.
    #[error("{0}")]
    Unauthenticated(String),
    /// 403: a valid token without the scope the route needs.
    #[error("token lacks the {0} scope")]
    MissingScope(Scope),
    /// 403: a remote peer of a server without a key.
    #[error("{0}")]
    Forbidden(String),
}

impl Access {
    /// The signing key, if the server has one.
    pub fn key(&self) -> Option<&SigningKey> {
        match self {
            Access::LoopbackOnly => None,
            Access::Tokens(key) => Some(key),
        }
    }

    /// Checks one request: `needs` is the scope its route requires (`None`
    /// for open routes), `authorization` its `Authorization` header. An
    /// allowed request gets the token's [`Grant`] (everything on open
    /// routes and without a key).
    pub fn check(
        &self,
        peer: SocketAddr,
        needs: Option<Scope>,
        authorization: Option<&[u8]>,
        now: u64,
    ) -> Result<Grant, Denied> {
        let key = match self {
            Access::LoopbackOnly if peer.ip().is_loopback() => return Ok(Grant::all()),
            Access::LoopbackOnly => {
                return Err(Denied::Forbidden(
                    "this server has no signing key and serves loopback clients only".into(),
                ))
            }
            Access::Tokens(key) => key,
        };
        let Some(scope) = needs else {
            return Ok(Grant::all());
        };
        let token = authorization
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(bearer_token)
            .ok_or(Denied::NoToken)?;
        let claims = key
            .verify(token.trim(), now)
            .map_err(|e| Denied::Unauthenticated(e.to_string()))?;
        if !claims.scopes.contains(&scope) {
            return Err(Denied::MissingScope(scope));
        }
        Ok(Grant {
            repos: claims.repos,
        })
    }
}

/// The token of an `Authorization: Bearer <token>` value, or of `Basic
/// <base64 of user:token>` (the user is ignored: git and git-lfs send
/// credentials this way, with the token as the password). The scheme is
/// case-insensitive (RFC 7235 §2.1), so `bearer` and `BEARER` count too.
fn bearer_token(value: &str) -> Option<String> {
    use base64::Engine;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(token.to_owned());
    }
    if !scheme.eq_ignore_ascii_case("basic") || token.len() > 2 * MAX_TOKEN_LEN {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let (_, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(password.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(scopes: &[Scope], exp: u64) -> Claims {
        Claims {
            scopes: scopes.to_vec(),
            exp,
            repos: None,
        }
    }

    #[test]
    fn tokens_verify_only_untampered_and_unexpired() {
        let key = SigningKey::generate();
        let t = key.sign(&claims(&[Scope::Write], 1000));
        assert_eq!(key.verify(&t, 999), Ok(claims(&[Scope::Write], 1000)));
        assert_eq!(key.verify(&t, 1000), Err(TokenError::Expired(1000)));
        assert_eq!(
            SigningKey::generate().verify(&t, 0),
            Err(TokenError::Invalid),
            "another key"
        );
        // Flip every character in turn: never accepted, never a panic.
        for i in 0..t.len() {
            let mut b = t.clone().into_bytes();
            b[i] = if b[i] == b'0' { b'1' } else { b'0' };
            let Ok(s) = String::from_utf8(b) else {
                continue;
            };
            assert!(key.verify(&s, 0).is_err(), "flipped at {i}");
        }
        for junk in [
            "",
            ".",
            "cas1..",
            "cas1.zz.zz",
            "Bearer x",
            &"a".repeat(5000),
        ] {
            assert_eq!(key.verify(junk, 0), Err(TokenError::Invalid), "{junk:.20}");
        }
    }

    #[test]
    fn access_by_scope_and_peer() {
        let key = SigningKey::generate();
        let access = Access::Tokens(key.clone());
        let local: SocketAddr = "127.0.0.1:5".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:5".parse().unwrap();
        let bearer = |s: &[Scope], exp| format!("Bearer {}", key.sign(&claims(s, exp)));
        let read = bearer(&[Scope::Read], 100);
        let write = bearer(&[Scope::Write], 100);
        let both = bearer(&[Scope::Read, Scope::Write], 100);
        let check =
            |peer, needs, h: Option<&str>| access.check(peer, needs, h.map(str::as_bytes), 50);
        assert_eq!(
            check(remote, Some(Scope::Read), Some(&read)),
            Ok(Grant::all())
        );
        assert_eq!(
            check(remote, Some(Scope::Write), Some(&write)),
            Ok(Grant::all())
        );
        assert_eq!(
            check(remote, Some(Scope::Read), Some(&write)),
            Err(Denied::MissingScope(Scope::Read))
        );
        assert_eq!(
            check(remote, Some(Scope::Write), Some(&both)),
            Ok(Grant::all())
        );
        for scheme in ["bearer", "BEARER", "bEaReR"] {
            let h = read.replacen("Bearer", scheme, 1);
            assert_eq!(
                check(remote, Some(Scope::Read), Some(&h)),
                Ok(Grant::all()),
                "{h:.10}"
            );
        }
        assert!(matches!(
            check(
                remote,
                Some(Scope::Read),
                Some(&read.replacen("Bearer ", "Bearer", 1))
            ),
            Err(Denied::NoToken)
        ));
        assert_eq!(check(remote, None, None), Ok(Grant::all()), "open routes");
        let lacks = check(remote, Some(Scope::Write), Some(&read)).unwrap_err();
        assert_eq!(lacks.to_string(), "token lacks the write scope");
        assert_eq!(check(local, Some(Scope::Read), None), Err(Denied::NoToken));
        assert_eq!(
            check(remote, Some(Scope::Read), Some("Basic abc")),
            Err(Denied::NoToken)
        );
        // git's credentials: Basic, the token as the password.
        let basic = |user_pass: &str| {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD.encode(user_pass);
            format!("Basic {b64}")
        };
        let token = read.strip_prefix("Bearer ").unwrap();
        assert_eq!(
            check(
                remote,
                Some(Scope::Read),
                Some(&basic(&format!("git:{token}")))
            ),
            Ok(Grant::all())
        );
        assert!(matches!(
            check(remote, Some(Scope::Read), Some(&basic("git:nope"))),
            Err(Denied::Unauthenticated(_))
        ));
        assert_eq!(
            check(remote, Some(Scope::Read), Some(&basic("no colon"))),
            Err(Denied::NoToken)
        );
        let expired = bearer(&[Scope::Read], 10);
        assert!(
            matches!(check(remote, Some(Scope::Read), Some(&expired)), Err(Denied::Unauthenticated(m)) if m.contains("expired at 1970-01-01T00:00:10Z"))
        );

        let open = Access::LoopbackOnly;
        assert_eq!(
            open.check(local, Some(Scope::Write), None, 0),
            Ok(Grant::all())
        );
        assert_eq!(
            open.check("[::1]:9".parse().unwrap(), None, None, 0),
            Ok(Grant::all())
        );
        assert!(matches!(
            open.check(remote, None, None, 0),
            Err(Denied::Forbidden(_))
        ));
    }

    #[test]
    fn repo_patterns_limit_a_grant() {
        for ok in ["org/*", "org/name", "models/org/*", "datasets/org/x"] {
            assert_eq!(ok.parse::<RepoPattern>().unwrap().to_string(), ok);
        }
        for bad in [
            "*/*",
            "org",
            "a/b/c",
            "../x",
            "org/*x",
            "files/org/x",
            "org/",
            "",
        ] {
            assert!(bad.parse::<RepoPattern>().is_err(), "{bad:?}");
        }
        let repo = |s: &str| RepoId::parse(s, RepoType::Model).unwrap();
        let grant = |ps: &[&str]| Grant {
            repos: Some(ps.iter().map(|s| s.parse().unwrap()).collect()),
        };
        let g = grant(&["org/*", "datasets/org2/x"]);
        assert!(g.allows(&repo("org/a")) && g.allows(&repo("datasets/org/a")));
        assert!(g.allows(&repo("datasets/org2/x")));
        assert!(!g.allows(&repo("org2/x")), "the pattern names a dataset");
        assert!(!g.allows(&repo("other/b")) && !g.allows(&repo("org-x/a")));
        assert!(g.is_limited() && !Grant::all().is_limited());
        assert!(!grant(&[]).allows(&repo("org/a")));
        assert!(Grant::all().allows(&repo("any/thing")));

        // The token carries its patterns; a token without them is unlimited.
        let key = SigningKey::generate();
        let access = Access::Tokens(key.clone());
        let remote: SocketAddr = "10.1.2.3:5".parse().unwrap();
        let mut limited = claims(&[Scope::Read], 100);
        limited.repos = g.repos.clone();
        let t = format!("Bearer {}", key.sign(&limited));
        assert_eq!(
            access.check(remote, Some(Scope::Read), Some(t.as_bytes()), 50),
            Ok(g)
        );
        let plain = key.sign(&claims(&[Scope::Read], 100));
        let json = hex::decode(plain.split('.').nth(1).unwrap()).unwrap();
        assert!(!String::from_utf8(json).unwrap().contains("repos"));
        let t = format!("Bearer {plain}");
        assert_eq!(
            access.check(remote, Some(Scope::Read), Some(t.as_bytes()), 50),
            Ok(Grant::all())
        );
    }

    #[test]
    fn url_macs_bind_purpose_subject_and_key() {
        let key = SigningKey::generate();
        let mac = key.url_mac("content", "abc");
        assert_eq!(mac.len(), 2 * URL_MAC_BYTES);
        assert_eq!(key.url_mac("content", "abc"), mac, "deterministic");
        assert!(key.verify_url_mac("content", "abc", &mac));
        assert!(!key.verify_url_mac("content", "abd", &mac));
        assert!(!key.verify_url_mac("xorb", "abc", &mac));
        assert!(!SigningKey::generate().verify_url_mac("content", "abc", &mac));
        for bad in [
            "",
            "zz",
            &mac[..30],
            &format!("{mac}00"),
            &mac.to_uppercase(),
        ] {
            assert!(!key.verify_url_mac("content", "abc", bad), "{bad:?}");
        }
    }

    #[test]
    fn key_files_are_hex_and_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let key = SigningKey::generate();
        std::fs::write(&p, format!("{}\n", key.to_hex())).unwrap();
        let again = SigningKey::from_file(&p).unwrap();
        let t = key.sign(&claims(&[Scope::Read], 10));
        assert!(again.verify(&t, 0).is_ok());
        std::fs::write(&p, "abcd").unwrap();
        assert!(matches!(
            SigningKey::from_file(&p),
            Err(KeyError::Format(_))
        ));
    }
}
