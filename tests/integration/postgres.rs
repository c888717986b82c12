//! The server on PostgreSQL (`index.type = "postgres"`), on a cluster each test starts
//! on a loopback port: the real Nix clients push and pull through it, what it
//! committed is served again after the server restarts, a database that goes away is
//! 503 and not ready until it is back (no restart of the server), and a sled index
//! migrated into PostgreSQL serves what it served. Replicas: `replicas.rs`.

use std::time::{Duration, Instant};

use cachet::testing::postgres::PgServer;

use crate::harness::{client, Nix, NixHost, Server};

fn config(url: &str) -> String {
    format!("[index]\ntype = \"postgres\"\nurl = \"{url}\"\n")
}

#[test]
fn nix_pushes_and_pulls_through_a_server_on_postgres() {
    let db = PgServer::start();
    let mut server = Server::with_config(&config(&db.database("cachet")));
    let c = crate::nix_client::round_trip_through(&server, "zstd", Nix::V2_8);
    // Nothing of it was in the data directory's metadata: none is there.
    assert!(!server.data_dir().join("index").exists());
    server.restart();
    let host = NixHost::new(&server, Nix::V2_8);
    assert_eq!(host.pull(&server, "again", &c.top), c.nar_hashes);
    // `admin` fails the test on a non-zero exit: a problem found is one.
    let verify = server.admin(&["verify", "--deep"]);
    assert!(
        verify.contains(&format!("checked {} paths", c.nar_hashes.len())),
        "{verify}"
    );
    // A collection with the defaults keeps every served path whole.
    server.admin(&["gc"]);
    let host = NixHost::new(&server, Nix::V2_8);
    assert_eq!(host.pull(&server, "after-gc", &c.top), c.nar_hashes);
}

/// Asks `url` until `want` comes back, for at most `secs`; the last status.
fn status_within(url: &str, want: u16, secs: u64) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = client().get(url).send().unwrap().status().as_u16();
        if got == want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_database_that_goes_away_is_503_and_not_ready_until_it_is_back() {
    let db = PgServer::start();
    let url = db.database("cachet");
    let server = Server::with_config(&config(&url));
    let missing = format!("{}/{}.narinfo", server.url(), "0".repeat(32));
    let ready_url = format!("{}/ready", server.base());
    let r = client().get(&missing).send().unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.text().unwrap(),
        "narinfo not found\n",
        "a miss, not a wrong route"
    );
    db.stop("fast");
    // A miss is not what the server can say now: it cannot tell.
    assert_eq!(status_within(&missing, 503, 10), 503, "{}", server.log());
    assert_eq!(status_within(&ready_url, 503, 10), 503);
    let ready: serde_json::Value = client().get(&ready_url).send().unwrap().json().unwrap();
    assert_eq!(ready["index"], "unavailable", "{ready}");
    let health = client()
        .get(format!("{}/health", server.base()))
        .send()
        .unwrap();
    assert_eq!(health.status(), 200);
    db.start_again();
    assert_eq!(status_within(&missing, 404, 20), 404);
    assert_eq!(status_within(&ready_url, 200, 20), 200);
    // It writes again.
    let token = server.new_token("after", "push", &["main"]);
    assert!(!token.is_empty());
}

#[test]
fn a_sled_index_migrated_into_postgres_serves_the_same_narinfos_and_nars() {
    let db = PgServer::start();
    let url = db.database("cachet");
    let mut on_sled = Server::start();
    let c = crate::nix_client::round_trip_through(&on_sled, "zstd", Nix::V2_8);
    let narinfos = |server: &Server| -> Vec<String> {
        c.nar_hashes
            .keys()
            .map(|p| {
                let hash = &p.trim_start_matches("/nix/store/")[..32];
                let r = server.get(&format!("{hash}.narinfo"));
                assert_eq!(r.status(), 200, "{p}");
                r.text().unwrap()
            })
            .collect()
    };
    let before = narinfos(&on_sled);
    let data_dir = on_sled.data_dir();
    on_sled.kill();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cachet"))
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["migrate-index", "--to", &url])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("checked:") && said.contains("type = \"postgres\""),
        "{said}"
    );
    // Into a database that holds caches now, a second copy is refused.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_cachet"))
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["migrate-index", "--to", &url])
        .output()
        .unwrap();
    assert!(!again.status.success());

    let on_postgres = Server::launch(
        crate::harness::Start {
            config: Some(&config(&url)),
            data_dir: Some(data_dir),
            ..Default::default()
        },
        &[],
    );
    assert_eq!(narinfos(&on_postgres), before);
    let host = NixHost::new(&on_postgres, Nix::V2_8);
    assert_eq!(host.pull(&on_postgres, "migrated", &c.top), c.nar_hashes);
    let verify = on_postgres.admin(&["verify", "--deep"]);
    assert!(
        verify.contains(&format!("checked {} paths", c.nar_hashes.len())),
        "{verify}"
    );
}

/// The statements database `name` ran since the last reset, by their text: how many
/// times each.
fn statements(db: &PgServer, name: &str) -> Vec<(u64, String)> {
    let out = db.sql(
        name,
        "SELECT s.calls, s.query FROM pg_stat_statements s JOIN pg_database d \
         ON d.oid = s.dbid WHERE d.datname = current_database() \
         AND s.query NOT ILIKE '%pg_stat_statements%' ORDER BY s.query",
    );
    // The writer of fetches runs on its own every 15 s, the heartbeat of the
    // coordination every half second, and the notices of changes are sent after the
    // request that made them: their statements are not a request's.
    let background = [
        "INSERT INTO accesses",
        "AND nar_hash = $2 ORDER BY path",
        "coord_servers",
        "pg_notify",
    ];
    out.lines()
        .filter_map(|l| l.split_once('|'))
        .filter(|(_, query)| !background.iter().any(|b| query.contains(b)))
        .map(|(calls, query)| (calls.parse().unwrap(), query.to_owned()))
        .collect()
}

fn reset(db: &PgServer, name: &str) {
    db.sql(name, "SELECT pg_stat_statements_reset()");
}

/// A database counting its statements, and a server over it with `index` settings
/// added, that writes no fetch while they are counted.
fn counted(index: &str) -> (PgServer, Server) {
    let db = PgServer::start();
    let url = db.database("cachet");
    db.sql("cachet", "CREATE EXTENSION pg_stat_statements");
    let server = Server::with_config(&format!("{}{index}[gc]\nevery_secs = 0\n", config(&url)));
    (db, server)
}

/// A NAR of 4 MiB of `seed`'s bytes.
fn four_mib(seed: u64) -> Vec<u8> {
    use cachet::nix::nar::write::{nar, Entry};
    nar(&Entry::File {
        executable: false,
        contents: &cachet::testing::Xorshift(seed).bytes(4 << 20),
    })
}

/// Publishes `body` (uploaded under `nar_url`) as a path: its narinfo's file name, and
/// the URL its NAR is served under.
fn publish(server: &Server, nar_url: &str, body: &[u8]) -> (String, String) {
    use cachet::nix::Sha256;
    let hash = "0123456789abcdfghijklmnpqrsvwxyz";
    let narinfo = format!(
        "StorePath: /nix/store/{hash}-counted\nURL: {nar_url}\nCompression: none\n\
         NarHash: {}\nNarSize: {}\nReferences: \n",
        Sha256::digest(body),
        body.len()
    );
    let r = server.put(&format!("{hash}.narinfo"), narinfo);
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    let served = format!("nar/{}.nar.zst", Sha256::digest(body).to_nix32());
    (format!("{hash}.narinfo"), served)
}

/// What the queries of a request are, counted by the database itself
/// (`pg_stat_statements`): a narinfo lookup is one, a NAR download two whatever the
/// NAR's size, and an upload looks its chunks up a batch at a time, not one by one.
/// Counted without the server's copies of lookups (`cache_mib = 0`), as a first read
/// of each makes them; the next test counts the reads the copies answer.
#[test]
fn a_narinfo_get_is_one_query_and_an_upload_looks_chunks_up_a_batch_at_a_time() {
    use cachet::nix::Sha256;
    let (db, server) = counted("cache_mib = 0\n");
    let body = four_mib(17);
    let nar_url = format!("nar/{}.nar", Sha256::digest(&body).to_nix32());
    reset(&db, "cachet");
    assert_eq!(server.put(&nar_url, body.clone()).status(), 200);
    let uploaded = statements(&db, "cachet");
    let lookups: u64 = uploaded
        .iter()
        .filter(|(_, q)| q.contains("FROM chunks WHERE id = ANY"))
        .map(|(n, _)| *n)
        .sum();
    let chunks = body.len() as u64 / (32 * 1024);
    let all: u64 = uploaded.iter().map(|(n, _)| n).sum();
    eprintln!("upload of about {chunks} chunks: {lookups} chunk lookups, {all} statements");
    assert!(
        lookups >= 1 && lookups * 8 <= chunks,
        "{lookups} lookups for about {chunks} chunks: {uploaded:#?}"
    );

    // The path published, its narinfo read: one statement.
    let (narinfo, served) = publish(&server, &nar_url, &body);
    // Each connection of the pool prepares its statements once: warm them.
    for _ in 0..3 {
        assert_eq!(server.get_status(&narinfo), 200);
    }
    reset(&db, "cachet");
    assert_eq!(server.get_status(&narinfo), 200);
    let read = statements(&db, "cachet");
    let total: u64 = read.iter().map(|(n, _)| n).sum();
    assert_eq!(total, 1, "{read:#?}");

    // Its NAR read whole: its record if the cache holds it (one statement), and its
    // manifest of one segment (up to 1,024 chunks): two, however many chunks it has.
    for _ in 0..3 {
        assert_eq!(server.get_status(&served), 200);
    }
    reset(&db, "cachet");
    let r = server.get(&served);
    assert_eq!(r.status(), 200);
    assert!(r.bytes().unwrap().len() > 4 << 20);
    let read = statements(&db, "cachet");
    let total: u64 = read.iter().map(|(n, _)| n).sum();
    assert_eq!(total, 2, "{read:#?}");
}

/// With the defaults, a server keeps copies of what it read (narinfos, NAR records,
/// manifest segments), kept current by the database's notices: a narinfo or a NAR read
/// again asks the database nothing, and a path deleted is a miss at once.
#[test]
fn a_narinfo_or_nar_read_again_asks_the_database_nothing() {
    use cachet::nix::Sha256;
    let (db, server) = counted("");
    let body = four_mib(18);
    let nar_url = format!("nar/{}.nar", Sha256::digest(&body).to_nix32());
    assert_eq!(server.put(&nar_url, body.clone()).status(), 200);
    let (narinfo, served) = publish(&server, &nar_url, &body);
    assert_eq!(server.get_status(&narinfo), 200);
    assert_eq!(server.get_status(&served), 200);
    reset(&db, "cachet");
    for _ in 0..3 {
        assert_eq!(server.get_status(&narinfo), 200);
        let r = server.get(&served);
        assert_eq!(r.status(), 200);
        assert!(r.bytes().unwrap().len() > 4 << 20);
    }
    let read = statements(&db, "cachet");
    let total: u64 = read.iter().map(|(n, _)| n).sum();
    assert_eq!(total, 0, "{read:#?}");
    // A path deleted is gone from the copies with it.
    let hash = narinfo.trim_end_matches(".narinfo");
    server.admin(&[
        "path",
        "delete",
        "main",
        &format!("/nix/store/{hash}-counted"),
    ]);
    assert_eq!(server.get_status(&narinfo), 404);
    assert_eq!(server.get_status(&served), 404);
}
