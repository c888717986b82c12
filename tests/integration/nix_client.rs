//! The real Nix client pushing and pulling closures.

use crate::harness::{closure, ok, pull, push, Closure, NixHost, Server};

/// Push with one compression, pull into a fresh store that trusts only the cache's key.
fn round_trip(compression: &str) {
    round_trip_through(&Server::start(), compression);
}

fn round_trip_through(server: &Server, compression: &str) -> Closure {
    let c = closure(48, "v1");
    let ci = NixHost::new(server);
    ok(push(&ci, server, compression, &c.top));

    let host = NixHost::new(server);
    let arrived = pull(&host, server, "store", &c.top);
    assert_eq!(arrived, c.nar_hashes, "every path arrives with its NarHash");
    assert!(
        arrived.len() > 30,
        "a realistic closure: {} paths",
        arrived.len()
    );

    // The same kind of store substitutes through `substituters`, one path at a time.
    let leaf = c
        .nar_hashes
        .keys()
        .find(|p| p.ends_with("-libc6"))
        .expect("libc6 is in every closure");
    let store = host.store("substituted");
    let url = server.url();
    ok(host
        .cmd("nix-store")
        .args([
            "--store",
            &store,
            "--realise",
            leaf,
            "--option",
            "substituters",
            &url,
        ])
        .output()
        .unwrap());
    let got = crate::harness::nar_hashes(Some(&store), leaf);
    assert_eq!(got.get(leaf.as_str()), c.nar_hashes.get(leaf.as_str()));
    c
}

#[test]
fn round_trip_xz() {
    round_trip("xz");
}

#[test]
fn round_trip_zstd() {
    round_trip("zstd");
}

#[test]
fn round_trip_none() {
    round_trip("none");
}

/// `zstd_level = 0` stores chunks as raw zstd frames: served `.nar.zst` bodies are
/// still valid zstd, and the packs hold about the NAR bytes themselves.
#[test]
fn uncompressed_chunks_round_trip() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "[ingest]\nzstd_level = 0\n").unwrap();
    let server = Server::start_with(&["--config", config.path().to_str().unwrap()]);
    let c = round_trip_through(&server, "zstd");
    let (_, stored) = server.chunk_files();
    // Compressed at level 1 the same closure takes about a third of its NAR bytes;
    // raw, only what repeats within the closure is saved.
    assert!(
        stored * 10 > c.nar_bytes * 6,
        "stored {stored} bytes of {} NAR bytes",
        c.nar_bytes
    );
}

#[test]
fn a_different_key_does_not_verify() {
    let server = Server::start();
    let c = closure(48, "v1");
    ok(push(&NixHost::new(&server), &server, "zstd", &c.top));
    let host = NixHost::new(&server);
    // The cache's own key verifies every path, NAR contents included...
    ok(host.nix(&["store", "verify", "--store", &server.url(), "-r", &c.top]));
    // ...and a key the cache did not sign with does not.
    let other = "other-1:ccp56oDK3uTneBckSgBBgZqb4tSdiI5uREhMHET9jHc=";
    let out = host.nix(&[
        "store",
        "verify",
        "--store",
        &server.url(),
        "--trusted-public-keys",
        other,
        &c.top,
    ]);
    assert!(
        !out.status.success(),
        "an untrusted signature must fail verification"
    );
}

#[test]
fn concurrent_pushes_of_overlapping_closures() {
    let server = Server::start();
    let closures = [
        closure(24, "v1"),
        closure(32, "v1"),
        closure(48, "v1"),
        closure(48, "v1"),
    ];
    let compressions = ["zstd", "xz", "zstd", "none"];
    std::thread::scope(|s| {
        let handles: Vec<_> = closures
            .iter()
            .zip(compressions)
            .map(|(c, comp)| {
                let server = &server;
                s.spawn(move || push(&NixHost::new(server), server, comp, &c.top))
            })
            .collect();
        for h in handles {
            ok(h.join().unwrap());
        }
    });
    let host = NixHost::new(&server);
    for (i, c) in closures.iter().enumerate().take(3) {
        assert_eq!(
            pull(&host, &server, &format!("store{i}"), &c.top),
            c.nar_hashes
        );
    }
    ok(host.nix(&[
        "store",
        "verify",
        "--store",
        &server.url(),
        "-r",
        &closures[2].top,
    ]));
}

#[test]
fn pushing_again_stores_nothing_and_a_rebuild_stores_little() {
    let server = Server::start();
    let v1 = closure(48, "v1");
    let v2 = closure(48, "v2");
    ok(push(&NixHost::new(&server), &server, "zstd", &v1.top));
    let after_v1 = server.chunk_files();

    // A second runner (its own client cache, so it asks the server) pushing the same
    // closure with another compression writes no chunk.
    ok(push(&NixHost::new(&server), &server, "xz", &v1.top));
    assert_eq!(
        server.chunk_files(),
        after_v1,
        "the same closure again adds no chunk"
    );

    // A mass rebuild: every store path differs, file contents only where hashes sit.
    ok(push(&NixHost::new(&server), &server, "zstd", &v2.top));
    let after_v2 = server.chunk_files();
    let added = after_v2.1 - after_v1.1;
    eprintln!(
        "v1: {} NAR bytes, stored {} bytes in {} packs; v2 added {added} bytes ({:.1}% of v1 stored)",
        v1.nar_bytes,
        after_v1.1,
        after_v1.0,
        100.0 * added as f64 / after_v1.1 as f64
    );
    assert!(
        added * 5 < v1.nar_bytes,
        "a rebuild should store far less than the closure's size: {added} of {}",
        v1.nar_bytes
    );
    let host = NixHost::new(&server);
    assert_eq!(pull(&host, &server, "v2", &v2.top), v2.nar_hashes);
}
