//! The contract every `Index` implementation must keep, as test cases over
//! `&dyn Index`. An implementation runs them all with
//! `crate::index::contract::tests!(open, pair)`, where `open()` (async) returns a guard
//! to keep alive (a temporary directory, a database server) and a fresh, empty index,
//! and `pair()` two handles of one fresh index (two processes' views of one database;
//! one shared handle for an index one process owns).

use bytes::Bytes;

use super::*;
use crate::store::{PackId, Segment};

fn cache(name: &str) -> CacheName {
    name.parse().unwrap()
}

fn chunk(n: u8) -> ChunkRef {
    ChunkRef {
        id: ChunkId([n; 32]),
        pack: PackId([n; 16]),
        offset: u32::from(n),
        stored_len: 10,
        len: 20,
    }
}

pub(crate) fn narinfo(nar: &[u8], text: &'static str) -> NarInfoRecord {
    NarInfoRecord {
        nar_hash: Sha256::digest(nar),
        nar_size: 100,
        file_size: 40,
        text: Bytes::from_static(text.as_bytes()),
    }
}

pub(crate) fn nar_record(n: u8) -> NarRecord {
    NarRecord {
        contents: Stored {
            id: ManifestId([n; 16]),
            segments: vec![Segment {
                size: 20,
                stored_size: 10,
            }],
        },
        listing: Stored {
            id: ManifestId([n + 100; 16]),
            segments: Vec::new(),
        },
    }
}

fn blob_key(kind: BlobKind, cache: &CacheName, key: &str) -> BlobKey {
    BlobKey {
        kind,
        cache: cache.clone(),
        key: key.to_owned(),
    }
}

pub(crate) fn path(n: u8) -> StorePathHash {
    let letters = "0123456789abcdfghijklmnpqrsvwxyz";
    let c = letters.as_bytes()[usize::from(n) % 32] as char;
    c.to_string().repeat(32).parse().unwrap()
}

pub async fn caches_are_created_and_replaced(index: &dyn Index) {
    assert!(index.caches().await.unwrap().is_empty());
    let mut record = CacheRecord {
        name: cache("main"),
        public: true,
        priority: 40,
        keys: vec![KeyRecord {
            name: "main-1".into(),
            public_key: "main-1:AAAA".into(),
            secret_key_file: Some("/keys/main".into()),
            sealed_secret_key: Some("v1:sealed".into()),
            signing: true,
            created: 1,
        }],
        keep_client_signatures: true,
        retention: Retention::default(),
        quota_bytes: None,
        created: 1,
    };
    index.put_cache(&record).await.unwrap();
    record.public = false;
    index.put_cache(&record).await.unwrap();
    let other = CacheRecord {
        name: cache("other"),
        ..record.clone()
    };
    index.put_cache(&other).await.unwrap();
    let mut all = index.caches().await.unwrap();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(all, vec![record, other]);
}

pub async fn chunks_and_nars_round_trip(index: &dyn Index) {
    assert_eq!(super::chunk(index, &chunk(1).id).await.unwrap(), None);
    index.put_chunks(&[chunk(1), chunk(2)]).await.unwrap();
    assert_eq!(
        super::chunk(index, &chunk(2).id).await.unwrap(),
        Some(chunk(2))
    );
    // The last record of a chunk wins (two uploads may store the same chunk).
    let moved = ChunkRef {
        offset: 99,
        ..chunk(1)
    };
    index.put_chunks(&[moved]).await.unwrap();
    assert_eq!(super::chunk(index, &moved.id).await.unwrap(), Some(moved));

    let h = Sha256::digest(b"nar");
    assert_eq!(index.nar(&h).await.unwrap(), None);
    let stored = |n: u8, segments: usize| Stored {
        id: ManifestId([n; 16]),
        segments: vec![
            Segment {
                size: 20,
                stored_size: 10
            };
            segments
        ],
    };
    let record = NarRecord {
        contents: stored(1, 2),
        listing: stored(2, 1),
    };
    let up = Upload {
        nar_hash: h,
        nar_size: 40,
        file_hash: Sha256::digest(b"file"),
        file_size: 30,
        created: 5,
        stored_size: 0,
        claimed: false,
    };
    let url: NarUrl = format!("nar/{}.nar.xz", up.file_hash.to_nix32())
        .parse()
        .unwrap();
    index
        .put_upload(&cache("main"), &url, &up, &record)
        .await
        .unwrap();
    assert_eq!(index.nar(&h).await.unwrap(), Some(record.clone()));
    // A NAR recorded without an upload (a copied index's), and replaced.
    let alone = Sha256::digest(b"alone");
    index.put_nar(&alone, &nar_record(7)).await.unwrap();
    index.put_nar(&alone, &record).await.unwrap();
    assert_eq!(index.nar(&alone).await.unwrap(), Some(record));
    assert_eq!(
        index
            .cache_stats(&cache("main"))
            .await
            .unwrap()
            .pending_bytes,
        0
    );
}

pub async fn segments_are_kept_by_manifest_and_index(index: &dyn Index) {
    let (a, b) = (ManifestId([1; 16]), ManifestId([2; 16]));
    let seg = |chunks: &[u8]| Manifest {
        chunks: chunks.iter().map(|&n| chunk(n)).collect(),
    };
    assert_eq!(index.segment(&a, 0).await.unwrap(), None);
    index.put_segment(&a, 0, &seg(&[1, 2])).await.unwrap();
    index.put_segment(&a, 1, &seg(&[3])).await.unwrap();
    index.put_segment(&b, 0, &seg(&[4])).await.unwrap();
    assert_eq!(index.segment(&a, 0).await.unwrap(), Some(seg(&[1, 2])));
    assert_eq!(index.segment(&a, 1).await.unwrap(), Some(seg(&[3])));
    assert_eq!(index.segment(&a, 2).await.unwrap(), None);
    assert_eq!(index.segment(&b, 0).await.unwrap(), Some(seg(&[4])));
    // A manifest of no chunks is a segment like another.
    index
        .put_segment(&b, 1, &Manifest::default())
        .await
        .unwrap();
    assert_eq!(
        index.segment(&b, 1).await.unwrap(),
        Some(Manifest::default())
    );
}

pub async fn uploads_belong_to_their_cache(index: &dyn Index) {
    let url: NarUrl = format!("nar/{}.nar.xz", Sha256::digest(b"f").to_nix32())
        .parse()
        .unwrap();
    let up = Upload {
        nar_hash: Sha256::digest(b"n"),
        nar_size: 9,
        file_hash: Sha256::digest(b"f"),
        file_size: 3,
        created: 1,
        stored_size: 0,
        claimed: false,
    };
    index
        .put_upload(&cache("main"), &url, &up, &nar_record(1))
        .await
        .unwrap();
    assert_eq!(index.upload(&cache("main"), &url).await.unwrap(), Some(up));
    assert_eq!(index.nar(&up.nar_hash).await.unwrap(), Some(nar_record(1)));
    assert_eq!(index.upload(&cache("other"), &url).await.unwrap(), None);
    let zst = NarUrl {
        compression: crate::nix::Compression::Zstd,
        ..url
    };
    assert_eq!(index.upload(&cache("main"), &zst).await.unwrap(), None);
}

pub async fn the_first_narinfo_wins_and_is_counted_once(index: &dyn Index) {
    let (main, other) = (cache("main"), cache("other"));
    let first = narinfo(b"a", "one");
    let second = narinfo(b"b", "two");
    assert_eq!(
        index.cache_stats(&main).await.unwrap(),
        CacheStats::default()
    );
    assert_eq!(
        index
            .commit_narinfo(&main, &path(1), &first, &[], None)
            .await
            .unwrap(),
        Commit::Written
    );
    assert_eq!(
        index
            .commit_narinfo(&main, &path(1), &second, &[], None)
            .await
            .unwrap(),
        Commit::Exists {
            nar_hash: first.nar_hash
        }
    );
    assert_eq!(
        index.narinfo(&main, &path(1)).await.unwrap(),
        Some(first.clone())
    );
    assert!(index.cache_has_nar(&main, &first.nar_hash).await.unwrap());
    assert!(!index.cache_has_nar(&main, &second.nar_hash).await.unwrap());
    assert!(!index.cache_has_nar(&other, &first.nar_hash).await.unwrap());
    // Held paths are asked in a batch, answered in the order asked, per cache.
    let asked = [path(2), path(1), path(2)];
    let held = index.holds_paths(&main, &asked).await.unwrap();
    assert_eq!(held, [false, true, false]);
    let held = index.holds_paths(&other, &asked).await.unwrap();
    assert_eq!(held, [false, false, false]);
    assert!(index.holds_paths(&main, &[]).await.unwrap().is_empty());
    assert_eq!(index.narinfo(&other, &path(1)).await.unwrap(), None);
    // Served through the cache that holds a narinfo for it, once its record is there.
    assert_eq!(
        index.served_nar(&main, &first.nar_hash).await.unwrap(),
        None
    );
    index
        .put_nar(&first.nar_hash, &nar_record(5))
        .await
        .unwrap();
    assert_eq!(
        index.served_nar(&main, &first.nar_hash).await.unwrap(),
        Some(nar_record(5))
    );
    assert_eq!(
        index.served_nar(&other, &first.nar_hash).await.unwrap(),
        None
    );
    index
        .put_nar(&second.nar_hash, &nar_record(6))
        .await
        .unwrap();
    assert_eq!(
        index.served_nar(&main, &second.nar_hash).await.unwrap(),
        None
    );
    // A second path with the same NAR: the claim holds while either is there.
    index
        .commit_narinfo(&main, &path(2), &first, &[], None)
        .await
        .unwrap();
    assert_eq!(
        index.cache_stats(&main).await.unwrap(),
        CacheStats {
            paths: 2,
            nar_bytes: 200,
            stored_bytes: 80,
            ..CacheStats::default()
        }
    );
    assert_eq!(
        index.cache_stats(&other).await.unwrap(),
        CacheStats::default()
    );
}

pub async fn uploads_count_as_pending_until_a_narinfo_takes_them_up(index: &dyn Index) {
    let main = cache("main");
    let record = narinfo(b"a", "one");
    let url = |n: u8| NarUrl {
        hash: Sha256::digest(&[n]),
        compression: crate::nix::Compression::Zstd,
    };
    let up = |n: u8, nar: &[u8]| Upload {
        nar_hash: Sha256::digest(nar),
        nar_size: 100,
        file_hash: Sha256::digest(&[n]),
        file_size: 50,
        created: 1,
        stored_size: 40 + u64::from(n),
        claimed: false,
    };
    let pending = async |i: &dyn Index| i.cache_stats(&main).await.unwrap().pending_bytes;
    index
        .put_upload(&main, &url(1), &up(1, b"a"), &nar_record(1))
        .await
        .unwrap();
    index
        .put_upload(&main, &url(2), &up(2, b"b"), &nar_record(2))
        .await
        .unwrap();
    assert_eq!(pending(index).await, 41 + 42);
    // Sent again under the same URL: counted once.
    index
        .put_upload(&main, &url(1), &up(1, b"a"), &nar_record(1))
        .await
        .unwrap();
    assert_eq!(pending(index).await, 41 + 42);
    // A narinfo of another NAR does not take it up.
    index
        .commit_narinfo(&main, &path(1), &record, &[], Some(&url(2)))
        .await
        .unwrap();
    assert_eq!(pending(index).await, 41 + 42);
    // One of its NAR does; its record says so, and a repeat changes nothing.
    index
        .commit_narinfo(&main, &path(2), &record, &[], Some(&url(1)))
        .await
        .unwrap();
    assert_eq!(pending(index).await, 42);
    let taken = index.upload(&main, &url(1)).await.unwrap().unwrap();
    assert!(taken.claimed);
    index
        .commit_narinfo(&main, &path(2), &record, &[], Some(&url(1)))
        .await
        .unwrap();
    assert_eq!(pending(index).await, 42);
    let stats = index.cache_stats(&main).await.unwrap();
    assert_eq!(stats.used_bytes(), stats.stored_bytes + 42);
    // Removing a pending upload uncounts it; a taken-up one was uncounted already.
    assert!(index
        .delete_upload_if(&main, &url(2), &up(2, b"b"))
        .await
        .unwrap());
    assert!(index
        .delete_upload_if(&main, &url(1), &taken)
        .await
        .unwrap());
    assert_eq!(pending(index).await, 0);
    // Logs and realisations count too, a replaced one no more.
    let blob = |size: u64| Stored {
        id: ManifestId::random(),
        segments: vec![crate::store::Segment {
            size,
            stored_size: size / 2,
        }],
    };
    let (first, second) = (blob(100), blob(300));
    index
        .put_blob(BlobKind::Log, &main, "x.drv", &first)
        .await
        .unwrap();
    index
        .put_blob(BlobKind::Log, &main, "x.drv", &second)
        .await
        .unwrap();
    index
        .put_blob(BlobKind::Realisation, &main, "y.doi", &first)
        .await
        .unwrap();
    assert_eq!(index.cache_stats(&main).await.unwrap().blob_bytes, 150 + 50);
    assert!(index
        .replace_blob(&blob_key(BlobKind::Log, &main, "x.drv"), &second, &first)
        .await
        .unwrap());
    assert_eq!(index.cache_stats(&main).await.unwrap().blob_bytes, 50 + 50);
}

pub async fn narinfos_are_paged_rewritten_and_deleted_with_their_references(index: &dyn Index) {
    let (main, other) = (cache("main"), cache("other"));
    let leaf = narinfo(b"leaf", "leaf");
    let top = narinfo(b"top", "top");
    index
        .commit_narinfo(&main, &path(1), &leaf, &[], None)
        .await
        .unwrap();
    index
        .commit_narinfo(&main, &path(2), &top, &[path(1)], None)
        .await
        .unwrap();
    index
        .commit_narinfo(&main, &path(3), &top, &[path(1)], None)
        .await
        .unwrap();
    index
        .commit_narinfo(&other, &path(4), &top, &[path(1)], None)
        .await
        .unwrap();
    assert_eq!(
        index.referrers(&main, &path(1)).await.unwrap(),
        vec![path(2), path(3)]
    );
    assert_eq!(
        index.referrers(&other, &path(1)).await.unwrap(),
        vec![path(4)]
    );
    assert!(index.referrers(&main, &path(2)).await.unwrap().is_empty());

    // Pages in the order of the hashes, within the cache only.
    let first = index.narinfos(&main, None, 2).await.unwrap();
    let hashes: Vec<_> = first.iter().map(|(h, _)| *h).collect();
    assert_eq!(hashes, vec![path(1), path(2)]);
    let rest = index.narinfos(&main, Some(&path(2)), 2).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0], (path(3), top.clone()));
    assert!(index
        .narinfos(&main, Some(&path(3)), 2)
        .await
        .unwrap()
        .is_empty());

    assert!(index
        .replace_narinfo(&main, &path(2), b"top", b"signed again", None)
        .await
        .unwrap());
    // Only over the text it was read with: not over what another writer put there.
    assert!(!index
        .replace_narinfo(&main, &path(2), b"top", b"stale", None)
        .await
        .unwrap());
    assert_eq!(
        &index.narinfo(&main, &path(2)).await.unwrap().unwrap().text[..],
        b"signed again"
    );
    assert!(!index
        .replace_narinfo(&main, &path(9), b"x", b"x", None)
        .await
        .unwrap());
    assert_eq!(index.cache_stats(&main).await.unwrap().paths, 3);
    // A new FileSize moves the cache's stored bytes with it.
    let stored = index.cache_stats(&main).await.unwrap().stored_bytes;
    assert!(index
        .replace_narinfo(&main, &path(2), b"signed again", b"smaller", Some(25))
        .await
        .unwrap());
    let smaller = index.narinfo(&main, &path(2)).await.unwrap().unwrap();
    assert_eq!(
        (&smaller.text[..], smaller.file_size),
        (&b"smaller"[..], 25)
    );
    assert_eq!(
        index.cache_stats(&main).await.unwrap().stored_bytes,
        stored - 15
    );
    assert!(index
        .replace_narinfo(&main, &path(2), b"smaller", b"signed again", Some(40))
        .await
        .unwrap());

    // Deleting a path takes its references and its claim with it, and uncounts it.
    assert!(index
        .delete_narinfo(&main, &path(2), &[path(1)])
        .await
        .unwrap());
    assert!(!index
        .delete_narinfo(&main, &path(2), &[path(1)])
        .await
        .unwrap());
    assert_eq!(
        index.referrers(&main, &path(1)).await.unwrap(),
        vec![path(3)]
    );
    assert!(
        index.cache_has_nar(&main, &top.nar_hash).await.unwrap(),
        "path 3 still claims it"
    );
    assert!(index
        .delete_narinfo(&main, &path(3), &[path(1)])
        .await
        .unwrap());
    assert!(!index.cache_has_nar(&main, &top.nar_hash).await.unwrap());
    assert!(index.cache_has_nar(&other, &top.nar_hash).await.unwrap());
    assert_eq!(
        index.cache_stats(&main).await.unwrap(),
        CacheStats {
            paths: 1,
            nar_bytes: 100,
            stored_bytes: 40,
            ..CacheStats::default()
        }
    );
}

pub async fn a_deleted_cache_leaves_nothing_under_its_name(index: &dyn Index) {
    let (main, other) = (cache("main"), cache("other"));
    let record = |name: &CacheName| CacheRecord {
        name: name.clone(),
        public: true,
        priority: 40,
        keys: Vec::new(),
        keep_client_signatures: true,
        retention: Retention::default(),
        quota_bytes: None,
        created: 0,
    };
    index.put_cache(&record(&main)).await.unwrap();
    index.put_cache(&record(&other)).await.unwrap();
    let url: NarUrl = format!("nar/{}.nar.xz", Sha256::digest(b"f").to_nix32())
        .parse()
        .unwrap();
    let up = Upload {
        nar_hash: Sha256::digest(b"n"),
        nar_size: 9,
        file_hash: Sha256::digest(b"f"),
        file_size: 3,
        created: 1,
        stored_size: 0,
        claimed: false,
    };
    let info = narinfo(b"n", "n");
    let stored = Stored {
        id: ManifestId([3; 16]),
        segments: Vec::new(),
    };
    for c in [&main, &other] {
        index
            .put_upload(c, &url, &up, &nar_record(1))
            .await
            .unwrap();
        index
            .commit_narinfo(c, &path(1), &info, &[], None)
            .await
            .unwrap();
        index
            .commit_narinfo(c, &path(2), &info, &[path(1)], None)
            .await
            .unwrap();
        index
            .put_blob(BlobKind::Log, c, "x.drv", &stored)
            .await
            .unwrap();
        index
            .put_blob(BlobKind::Realisation, c, "r.doi", &stored)
            .await
            .unwrap();
    }
    // A name that is the prefix of another's is its own: purging "ma" leaves "main".
    index.purge_cache(&cache("ma")).await.unwrap();
    assert_eq!(index.narinfos(&main, None, 10).await.unwrap().len(), 2);
    assert_eq!(
        index.referrers(&main, &path(1)).await.unwrap(),
        vec![path(2)]
    );
    assert!(index.cache_has_nar(&main, &info.nar_hash).await.unwrap());
    assert_eq!(index.upload(&main, &url).await.unwrap(), Some(up));
    assert!(index
        .blob(BlobKind::Log, &main, "x.drv")
        .await
        .unwrap()
        .is_some());
    assert_eq!(index.cache_stats(&main).await.unwrap().paths, 2);
    index.delete_cache(&main).await.unwrap();
    let names: Vec<_> = index
        .caches()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec![other.clone()]);
    assert_eq!(index.narinfo(&main, &path(1)).await.unwrap(), None);
    assert!(index.narinfos(&main, None, 10).await.unwrap().is_empty());
    assert!(index.referrers(&main, &path(1)).await.unwrap().is_empty());
    assert!(!index.cache_has_nar(&main, &info.nar_hash).await.unwrap());
    assert_eq!(index.upload(&main, &url).await.unwrap(), None);
    assert_eq!(
        index.blob(BlobKind::Log, &main, "x.drv").await.unwrap(),
        None
    );
    assert_eq!(
        index
            .blob(BlobKind::Realisation, &main, "r.doi")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        index.cache_stats(&main).await.unwrap(),
        CacheStats::default()
    );
    // The other cache keeps everything; purging an absent name changes nothing.
    index.purge_cache(&main).await.unwrap();
    assert_eq!(index.narinfos(&other, None, 10).await.unwrap().len(), 2);
    assert_eq!(
        index.referrers(&other, &path(1)).await.unwrap(),
        vec![path(2)]
    );
    assert!(index.cache_has_nar(&other, &info.nar_hash).await.unwrap());
    assert_eq!(index.upload(&other, &url).await.unwrap(), Some(up));
    assert_eq!(
        index.blob(BlobKind::Log, &other, "x.drv").await.unwrap(),
        Some(stored)
    );
    assert_eq!(index.cache_stats(&other).await.unwrap().paths, 2);
}

pub async fn tokens_are_kept_by_hash(index: &dyn Index) {
    assert!(index.tokens().await.unwrap().is_empty());
    let mut token = TokenRecord {
        name: "ci".into(),
        hash: Sha256::digest(b"secret"),
        grants: crate::grants::Grants {
            permissions: vec![crate::grants::Permission::Push],
            caches: vec!["main".parse().unwrap()],
        },
        created: 1,
        expires: Some(10),
        last_used: None,
        revoked: None,
    };
    index.put_token(&token).await.unwrap();
    assert_eq!(index.tokens().await.unwrap(), vec![token.clone()]);
    token.revoked = Some(5);
    index.put_token(&token).await.unwrap();
    assert_eq!(index.tokens().await.unwrap(), vec![token]);
}

pub async fn blobs_are_kept_per_kind_and_cache(index: &dyn Index) {
    let stored = |n: u8| Stored {
        id: ManifestId([n; 16]),
        segments: vec![Segment {
            size: 9,
            stored_size: 5,
        }],
    };
    let main = cache("main");
    index
        .put_blob(BlobKind::Log, &main, "x.drv", &stored(1))
        .await
        .unwrap();
    assert_eq!(
        index.blob(BlobKind::Log, &main, "x.drv").await.unwrap(),
        Some(stored(1))
    );
    assert_eq!(
        index
            .blob(BlobKind::Realisation, &main, "x.drv")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        index
            .blob(BlobKind::Log, &cache("other"), "x.drv")
            .await
            .unwrap(),
        None
    );
    index
        .put_blob(BlobKind::Log, &main, "x.drv", &stored(2))
        .await
        .unwrap();
    assert_eq!(
        index.blob(BlobKind::Log, &main, "x.drv").await.unwrap(),
        Some(stored(2))
    );
}

pub async fn flush_and_check_succeed(index: &dyn Index) {
    index.put_chunks(&[chunk(7)]).await.unwrap();
    index.flush().await.unwrap();
    index.check().await.unwrap();
    assert_eq!(
        super::chunk(index, &chunk(7).id).await.unwrap(),
        Some(chunk(7))
    );
}

/// One `#[test]` per contract case, for the index `$open()` makes.
pub async fn what_the_collector_walks_and_deletes(index: &dyn Index) {
    let main = cache("main");
    let url = |n: u8| -> NarUrl {
        format!("nar/{}.nar.xz", Sha256::digest(&[n]).to_nix32())
            .parse()
            .unwrap()
    };
    let upload = |n: u8| Upload {
        nar_hash: Sha256::digest(&[n, n]),
        nar_size: 9,
        file_hash: Sha256::digest(&[n]),
        file_size: 3,
        created: u64::from(n),
        stored_size: 0,
        claimed: false,
    };
    index
        .put_upload(&main, &url(1), &upload(1), &nar_record(1))
        .await
        .unwrap();
    index
        .put_upload(&main, &url(2), &upload(2), &nar_record(2))
        .await
        .unwrap();
    let mut nars = Vec::new();
    let mut after = None;
    // A page at a time, of one record: every walk resumes where it stopped.
    loop {
        let page = index.nars_after(after.as_ref(), 1).await.unwrap();
        let Some((last, _)) = page.last() else { break };
        after = Some(*last);
        nars.extend(page);
    }
    let mut want = vec![
        (upload(1).nar_hash, nar_record(1)),
        (upload(2).nar_hash, nar_record(2)),
    ];
    want.sort_by_key(|(h, _)| *h);
    assert_eq!(nars, want);
    // Replaced only over what was read.
    let h1 = upload(1).nar_hash;
    assert!(!index
        .replace_nar(&h1, &nar_record(2), &nar_record(3))
        .await
        .unwrap());
    assert!(index
        .replace_nar(&h1, &nar_record(1), &nar_record(3))
        .await
        .unwrap());
    assert_eq!(index.nar(&h1).await.unwrap(), Some(nar_record(3)));
    assert!(index
        .replace_nar(&h1, &nar_record(3), &nar_record(1))
        .await
        .unwrap());
    // A NAR record changed since it was read stays.
    assert!(!index
        .delete_nar_if(&upload(1).nar_hash, &nar_record(2))
        .await
        .unwrap());
    assert!(index
        .delete_nar_if(&upload(1).nar_hash, &nar_record(1))
        .await
        .unwrap());
    assert_eq!(index.nar(&upload(1).nar_hash).await.unwrap(), None);

    index
        .put_upload(&cache("other"), &url(3), &upload(3), &nar_record(3))
        .await
        .unwrap();
    let mut uploads = Vec::new();
    let mut after = None;
    loop {
        let page = index.uploads_after(after.as_ref(), 1).await.unwrap();
        let Some((c, u, _)) = page.last() else { break };
        after = Some((c.clone(), *u));
        uploads.extend(page);
    }
    assert_eq!(uploads.len(), 3);
    assert_eq!(uploads[2], (cache("other"), url(3), upload(3)));
    assert!(uploads.contains(&(main.clone(), url(2), upload(2))));
    assert!(!index
        .delete_upload_if(&main, &url(2), &upload(1))
        .await
        .unwrap());
    assert!(index
        .delete_upload_if(&main, &url(2), &upload(2))
        .await
        .unwrap());
    assert_eq!(index.upload(&main, &url(2)).await.unwrap(), None);

    index
        .put_chunks(&[chunk(1), chunk(2), chunk(3)])
        .await
        .unwrap();
    index.delete_chunks(&[chunk(2).id]).await.unwrap();
    let mut chunks = Vec::new();
    let mut after = None;
    loop {
        let page = index.chunks_after(after.as_ref(), 1).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        chunks.extend(page);
    }
    assert_eq!(chunks, vec![chunk(1), chunk(3)]);
    assert_eq!(
        index
            .chunks(&[chunk(3).id, chunk(2).id, chunk(1).id])
            .await
            .unwrap(),
        vec![Some(chunk(3)), None, Some(chunk(1))]
    );

    let seg = Manifest {
        chunks: vec![chunk(1)],
    };
    for (id, n) in [([7; 16], 0), ([7; 16], 1), ([8; 16], 0)] {
        index.put_segment(&ManifestId(id), n, &seg).await.unwrap();
    }
    let mut ids: Vec<ManifestId> = Vec::new();
    loop {
        let page = index.manifests_after(ids.last(), 1).await.unwrap();
        if page.is_empty() {
            break;
        }
        ids.extend(page);
    }
    assert_eq!(ids, vec![ManifestId([7; 16]), ManifestId([8; 16])]);
    assert_eq!(
        index.manifests_after(None, 5).await.unwrap(),
        vec![ManifestId([7; 16]), ManifestId([8; 16])]
    );
    index.delete_manifest(&ManifestId([7; 16])).await.unwrap();
    assert_eq!(index.segment(&ManifestId([7; 16]), 1).await.unwrap(), None);
    assert_eq!(
        index.segment(&ManifestId([8; 16]), 0).await.unwrap(),
        Some(seg)
    );

    let stored = nar_record(9).contents;
    index
        .put_blob(BlobKind::Log, &main, "a.drv", &stored)
        .await
        .unwrap();
    index
        .put_blob(BlobKind::Realisation, &main, "b.doi", &stored)
        .await
        .unwrap();
    index
        .put_blob(BlobKind::Log, &cache("other"), "c.drv", &stored)
        .await
        .unwrap();
    let mut blobs = Vec::new();
    let mut after = None;
    loop {
        let page = index.blobs_after(after.as_ref(), 1).await.unwrap();
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        blobs.extend(page);
    }
    assert_eq!(
        blobs,
        vec![
            (blob_key(BlobKind::Log, &main, "a.drv"), stored.clone()),
            (
                blob_key(BlobKind::Log, &cache("other"), "c.drv"),
                stored.clone()
            ),
            (
                blob_key(BlobKind::Realisation, &main, "b.doi"),
                stored.clone()
            ),
        ]
    );
    let moved = nar_record(10).contents;
    assert!(!index
        .replace_blob(&blob_key(BlobKind::Log, &main, "a.drv"), &moved, &moved)
        .await
        .unwrap());
    assert!(index
        .replace_blob(&blob_key(BlobKind::Log, &main, "a.drv"), &stored, &moved)
        .await
        .unwrap());
    assert_eq!(
        index.blob(BlobKind::Log, &main, "a.drv").await.unwrap(),
        Some(moved)
    );

    assert_eq!(index.meta("last_gc").await.unwrap(), None);
    index.put_meta("last_gc", b"{}").await.unwrap();
    assert_eq!(index.meta("last_gc").await.unwrap(), Some(b"{}".to_vec()));
}

pub async fn accesses_and_pins_are_kept_per_cache(index: &dyn Index) {
    let (main, other) = (cache("main"), cache("other"));
    index
        .commit_narinfo(&main, &path(1), &narinfo(b"a", "a"), &[], None)
        .await
        .unwrap();
    index
        .commit_narinfo(&main, &path(2), &narinfo(b"a", "b"), &[], None)
        .await
        .unwrap();
    let mut paths = index
        .paths_of_nar(&main, &Sha256::digest(b"a"))
        .await
        .unwrap();
    paths.sort();
    let mut want = vec![path(1), path(2)];
    want.sort();
    assert_eq!(paths, want);
    assert_eq!(
        index
            .paths_of_nar(&other, &Sha256::digest(b"a"))
            .await
            .unwrap(),
        vec![]
    );

    index
        .put_accesses(&main, &[(path(1), 10), (path(2), 20)])
        .await
        .unwrap();
    index.put_accesses(&main, &[(path(1), 30)]).await.unwrap();
    index.put_accesses(&other, &[(path(1), 5)]).await.unwrap();
    let mut got = index.accesses(&main).await.unwrap();
    got.sort();
    let mut want = vec![(path(1), 30), (path(2), 20)];
    want.sort();
    assert_eq!(got, want);
    // A deleted path's access goes with it.
    assert!(index.delete_narinfo(&main, &path(1), &[]).await.unwrap());
    assert_eq!(index.accesses(&main).await.unwrap(), vec![(path(2), 20)]);

    let pin = PinRecord {
        name: "release".into(),
        revisions: vec![PinRevision {
            store_path: "/nix/store/x".into(),
            added: 1,
        }],
        keep_revisions: Some(2),
        keep_days: None,
    };
    index.put_pin(&main, &pin).await.unwrap();
    assert_eq!(index.pins(&main).await.unwrap(), vec![pin.clone()]);
    assert_eq!(index.pins(&other).await.unwrap(), vec![]);
    assert!(!index.delete_pin(&other, "release").await.unwrap());
    // Purging a cache removes its accesses and pins.
    index.purge_cache(&main).await.unwrap();
    assert_eq!(index.pins(&main).await.unwrap(), vec![]);
    assert_eq!(index.accesses(&main).await.unwrap(), vec![]);
    assert_eq!(index.accesses(&other).await.unwrap(), vec![(path(1), 5)]);
    index.put_pin(&other, &pin).await.unwrap();
    assert!(index.delete_pin(&other, "release").await.unwrap());
}

/// Two handles commit each of 16 paths at once: one commit wins per path, the other
/// finds it there; the cache counts each path once, and each claimed upload stops
/// counting as pending once.
pub async fn commits_of_one_path_through_two_handles_count_once(
    [a, b]: [std::sync::Arc<dyn Index>; 2],
) {
    let main = cache("main");
    let mut both = Vec::new();
    for n in 0..16u8 {
        let url: NarUrl = format!("nar/{}.nar.xz", Sha256::digest(&[n, 1]).to_nix32())
            .parse()
            .unwrap();
        let nar = [n, 2];
        let upload = Upload {
            nar_hash: Sha256::digest(&nar),
            nar_size: 100,
            file_hash: Sha256::digest(&[n, 1]),
            file_size: 50,
            created: 1,
            stored_size: 7,
            claimed: false,
        };
        a.put_upload(&main, &url, &upload, &nar_record(n))
            .await
            .unwrap();
        let record = NarInfoRecord {
            nar_hash: upload.nar_hash,
            nar_size: 100,
            file_size: 40,
            text: Bytes::from(format!("StorePath: {n}\n")),
        };
        for index in [a.clone(), b.clone()] {
            let (record, main) = (record.clone(), main.clone());
            both.push(tokio::spawn(async move {
                index
                    .commit_narinfo(&main, &path(n), &record, &[], Some(&url))
                    .await
                    .unwrap()
            }));
        }
    }
    let mut written = 0;
    for (i, task) in both.into_iter().enumerate() {
        match task.await.unwrap() {
            Commit::Written => written += 1,
            Commit::Exists { nar_hash } => {
                assert_eq!(nar_hash, Sha256::digest(&[(i / 2) as u8, 2]));
            }
        }
    }
    assert_eq!(written, 16);
    for index in [&a, &b] {
        let stats = index.cache_stats(&main).await.unwrap();
        assert_eq!((stats.paths, stats.nar_bytes), (16, 1600));
        assert_eq!((stats.stored_bytes, stats.pending_bytes), (640, 0));
    }
}

/// Two handles record each of 16 uploads and 16 logs at once: each counts once in the
/// cache's pending and log bytes.
pub async fn first_writes_of_one_record_through_two_handles_count_once(
    [a, b]: [std::sync::Arc<dyn Index>; 2],
) {
    let main = cache("main");
    let mut both = Vec::new();
    for n in 0..16u8 {
        let url: NarUrl = format!("nar/{}.nar.xz", Sha256::digest(&[n, 3]).to_nix32())
            .parse()
            .unwrap();
        let upload = Upload {
            nar_hash: Sha256::digest(&[n, 4]),
            nar_size: 100,
            file_hash: Sha256::digest(&[n, 3]),
            file_size: 50,
            created: 1,
            stored_size: 7,
            claimed: false,
        };
        let log = nar_record(n).contents;
        // Both start together: each reads that there is no record before either writes.
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        for index in [a.clone(), b.clone()] {
            let (main, log, start) = (main.clone(), log.clone(), start.clone());
            both.push(tokio::spawn(async move {
                start.wait().await;
                index
                    .put_upload(&main, &url, &upload, &nar_record(n))
                    .await
                    .unwrap();
                index
                    .put_blob(BlobKind::Log, &main, &format!("{n}.drv"), &log)
                    .await
                    .unwrap();
            }));
        }
    }
    for task in both {
        task.await.unwrap();
    }
    for index in [&a, &b] {
        let stats = index.cache_stats(&main).await.unwrap();
        assert_eq!((stats.pending_bytes, stats.blob_bytes), (16 * 7, 16 * 10));
    }
}

/// A NAR record read through one handle and uploaded again through the other is not
/// removed by a deletion that expected what was read; a token written through one is
/// read through the other at once.
pub async fn what_one_handle_writes_the_other_reads_and_does_not_undo(
    [a, b]: [std::sync::Arc<dyn Index>; 2],
) {
    let main = cache("main");
    let url: NarUrl = format!("nar/{}.nar", Sha256::digest(b"u").to_nix32())
        .parse()
        .unwrap();
    let upload = Upload {
        nar_hash: Sha256::digest(b"n"),
        nar_size: 9,
        file_hash: Sha256::digest(b"u"),
        file_size: 9,
        created: 1,
        stored_size: 0,
        claimed: false,
    };
    a.put_upload(&main, &url, &upload, &nar_record(1))
        .await
        .unwrap();
    let read = a.nar(&upload.nar_hash).await.unwrap().unwrap();
    b.put_upload(&main, &url, &upload, &nar_record(2))
        .await
        .unwrap();
    assert!(!a.delete_nar_if(&upload.nar_hash, &read).await.unwrap());
    assert_eq!(b.nar(&upload.nar_hash).await.unwrap(), Some(nar_record(2)));
    assert_eq!(a.nar(&upload.nar_hash).await.unwrap(), Some(nar_record(2)));

    let token = TokenRecord {
        name: "ci".into(),
        hash: Sha256::digest(b"secret"),
        grants: crate::grants::Grants {
            permissions: vec![crate::grants::Permission::Pull],
            caches: vec!["main".parse().unwrap()],
        },
        created: 1,
        expires: None,
        last_used: None,
        revoked: None,
    };
    a.put_token(&token).await.unwrap();
    assert_eq!(b.tokens().await.unwrap(), vec![token.clone()]);
    let revoked = TokenRecord {
        revoked: Some(2),
        ..token
    };
    b.put_token(&revoked).await.unwrap();
    assert_eq!(a.tokens().await.unwrap(), vec![revoked]);
}

/// A chunk the collector deletes through one handle while an upload stores it again
/// through the other: each handle reads what the last write left, and a write after
/// the deletion stands (the barrier keeps the upload that found the old record from
/// committing after its objects go; see `coord`).
pub async fn a_chunk_deleted_through_one_handle_and_stored_again_through_the_other_stands(
    [a, b]: [std::sync::Arc<dyn Index>; 2],
) {
    let ids: Vec<ChunkId> = (1..=64).map(|n| chunk(n).id).collect();
    let first: Vec<ChunkRef> = (1..=64).map(chunk).collect();
    a.put_chunks(&first).await.unwrap();
    assert_eq!(
        b.chunks(&ids).await.unwrap(),
        first.iter().map(|c| Some(*c)).collect::<Vec<_>>()
    );
    // At once: the collector's deletion through one, the upload's write through the
    // other. Whichever came last, both handles read the same.
    let again: Vec<ChunkRef> = first.iter().map(|c| ChunkRef { offset: 7, ..*c }).collect();
    let (deleted, stored) = tokio::join!(a.delete_chunks(&ids), b.put_chunks(&again));
    deleted.unwrap();
    stored.unwrap();
    let (seen_a, seen_b) = (a.chunks(&ids).await.unwrap(), b.chunks(&ids).await.unwrap());
    assert_eq!(seen_a, seen_b);
    for (seen, want) in seen_a.iter().zip(&again) {
        assert!(seen.is_none() || seen == &Some(*want), "{seen:?}");
    }
    // Stored again after the deletion: there, through both.
    b.put_chunks(&again).await.unwrap();
    let want: Vec<Option<ChunkRef>> = again.iter().map(|c| Some(*c)).collect();
    assert_eq!(a.chunks(&ids).await.unwrap(), want);
    assert_eq!(b.chunks(&ids).await.unwrap(), want);
}

/// Fills `index` with one of everything a server records: a cache with a path that
/// refers to another, their chunks, manifests, NARs and uploads (one taken up, one
/// not), a NAR whose upload is gone, a log, a realisation, fetches, a pin, a token,
/// the last collection's report.
pub async fn populate(index: &dyn Index) {
    let main = cache("main");
    index
        .put_cache(&CacheRecord {
            name: main.clone(),
            public: true,
            priority: 40,
            keys: Vec::new(),
            keep_client_signatures: true,
            retention: Retention::default(),
            quota_bytes: None,
            created: 1,
        })
        .await
        .unwrap();
    let hash = |n: u8| StorePathHash::from_bytes([n; 20]);
    for n in 1..=3u8 {
        let c = chunk(n);
        index.put_chunks(&[c]).await.unwrap();
        let contents = ManifestId([n; 16]);
        let manifest = Manifest { chunks: vec![c] };
        index.put_segment(&contents, 0, &manifest).await.unwrap();
        let record = NarRecord {
            contents: Stored {
                id: contents,
                segments: vec![Segment::of(&manifest)],
            },
            listing: Stored {
                id: ManifestId([n + 100; 16]),
                segments: Vec::new(),
            },
        };
        let nar_hash = Sha256::digest(&[n]);
        if n == 3 {
            index.put_nar(&nar_hash, &record).await.unwrap();
            continue;
        }
        let url: NarUrl = format!("nar/{}.nar.xz", Sha256::digest(&[n, n]).to_nix32())
            .parse()
            .unwrap();
        let upload = Upload {
            nar_hash,
            nar_size: 20,
            file_hash: Sha256::digest(&[n, n]),
            file_size: 10,
            created: 1,
            stored_size: 10,
            claimed: false,
        };
        index
            .put_upload(&main, &url, &upload, &record)
            .await
            .unwrap();
        if n == 1 {
            let path = crate::nix::StorePath::from_basename(&format!("{}-a", hash(1))).unwrap();
            let referrer = crate::nix::StorePath::from_basename(&format!("{}-b", hash(9))).unwrap();
            let text = format!(
                "StorePath: {}\nURL: {url}\nCompression: xz\nNarHash: {nar_hash}\nNarSize: 20\nReferences: {}\n",
                referrer.full(),
                path
            );
            let narinfo = NarInfoRecord {
                nar_hash,
                nar_size: 20,
                file_size: 10,
                text: Bytes::from(text),
            };
            index
                .commit_narinfo(&main, &hash(9), &narinfo, &[hash(1)], Some(&url))
                .await
                .unwrap();
        }
    }
    let blob = Stored {
        id: ManifestId([2; 16]),
        segments: vec![Segment {
            size: 20,
            stored_size: 10,
        }],
    };
    index
        .put_blob(BlobKind::Log, &main, "x.drv", &blob)
        .await
        .unwrap();
    index
        .put_blob(BlobKind::Realisation, &main, "y.doi", &blob)
        .await
        .unwrap();
    index.put_accesses(&main, &[(hash(9), 5)]).await.unwrap();
    let pin = PinRecord {
        name: "release".into(),
        revisions: Vec::new(),
        keep_revisions: None,
        keep_days: None,
    };
    index.put_pin(&main, &pin).await.unwrap();
    index
        .put_token(&TokenRecord {
            name: "ci".into(),
            hash: Sha256::digest(b"ci"),
            grants: crate::grants::Grants {
                permissions: vec![crate::grants::Permission::Push],
                caches: vec!["main".parse().unwrap()],
            },
            created: 1,
            expires: None,
            last_used: None,
            revoked: None,
        })
        .await
        .unwrap();
    // The key of the collector's report (`gc::LAST_GC`, a layer above).
    index.put_meta("last_gc", b"{}").await.unwrap();
}

macro_rules! tests {
    ($open:path, $pair:path) => {
        crate::index::contract::tests!(@pairs $pair;
            commits_of_one_path_through_two_handles_count_once,
            first_writes_of_one_record_through_two_handles_count_once,
            what_one_handle_writes_the_other_reads_and_does_not_undo,
            a_chunk_deleted_through_one_handle_and_stored_again_through_the_other_stands
        );
        crate::index::contract::tests!(one $open);
    };
    (one $open:path) => {
        crate::index::contract::tests!(@cases $open;
            caches_are_created_and_replaced,
            chunks_and_nars_round_trip,
            segments_are_kept_by_manifest_and_index,
            uploads_belong_to_their_cache,
            uploads_count_as_pending_until_a_narinfo_takes_them_up,
            the_first_narinfo_wins_and_is_counted_once,
            narinfos_are_paged_rewritten_and_deleted_with_their_references,
            a_deleted_cache_leaves_nothing_under_its_name,
            tokens_are_kept_by_hash,
            blobs_are_kept_per_kind_and_cache,
            what_the_collector_walks_and_deletes,
            accesses_and_pins_are_kept_per_cache,
            flush_and_check_succeed
        );
    };
    (@pairs $pair:path; $($name:ident),*) => {
        mod two_handles {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (_guard, pair) = $pair().await;
                    crate::index::contract::$name(pair).await;
                }
            )*
        }
    };
    (@cases $open:path; $($name:ident),*) => {
        mod contract {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let (_guard, index) = $open().await;
                    crate::index::contract::$name(index.as_ref()).await;
                }
            )*
        }
    };
}

pub(crate) use tests;
