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

/// Every narinfo of `closure` in `cache` says the FileSize of the `.nar.zst` served.
fn assert_file_sizes(server: &Server, cache: &str, closure: &crate::harness::Closure) {
    let http = server.http();
    for path in closure.nar_hashes.keys() {
        let hash = &path["/nix/store/".len()..][..32];
        let url = format!("{}/{hash}.narinfo", server.cache_url(cache));
        let text = http.get(&url).send().unwrap().bytes().unwrap();
        let info = cachet::nix::NarInfo::parse(&text).unwrap();
        let nar = format!("{}/{}", server.cache_url(cache), info.url);
        let body = http.get(&nar).send().unwrap().bytes().unwrap();
        assert_eq!(info.file_size, Some(body.len() as u64), "{path}");
    }
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
    assert_file_sizes(&server, "b", &v2);
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

/// Fetches every NAR of `closure` from `cache` by HTTP, uncompressed; panics on any
/// NAR that arrives whole (200, the full length) with the wrong bytes or short. A
/// miss or a failed response is no wrong data.
fn fetch_all(server: &Server, cache: &str, closure: &crate::harness::Closure) -> usize {
    let http = server.http();
    let mut good = 0;
    for (path, nar_hash) in &closure.nar_hashes {
        let url = format!(
            "{}/nar/{}.nar",
            server.cache_url(cache),
            nar_hash.to_nix32()
        );
        let Ok(r) = http.get(&url).send() else {
            continue;
        };
        if r.status() != 200 {
            assert_eq!(r.status(), 404, "{path}");
            continue;
        }
        let length = r.content_length();
        let Ok(body) = r.bytes() else { continue };
        // A body cut short by a failing read is an error the client sees (its length
        // falls short of Content-Length, and the stack reports it); a whole one must
        // be right.
        if length == Some(body.len() as u64) {
            assert_eq!(
                cachet::nix::Sha256::digest(&body),
                *nar_hash,
                "{path}: wrong NAR"
            );
            good += 1;
        }
    }
    good
}

#[test]
fn pushes_and_downloads_during_repeated_gc_lose_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Packs go as soon as they are dead and every pack with a dead byte is rewritten;
    // uploads keep the default age, as a push's narinfo follows its NAR.
    let server = Server::with_config("[gc]\ngrace_secs = 0\ncompact_dead_fraction = 0\n");
    let kept = closure(24, "v1");
    let churn = [closure(24, "v2"), closure(24, "v3")];
    server.admin(&["cache", "create", "kept"]);
    ok(NixHost::new(&server, Nix::V2_8).push_to(&server.cache_url("kept"), "zstd", &kept));

    let stop = AtomicBool::new(false);
    /// Stops the loops however the pushes end, a failure included.
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let (gcs, fetched) = std::thread::scope(|s| {
        let collector = s.spawn(|| {
            let mut runs = 0;
            while !stop.load(Ordering::Relaxed) {
                json(&server.admin(&["gc", "--json"]));
                runs += 1;
            }
            runs
        });
        let reader = s.spawn(|| {
            let mut fetched = 0;
            while !stop.load(Ordering::Relaxed) {
                fetched += fetch_all(&server, "kept", &kept);
            }
            fetched
        });
        let stopping = Stop(&stop);
        // Caches made, pushed to with the real client, and deleted, over and over:
        // their frames share packs with the kept cache's, which compaction rewrites
        // while the reader downloads them.
        for round in 0..4 {
            let name = format!("churn{round}");
            server.admin(&["cache", "create", &name]);
            let c = &churn[round % 2];
            ok(NixHost::new(&server, Nix::V2_8).push_to(&server.cache_url(&name), "zstd", c));
            if round < 3 {
                server.admin(&["cache", "delete", &name, "--yes"]);
            }
        }
        drop(stopping);
        (collector.join().unwrap(), reader.join().unwrap())
    });
    println!("{gcs} collections, {fetched} NARs fetched and checked during them");
    assert!(gcs >= 2 && fetched > 0, "{gcs} collections, {fetched} NARs");

    json(&server.admin(&["gc", "--json"]));
    verify_deep(&server);
    let fresh = |cache: &str, c: &crate::harness::Closure| {
        let host = NixHost::trusting(None, &[&server.public_key_of(cache)], Nix::V2_8);
        ok(host.copy_from(&server.cache_url(cache), "store", &c.top));
        assert_eq!(
            host.nar_hashes(Some(&host.store("store")), &c.top),
            c.nar_hashes
        );
    };
    fresh("kept", &kept);
    fresh("churn3", &churn[1]);
}

#[test]
fn a_server_killed_during_gc_restarts_whole_and_the_next_gc_finishes() {
    let mut server = Server::with_config(CONFIG);
    let v1 = closure(24, "v1");
    let v2 = closure(24, "v2");
    let v3 = closure(24, "v3");
    server.admin(&["cache", "create", "b"]);
    ok(NixHost::new(&server, Nix::V2_8).push_to(&server.cache_url("b"), "zstd", &v2));
    let http = server.http();
    // Killed at points spread over a collection's phases.
    for (round, delay_ms) in [150u64, 600, 1200, 40].into_iter().enumerate() {
        let name = format!("a{round}");
        server.admin(&["cache", "create", &name]);
        ok(NixHost::new(&server, Nix::V2_8).push_to(&server.cache_url(&name), "zstd", &v1));
        server.admin(&["cache", "delete", &name, "--yes"]);
        let started = http
            .post(format!("{}/_api/v1/gc", server.base()))
            .bearer_auth(server.token())
            .send()
            .unwrap();
        assert_eq!(started.status(), 202);
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        server.restart();
        verify_deep(&server);
        assert_eq!(fetch_all(&server, "b", &v2), v2.nar_hashes.len());
    }
    // An upload killed mid-way leaves packs that no record names.
    server.admin(&["cache", "create", "c"]);
    std::thread::scope(|s| {
        let push = s.spawn(|| {
            NixHost::new(&server, Nix::V2_8).push_to(&server.cache_url("c"), "none", &v3)
        });
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let pid = server.pid();
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        let _ = push.join();
    });
    server.restart();
    server.admin(&["cache", "delete", "c", "--yes"]);

    // The next collection finishes the job: every pack left is wholly live (what
    // stats counts as dead bytes includes packs no record names), and what stays
    // serves and verifies.
    json(&server.admin(&["gc", "--json"]));
    let s = stats(&server, None);
    assert_eq!(s["dead_bytes"], 0, "{s}");
    verify_deep(&server);
    let host = NixHost::trusting(None, &[&server.public_key_of("b")], Nix::V2_8);
    ok(host.copy_from(&server.cache_url("b"), "store", &v2.top));
}

#[test]
fn verify_names_the_paths_a_missing_pack_breaks_and_fails() {
    let server = Server::start();
    let v1 = closure(24, "v1");
    ok(NixHost::new(&server, Nix::V2_8).push(&server, "zstd", &v1));
    verify_deep(&server);
    // One pack gone, as a disk losing a file would.
    let (name, _) = pack_files(&server).into_iter().next().unwrap();
    let file = server
        .data_dir()
        .join("store/packs")
        .join(&name[..2])
        .join(&name);
    std::fs::remove_file(&file).unwrap();
    let out = server.cache_admin(&["verify"]);
    assert!(!out.status.success(), "verify must fail");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("problem:") && text.contains("missing"),
        "{text}"
    );
    // Each problem names the store paths it breaks, all of them from the closure.
    let affected: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("affects main: "))
        .collect();
    assert!(!affected.is_empty(), "{text}");
    assert!(
        affected.iter().all(|p| v1.nar_hashes.contains_key(*p)),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&server.cache_admin(&["verify", "--json"]).stdout).unwrap();
    assert!(!json["problems"].as_array().unwrap().is_empty());
}

/// With the default configuration (an hour's grace, half-dead packs rewritten): one gc
/// after `path delete` removes the paths' NARs, a deleted cache's packs go at that same
/// gc, what it leaves is reported, and `gc --compact` brings the store within 10% of
/// what the remaining paths alone store.
#[test]
fn with_the_defaults_one_gc_frees_what_was_removed() {
    let server = Server::start();
    let (a, b, c) = (closure(24, "gc-a"), closure(16, "gc-b"), closure(8, "gc-c"));
    let host = NixHost::new(&server, Nix::V2_8);
    // B first: A's chunks that B has too stay in B's packs.
    ok(host.push(&server, "zstd", &b));
    ok(host.push(&server, "zstd", &a));
    server.admin(&["cache", "create", "doomed"]);
    let before_c: Vec<String> = pack_files(&server).into_iter().map(|(p, _)| p).collect();
    ok(host.push_to(&server.cache_url("doomed"), "zstd", &c));
    let c_packs: Vec<String> = pack_files(&server)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| !before_c.contains(p))
        .collect();
    assert!(!c_packs.is_empty());

    let mut delete = vec!["path", "delete", "main", "--with-referrers"];
    delete.extend(b.nar_hashes.keys().map(String::as_str));
    server.admin(&delete);
    server.admin(&["cache", "delete", "doomed", "--yes"]);
    let report = json(&server.admin(&["gc", "--json"]));
    eprintln!("one gc with the defaults: {report}");
    let removed = (b.nar_hashes.len() + c.nar_hashes.len()) as u64;
    assert_eq!(report["nars"].as_u64(), Some(removed), "{report}");
    let left: Vec<String> = pack_files(&server).into_iter().map(|(p, _)| p).collect();
    for p in &c_packs {
        assert!(
            !left.contains(p),
            "pack {p} of the deleted cache is still there"
        );
    }
    // B's packs hold A's chunks too: a few of their bytes died, below the default
    // threshold, and the report says so.
    assert!(
        report["left_partly_dead_packs"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(report["left_dead_bytes"].as_u64().unwrap() > 0, "{report}");
    let text = server.admin(&["gc"]);
    assert!(text.contains("gc --compact rewrites them"), "{text}");

    // What A alone stores, pushed to a server of its own.
    let alone = Server::start();
    ok(NixHost::new(&alone, Nix::V2_8).push(&alone, "zstd", &a));
    let reference: u64 = pack_files(&alone).iter().map(|(_, n)| n).sum();
    let compacted = json(&server.admin(&["gc", "--compact", "--json"]));
    assert!(
        compacted["packs_compacted"].as_u64().unwrap() > 0,
        "{compacted}"
    );
    let stored: u64 = pack_files(&server).iter().map(|(_, n)| n).sum();
    eprintln!("after gc --compact: {stored} bytes stored; A alone: {reference}");
    assert!(
        stored * 10 <= reference * 11,
        "{stored} bytes stored, {reference} for the remaining paths alone"
    );
    verify_deep(&server);
    let puller = NixHost::new(&server, Nix::V2_8);
    assert_eq!(puller.pull(&server, "after", &a.top), a.nar_hashes);
}
