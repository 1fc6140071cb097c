//! An in-memory object store for tests of the core: same contract as the
//! filesystem store, no disk.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use cas_protocol::ByteRange;

use super::{Expect, KeyPrefix, ObjectKey, ObjectReader, ObjectStore, RefError, RefVersion};

#[derive(Debug, Default)]
pub struct MemStore {
    /// By key, so a listing is a range.
    objects: Mutex<BTreeMap<String, Bytes>>,
}

impl MemStore {
    fn objects(&self) -> MutexGuard<'_, BTreeMap<String, Bytes>> {
        self.objects.lock().expect("not poisoned")
    }

    /// Checks a record against `expect` under the map's lock.
    fn compare(objects: &BTreeMap<String, Bytes>, key: &ObjectKey, expect: &Expect) -> bool {
        match (expect, objects.get(key.as_str())) {
            (Expect::Absent, None) => true,
            (Expect::Version(v), Some(b)) => RefVersion::of(b) == *v,
            _ => false,
        }
    }
}

impl ObjectStore for MemStore {
    async fn put(&self, key: &ObjectKey, bytes: Bytes) -> io::Result<bool> {
        let mut objects = self.objects();
        if objects.contains_key(key.as_str()) {
            return Ok(false);
        }
        objects.insert(key.as_str().to_owned(), bytes);
        Ok(true)
    }

    async fn len(&self, key: &ObjectKey) -> io::Result<Option<u64>> {
        Ok(self.objects().get(key.as_str()).map(|b| b.len() as u64))
    }

    async fn delete(&self, key: &ObjectKey) -> io::Result<()> {
        self.objects().remove(key.as_str());
        Ok(())
    }

    async fn read_range(&self, key: &ObjectKey, range: ByteRange) -> io::Result<ObjectReader> {
        let objects = self.objects();
        let bytes = objects
            .get(key.as_str())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let slice = usize::try_from(range.start)
            .ok()
            .zip(usize::try_from(range.end).ok())
            .filter(|&(_, e)| e <= bytes.len())
            .map(|(s, e)| bytes.slice(s..e))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range outside object"))?;
        Ok(Box::pin(io::Cursor::new(slice)))
    }

    async fn get(&self, key: &ObjectKey) -> io::Result<Option<Bytes>> {
        Ok(self.objects().get(key.as_str()).cloned())
    }

    async fn list(&self, prefix: &KeyPrefix) -> io::Result<Vec<ObjectKey>> {
        let start = format!("{}/", prefix.as_str());
        Ok(self
            .objects()
            .range(start.clone()..)
            .take_while(|(k, _)| k.starts_with(&start))
            .filter_map(|(k, _)| ObjectKey::from_listed(k))
            .collect())
    }

    async fn get_ref(&self, key: &ObjectKey) -> io::Result<Option<(Bytes, RefVersion)>> {
        Ok(self
            .objects()
            .get(key.as_str())
            .map(|b| (b.clone(), RefVersion::of(b))))
    }

    async fn put_ref(
        &self,
        key: &ObjectKey,
        bytes: Bytes,
        expect: Expect,
    ) -> Result<RefVersion, RefError> {
        let mut objects = self.objects();
        if !Self::compare(&objects, key, &expect) {
            return Err(RefError::Conflict);
        }
        let version = RefVersion::of(&bytes);
        objects.insert(key.as_str().to_owned(), bytes);
        Ok(version)
    }

    async fn delete_ref(&self, key: &ObjectKey, version: &RefVersion) -> Result<(), RefError> {
        let mut objects = self.objects();
        if !Self::compare(&objects, key, &Expect::Version(version.clone())) {
            return Err(RefError::Conflict);
        }
        objects.remove(key.as_str());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn conforms() {
        super::super::conformance::run(&super::MemStore::default()).await;
    }
}
