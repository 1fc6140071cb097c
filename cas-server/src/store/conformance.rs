//! The contract every [`ObjectStore`] keeps, as one suite each
//! implementation runs against a fresh, empty store.

use bytes::Bytes;
use cas_protocol::repo::{CommitId, RefKind, RefName, RepoId, RepoType};
use cas_protocol::{ByteRange, XorbHash};
use tokio::io::AsyncReadExt;

use super::{Expect, KeyPrefix, ObjectKey, ObjectKind, ObjectStore, RefError};

/// Panics on the first broken promise.
pub async fn run(store: &impl ObjectStore) {
    immutable_objects(store).await;
    listing(store).await;
    compare_and_swap(store).await;
    concurrent_swaps_lose_nothing(store).await;
}

async fn immutable_objects(store: &impl ObjectStore) {
    let xorb = ObjectKey::xorb(&XorbHash::from_bytes([0x5a; 32]));
    let shard = ObjectKey::shard(&[0x5a; 32]);
    assert_eq!(store.len(&xorb).await.unwrap(), None, "absent at first");
    assert_eq!(store.get(&xorb).await.unwrap(), None);
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
        store.get(&xorb).await.unwrap().as_deref(),
        Some(&b"0123456789"[..])
    );
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
    let raced = ObjectKey::xorb(&XorbHash::from_bytes([0x7e; 32]));
    let puts = (0..8).map(|_| store.put(&raced, Bytes::from_static(b"same bytes")));
    let created = futures_util::future::join_all(puts).await;
    assert_eq!(
        created.into_iter().filter(|r| *r.as_ref().unwrap()).count(),
        1,
        "concurrent puts of one key: one reports that it wrote it"
    );
    let missing = ObjectKey::xorb(&XorbHash::from_bytes([0x01; 32]));
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

fn repo(t: RepoType, org: &str, name: &str) -> RepoId {
    RepoId::new(t, org, name).unwrap()
}

fn branch(r: &RepoId, name: &str) -> ObjectKey {
    ObjectKey::git_ref(r, RefKind::Branch, &RefName::new(name).unwrap())
}

async fn listing(store: &impl ObjectStore) {
    let a = repo(RepoType::Model, "org", "a");
    let a2 = repo(RepoType::Model, "org", "a-2");
    let d = repo(RepoType::Dataset, "org", "a");
    for r in [&a, &a2, &d] {
        store
            .put_ref(
                &ObjectKey::repo(r),
                Bytes::from_static(b"{}"),
                Expect::Absent,
            )
            .await
            .unwrap();
    }
    // `x` and `x/y` are both refs: one key segment each.
    for name in ["x/y", "x", "main"] {
        store
            .put_ref(&branch(&a, name), Bytes::from_static(b"c"), Expect::Absent)
            .await
            .unwrap();
    }
    store
        .put_ref(
            &branch(&a2, "main"),
            Bytes::from_static(b"c"),
            Expect::Absent,
        )
        .await
        .unwrap();
    let commit = ObjectKey::commit(&CommitId::from_bytes([7; 20]));
    store.put(&commit, Bytes::from_static(b"c")).await.unwrap();

    let names = |keys: Vec<ObjectKey>| -> Vec<String> {
        keys.iter().map(|k| k.as_str().to_owned()).collect()
    };
    assert_eq!(
        names(
            store
                .list(&KeyPrefix::repos(RepoType::Model))
                .await
                .unwrap()
        ),
        ["repos/model/org/a", "repos/model/org/a-2"]
    );
    assert_eq!(
        names(
            store
                .list(&KeyPrefix::repos(RepoType::Dataset))
                .await
                .unwrap()
        ),
        ["repos/dataset/org/a"]
    );
    let heads = store
        .list(&KeyPrefix::refs(&a, RefKind::Branch))
        .await
        .unwrap();
    assert_eq!(
        names(heads.clone()),
        [
            "refs/model/org/a/heads/main",
            "refs/model/org/a/heads/x",
            "refs/model/org/a/heads/x%2Fy"
        ],
        "sorted, and not the refs of org/a-2"
    );
    assert_eq!(
        RefName::from_key_segment(heads[2].last_segment()).unwrap(),
        RefName::new("x/y").unwrap()
    );
    assert!(store
        .list(&KeyPrefix::refs(&a, RefKind::Tag))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        names(
            store
                .list(&KeyPrefix::kind(ObjectKind::Commit))
                .await
                .unwrap()
        ),
        [commit.as_str()]
    );
}

async fn compare_and_swap(store: &impl ObjectStore) {
    let r = repo(RepoType::Model, "cas", "swap");
    let key = branch(&r, "main");
    assert!(store.get_ref(&key).await.unwrap().is_none());
    let v1 = store
        .put_ref(&key, Bytes::from_static(b"one"), Expect::Absent)
        .await
        .unwrap();
    assert!(
        matches!(
            store
                .put_ref(&key, Bytes::from_static(b"two"), Expect::Absent)
                .await,
            Err(RefError::Conflict)
        ),
        "create fails when the record exists"
    );
    let (bytes, v) = store.get_ref(&key).await.unwrap().unwrap();
    assert_eq!((&bytes[..], &v), (&b"one"[..], &v1));
    let v2 = store
        .put_ref(
            &key,
            Bytes::from_static(b"two"),
            Expect::Version(v1.clone()),
        )
        .await
        .unwrap();
    assert_ne!(v1, v2);
    assert!(
        matches!(
            store
                .put_ref(
                    &key,
                    Bytes::from_static(b"three"),
                    Expect::Version(v1.clone())
                )
                .await,
            Err(RefError::Conflict)
        ),
        "an update from a stale version fails"
    );
    assert!(matches!(
        store.delete_ref(&key, &v1).await,
        Err(RefError::Conflict)
    ));
    assert_eq!(&store.get_ref(&key).await.unwrap().unwrap().0[..], b"two");
    store.delete_ref(&key, &v2).await.unwrap();
    assert!(store.get_ref(&key).await.unwrap().is_none());
    assert!(matches!(
        store
            .put_ref(&key, Bytes::from_static(b"x"), Expect::Version(v2))
            .await,
        Err(RefError::Conflict)
    ));
    store
        .put_ref(&key, Bytes::from_static(b"again"), Expect::Absent)
        .await
        .unwrap();
}

/// Many writers append to one record by compare-and-swap, retrying on
/// conflict: every update that succeeded is in the final value, once.
async fn concurrent_swaps_lose_nothing(store: &impl ObjectStore) {
    const WRITERS: usize = 8;
    const UPDATES: usize = 12;
    let key = branch(&repo(RepoType::Model, "cas", "race"), "main");
    let writer = |w: usize| {
        let key = key.clone();
        async move {
            let mut conflicts = 0;
            for u in 0..UPDATES {
                loop {
                    let (old, expect) = match store.get_ref(&key).await.unwrap() {
                        Some((b, v)) => {
                            (String::from_utf8(b.to_vec()).unwrap(), Expect::Version(v))
                        }
                        None => (String::new(), Expect::Absent),
                    };
                    // Let the other writers read the same version.
                    tokio::task::yield_now().await;
                    let new = format!("{old}{w}.{u},");
                    match store.put_ref(&key, Bytes::from(new), expect).await {
                        Ok(_) => break,
                        Err(RefError::Conflict) => conflicts += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            conflicts
        }
    };
    let conflicts: usize = futures_util::future::join_all((0..WRITERS).map(writer))
        .await
        .into_iter()
        .sum();
    let (bytes, _) = store.get_ref(&key).await.unwrap().unwrap();
    let mut chain: Vec<&str> = std::str::from_utf8(&bytes)
        .unwrap()
        .trim_end_matches(',')
        .split(',')
        .collect();
    assert_eq!(chain.len(), WRITERS * UPDATES, "{conflicts} conflicts");
    chain.sort_unstable();
    chain.dedup();
    assert_eq!(chain.len(), WRITERS * UPDATES, "no update twice");
}
