//! A full disk never wedges the server: uploads at once never take a small
//! filesystem below `storage.min_free_mib` (they reserve what they write), other
//! caches keep publishing meanwhile, deleting the cache and one gc give the space
//! back, and a server started on a filesystem with no byte free comes up, serves,
//! deletes, collects and verifies. Every request is answered within the client's
//! timeout.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cachet::nix::nar::write::{nar, Entry};
use cachet::nix::store_path::StorePathHash;
use cachet::nix::Sha256;
use cachet::store::space::free_bytes;

use crate::harness::{heavy, Server, Start};
use crate::hostile::{fill, Tmpfs};

const MIN_FREE_MIB: u64 = 40;
const UPLOADS: usize = 5;
const UPLOAD_MIB: usize = 75;

/// A client that gives up on an answer after a minute: a request that hangs fails the
/// test.
fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn path(i: u64) -> StorePathHash {
    let digest = Sha256::digest(format!("other {i}").as_bytes());
    StorePathHash::from_bytes(digest.as_bytes()[..20].try_into().unwrap())
}

#[test]
fn parallel_uploads_keep_the_minimum_free_and_a_full_disk_never_wedges_the_server() {
    let _heavy = heavy();
    let fs = Tmpfs::mount(300);
    let config = format!("[storage]\nmin_free_mib = {MIN_FREE_MIB}\n");
    let mut server = Server::launch(
        Start {
            config: Some(&config),
            data_dir: Some(fs.path().join("data")),
            ..Start::default()
        },
        &[],
    );
    server.admin(&["cache", "create", "tenant", "--private"]);
    server.admin(&["cache", "create", "other"]);
    let tenant = server.new_token("tenant-ci", "push", &["tenant"]);
    let other = server.new_token("other-ci", "push", &["other"]);

    // The other cache's NAR, which its narinfos name while the tenant fills the disk.
    let small = nar(&Entry::Symlink("small"));
    let small_hash = Sha256::digest(&small);
    let small_url = format!("nar/{}.nar", small_hash.to_nix32());
    let http = client();
    let r = http
        .put(format!("{}/{small_url}", server.cache_url("other")))
        .bearer_auth(&other)
        .body(small.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // Give the ballast its second to be written, then measure.
    std::thread::sleep(Duration::from_secs(2));
    let before = free_bytes(fs.path()).unwrap();

    let done = AtomicBool::new(false);
    let least_free = AtomicU64::new(u64::MAX);
    let published = AtomicU64::new(0);
    let statuses: Vec<(u16, String)> = std::thread::scope(|s| {
        // The free space, sampled as fast as the machine allows.
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if let Ok(free) = free_bytes(fs.path()) {
                    least_free.fetch_min(free, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        // Another cache publishing throughout.
        let publisher = s.spawn(|| {
            let http = client();
            let mut i = 0;
            while !done.load(Ordering::Relaxed) {
                let hash = path(i);
                let text = format!(
                    "StorePath: /nix/store/{hash}-o{i}\nURL: {small_url}\nCompression: none\n\
                     NarHash: {small_hash}\nNarSize: {}\nReferences: \n",
                    small.len()
                );
                let r = http
                    .put(format!("{}/{hash}.narinfo", server.cache_url("other")))
                    .bearer_auth(&other)
                    .body(text)
                    .send()
                    .expect("answered within a minute");
                assert_eq!(r.status(), 200, "{}", r.text().unwrap());
                published.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let uploads: Vec<_> = (0..UPLOADS)
            .map(|n| {
                let (tenant, server) = (&tenant, &server);
                s.spawn(move || {
                    let contents =
                        cachet::testing::Xorshift(100 + n as u64).bytes(UPLOAD_MIB << 20);
                    let body = nar(&Entry::File {
                        executable: false,
                        contents: &contents,
                    });
                    drop(contents);
                    let url = format!("nar/{}.nar", Sha256::digest(&body).to_nix32());
                    let r = client()
                        .put(format!("{}/{url}", server.cache_url("tenant")))
                        .bearer_auth(tenant)
                        .body(body)
                        .send()
                        .expect("answered within a minute");
                    (r.status().as_u16(), url)
                })
            })
            .collect();
        let statuses = uploads.into_iter().map(|u| u.join().unwrap()).collect();
        // A little more publishing after the uploads, on a disk at its minimum.
        std::thread::sleep(Duration::from_secs(1));
        done.store(true, Ordering::Relaxed);
        publisher.join().unwrap();
        statuses
    });
    let least = least_free.load(Ordering::Relaxed);
    eprintln!(
        "uploads: {:?}; least free {} MiB; {} narinfos published meanwhile",
        statuses.iter().map(|(s, _)| s).collect::<Vec<_>>(),
        least >> 20,
        published.load(Ordering::Relaxed)
    );
    assert!(
        least >= MIN_FREE_MIB << 20,
        "the free space went down to {least} bytes"
    );
    assert!(published.load(Ordering::Relaxed) > 20);
    let refused = statuses.iter().filter(|(s, _)| *s == 507).count();
    assert!(refused >= 1, "{statuses:?}");
    assert_eq!(
        refused + statuses.iter().filter(|(s, _)| *s == 200).count(),
        UPLOADS,
        "{statuses:?}"
    );
    // A refused upload left nothing a client can see.
    for (status, url) in &statuses {
        let head = http
            .head(format!("{}/{url}", server.cache_url("tenant")))
            .bearer_auth(&tenant)
            .send()
            .unwrap();
        let expected = if *status == 200 { 200 } else { 404 };
        assert_eq!(head.status(), expected, "{url}");
    }

    // Deleting the tenant and one gc give the space back.
    server.admin(&["cache", "delete", "tenant", "--yes"]);
    let report: serde_json::Value = serde_json::from_str(&server.admin(&["gc", "--json"])).unwrap();
    let after = free_bytes(fs.path()).unwrap();
    eprintln!(
        "after delete and gc: {} MiB free, {} MiB before the uploads; {report}",
        after >> 20,
        before >> 20
    );
    assert!(
        after + (8 << 20) >= before,
        "freed back to {after} of {before} bytes: {report}"
    );
    assert!(report["bytes_freed"].as_u64().unwrap() > (UPLOAD_MIB as u64) << 20);

    // Filled to the last byte by someone else, and restarted: it comes up, serves
    // what it has, refuses uploads, and deletes, collects and verifies.
    server.admin(&["cache", "create", "spare"]);
    // The room kept for the metadata is back within a second of there being room.
    let ballast = server.data_dir().join("space-reserve");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ballast.exists() {
        assert!(Instant::now() < deadline, "the ballast is written back");
        std::thread::sleep(Duration::from_millis(100));
    }
    let filler = fill(fs.path(), 0);
    server.restart();
    let started = Instant::now();
    let r = http
        .get(format!("{}/{}.narinfo", server.cache_url("other"), path(0)))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .put(format!("{}/{small_url}", server.cache_url("other")))
        .bearer_auth(&other)
        .body(nar(&Entry::Symlink("another")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 507, "{}", r.text().unwrap());
    server.admin(&["gc"]);
    server.admin(&[
        "path",
        "delete",
        "other",
        &format!("/nix/store/{}-o0", path(0)),
    ]);
    server.admin(&["cache", "delete", "spare", "--yes"]);
    server.admin(&["verify"]);
    // The room kept for the metadata was given to it (by the server before the
    // restart, or by the start itself), and stays given while the disk is full.
    assert!(!ballast.exists());
    eprintln!(
        "on a full disk: up, serving and collecting in {:.1?}",
        started.elapsed()
    );
    std::fs::remove_file(filler).unwrap();
    // With room again, uploads work.
    let r = http
        .put(format!(
            "{}/nar/{}.nar",
            server.cache_url("other"),
            Sha256::digest(&nar(&Entry::Symlink("again"))).to_nix32()
        ))
        .bearer_auth(&other)
        .body(nar(&Entry::Symlink("again")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}
