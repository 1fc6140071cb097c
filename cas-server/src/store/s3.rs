//! The S3 object store (AWS S3 or any S3-compatible store: SeaweedFS,
//! MinIO, Ceph RGW, R2), through the `object_store` crate: it signs,
//! retries (5xx, 429 and connection errors, with backoff, for at most the
//! configured retry timeout; never a 4xx) and speaks S3's conditional
//! writes. We add no retry loop on top.
//!
//! Keys are `<prefix>/<key>` (e.g. `cas/xorbs/<hex>`). Every write is one
//! PUT, atomic in S3: an object is whole under its name or absent.
//! - Immutable objects: `If-None-Match: *` (create-if-absent); a 412 means
//!   another writer stored the same content-addressed bytes first.
//! - Mutable records: the version is the object's ETag; an update sends
//!   `If-Match: <etag>`, a create `If-None-Match: *`. A PUT whose outcome
//!   is unknown (a timeout: it may have landed) is settled by reading the
//!   record back: our bytes there mean our write won.
//! - `delete_ref` is a read, a compare and an unconditional DELETE: S3's
//!   DeleteObject has no portable `If-Match` (AWS added one in 2024,
//!   SeaweedFS 4.48 and `object_store` do not offer it). A branch deletion
//!   racing an update of the same branch on another node can drop that
//!   update; deletions are rare, admin-driven operations.
//!
//! Measured on SeaweedFS 4.48 (tests/tests/s3.rs runs it): `If-None-Match:
//! *` answers 412 on an existing key, `If-Match` 412 on a stale ETag or a
//! missing key, so both compare-and-swap forms hold.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cas_protocol::ByteRange;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore as Remote, ObjectStoreExt,
    PutMode, PutOptions, RetryConfig, UpdateVersion,
};

use super::{
    Expect, KeyPrefix, ObjectKey, ObjectReader, ObjectStore, RefError, RefVersion, Unavailable,
};

/// Longest a single S3 request may take, body included (a 64 MiB xorb
/// read by a slow client stays open this long at most).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest a TCP (and TLS) connect to the store may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the bucket is and how to reach it. Credentials, region and
/// endpoint come from the standard AWS environment (`AWS_ENDPOINT_URL`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
/// `AWS_ALLOW_HTTP`, ...) unless set here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/`), may be empty.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// How long a call retries a store that fails (5xx, 429, connection
    /// errors) before it fails.
    pub retry_timeout: Duration,
}

impl S3Config {
    /// Parses `s3://BUCKET[/PREFIX]`.
    pub fn from_url(url: &str, retry_timeout: Duration) -> Result<Self, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{url:?} is not an s3://BUCKET[/PREFIX] URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        if bucket.is_empty() {
            return Err(format!("{url:?} names no bucket"));
        }
        if !prefix.is_empty() && Path::parse(prefix).is_err() {
            return Err(format!("{url:?}: the prefix is not a usable key prefix"));
        }
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint: None,
            region: None,
            retry_timeout,
        })
    }
}

/// Objects in an S3 bucket under a prefix.
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<dyn Remote>,
    /// Signs presigned GET URLs (absent for stores that cannot sign).
    signer: Option<Arc<dyn Signer>>,
    prefix: String,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Store({}, prefix {:?})", self.inner, self.prefix)
    }
}

impl S3Store {
    /// A client for the bucket (no request is made yet).
    pub fn new(config: &S3Config) -> io::Result<Self> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            // Path style: what custom endpoints (SeaweedFS, MinIO) serve.
            .with_virtual_hosted_style_request(false)
            .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch)
            // No SHA-256 of each body in the signature: it was most of the
            // node's CPU time in an upload (docs/BENCHMARKS.md, "S3 store").
            // Objects are checked by their content hash on every read, and
            // HTTPS protects the bytes in transit.
            .with_unsigned_payload(true)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: 100,
                retry_timeout: config.retry_timeout,
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(REQUEST_TIMEOUT)
                    .with_connect_timeout(CONNECT_TIMEOUT),
            );
        if let Some(e) = &config.endpoint {
            b = b.with_endpoint(e);
        }
        // Plain HTTP to a store on this host (a test or sidecar SeaweedFS)
        // needs no AWS_ALLOW_HTTP; anything else stays HTTPS unless that says.
        let endpoint = config.endpoint.clone().or_else(|| {
            ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
                .iter()
                .find_map(|v| std::env::var(v).ok())
        });
        if endpoint.as_deref().is_some_and(is_loopback_http) {
            b = b.with_allow_http(true);
        }
        if let Some(r) = &config.region {
            b = b.with_region(r);
        }
        let s3 = Arc::new(b.build().map_err(io::Error::other)?);
        Ok(Self {
            inner: s3.clone(),
            signer: Some(s3),
            prefix: config.prefix.clone(),
        })
    }

    /// A store over any `object_store` implementation (tests use its
    /// `InMemory`); it cannot presign URLs.
    pub fn from_inner(inner: Arc<dyn Remote>, prefix: &str) -> Self {
        Self {
            inner,
            signer: None,
            prefix: prefix.to_owned(),
        }
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn path(&self, key: &ObjectKey) -> Path {
        Path::parse(self.full_key(key.as_str())).expect("object keys are valid paths")
    }

    /// A GET of the whole object with its ETag, or `None`.
    async fn get_versioned(&self, key: &ObjectKey) -> io::Result<Option<(Bytes, Option<String>)>> {
        match self
            .inner
            .get_opts(&self.path(key), GetOptions::default())
            .await
        {
            Ok(r) => {
                let e_tag = r.meta.e_tag.clone();
                let bytes = r.bytes().await.map_err(unavailable)?;
                Ok(Some((bytes, e_tag)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }
}

fn is_loopback_http(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A store failure the client did not overcome within its retry timeout.
fn unavailable(e: object_store::Error) -> io::Error {
    io::Error::other(Unavailable(e.to_string()))
}

fn version(e_tag: Option<String>) -> io::Result<RefVersion> {
    e_tag
        .map(RefVersion)
        .ok_or_else(|| io::Error::other("the object store answered without an ETag"))
}

impl ObjectStore for S3Store {
    async fn put(&self, key: &ObjectKey, bytes: Bytes) -> io::Result<bool> {
        let opts = PutOptions::from(PutMode::Create);
        match self
            .inner
            .put_opts(&self.path(key), bytes.into(), opts)
            .await
        {
            Ok(_) => Ok(true),
            // Content addressing: what is there has the same bytes.
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn len(&self, key: &ObjectKey) -> io::Result<Option<u64>> {
        match self.inner.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn delete(&self, key: &ObjectKey) -> io::Result<()> {
        match self.inner.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn read_range(&self, key: &ObjectKey, range: ByteRange) -> io::Result<ObjectReader> {
        if range.start >= range.end {
            return Ok(Box::pin(io::Cursor::new(Bytes::new())));
        }
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range.start..range.end)),
            ..GetOptions::default()
        };
        let r = match self.inner.get_opts(&self.path(key), opts).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(io::Error::from(io::ErrorKind::NotFound))
            }
            Err(e) => return Err(unavailable(e)),
        };
        if r.range != (range.start..range.end) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range outside object",
            ));
        }
        let stream = r.into_stream().map_err(unavailable);
        Ok(Box::pin(tokio_util::io::StreamReader::new(stream)))
    }

    async fn get(&self, key: &ObjectKey) -> io::Result<Option<Bytes>> {
        Ok(self.get_versioned(key).await?.map(|(b, _)| b))
    }

    async fn list(&self, prefix: &KeyPrefix) -> io::Result<Vec<ObjectKey>> {
        let path = Path::parse(self.full_key(prefix.as_str())).expect("prefixes are valid paths");
        let strip = match self.prefix.as_str() {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let mut listed = self.inner.list(Some(&path));
        let mut keys = Vec::new();
        while let Some(meta) = listed.next().await {
            let meta = meta.map_err(unavailable)?;
            let found = meta.location.as_ref();
            match found.strip_prefix(&strip).and_then(ObjectKey::from_listed) {
                Some(k) if prefix.contains(&k) => keys.push(k),
                _ => tracing::debug!(key = found, "not an object; skipped in a listing"),
            }
        }
        keys.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(keys)
    }

    async fn get_ref(&self, key: &ObjectKey) -> io::Result<Option<(Bytes, RefVersion)>> {
        match self.get_versioned(key).await? {
            Some((bytes, e_tag)) => Ok(Some((bytes, version(e_tag)?))),
            None => Ok(None),
        }
    }

    async fn put_ref(
        &self,
        key: &ObjectKey,
        bytes: Bytes,
        expect: Expect,
    ) -> Result<RefVersion, RefError> {
        let mode = match expect {
            Expect::Absent => PutMode::Create,
            Expect::Version(v) => PutMode::Update(UpdateVersion {
                e_tag: Some(v.0),
                version: None,
            }),
        };
        let put = self
            .inner
            .put_opts(&self.path(key), bytes.clone().into(), mode.into())
            .await;
        match put {
            Ok(r) => Ok(version(r.e_tag)?),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Err(RefError::Conflict),
            Err(e) => {
                // The PUT may have landed although the call failed: if the
                // record holds our bytes now, our swap is what put them
                // there (a record's value names a new commit, so another
                // writer does not write the same bytes).
                match self.get_ref(key).await {
                    Ok(Some((now, v))) if now == bytes => Ok(v),
                    _ => Err(RefError::Io(unavailable(e))),
                }
            }
        }
    }

    async fn presign(&self, key: &ObjectKey, ttl: Duration) -> io::Result<Option<String>> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let url = signer
            .signed_url(object_store::signer::Method::GET, &self.path(key), ttl)
            .await
            .map_err(unavailable)?;
        Ok(Some(url.to_string()))
    }

    async fn delete_ref(&self, key: &ObjectKey, version: &RefVersion) -> Result<(), RefError> {
        match self.get_ref(key).await? {
            Some((_, v)) if v == *version => {}
            _ => return Err(RefError::Conflict),
        }
        match self.inner.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(RefError::Io(unavailable(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn conforms_on_in_memory() {
        let remote = Arc::new(InMemory::new());
        let store = S3Store::from_inner(remote.clone(), "a/prefix");
        super::super::conformance::run(&store).await;
        // Everything lies under the prefix; a foreign key beside ours is
        // not listed.
        remote
            .put(
                &Path::parse("a/prefix/xorbs/not-hex").unwrap(),
                Bytes::new().into(),
            )
            .await
            .unwrap();
        let all: Vec<_> = remote.list(None).try_collect().await.unwrap();
        assert!(all
            .iter()
            .all(|m| m.location.as_ref().starts_with("a/prefix/")));
        let xorbs = store
            .list(&KeyPrefix::kind(super::super::ObjectKind::Xorb))
            .await
            .unwrap();
        assert!(xorbs.iter().all(|k| k.last_segment().len() == 64));
    }

    #[test]
    fn plain_http_only_on_loopback() {
        for yes in [
            "http://127.0.0.1:8333",
            "http://localhost:1/",
            "http://[::1]:9",
        ] {
            assert!(is_loopback_http(yes), "{yes}");
        }
        for no in [
            "https://127.0.0.1",
            "http://s3.example.com",
            "http://10.0.0.1:80",
        ] {
            assert!(!is_loopback_http(no), "{no}");
        }
    }

    #[test]
    fn parses_urls() {
        let t = Duration::from_secs(15);
        let c = S3Config::from_url("s3://bucket/some/prefix/", t).unwrap();
        assert_eq!(
            (c.bucket.as_str(), c.prefix.as_str()),
            ("bucket", "some/prefix")
        );
        let c = S3Config::from_url("s3://bucket", t).unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("bucket", ""));
        for bad in ["s3://", "file:///x", "bucket/x", "s3:///x"] {
            assert!(S3Config::from_url(bad, t).is_err(), "{bad}");
        }
    }
}
