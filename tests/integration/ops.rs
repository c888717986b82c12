//! What operators and people see: `/metrics`, `/health` and `/ready`, JSON logs with
//! request ids, 5xx bodies, and the pages in a real browser.

use std::process::Command;

use cachet::nix::Sha256;
use prometheus_parse::{Scrape, Value};

use crate::golden::{upload_golden, LEAF, TOP};
use crate::harness::{client, closure, ok, Nix, NixHost, Server};

/// `/metrics`, parsed as Prometheus text.
fn scrape(server: &Server) -> Scrape {
    let r = client()
        .get(format!("{}/metrics", server.base()))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = r.text().unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text")
}

/// The sum of the samples of `name` whose labels include `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|m| m.metric == name)
        .filter(|m| labels.iter().all(|(k, v)| m.labels.get(k) == Some(*v)))
        .map(|m| match &m.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => 0.0,
        })
        .sum()
}

#[test]
fn metrics_count_a_push_and_a_download_by_the_right_amounts() {
    let server = Server::start();
    let c = closure(24, "v1");
    let paths = c.nar_hashes.len() as f64;
    let before = scrape(&server);
    assert_eq!(value(&before, "cachet_nars_ingested_total", &[]), 0.0);

    ok(NixHost::new(&server, Nix::V2_8).push(&server, "zstd", &c));
    let pushed = scrape(&server);
    let delta = |after: &Scrape, before: &Scrape, name: &str, labels: &[(&str, &str)]| {
        value(after, name, labels) - value(before, name, labels)
    };
    assert_eq!(
        delta(&pushed, &before, "cachet_nars_ingested_total", &[]),
        paths
    );
    assert_eq!(
        delta(&pushed, &before, "cachet_nar_ingested_bytes_total", &[]),
        c.nar_bytes as f64
    );
    let (packs, stored) = server.chunk_files();
    assert_eq!(
        value(&pushed, "cachet_stored_added_bytes_total", &[]),
        stored as f64
    );
    assert_eq!(
        value(&pushed, "cachet_packs_written_total", &[]),
        packs as f64
    );
    assert!(value(&pushed, "cachet_upload_decoded_bytes_total", &[]) >= c.nar_bytes as f64);
    let narinfo_puts = delta(
        &pushed,
        &before,
        "cachet_http_requests_total",
        &[("family", "narinfo"), ("status", "200")],
    );
    assert_eq!(narinfo_puts, paths, "one narinfo published per path");
    assert_eq!(
        delta(
            &pushed,
            &before,
            "cachet_http_requests_total",
            &[("family", "nar"), ("status", "200")]
        ),
        paths,
        "one NAR uploaded per path"
    );
    assert_eq!(value(&pushed, "cachet_uploads_in_flight", &[]), 0.0);
    assert_eq!(value(&pushed, "cachet_uploads_waiting", &[]), 0.0);
    assert_eq!(value(&pushed, "cachet_narinfo_conflicts_total", &[]), 0.0);

    let host = NixHost::new(&server, Nix::V2_8);
    assert_eq!(host.pull(&server, "store", &c.top), c.nar_hashes);
    let pulled = scrape(&server);
    assert_eq!(
        delta(
            &pulled,
            &pushed,
            "cachet_http_requests_total",
            &[("family", "nar"), ("status", "200")]
        ),
        paths,
        "one NAR downloaded per path"
    );
    // Nix may ask for a narinfo more than once; every path at least once.
    let narinfo_gets = delta(
        &pulled,
        &pushed,
        "cachet_http_requests_total",
        &[("family", "narinfo"), ("status", "200")],
    );
    assert!(
        narinfo_gets >= paths,
        "{narinfo_gets} narinfos for {paths} paths"
    );
    // Every served NAR's bytes left the server, besides headers and narinfos.
    assert!(
        delta(&pulled, &pushed, "cachet_http_sent_bytes_total", &[]) > stored as f64,
        "bytes sent cover the served frames"
    );
    let latency = value(
        &pulled,
        "cachet_http_request_duration_seconds",
        &[("family", "nar")],
    );
    let nar_requests = value(&pulled, "cachet_http_requests_total", &[("family", "nar")]);
    assert_eq!(latency, nar_requests, "every NAR request is timed");
    assert!(nar_requests >= 2.0 * paths);
    assert_eq!(value(&pulled, "cachet_storage_errors_total", &[]), 0.0);

    // Bytes on the wire, to within the size of the request and response heads.
    let nar = cachet::nix::nar::write::nar(&cachet::nix::nar::write::Entry::File {
        executable: false,
        contents: &cachet::testing::Xorshift(9).bytes(1 << 20),
    });
    let len = nar.len() as f64;
    let url = format!("nar/{}.nar", Sha256::digest(&nar).to_nix32());
    assert_eq!(server.put(&url, nar).status(), 200);
    let uploaded = scrape(&server);
    let received = delta(&uploaded, &pulled, "cachet_http_received_bytes_total", &[]);
    assert!(
        received >= len && received < len + 4096.0,
        "{received} for {len}"
    );
    // A scrape's own response counts in the next one: it is sent after it is rendered.
    let metrics_len = client()
        .get(format!("{}/metrics", server.base()))
        .send()
        .unwrap()
        .bytes()
        .unwrap()
        .len() as f64;
    let before_get = scrape(&server);
    let top = &c.top["/nix/store/".len()..][..32];
    let narinfo = server.get(&format!("{top}.narinfo")).bytes().unwrap();
    let info = cachet::nix::NarInfo::parse(&narinfo).unwrap();
    let body = server.get(&info.url).bytes().unwrap();
    assert_eq!(body.len() as u64, info.file_size.unwrap());
    let sent = delta(
        &scrape(&server),
        &before_get,
        "cachet_http_sent_bytes_total",
        &[],
    );
    let least = (body.len() + narinfo.len()) as f64 + metrics_len;
    assert!(sent >= least && sent < least + 4096.0, "{sent} for {least}");
}

#[test]
fn ready_follows_the_storage_and_health_stays_up() {
    let server = Server::start();
    let ask = || {
        let r = client()
            .get(format!("{}/ready", server.base()))
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().unwrap())
    };
    // A check stands for a second; ask until the answer is the one expected.
    let ready = || {
        let first = ask();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut now = first.clone();
        while now.0 == first.0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(200));
            now = ask();
        }
        now
    };
    let (status, body) = ask();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["index"], "ok");
    assert_eq!(body["storage"], "ok");

    let store = server.data_dir().join("store");
    let moved = server.dir.path().join("store-away");
    std::fs::rename(&store, &moved).unwrap();
    std::fs::write(&store, b"not a directory").unwrap();
    let (status, body) = ready();
    assert_eq!(status, 503);
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["storage"], "unavailable");
    assert_eq!(body["index"], "ok");
    let health = client()
        .get(format!("{}/health", server.base()))
        .send()
        .unwrap();
    assert_eq!(health.status(), 200);

    std::fs::remove_file(&store).unwrap();
    std::fs::rename(&moved, &store).unwrap();
    let (status, body) = ready();
    assert_eq!(status, 200, "{body}");
}

#[test]
fn server_errors_say_only_their_status_and_the_log_has_the_rest_under_the_request_id() {
    let server = Server::start_with(&["--log-format", "json"]);
    // Packs cannot be written while the storage directory is a file.
    let store = server.data_dir().join("store");
    std::fs::rename(&store, server.dir.path().join("away")).unwrap();
    std::fs::write(&store, b"").unwrap();
    let nar = cachet::nix::nar::write::nar(&cachet::nix::nar::write::Entry::File {
        executable: false,
        contents: &[7u8; 100_000],
    });
    let r = server.put(&format!("nar/{}.nar", Sha256::digest(&nar).to_nix32()), nar);
    assert_eq!(r.status(), 503);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(r.text().unwrap(), "Service Unavailable\n");
    let line = server
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "request failed")
        .expect("a JSON log line for the failure");
    assert_eq!(line["fields"]["id"], id, "{line}");
    assert_eq!(line["fields"]["method"], "PUT", "{line}");
    // Every line of an upload carries its id.
    assert_eq!(line["span"]["id"], id, "{line}");
    assert!(
        line["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("chunk storage"),
        "{line}"
    );
    // A client error keeps its reason.
    let r = server.put("nar/abc.nar", "x");
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("nix32"));
}

/// The DOM a headless Chromium renders for `url`.
fn rendered(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("running chromium (scripts/test.sh installs it)");
    ok(out)
}

/// The text of the element with `id` in a rendered DOM, entities decoded.
fn element_text(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element {id} in {dom}"));
    let open = start + dom[start..].find('>').unwrap() + 1;
    let close = open + dom[open..].find("</").unwrap();
    dom[open..close]
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

#[test]
fn the_cache_page_shows_how_to_use_the_cache_in_a_browser() {
    let server = Server::start();
    upload_golden(&server);
    let url = server.url();
    let dom = rendered(&format!("{url}/"));
    let key = server.public_key();
    assert!(dom.contains("<title>main · cachet</title>"), "{dom}");
    assert_eq!(element_text(&dom, "public-key"), key);
    assert_eq!(
        element_text(&dom, "nix-conf"),
        format!("extra-substituters = {url}\nextra-trusted-public-keys = {key}")
    );
    assert_eq!(
        element_text(&dom, "push"),
        format!("nix copy --to '{url}?compression=zstd' ./result")
    );
    assert_eq!(element_text(&dom, "visibility"), "public");
    assert_eq!(
        element_text(&dom, "paths"),
        "2",
        "the golden closure's two paths"
    );
    assert!(!dom.contains("<script"), "no JavaScript");
    // The values are the ones a client needs: the page's key verifies what is served.
    let served = server.get(&format!("{TOP}.narinfo")).text().unwrap();
    let info = cachet::nix::NarInfo::parse(served.as_bytes()).unwrap();
    let pk: cachet::nix::signing::PublicKey = element_text(&dom, "public-key").parse().unwrap();
    assert!(info.sigs.iter().any(|s| pk.verify(&info.fingerprint(), s)));
    assert_eq!(server.get_status(&format!("{LEAF}.narinfo")), 200);

    let index = rendered(&format!("{}/", server.base()));
    assert!(index.contains("href=\"/main/\""), "{index}");
    let missing = client()
        .get(format!("{}/nope/", server.base()))
        .send()
        .unwrap();
    assert_eq!(
        missing.status(),
        401,
        "a missing cache looks like a private one"
    );
    assert_eq!(server.admin_get("/nope/").status(), 404);
}
