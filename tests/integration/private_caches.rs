//! The real Nix clients with private caches and tokens, through a key rotation, and
//! over HTTPS with a test CA.

use std::process::Output;

use crate::harness::{closure, ok, with_each_client, Nix, NixHost, Server, Start, TestCertificate};

with_each_client!(
    a_private_cache_serves_only_its_token_holders,
    hosts_trusting_either_key_keep_working_through_a_rotation,
    nix_pushes_and_substitutes_over_https,
);

fn failed(out: &Output, what: &str) -> String {
    assert!(!out.status.success(), "{what} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn a_private_cache_serves_only_its_token_holders(nix: Nix) {
    let server = Server::start();
    server.admin(&["cache", "create", "team", "--private"]);
    let key = server.public_key_of("team");
    let push = server.new_token("ci", "push", &["team"]);
    let pull = server.new_token("hosts", "pull", &["team"]);
    let url = server.cache_url("team");
    let c = closure(16, "private");

    let ci = NixHost::trusting(Some(&push), &[&key], nix);
    ok(ci.push_to(&url, "zstd", &c));

    let host = NixHost::trusting(Some(&pull), &[&key], nix);
    ok(host.copy_from(&url, "store", &c.top));
    assert_eq!(
        host.nar_hashes(Some(&host.store("store")), &c.top),
        c.nar_hashes
    );
    // A pull token does not push.
    let other = closure(16, "private-2");
    let err = failed(
        &host.push_to(&url, "zstd", &other),
        "a push with a pull token",
    );
    assert!(err.contains("403"), "{err}");

    // Without a token, nothing: not the data, not even whether the cache exists.
    let stranger = NixHost::trusting(None, &[&key], nix);
    // (Nix 2.8 reports a refused nix-cache-info as "not a binary cache".)
    let refused =
        |err: &str| err.contains("401") || err.contains("does not appear to be a binary cache");
    let err = failed(
        &stranger.copy_from(&url, "store", &c.top),
        "a pull without a token",
    );
    assert!(refused(&err), "{err}");
    let gone = failed(
        &stranger.copy_from(&server.cache_url("no-such-cache"), "store2", &c.top),
        "a pull from nowhere",
    );
    assert!(refused(&gone), "{gone}");
    let store = stranger.store("store");
    failed(
        &stranger.nix(&["path-info", "--store", &store, &c.top]),
        "the top path arriving without a token",
    );

    // Revoked, the pull token stops working on its next request: the NARs this host
    // still knows the narinfos of are refused.
    server.admin(&["token", "revoke", "hosts"]);
    failed(
        &host.copy_from(&url, "again", &c.top),
        "a pull with a revoked token",
    );
    let nar = server
        .http()
        .get(format!("{url}/nix-cache-info"))
        .bearer_auth(&pull)
        .send()
        .unwrap();
    assert_eq!(nar.status(), 401);
    // The push token still works.
    ok(ci.push_to(&url, "zstd", &other));
}

fn hosts_trusting_either_key_keep_working_through_a_rotation(nix: Nix) {
    let server = Server::start();
    let old_key = server.public_key();
    let before = closure(16, "rotation-1");
    let ci = NixHost::new(&server, nix);
    ok(ci.push(&server, "zstd", &before));

    let rotated = server.admin(&["key", "rotate", "main"]);
    let new_key = rotated
        .lines()
        .find_map(|l| l.strip_prefix("trust:"))
        .unwrap()
        .trim()
        .to_owned();
    assert_ne!(new_key, old_key);
    let after = closure(16, "rotation-2");
    ok(ci.push(&server, "zstd", &after));

    // Until `resign`, a host that trusts only one of the keys substitutes everything.
    for key in [&old_key, &new_key] {
        let host = NixHost::trusting(None, &[key], nix);
        for (i, c) in [&before, &after].into_iter().enumerate() {
            let store = format!("store-{i}");
            ok(host.copy_from(&server.url(), &store, &c.top));
            assert_eq!(
                host.nar_hashes(Some(&host.store(&store)), &c.top),
                c.nar_hashes
            );
        }
    }

    server.admin(&["key", "resign", "main"]);
    let verify = |key: &str, top: &str| {
        let host = NixHost::trusting(None, &[key], nix);
        host.nix(&["store", "verify", "--store", &server.url(), "-r", top])
    };
    for c in [&before, &after] {
        // Every path verifies with the new key alone, contents and signatures...
        ok(verify(&new_key, &c.top));
        // ...and no longer with the retired one.
        let err = failed(
            &verify(&old_key, &c.top),
            "a verify trusting only the retired key",
        );
        assert!(
            err.contains("untrusted") || err.contains("signature"),
            "{err}"
        );
    }
}

fn nix_pushes_and_substitutes_over_https(nix: Nix) {
    let certs = tempfile::tempdir().unwrap();
    let first = TestCertificate::new(certs.path(), "first");
    let config = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        first.cert.display(),
        first.key.display()
    );
    let server = Server::launch(
        Start {
            config: Some(&config),
            ca_file: Some(first.ca.clone()),
            ..Start::default()
        },
        &[],
    );
    assert!(server.url().starts_with("https://"));
    let key = server.public_key();
    let host_with_ca =
        |token: Option<&str>| NixHost::trusting(token, &[&key], nix).trusting_ca(&first.ca);
    let c = closure(16, "https");
    let ci = host_with_ca(Some(&server.token()));
    ok(ci.push(&server, "xz", &c));
    let host = host_with_ca(None);
    ok(host.copy_from(&server.url(), "store", &c.top));
    assert_eq!(
        host.nar_hashes(Some(&host.store("store")), &c.top),
        c.nar_hashes
    );
    // Without the CA, the server is not trusted.
    let plain = NixHost::trusting(None, &[&key], nix);
    failed(
        &plain.copy_from(&server.url(), "store", &c.top),
        "a pull that does not trust the CA",
    );

    // cache-admin over HTTPS, with the CA file.
    let listed = server.admin(&["cache", "list"]);
    assert!(listed.contains("main "), "{listed}");
    let without =
        crate::harness::cache_admin(&server.base(), Some(&server.token()), &["cache", "list"]);
    let err = failed(&without, "cache-admin without the CA");
    assert!(
        err.contains("could not reach") && err.contains("certificate"),
        "{err}"
    );

    // A renewed certificate (from another CA here) is served after SIGHUP, with no restart.
    let second = TestCertificate::new(certs.path(), "second");
    let trusting_second = crate::harness::client_trusting(&second.ca);
    let health = format!("{}/health", server.base());
    assert!(trusting_second.get(&health).send().is_err());
    std::fs::copy(&second.cert, &first.cert).unwrap();
    std::fs::copy(&second.key, &first.key).unwrap();
    let pid = server.pid().to_string();
    ok(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .output()
        .unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while trusting_second.get(&health).send().is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate is not served:\n{}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(server.log().contains("reloaded the TLS certificate"));
}
