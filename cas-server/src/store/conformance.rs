//! The contract every [`ObjectStore`] keeps, as one suite each
//! implementation runs against a fresh, empty store.

use bytes::Bytes;
use cas_protocol::ByteRange;
use tokio::io::AsyncReadExt;

use super::{ObjectKey, ObjectKind, ObjectStore};

/// Panics on the first broken promise.
pub async fn run(store: &impl ObjectStore) {
    let xorb = ObjectKey::new(ObjectKind::Xorb, &[0x5a; 32]);
    let shard = ObjectKey::new(ObjectKind::Shard, &[0x5a; 32]);
    assert_eq!(store.len(&xorb).await.unwrap(), None, "absent at first");
    assert!(store
        .put(&xorb, Bytes::from_static(b"0123456789"))
        .await
        .unwrap());
    assert!(
        !store
            .put(&xorb, Bytes::from_static(b"0123456789"))
            .await
            .unwrap(),
        "a second put of the same key reports that it existed"
    );
    assert_eq!(store.len(&xorb).await.unwrap(), Some(10));
    assert_eq!(
        store.len(&shard).await.unwrap(),
        None,
        "kinds are separate namespaces"
    );
    for (start, end, want) in [(0, 10, &b"0123456789"[..]), (3, 7, b"3456"), (9, 10, b"9")] {
        let mut out = Vec::new();
        store
            .read_range(&xorb, ByteRange { start, end })
            .await
            .unwrap()
            .read_to_end(&mut out)
            .await
            .unwrap();
        assert_eq!(out, want, "bytes {start}..{end}");
    }
    // Concurrent puts of one new key: exactly one wrote it.
    let raced = ObjectKey::new(ObjectKind::Xorb, &[0x7e; 32]);
    let puts = (0..8).map(|_| store.put(&raced, Bytes::from_static(b"same bytes")));
    let created = futures_util::future::join_all(puts).await;
    assert_eq!(
        created.into_iter().filter(|r| *r.as_ref().unwrap()).count(),
        1,
        "concurrent puts of one key: one reports that it wrote it"
    );
    let missing = ObjectKey::new(ObjectKind::Xorb, &[0x01; 32]);
    assert!(store
        .read_range(&missing, ByteRange { start: 0, end: 1 })
        .await
        .is_err());
    store.delete(&missing).await.unwrap();
    store.delete(&xorb).await.unwrap();
    assert_eq!(store.len(&xorb).await.unwrap(), None, "deleted");
    assert!(
        store
            .put(&xorb, Bytes::from_static(b"again"))
            .await
            .unwrap(),
        "a deleted key can be written again"
    );
    assert_eq!(store.len(&xorb).await.unwrap(), Some(5));
}
