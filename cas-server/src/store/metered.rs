//! A decorator that counts every call of the store it wraps by operation
//! (`cas_store_requests_total{op}`: S3 requests, which cost money and
//! time) and keeps the store's health: a failed call marks the store
//! failing (`/healthz` says "degraded"), the next answered one clears it.
//! An absent object or a lost compare-and-swap is an answer, not a failure.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use cas_protocol::ByteRange;

use super::{Expect, KeyPrefix, ObjectKey, ObjectReader, ObjectStore, RefError, RefVersion};
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Metered<S> {
    pub fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    fn io<T>(&self, op: &'static str, r: io::Result<T>) -> io::Result<T> {
        let failure = r
            .as_ref()
            .err()
            .filter(|e| e.kind() != io::ErrorKind::NotFound);
        self.metrics
            .store_request(op, failure.map(|e| e as &dyn std::fmt::Display));
        r
    }

    fn swap<T>(&self, op: &'static str, r: Result<T, RefError>) -> Result<T, RefError> {
        let failure = match &r {
            Err(RefError::Io(e)) => Some(e as &dyn std::fmt::Display),
            _ => None,
        };
        self.metrics.store_request(op, failure);
        r
    }
}

impl<S: ObjectStore> ObjectStore for Metered<S> {
    async fn put(&self, key: &ObjectKey, bytes: Bytes) -> io::Result<bool> {
        self.io("put", self.inner.put(key, bytes).await)
    }

    async fn len(&self, key: &ObjectKey) -> io::Result<Option<u64>> {
        self.io("head", self.inner.len(key).await)
    }

    async fn delete(&self, key: &ObjectKey) -> io::Result<()> {
        self.io("delete", self.inner.delete(key).await)
    }

    async fn read_range(&self, key: &ObjectKey, range: ByteRange) -> io::Result<ObjectReader> {
        self.io("get_range", self.inner.read_range(key, range).await)
    }

    async fn get(&self, key: &ObjectKey) -> io::Result<Option<Bytes>> {
        self.io("get", self.inner.get(key).await)
    }

    async fn list(&self, prefix: &KeyPrefix) -> io::Result<Vec<ObjectKey>> {
        self.io("list", self.inner.list(prefix).await)
    }

    async fn get_ref(&self, key: &ObjectKey) -> io::Result<Option<(Bytes, RefVersion)>> {
        self.io("get", self.inner.get_ref(key).await)
    }

    async fn put_ref(
        &self,
        key: &ObjectKey,
        bytes: Bytes,
        expect: Expect,
    ) -> Result<RefVersion, RefError> {
        self.swap("put", self.inner.put_ref(key, bytes, expect).await)
    }

    async fn delete_ref(&self, key: &ObjectKey, version: &RefVersion) -> Result<(), RefError> {
        self.swap("delete", self.inner.delete_ref(key, version).await)
    }

    /// Signing is local: no request to count.
    async fn presign(
        &self,
        key: &ObjectKey,
        ttl: std::time::Duration,
    ) -> io::Result<Option<String>> {
        self.inner.presign(key, ttl).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    use cas_protocol::XorbHash;

    #[tokio::test]
    async fn counts_calls_and_conforms() {
        let metrics = Arc::new(Metrics::default());
        let store = Metered::new(MemStore::default(), metrics.clone());
        crate::store::conformance::run(&store).await;
        let key = ObjectKey::xorb(&XorbHash::from_bytes([3; 32]));
        store.len(&key).await.unwrap();
        let text = metrics.render(&[]);
        assert!(
            text.contains("cas_store_requests_total{op=\"head\"} "),
            "{text}"
        );
        assert!(text.contains("cas_store_requests_total{op=\"list\"} "));
        assert_eq!(metrics.store_degraded(), None, "absent objects are answers");
    }
}
