//! The garbage collector against a real server fed by the real `nix`: deleted caches'
//! data reclaimed, `--dry-run` predicting exactly what the run removes and changing
//! nothing, retention by size keeping every
//! closure whole, pins surviving retention, and `verify --deep` on what is left.

use crate::harness::{closure, local_nix, ok, Nix, NixHost, Server};

/// Grace and pending-upload ages of zero: everything dead goes at once; every pack
/// with a dead byte is rewritten.
const CONFIG: &str = "[gc]\ngrace_secs = 0\npending_upload_secs = 0\ncompact_dead_fraction = 0\n";

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn stats(server: &Server, cache: Option<&str>) -> serde_json::Value {
    let mut args = vec!["stats", "--json"];
    args.extend(cache);
    json(&server.admin(&args))
}

/// Every file under the data directory's packs, with its size.
fn pack_files(server: &Server) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let root = server.data_dir().join("store/packs");
    for dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let len = f.metadata().unwrap().len();
            out.push((f.file_name().to_string_lossy().into_owned(), len));
        }
    }
    out.sort();
    out
}

fn verify_deep(server: &Server) -> serde_json::Value {
    let report = json(&server.admin(&["verify", "--deep", "--json"]));
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    report
}

/// A dry run, then the run: the run removes what the dry run said, and the dry run
/// changed nothing.
fn gc_as_predicted(server: &Server) -> serde_json::Value {
    let before = pack_files(server);
    let predicted = json(&server.admin(&["gc", "--dry-run", "--json"]));
    assert_eq!(pack_files(server), before, "a dry run changes nothing");
    assert_eq!(predicted["dry_run"], true);
    let done = json(&server.admin(&["gc", "--json"]));
    for field in [
        "paths",
        "nars",
        "uploads",
        "chunks",
        "manifests",
        "packs",
        "bytes_freed",
        "packs_compacted",
        "dead_bytes_compacted",
    ] {
        assert_eq!(
            done[field], predicted[field],
            "{field}: {predicted} then {done}"
        );
    }
    let after = pack_files(server);
    let size = |files: &[(String, u64)]| files.iter().map(|(_, n)| n).sum::<u64>();
    let n = |field: &str| done[field].as_u64().unwrap();
    assert_eq!(
        size(&before) + n("bytes_written"),
        size(&after) + n("bytes_freed") + n("bytes_compacted"),
        "{done}"
    );
    assert_eq!(
        before.len() as u64 + n("packs_written"),
        after.len() as u64 + n("packs") + n("packs_compacted"),
        "{done}"
    );
    assert_eq!(stats(server, None)["last_gc"]["packs"], done["packs"]);
    done
}

#[test]
fn deleted_caches_are_reclaimed_as_a_dry_run_predicts() {
    let v1 = closure(48, "v1");
    let v2 = closure(48, "v2");

    // What the rebuild alone stores.
    let alone = Server::with_config(CONFIG);
    ok(NixHost::new(&alone, Nix::V2_8).push(&alone, "zstd", &v2));
    let alone_bytes = stats(&alone, None)["stored_bytes"].as_u64().unwrap();
    drop(alone);

    let server = Server::with_config(CONFIG);
    server.admin(&["cache", "create", "a"]);
    server.admin(&["cache", "create", "b"]);
    let ci = NixHost::new(&server, Nix::V2_8);
    ok(ci.push_to(&server.cache_url("a"), "zstd", &v1));
    ok(ci.push_to(&server.cache_url("b"), "zstd", &v2));

    // The rebuild shares most chunks with the first build: what only the first build
    // had goes (its packs, shared frame by frame, are rewritten with the live frames,
    // recompressed), and the rebuild still serves and verifies.
    let both = stats(&server, None)["stored_bytes"].as_u64().unwrap();
    server.admin(&["cache", "delete", "a", "--yes"]);
    let done = gc_as_predicted(&server);
    assert_eq!(
        done["nars"].as_u64().unwrap() as usize,
        v1.nar_hashes.len(),
        "{done}"
    );
    assert!(done["chunks"].as_u64().unwrap() > 0, "{done}");
    assert!(done["packs_compacted"].as_u64().unwrap() > 0, "{done}");
    let left = stats(&server, None)["stored_bytes"].as_u64().unwrap();
    println!(
        "stored: both builds {both} B; after deleting the first and gc {left} B; \
         the rebuild alone {alone_bytes} B; {done}"
    );
    assert!(
        left as f64 <= alone_bytes as f64 * 1.1,
        "after gc {left} B, the rebuild alone {alone_bytes} B"
    );
    verify_deep(&server);
    let host = NixHost::trusting(None, &[&server.public_key_of("b")], Nix::V2_8);
    ok(host.copy_from(&server.cache_url("b"), "store", &v2.top));
    let again = json(&server.admin(&["gc", "--json"]));
    assert_eq!(
        (again["nars"].as_u64(), again["chunks"].as_u64()),
        (Some(0), Some(0)),
        "{again}"
    );

    // With the rebuild gone too, nothing is left stored.
    server.admin(&["cache", "delete", "b", "--yes"]);
    let done = gc_as_predicted(&server);
    assert!(done["packs"].as_u64().unwrap() > 0, "{done}");
    assert!(pack_files(&server).is_empty());
    assert_eq!(stats(&server, None)["stored_bytes"], 0);
    assert_eq!(stats(&server, None)["chunks"], 0);
    verify_deep(&server);
}

#[test]
fn retention_by_size_keeps_closures_whole_and_pins_survive_it() {
    let v1 = closure(48, "v1");
    let server = Server::with_config(CONFIG);
    ok(NixHost::new(&server, Nix::V2_8).push(&server, "zstd", &v1));
    let all = stats(&server, Some("main"))["paths"].as_u64().unwrap();
    assert_eq!(all as usize, v1.nar_hashes.len());

    // A pinned leaf keeps its closure (just itself) whatever the retention.
    let leaf = v1
        .nar_hashes
        .keys()
        .find(|p| p.ends_with("-libc6"))
        .unwrap()
        .clone();
    let out = server.admin(&["pin", "add", "main", "libc", &leaf, "--keep-revisions", "2"]);
    assert!(out.contains("pinned"), "{out}");
    let pins = json(&server.admin(&["pin", "list", "main", "--json"]));
    assert_eq!(pins[0]["name"], "libc");

    // Half the size: the least recently fetched go, with their referrers.
    let stored = stats(&server, Some("main"))["stored_bytes"]
        .as_u64()
        .unwrap();
    let half = (stored / 2).to_string();
    server.admin(&[
        "cache",
        "update",
        "main",
        "--keep-size",
        &format!("{half}B"),
    ]);
    let done = json(&server.admin(&["gc", "--json"]));
    let evicted = done["paths"]["main"].as_u64().unwrap();
    let s = stats(&server, Some("main"));
    assert_eq!(s["paths"].as_u64().unwrap(), all - evicted);
    assert!(s["stored_bytes"].as_u64().unwrap() <= stored / 2, "{s}");
    // `verify` checks every narinfo's references are in the cache.
    verify_deep(&server);
    assert_eq!(
        server.get_status(&narinfo_url(&leaf)),
        200,
        "the pinned path stays"
    );

    // Nothing may stay but the pin's closure.
    server.admin(&["cache", "update", "main", "--keep-size", "0B"]);
    json(&server.admin(&["gc", "--json"]));
    let pinned_closure = ok(local_nix(&["path-info", "-r", &leaf])).lines().count();
    assert_eq!(stats(&server, Some("main"))["paths"], pinned_closure);
    assert_eq!(server.get_status(&narinfo_url(&leaf)), 200);
    verify_deep(&server);

    // Unpinned, it goes too, and its data with it.
    server.admin(&["pin", "remove", "main", "libc"]);
    json(&server.admin(&["gc", "--json"]));
    assert_eq!(stats(&server, Some("main"))["paths"], 0);
    assert_eq!(server.get_status(&narinfo_url(&leaf)), 404);
    assert_eq!(stats(&server, None)["stored_bytes"], 0);
    assert!(pack_files(&server).is_empty());
}

fn narinfo_url(store_path: &str) -> String {
    let base = store_path.rsplit('/').next().unwrap();
    format!("{}.narinfo", &base[..32])
}
