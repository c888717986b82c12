//! Quotas: a cache with `--max-size` refuses the push that would take it past its
//! quota with 507 naming the cache and its quota, and nothing of that push becomes
//! visible past what fitted; other caches keep accepting pushes; with the quota raised
//! the same push completes; `stats`, the cache's page and the metrics show the use
//! against the quota. And a compression bomb past the default bound on expansion is
//! refused with 413.

use cachet::nix::nar::write::{nar, Entry};
use cachet::nix::Sha256;

use crate::harness::{closure, ok, Nix, NixHost, Server};
use crate::hostile::{admin_metric, metric};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn a_cache_at_its_quota_refuses_pushes_and_others_go_on() {
    let server = Server::start();
    let c = closure(16, "quota");
    let host = NixHost::new(&server, Nix::V2_8);
    // What the closure takes, from a cache without a quota.
    ok(host.push(&server, "zstd", &c));
    let used = json(&server.admin(&["stats", "main", "--json"]))["used_bytes"]
        .as_u64()
        .unwrap();
    assert!(used > 1 << 20, "{used}");

    let half = (used / 2).to_string();
    server.admin(&["cache", "create", "small", "--max-size", &half]);
    server.admin(&["cache", "create", "other"]);
    let small = server.cache_url("small");
    // A push refused is not retried: 507 is a server error, which Nix retries with
    // backoff, five times by default.
    let once =
        |server: &Server| NixHost::new(server, Nix::V2_8).with_setting("download-attempts = 1");
    let out = once(&server).push_to(&small, "zstd", &c);
    assert!(!out.status.success(), "the push passes the quota");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("507"), "{stderr}");
    let stats = json(&server.admin(&["stats", "small", "--json"]));
    let held = stats["used_bytes"].as_u64().unwrap();
    assert!(held <= used / 2, "{stats}");
    assert_eq!(stats["quota_bytes"].as_u64(), Some(used / 2));
    // The top of the closure, pushed last, is not there.
    let top = &c.top["/nix/store/".len()..][..32];
    let http = server.http();
    let narinfo = |cache: &str| {
        http.get(format!("{}/{top}.narinfo", server.cache_url(cache)))
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(narinfo("small"), 404);

    // The refusal says which cache and which quota.
    let body = nar(&Entry::File {
        executable: false,
        contents: &cachet::testing::Xorshift(9).bytes((used / 2) as usize + (1 << 20)),
    });
    let r = http
        .put(format!(
            "{small}/nar/{}.nar",
            Sha256::digest(&body).to_nix32()
        ))
        .bearer_auth(server.token())
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 507);
    let text = r.text().unwrap();
    assert!(
        text.contains("cache small") && text.contains(&format!("its {half} bytes")),
        "{text}"
    );

    // Another cache takes the same closure meanwhile.
    ok(NixHost::new(&server, Nix::V2_8).push_to(&server.cache_url("other"), "zstd", &c));
    assert_eq!(narinfo("other"), 200);

    // The page and the metrics show the use against the quota.
    let page = http
        .get(format!("{small}/"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(page.contains("id=\"quota\""), "{page}");
    let shown = server.admin(&["stats", "small"]);
    assert!(shown.contains("quota"), "{shown}");
    let quota = admin_metric(&server, "cachet_cache_quota_bytes", "cache=\"small\"");
    assert_eq!(quota as u64, used / 2);
    assert!(admin_metric(&server, "cachet_cache_used_bytes", "cache=\"small\"") > 0.0);
    // Without a server admin token, no series names a cache.
    assert_eq!(metric(&server, "cachet_cache_used_bytes", ""), 0.0);

    // The tenant's own admin cannot lift its quota.
    let tenant = server.new_token("small-admin", "admin", &["small"]);
    let lift = crate::harness::cache_admin(
        &server.base(),
        Some(&tenant),
        &["cache", "update", "small", "--max-size", "none"],
    );
    assert!(!lift.status.success());
    let says = String::from_utf8_lossy(&lift.stderr);
    assert!(says.contains("only the server admin"), "{says}");

    // Raised, the same push completes.
    let double = (used * 2).to_string();
    server.admin(&["cache", "update", "small", "--max-size", &double]);
    ok(NixHost::new(&server, Nix::V2_8).push_to(&small, "zstd", &c));
    assert_eq!(narinfo("small"), 200);
    let stats = json(&server.admin(&["stats", "small", "--json"]));
    assert_eq!(stats["used_bytes"].as_u64(), Some(used), "{stats}");
    // Cleared, there is none.
    server.admin(&["cache", "update", "small", "--max-size", "none"]);
    let info = json(&server.admin(&["cache", "info", "small", "--json"]));
    assert_eq!(info["quota_bytes"], serde_json::Value::Null);
}

#[test]
fn the_default_quota_applies_to_caches_that_set_none() {
    let server = Server::with_config("[quota]\nmax_size_bytes = 100000\n");
    let c = closure(8, "quota-default");
    let out = NixHost::new(&server, Nix::V2_8)
        .with_setting("download-attempts = 1")
        .push(&server, "zstd", &c);
    assert!(!out.status.success());
    let info = json(&server.admin(&["cache", "info", "main", "--json"]));
    assert_eq!(info["quota_bytes"], serde_json::Value::Null);
    assert_eq!(info["effective_quota_bytes"].as_u64(), Some(100_000));
    assert!(info["used_bytes"].as_u64().unwrap() <= 100_000, "{info}");
    // Its own quota wins.
    server.admin(&["cache", "update", "main", "--max-size", "1GiB"]);
    ok(NixHost::new(&server, Nix::V2_8).push(&server, "zstd", &c));
}

#[test]
fn a_zstd_bomb_past_the_default_expansion_is_refused_with_nothing_visible() {
    let server = Server::start();
    // A NAR of 1 GiB of zeros in a few tens of KiB of zstd.
    let size: u64 = 1 << 30;
    let mut head = nar(&Entry::File {
        executable: false,
        contents: b"",
    });
    head.truncate(head.len() - 24);
    head.extend_from_slice(&size.to_le_bytes());
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    std::io::Write::write_all(&mut encoder, &head).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        std::io::Write::write_all(&mut encoder, &zeros).unwrap();
    }
    let body = encoder.finish().unwrap();
    assert!(body.len() < 1 << 20, "{} bytes", body.len());
    let url = format!("nar/{}.nar.zst", Sha256::digest(&body).to_nix32());
    let decoded_before = metric(&server, "cachet_upload_decoded_bytes_total", "");
    let r = server.put(&url, body);
    assert_eq!(r.status(), 413);
    let text = r.text().unwrap();
    assert!(text.contains("ingest.max_expansion"), "{text}");
    // Refused at the bound, long before the NAR's end.
    let decoded = metric(&server, "cachet_upload_decoded_bytes_total", "") - decoded_before;
    assert!(decoded < (256 << 20) as f64, "{decoded} bytes decoded");
    assert_eq!(server.head_status(&url), 404);
    let stats = json(&server.admin(&["stats", "main", "--json"]));
    assert_eq!(stats["used_bytes"].as_u64(), Some(0), "{stats}");
}
