//! An in-memory object store for tests of the core: same contract as the
//! filesystem store, no disk.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

use bytes::Bytes;
use cas_protocol::ByteRange;

use super::{ObjectKey, ObjectKind, ObjectReader, ObjectStore};

#[derive(Debug, Default)]
pub struct MemStore {
    objects: Mutex<HashMap<(ObjectKind, String), Bytes>>,
}

impl MemStore {
    fn key(key: &ObjectKey) -> (ObjectKind, String) {
        (key.kind(), key.hex().to_owned())
    }
}

impl ObjectStore for MemStore {
    async fn put(&self, key: &ObjectKey, bytes: Bytes) -> io::Result<bool> {
        let mut objects = self.objects.lock().expect("not poisoned");
        if objects.contains_key(&Self::key(key)) {
            return Ok(false);
        }
        objects.insert(Self::key(key), bytes);
        Ok(true)
    }

    async fn len(&self, key: &ObjectKey) -> io::Result<Option<u64>> {
        let objects = self.objects.lock().expect("not poisoned");
        Ok(objects.get(&Self::key(key)).map(|b| b.len() as u64))
    }

    async fn delete(&self, key: &ObjectKey) -> io::Result<()> {
        let mut objects = self.objects.lock().expect("not poisoned");
        objects.remove(&Self::key(key));
        Ok(())
    }

    async fn read_range(&self, key: &ObjectKey, range: ByteRange) -> io::Result<ObjectReader> {
        let objects = self.objects.lock().expect("not poisoned");
        let bytes = objects
            .get(&Self::key(key))
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let slice = usize::try_from(range.start)
            .ok()
            .zip(usize::try_from(range.end).ok())
            .filter(|&(_, e)| e <= bytes.len())
            .map(|(s, e)| bytes.slice(s..e))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range outside object"))?;
        Ok(Box::pin(io::Cursor::new(slice)))
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn conforms() {
        super::super::conformance::run(&super::MemStore::default()).await;
    }
}
