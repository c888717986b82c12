//! S3 storage on a real Garage: the storage contract on both backends, the real Nix
//! clients end to end with packs in the bucket, and the store failing under uploads,
//! downloads and while idle.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cachet::config::Config;
use cachet::metrics::CacheMetrics;
use cachet::store::{PackCache, PackId, PackStore};
use prometheus_client::metrics::counter::Counter;

use crate::crash::killed_during_pushes_restarts_whole;
use crate::garage::Garage;
use crate::harness::{closure, ok, Nix, NixHost, Server};
use crate::nix_client::round_trip_through;

fn s3_store(garage: &Garage, prefix: &str) -> PackStore {
    let config: Config = toml::from_str(&garage.storage_toml(prefix)).unwrap();
    config.validate().unwrap();
    let objects = cachet::store::s3::open(&config.storage).unwrap();
    PackStore::new(objects, Counter::default())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// What every backend does: whole and ranged reads of what was written, a short read
/// refused, listing with sizes and times, existence, deletion (twice is no error),
/// the readiness probe.
async fn contract(store: &PackStore) {
    store.check().await.unwrap();
    let data: Vec<u8> = (0..700_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let id = PackId::random();
    store.put(&id, Bytes::from(data.clone())).await.unwrap();
    let other = PackId::random();
    store.put(&other, Bytes::from_static(b"x")).await.unwrap();
    for r in [
        0..700_000u64,
        0..1,
        5..70_000,
        699_999..700_000,
        300_000..650_000,
    ] {
        let got = store.get_range(&id, r.clone()).await.unwrap();
        assert_eq!(&got[..], &data[r.start as usize..r.end as usize], "{r:?}");
    }
    assert!(store.get_range(&id, 699_000..700_001).await.is_err());
    assert!(store.exists(&id).await.unwrap());
    let listed = store.list().await.unwrap();
    let info = listed.iter().find(|p| p.id == id).expect("listed");
    assert_eq!(info.size, 700_000);
    assert!(info.modified.abs_diff(now()) < 300, "{info:?}");
    assert!(listed.iter().any(|p| p.id == other));

    store.delete(&id).await.unwrap();
    store.delete(&id).await.unwrap();
    assert!(!store.exists(&id).await.unwrap());
    assert!(store.list().await.unwrap().iter().all(|p| p.id != id));
    let err = store.get_range(&id, 0..1).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    assert!(store.exists(&other).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storage_contract_holds_on_local_disk_and_on_garage() {
    let dir = tempfile::tempdir().unwrap();
    let local = PackStore::local(dir.path().to_path_buf(), Counter::default()).unwrap();
    contract(&local).await;

    let garage = tokio::task::spawn_blocking(Garage::start).await.unwrap();
    let a = s3_store(&garage, "server-a");
    contract(&a).await;
    // The prefix keeps servers sharing a bucket apart.
    let b = s3_store(&garage, "server-b/");
    contract(&b).await;
    // Reads through the cache of packs keep the contract too.
    let cache_dir = tempfile::tempdir().unwrap();
    let metrics = CacheMetrics::default();
    let cache = PackCache::open(
        cache_dir.path().join("packs"),
        1 << 20,
        0,
        1,
        metrics.clone(),
    )
    .unwrap();
    contract(&s3_store(&garage, "server-c").with_cache(cache)).await;
    assert!(metrics.hits.get() > 0 && metrics.fetches.get() > 0);
    let in_a = a.list().await.unwrap();
    let in_b = b.list().await.unwrap();
    assert_eq!((in_a.len(), in_b.len()), (1, 1));
    assert_ne!(in_a[0].id, in_b[0].id);
    let objects = tokio::task::spawn_blocking(move || {
        let o = garage.objects("");
        drop(garage);
        o
    })
    .await
    .unwrap();
    let hex = in_a[0].id.to_hex();
    let name = format!("server-a/packs/{}/{hex}", &hex[..2]);
    assert!(
        objects.iter().any(|(n, s)| *n == name && *s == 1),
        "{objects:?}"
    );
    assert_eq!(objects.len(), 3, "probes are deleted: {objects:?}");
}

fn s3_server(garage: &Garage, prefix: &str) -> Server {
    Server::with_config(&garage.storage_toml(prefix))
}

/// The bytes of packs the server keeps in the bucket.
fn stored(garage: &Garage, prefix: &str) -> (usize, u64) {
    let packs: Vec<u64> = garage
        .objects(&format!("{prefix}/packs"))
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    (packs.len(), packs.iter().sum())
}

#[test]
fn nix_pushes_and_substitutes_every_compression_with_packs_in_s3() {
    let garage = Garage::start();
    let server = s3_server(&garage, "e2e");
    let nix = Nix::V2_8;
    for compression in ["xz", "zstd", "none"] {
        let server = s3_server(&garage, &format!("e2e-{compression}"));
        round_trip_through(&server, compression, nix);
        assert!(stored(&garage, &format!("e2e-{compression}")).0 > 0);
    }
    // Dedup across pushes: the same closure from a second runner stores nothing new,
    // its mass rebuild little.
    let v1 = closure(48, "v1");
    let v2 = closure(48, "v2");
    ok(NixHost::new(&server, nix).push(&server, "zstd", &v1));
    let after_v1 = stored(&garage, "e2e");
    ok(NixHost::new(&server, Nix::Current).push(&server, "xz", &v1));
    assert_eq!(stored(&garage, "e2e"), after_v1);
    ok(NixHost::new(&server, nix).push(&server, "zstd", &v2));
    let added = stored(&garage, "e2e").1 - after_v1.1;
    assert!(added * 5 < v1.nar_bytes, "{added} of {}", v1.nar_bytes);
    assert_eq!(
        NixHost::new(&server, Nix::Current).pull(&server, "v2", &v2.top),
        v2.nar_hashes
    );
}

#[test]
fn a_server_on_s3_killed_during_pushes_restarts_whole() {
    let garage = Garage::start();
    let mut server = s3_server(&garage, "crash");
    killed_during_pushes_restarts_whole(&mut server, Nix::V2_8);
}

#[test]
fn a_bad_endpoint_bucket_or_key_stops_the_start_with_the_reason() {
    let garage = Garage::start();
    let base = garage.storage_toml("");
    let cases = [
        (
            base.replace(&garage.endpoint(), "http://127.0.0.1:9"),
            "did not answer as S3 does",
        ),
        (
            base.replace("bucket = \"cachet\"", "bucket = \"missing\""),
            "the bucket does not exist",
        ),
        (
            base.replace(&garage.secret, &"0".repeat(64)),
            "access was denied",
        ),
    ];
    for (config, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cachet.toml");
        std::fs::write(&path, &config).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cachet"))
            .args(["--listen", "127.0.0.1:0", "--config"])
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(reason), "{reason:?} not in:\n{err}");
        let secret = config
            .lines()
            .find_map(|l| l.strip_prefix("secret_access_key = "))
            .unwrap()
            .trim_matches('"');
        assert!(!err.contains(secret), "the secret is never shown:\n{err}");
    }
}

/// Status and time of a GET.
fn timed_status(server: &Server, path: &str) -> (u16, Duration) {
    let at = Instant::now();
    let status = server.get_status(path);
    (status, at.elapsed())
}

fn ready_response(server: &Server) -> reqwest::blocking::Response {
    server
        .http()
        .get(format!("{}/ready", server.base()))
        .send()
        .unwrap()
}

fn ready(server: &Server) -> bool {
    ready_response(server).status() == 200
}

#[test]
fn while_s3_is_down_lookups_answer_downloads_fail_fast_and_all_recovers() {
    down_while_idle(true);
}

#[test]
fn while_s3_is_down_without_the_pack_cache_downloads_fail_fast_and_all_recover() {
    down_while_idle(false);
}

/// The store refused, then silent, while the server is idle. With the cache of
/// packs (the default), the server restarts before each outage: a start empties the
/// cache, which would otherwise serve the NAR read after the first outage (see
/// a_served_pack_is_served_again_from_the_cache_while_s3_is_down).
fn down_while_idle(cached: bool) {
    let mut garage = Garage::start();
    let storage = garage.storage_toml("down");
    let mut server = Server::with_config(&if cached {
        storage
    } else {
        format!("{storage}cache_mib = 0\n")
    });
    let nix = Nix::V2_8;
    let c = closure(24, "v1");
    ok(NixHost::new(&server, nix).push(&server, "zstd", &c));
    let (path, hash) = c.nar_hashes.iter().next().unwrap();
    let narinfo_path = format!(
        "{}.narinfo",
        path.trim_start_matches("/nix/store/")
            .split('-')
            .next()
            .unwrap()
    );
    let narinfo = server.get(&narinfo_path).text().unwrap();
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_owned();
    let nar_path = url;
    assert!(ready(&server));

    for how in ["refusing", "silent"] {
        if cached {
            server.restart();
        }
        if how == "refusing" {
            garage.stop();
        } else {
            garage.freeze(true);
        }
        // Lookups answer from the metadata.
        assert_eq!(server.get_status(&narinfo_path), 200, "{how}");
        assert_eq!(server.get_status("nix-cache-info"), 200, "{how}");
        // A NAR is 503 (never 404, never a partial 200), within a bounded time.
        let (status, took) = timed_status(&server, &nar_path);
        assert_eq!(status, 503, "{how}");
        assert!(took < Duration::from_secs(30), "{how}: {took:?}");
        assert!(
            !ready(&server),
            "{how}: /ready says the storage is unavailable"
        );
        let body = ready_response(&server).text().unwrap();
        assert!(body.contains("storage"), "{body}");
        if how == "refusing" {
            garage.restart();
        } else {
            garage.freeze(false);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(&server) {
            assert!(Instant::now() < deadline, "{how}: ready again");
            std::thread::sleep(Duration::from_millis(200));
        }
        let got = server.get(&nar_path);
        assert_eq!(got.status(), 200);
        let nar = zstd::decode_all(&got.bytes().unwrap()[..]).unwrap();
        assert_eq!(cachet::nix::Sha256::digest(&nar), *hash);
    }
}

#[test]
fn s3_stopped_mid_upload_refuses_it_and_leaves_nothing_visible() {
    let mut garage = Garage::start();
    let server = s3_server(&garage, "mid");
    let nix = Nix::V2_8;
    let c = closure(64, "v1");
    let before = server.log().matches("published").count();
    let mut child = crate::crash::push_until_published(&server, nix, &c, 3);
    assert!(
        server.log().matches("published").count() >= before + 3,
        "the push got under way"
    );
    let refusals = server.log().matches("503 Service Unavailable").count();
    garage.stop();
    // The upload under way is refused with 503 (the client retries it a while), or
    // the client gives up on its own (curl, under load, sometimes sends a large body
    // before its credentials and takes the 401 as final): either way the push fails.
    let deadline = Instant::now() + Duration::from_secs(90);
    let exited = loop {
        if server.log().matches("503 Service Unavailable").count() > refusals {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "neither refused nor failed:\n{}\nthe client said:\n{}",
            server.log(),
            std::fs::read_to_string(server.dir.path().join("push.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !exited.success(),
        "the push did not complete while the store was down"
    );
    garage.restart();
    // Every narinfo the server serves has its NAR.
    let served =
        crate::crash::check_served(&server, &c.nar_hashes.keys().cloned().collect::<Vec<_>>());
    assert!(
        served < c.nar_hashes.len(),
        "the push was cut off: {served}"
    );
    // The next push completes it, and another machine verifies all of it.
    ok(NixHost::new(&server, nix).push(&server, "zstd", &c));
    let verifier = NixHost::new(&server, nix);
    assert_eq!(verifier.pull(&server, "after", &c.top), c.nar_hashes);
}

/// The NAR URL and NarSize of the largest path of `paths`, from the server's narinfos.
fn largest_nar(server: &Server, paths: &[String]) -> (String, String, u64) {
    paths
        .iter()
        .map(|p| {
            let hash = p
                .trim_start_matches("/nix/store/")
                .split('-')
                .next()
                .unwrap();
            let text = server.get(&format!("{hash}.narinfo")).text().unwrap();
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap()
                    .to_owned()
            };
            (
                p.clone(),
                field("URL: "),
                field("NarSize: ").parse().unwrap(),
            )
        })
        .max_by_key(|(_, _, size)| *size)
        .unwrap()
}

#[test]
fn s3_stopped_during_a_download_breaks_it_and_a_retry_succeeds() {
    stopped_during_a_download(false);
}

#[test]
fn s3_stopped_during_a_download_through_the_pack_cache_breaks_it_and_a_retry_succeeds() {
    stopped_during_a_download(true);
}

fn stopped_during_a_download(cached: bool) {
    use std::io::{BufRead as _, Read as _, Write as _};
    let mut garage = Garage::start();
    // Small reads, one ahead, a small send buffer: the download is many requests to
    // the store, and little of it is ahead of the client. The cache of packs fetches
    // whole packs, so with it the packs are small.
    let (storage, ingest) = if cached {
        ("", "[ingest]\npack_bytes = 65536\n")
    } else {
        ("cache_mib = 0\n", "")
    };
    let config = format!(
        "{}{storage}{ingest}[serve]\nremote_read_bytes = 65536\nread_ahead = 1\nsend_buffer_bytes = 65536\n",
        garage.storage_toml("dl")
    );
    let mut server = Server::with_config(&config);
    let nix = Nix::V2_8;
    let c = closure(48, "v1");
    ok(NixHost::new(&server, nix).push(&server, "none", &c));
    // A start empties the cache of the packs the push kept: the download fetches.
    server.restart();
    let paths: Vec<String> = c.nar_hashes.keys().cloned().collect();
    let (path, url, size) = largest_nar(&server, &paths);
    assert!(size > 2 << 20, "a NAR larger than what is buffered: {size}");
    let url = url.replace(".nar.zst", ".nar");

    // A client with a small receive buffer that reads the headers and a little.
    let stream = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    rustix::net::sockopt::set_socket_recv_buffer_size(&stream, 16 * 1024).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    (&stream)
        .write_all(
            format!("GET /main/{url} HTTP/1.1\r\nHost: cache\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
    let mut reader = std::io::BufReader::new(&stream);
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
            length = Some(v.trim().parse::<u64>().unwrap());
        }
        if line.starts_with("HTTP/1.1") {
            assert!(line.contains(" 200 "), "{line}");
        }
    }
    assert_eq!(length, Some(size));
    let mut first = vec![0u8; 4096];
    reader.read_exact(&mut first).unwrap();
    garage.stop();
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    let got = 4096 + rest.len() as u64;
    assert!(
        got < size,
        "the client sees a body shorter than its Content-Length: {got} of {size}"
    );

    garage.restart();
    let again = server.get(&url);
    assert_eq!(again.status(), 200);
    let nar = again.bytes().unwrap();
    assert_eq!(nar.len() as u64, size);
    assert_eq!(cachet::nix::Sha256::digest(&nar), c.nar_hashes[&path]);
    let fetched = metric(&server, "cachet_pack_cache_fetches_total");
    assert_eq!(
        fetched > 0,
        cached,
        "reads went through the cache: {fetched}"
    );
    if cached {
        // The fetch the outage broke left no file and no reservation behind.
        let files = cache_files(&server);
        assert!(
            files.iter().all(|(name, _)| !name.starts_with(".partial")),
            "{files:?}"
        );
        let on_disk: u64 = files.iter().map(|(_, len)| len).sum();
        assert_eq!(metric(&server, "cachet_pack_cache_bytes"), on_disk);
    }
}

fn metric(server: &Server, name: &str) -> u64 {
    crate::hostile::metric(server, name, "") as u64
}

/// The cache's files, but its lock: names and sizes.
fn cache_files(server: &Server) -> Vec<(String, u64)> {
    std::fs::read_dir(server.data_dir().join("pack-cache"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, e.metadata().unwrap().len())
        })
        .filter(|(name, _)| name != ".lock")
        .collect()
}

/// Waits until the cache of packs holds `bytes` (uploads keep their packs in the
/// background).
fn cache_holds(server: &Server, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(server, "cachet_pack_cache_bytes") != bytes {
        assert!(Instant::now() < deadline, "the cache holds {bytes} bytes");
        std::thread::sleep(Duration::from_millis(50));
    }
    let on_disk: u64 = cache_files(server).iter().map(|(_, len)| len).sum();
    assert_eq!(on_disk, bytes);
}

#[test]
fn a_served_pack_is_served_again_from_the_cache_while_s3_is_down() {
    let mut garage = Garage::start();
    let mut server = s3_server(&garage, "cached");
    let nix = Nix::V2_8;
    let c = closure(24, "v1");
    ok(NixHost::new(&server, nix).push(&server, "zstd", &c));
    let (packs, pack_bytes) = stored(&garage, "cached");
    // The push kept its packs: the first host's pull reads none from the bucket.
    cache_holds(&server, pack_bytes);
    let first = NixHost::new(&server, nix);
    assert_eq!(first.pull(&server, "first", &c.top), c.nar_hashes);
    assert_eq!(metric(&server, "cachet_pack_cache_fetches_total"), 0);
    assert!(metric(&server, "cachet_pack_cache_hits_total") > 0);
    // After a restart (which empties the cache) a pull fetches each pack, whole,
    // once...
    server.restart();
    cache_holds(&server, 0);
    let second = NixHost::new(&server, nix);
    assert_eq!(second.pull(&server, "second", &c.top), c.nar_hashes);
    let fetched = metric(&server, "cachet_pack_cache_fetches_total");
    assert_eq!(
        fetched as usize, packs,
        "each of the {packs} packs fetched once"
    );
    cache_holds(&server, pack_bytes);
    // ...and with the store gone, a third host's pull is served from the cache.
    garage.stop();
    let third = NixHost::new(&server, nix);
    assert_eq!(third.pull(&server, "third", &c.top), c.nar_hashes);
    assert_eq!(metric(&server, "cachet_pack_cache_fetches_total"), fetched);
}
