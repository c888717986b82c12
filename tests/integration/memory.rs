//! Memory bounded by design on the paths whose work grows with data a request names:
//! 150,000 narinfos published, read back anonymously, and a path with 30,000 referrers
//! deleted with them, against a server with the default settings (its data on a tmpfs,
//! so that the disk is not what the test waits for): its peak RSS stays under 256 MiB.

use std::time::Instant;

use cachet::nix::nar::write::{nar, Entry};
use cachet::nix::store_path::StorePathHash;
use cachet::nix::Sha256;

use crate::harness::{heavy, Server, Start};
use crate::hostile::Tmpfs;

const PATHS: usize = 150_000;
const REFERRERS: usize = 30_000;
const THREADS: usize = 4;
const RSS_LIMIT_KIB: u64 = 256 * 1024;

/// The hash of the `i`th path.
fn path(i: usize) -> StorePathHash {
    let digest = Sha256::digest(format!("path {i}").as_bytes());
    StorePathHash::from_bytes(digest.as_bytes()[..20].try_into().unwrap())
}

/// Runs `f(client, i)` for every `i` below `n`, on `THREADS` threads with a kept-alive
/// connection each.
fn each(n: usize, f: impl Fn(&reqwest::blocking::Client, usize) + Sync) {
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let f = &f;
            s.spawn(move || {
                let client = crate::harness::client();
                for i in (t..n).step_by(THREADS) {
                    f(&client, i);
                }
            });
        }
    });
}

#[test]
fn publishing_reading_and_deleting_many_paths_stays_within_bounds() {
    let _heavy = heavy();
    let fs = Tmpfs::mount(2048);
    let server = Server::launch(
        Start {
            data_dir: Some(fs.path().join("data")),
            ..Start::default()
        },
        &[],
    );
    let token = server.token();
    let data = nar(&Entry::Symlink("target"));
    let nar_hash = Sha256::digest(&data);
    let url = format!("nar/{}.nar", nar_hash.to_nix32());
    assert_eq!(server.put(&url, data.clone()).status(), 200);
    let root = path(usize::MAX);
    let narinfo = |hash: &StorePathHash, name: &str, refs: &str| {
        format!(
            "StorePath: /nix/store/{hash}-{name}\nURL: {url}\nCompression: none\n\
             NarHash: {nar_hash}\nNarSize: {}\nReferences: {refs}\n",
            data.len()
        )
    };
    let r = server.put(&format!("{root}.narinfo"), narinfo(&root, "root", ""));
    assert_eq!(r.status(), 200);

    let started = Instant::now();
    each(PATHS, |client, i| {
        let hash = path(i);
        let refs = if i < REFERRERS {
            format!("{root}-root")
        } else {
            String::new()
        };
        let r = client
            .put(format!("{}/{hash}.narinfo", server.url()))
            .bearer_auth(&token)
            .body(narinfo(&hash, &format!("p{i}"), &refs))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    });
    let published = server.peak_rss_kib();
    eprintln!(
        "published {PATHS} narinfos in {:.0?}: peak RSS {} MiB",
        started.elapsed(),
        published / 1024
    );

    let started = Instant::now();
    each(PATHS, |client, i| {
        let r = client
            .get(format!("{}/{}.narinfo", server.url(), path(i)))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
    });
    let read = server.peak_rss_kib();
    eprintln!(
        "read {PATHS} distinct narinfos anonymously in {:.0?}: peak RSS {} MiB",
        started.elapsed(),
        read / 1024
    );

    let started = Instant::now();
    let out = server.admin(&[
        "path",
        "delete",
        "main",
        &format!("/nix/store/{root}-root"),
        "--with-referrers",
        "--json",
    ]);
    let deleted: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(deleted["deleted"].as_array().unwrap().len(), REFERRERS + 1);
    let after = server.peak_rss_kib();
    eprintln!(
        "deleted a path with {REFERRERS} referrers in {:.0?}: peak RSS {} MiB",
        started.elapsed(),
        after / 1024
    );
    assert!(published < RSS_LIMIT_KIB, "publishing: {published} KiB");
    assert!(read < RSS_LIMIT_KIB, "reading: {read} KiB");
    assert!(after < RSS_LIMIT_KIB, "deleting: {after} KiB");
    // What was not deleted is still there.
    let stats = server.admin(&["stats", "main", "--json"]);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(
        stats["paths"].as_u64(),
        Some((PATHS - REFERRERS) as u64),
        "{stats}"
    );
}
