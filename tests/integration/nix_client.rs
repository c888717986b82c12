//! The real Nix clients, 2.8 and current, pushing and pulling closures.

use crate::harness::{
    closure, ok, parse_path_info, with_each_client, Closure, Nix, NixHost, Server,
};

with_each_client!(
    round_trip_xz,
    round_trip_zstd,
    round_trip_none,
    uncompressed_chunks_round_trip,
    a_different_key_does_not_verify,
    concurrent_pushes_of_overlapping_closures,
    pushing_again_stores_nothing_and_a_rebuild_stores_little,
);

/// Push with one compression, pull into a fresh store that trusts only the cache's key.
fn round_trip(compression: &str, nix: Nix) {
    round_trip_through(&Server::start(), compression, nix);
}

/// Pushes a closure to `server` with `compression` and pulls it back every way a
/// client does, into stores that trust only the cache's key.
pub(crate) fn round_trip_through(server: &Server, compression: &str, nix: Nix) -> Closure {
    let c = closure(48, "v1");
    let ci = NixHost::new(server, nix);
    ok(ci.push(server, compression, &c));

    let host = NixHost::new(server, nix);
    let arrived = host.pull(server, "store", &c.top);
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
    let got = host.nar_hashes(Some(&store), leaf);
    assert_eq!(got.get(leaf.as_str()), c.nar_hashes.get(leaf.as_str()));

    // Over HTTP, `nix path-info` sees the closure and `nix store ls` lists a path as
    // the pusher's own store does (from the `.ls` listing the server built).
    let info = parse_path_info(&ok(host.nix(&[
        "path-info",
        "--json",
        "--store",
        &url,
        "-r",
        &c.top,
    ])));
    let hashes: std::collections::BTreeMap<_, _> =
        info.into_iter().map(|(p, (h, _))| (p, h)).collect();
    assert_eq!(hashes, c.nar_hashes);
    let remote = ok(host.nix(&["store", "ls", "--store", &url, "-lR", leaf]));
    let local = ok(ci.nix(&["store", "ls", "-lR", leaf]));
    assert_eq!(remote, local);
    assert!(remote.contains("libc.so.6"), "{remote}");
    c
}

fn round_trip_xz(nix: Nix) {
    round_trip("xz", nix);
}

fn round_trip_zstd(nix: Nix) {
    round_trip("zstd", nix);
}

fn round_trip_none(nix: Nix) {
    round_trip("none", nix);
}

/// `zstd_level = 0` stores chunks as raw zstd frames: served `.nar.zst` bodies are
/// still valid zstd, and the packs hold about the NAR bytes themselves.
fn uncompressed_chunks_round_trip(nix: Nix) {
    let server = Server::with_config("[ingest]\nzstd_level = 0\n");
    let c = round_trip_through(&server, "zstd", nix);
    let (_, stored) = server.chunk_files();
    // Compressed at level 1 the same closure takes about a third of its NAR bytes;
    // raw, only what repeats within the closure is saved.
    assert!(
        stored * 10 > c.nar_bytes * 6,
        "stored {stored} bytes of {} NAR bytes",
        c.nar_bytes
    );
}

fn a_different_key_does_not_verify(nix: Nix) {
    let server = Server::start();
    let c = closure(48, "v1");
    ok(NixHost::new(&server, nix).push(&server, "zstd", &c));
    let host = NixHost::new(&server, nix);
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

fn concurrent_pushes_of_overlapping_closures(nix: Nix) {
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
                s.spawn(move || NixHost::new(server, nix).push(server, comp, c))
            })
            .collect();
        for h in handles {
            ok(h.join().unwrap());
        }
    });
    let host = NixHost::new(&server, nix);
    for (i, c) in closures.iter().enumerate().take(3) {
        assert_eq!(
            host.pull(&server, &format!("store{i}"), &c.top),
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

fn pushing_again_stores_nothing_and_a_rebuild_stores_little(nix: Nix) {
    let server = Server::start();
    let v1 = closure(48, "v1");
    let v2 = closure(48, "v2");
    ok(NixHost::new(&server, nix).push(&server, "zstd", &v1));
    let after_v1 = server.chunk_files();

    // A second runner (its own client cache, so it asks the server) pushing the same
    // closure with another compression writes no chunk.
    ok(NixHost::new(&server, nix).push(&server, "xz", &v1));
    assert_eq!(
        server.chunk_files(),
        after_v1,
        "the same closure again adds no chunk"
    );

    // A mass rebuild: every store path differs, file contents only where hashes sit.
    ok(NixHost::new(&server, nix).push(&server, "zstd", &v2));
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
    let host = NixHost::new(&server, nix);
    assert_eq!(host.pull(&server, "v2", &v2.top), v2.nar_hashes);
}
