//! Three cachet replicas on loopback over one PostgreSQL and a three-node Garage
//! cluster, behind nginx spreading requests round-robin, so that a NAR's PUT and its
//! narinfo's PUT reach different replicas. The real Nix clients push and pull
//! through the front and through each replica.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cachet::testing::postgres::PgServer;

use crate::garage::Garage;
use crate::harness::{client, closure, ok, Closure, Nix, NixHost, Server, Start};

/// nginx in front of the replicas, round-robin, stopped when dropped.
struct Front {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
}

impl Front {
    fn start(upstreams: &[u16]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = cachet::testing::free_port();
        let servers: String = upstreams
            .iter()
            .map(|p| format!("server 127.0.0.1:{p};"))
            .collect();
        let root = dir.path().display();
        // Bodies go through as they come (no buffering), and only requests that did
        // not reach a replica are tried on the next: as a load balancer does.
        let config = format!(
            "daemon off; master_process off; user root; pid {root}/nginx.pid;\n\
             error_log {root}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
               access_log off; client_max_body_size 0;\n\
               client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;\n\
               fastcgi_temp_path {root}/fcgi; uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;\n\
               upstream cachet {{ {servers} keepalive 16; }}\n\
               server {{\n\
                 listen 127.0.0.1:{port};\n\
                 location / {{\n\
                   proxy_pass http://cachet; proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\"; proxy_set_header Host $host;\n\
                   proxy_request_buffering off; proxy_buffering off;\n\
                   proxy_read_timeout 120s; proxy_send_timeout 120s;\n\
                 }}\n\
               }}\n\
             }}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .spawn()
            .expect("starting nginx (scripts/test.sh installs it)");
        let front = Self {
            dir,
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                front.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        front
    }

    fn url(&self, cache: &str) -> String {
        format!("http://127.0.0.1:{}/{cache}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        crate::harness::kill_child(&mut self.child);
    }
}

/// The replicas and what they share.
struct Replicas {
    servers: Vec<Server>,
    front: Front,
    db: PgServer,
    garage: [Garage; 3],
    /// The data directories of the replicas after the first (kept with them).
    _dirs: Vec<tempfile::TempDir>,
    _secrets: tempfile::TempDir,
}

/// Each replica's config: the shared database, the shared key-encryption file, the
/// packs in the Garage cluster (through the first node; the cluster keeps each object
/// on all three).
fn replica_config(db: &str, keys: &Path, garage: &Garage, extra: &str) -> String {
    format!(
        "[index]\ntype = \"postgres\"\nurl = \"{db}\"\nkey_encryption_file = \"{}\"\n{}{extra}",
        keys.display(),
        garage.storage_toml("cachet")
    )
}

impl Replicas {
    /// Three replicas; the first starts alone on the empty database and writes the
    /// admin token, which the others are given.
    fn start(extra: &str) -> Self {
        let db = PgServer::start();
        let url = db.database("cachet");
        let garage = Garage::cluster();
        let secrets = tempfile::tempdir().unwrap();
        let keys = secrets.path().join("key-encryption");
        std::fs::write(&keys, [7u8; 48].map(|b| b ^ 0x5a)).unwrap();
        let config = replica_config(&url, &keys, &garage[0], extra);
        let first = Server::with_config(&config);
        let mut servers = vec![first];
        let mut dirs = Vec::new();
        for _ in 1..3 {
            let dir = tempfile::tempdir().unwrap();
            let data: PathBuf = dir.path().join("data");
            std::fs::create_dir_all(&data).unwrap();
            std::fs::write(data.join("admin-token"), servers[0].token()).unwrap();
            servers.push(Server::launch(
                Start {
                    config: Some(&config),
                    data_dir: Some(data),
                    ..Start::default()
                },
                &[],
            ));
            dirs.push(dir);
        }
        let ports: Vec<u16> = servers.iter().map(|s| s.port).collect();
        let front = Front::start(&ports);
        Self {
            servers,
            front,
            db,
            garage,
            _dirs: dirs,
            _secrets: secrets,
        }
    }
}

/// Pushes `c` through `url`, retrying a push whose request died with a replica (as a
/// CI job's retry does), at most `tries` times.
fn push_retrying(host: &NixHost, url: &str, compression: &str, c: &Closure, tries: u32) {
    let started = Instant::now();
    for attempt in 1..=tries {
        let out = host.push_to(url, compression, c);
        if out.status.success() {
            eprintln!("pushed in {:?}, {attempt} attempt(s)", started.elapsed());
            return;
        }
        let said = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "push attempt {attempt} failed: {}",
            said.lines().last().unwrap_or("")
        );
        assert!(
            attempt < tries,
            "push failed {tries} times: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Pulls `c` through `url` into a fresh store of a host that trusts only `keys`; every
/// path arrives, signed, with its NarHash.
fn pulls_whole(url: &str, token: &str, keys: &[&str], c: &Closure, name: &str) {
    let host = NixHost::trusting(Some(token), keys, Nix::V2_8);
    let store = host.store(name);
    ok(host.copy_from(url, name, &c.top));
    assert_eq!(host.nar_hashes(Some(&store), &c.top), c.nar_hashes, "{url}");
}

/// `cachet_http_requests_total` of a replica, for one route family, all statuses.
fn requests(server: &Server, family: &str) -> u64 {
    let text = client()
        .get(format!("{}/metrics", server.base()))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let prefix = format!("cachet_http_requests_total{{family=\"{family}\"");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Asks `check` until it holds, for at most `limit`; how long it took.
fn within(limit: Duration, check: impl Fn() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

#[test]
fn three_replicas_take_four_pushes_at_once_and_each_serves_them_signed() {
    let _heavy = crate::harness::heavy();
    let r = Replicas::start("");
    let (a, b, c) = (&r.servers[0], &r.servers[1], &r.servers[2]);
    let token = a.token();
    let key = a.public_key_of("main");
    let (one, two) = (closure(12, "replica-1"), closure(12, "replica-2"));
    let main = r.front.url("main");
    // Overlapping: each closure twice at once, in different compressions.
    std::thread::scope(|s| {
        for (closure, compression) in [(&one, "zstd"), (&two, "xz"), (&one, "none"), (&two, "zstd")]
        {
            let (token, key, main) = (&token, &key, &main);
            s.spawn(move || {
                let host = NixHost::trusting(Some(token), &[key], Nix::V2_8);
                ok(host.push_to(main, compression, closure));
            });
        }
    });
    // Every replica took uploads and publications.
    for s in &r.servers {
        assert!(
            requests(s, "nar") > 0 && requests(s, "narinfo") > 0,
            "{}",
            s.log()
        );
    }
    for (n, s) in r.servers.iter().enumerate() {
        for (m, closure) in [&one, &two].into_iter().enumerate() {
            pulls_whole(&s.url(), &token, &[&key], closure, &format!("r{n}-{m}"));
        }
    }

    // A cache created through A answers on B and C, and signs what B publishes.
    a.admin(&["cache", "create", "fresh", "--private"]);
    let fresh_info = |s: &Server| {
        client()
            .get(format!("{}/nix-cache-info", s.cache_url("fresh")))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .status()
            == 200
    };
    for s in [b, c] {
        let took = within(Duration::from_secs(1), || fresh_info(s)).expect("the new cache on B");
        eprintln!("a cache created through A answered on another replica after {took:?}");
    }
    let fresh_key = a.public_key_of("fresh");
    let three = closure(4, "replica-3");
    ok(
        NixHost::trusting(Some(&token), &[&fresh_key], Nix::V2_8).push_to(
            &b.cache_url("fresh"),
            "zstd",
            &three,
        ),
    );
    pulls_whole(
        &c.cache_url("fresh"),
        &token,
        &[&fresh_key],
        &three,
        "fresh-c",
    );

    // A key rotated through A signs on B at once.
    let rotated = a.admin(&["key", "rotate", "fresh"]);
    let new_key = rotated
        .lines()
        .find_map(|l| l.trim().strip_prefix("trust:"))
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|| panic!("{rotated}"));
    assert!(new_key.starts_with("fresh-2:"), "{rotated}");
    let four = closure(4, "replica-4");
    ok(
        NixHost::trusting(Some(&token), &[&new_key], Nix::V2_8).push_to(
            &b.cache_url("fresh"),
            "zstd",
            &four,
        ),
    );
    pulls_whole(
        &c.cache_url("fresh"),
        &token,
        &[&new_key],
        &four,
        "rotated-c",
    );

    // A token revoked through A is refused by B and C within a second.
    let pull = a.new_token("reader", "pull", &["fresh"]);
    let answers = |s: &Server| {
        client()
            .get(format!("{}/nix-cache-info", s.cache_url("fresh")))
            .bearer_auth(&pull)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    for s in [b, c] {
        within(Duration::from_secs(1), || answers(s) == 200).expect("the new token on B and C");
    }
    a.admin(&["token", "revoke", "reader"]);
    for s in [b, c] {
        let took = within(Duration::from_secs(1), || matches!(answers(s), 401 | 403))
            .expect("the revoked token refused within a second");
        eprintln!("a token revoked through A was refused by another replica after {took:?}");
    }
    let _ = (&r.db, &r.garage);
}

#[test]
fn pushes_through_the_survivors_complete_when_a_replica_a_store_node_and_the_database_fail() {
    let _heavy = crate::harness::heavy();
    let mut r = Replicas::start("");
    let token = r.servers[0].token();
    let key = r.servers[0].public_key_of("main");
    let closures = [
        closure(24, "fault-1"),
        closure(24, "fault-2"),
        closure(24, "fault-3"),
    ];
    let main = r.front.url("main");
    std::thread::scope(|s| {
        for (closure, compression) in closures.iter().zip(["zstd", "xz", "none"]) {
            let (token, key, main) = (&token, &key, &main);
            s.spawn(move || {
                let host = NixHost::trusting(Some(token), &[key], Nix::V2_8);
                push_retrying(&host, main, compression, closure, 5);
            });
        }
        // The faults, one after another, while the pushes run.
        std::thread::sleep(Duration::from_secs(2));
        r.servers[2].kill();
        std::thread::sleep(Duration::from_secs(1));
        r.garage[2].stop();
        std::thread::sleep(Duration::from_secs(1));
        r.db.restart();
    });
    let survivors = &r.servers[..2];
    for (n, s) in survivors.iter().enumerate() {
        for (m, closure) in closures.iter().enumerate() {
            pulls_whole(&s.url(), &token, &[&key], closure, &format!("s{n}-{m}"));
        }
    }
    let verify = survivors[0].admin(&["verify", "--deep"]);
    let paths: usize = closures.iter().map(|c| c.nar_hashes.len()).sum();
    assert!(verify.contains("checked"), "{verify}");
    assert!(
        verify.contains(&format!("checked {paths} paths")),
        "every pushed path is served and whole: {verify}"
    );
    // The killed replica comes back and serves the same.
    r.servers[2].restart();
    pulls_whole(&r.servers[2].url(), &token, &[&key], &closures[0], "back");
}

/// The figure of `name` in a `cache-admin gc` report (`removed <name>: <n>`).
fn gc_figure(report: &str, name: &str) -> u64 {
    report
        .lines()
        .find_map(|l| {
            let rest = l.split_once(' ')?.1.trim_start();
            let value = rest.strip_prefix(name)?.strip_prefix(':')?.trim_start();
            value.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no {name} in:\n{report}"))
}

#[test]
fn gc_through_one_replica_keeps_what_the_others_serve_and_reclaims_what_a_killed_one_left() {
    let _heavy = crate::harness::heavy();
    // Graces of seconds instead of an hour, so that what the killed replica left is
    // due by the next collection (the same with the defaults, an hour later:
    // `gc.rs`). The lease time is the default's.
    let mut r = Replicas::start("[gc]\npending_upload_secs = 3\ngrace_secs = 3\n");
    let _ = (&r.db, &r.garage);
    let token = r.servers[0].token();
    let key = r.servers[0].public_key_of("main");
    let host = || NixHost::trusting(Some(&token), &[&key], Nix::V2_8);
    // Kept: pulled again and again while collections run. Doomed: shares most of its
    // chunks with the kept one, deleted while they run.
    let (kept, doomed, later) = (
        closure(12, "gc-kept"),
        closure(12, "gc-doomed"),
        closure(12, "gc-later"),
    );
    ok(host().push_to(&r.servers[1].url(), "zstd", &kept));
    ok(host().push_to(&r.servers[1].url(), "zstd", &doomed));
    let big = closure(48, "gc-killed");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut c = r.servers.pop().unwrap();
    let (a, b) = (&r.servers[0], &r.servers[1]);
    std::thread::scope(|s| {
        let collections = s.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                a.admin(&["gc"]);
                n += 1;
            }
            n
        });
        let pulls = s.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                pulls_whole(&b.url(), &token, &[&key], &kept, &format!("pull-{n}"));
                n += 1;
            }
            n
        });
        // A push through the third replica, which is killed in the middle of it.
        let killed = s.spawn(|| {
            let pushing = std::thread::spawn({
                let h = host();
                let (url, big) = (c.url(), big.clone());
                move || h.push_to(&url, "zstd", &big)
            });
            std::thread::sleep(Duration::from_secs(3));
            c.kill();
            let _ = pushing.join();
        });
        // The doomed closure deleted, another pushed, meanwhile.
        let deleted = a.admin(&["path", "delete", "main", &doomed.top, "--with-referrers"]);
        assert!(!deleted.is_empty());
        ok(host().push_to(&b.url(), "xz", &later));
        killed.join().unwrap();
        std::thread::sleep(Duration::from_secs(4));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (gcs, pulled) = (collections.join().unwrap(), pulls.join().unwrap());
        eprintln!("{gcs} collections, {pulled} pulls of the kept closure meanwhile");
        assert!(gcs >= 2 && pulled >= 2, "{gcs} collections, {pulled} pulls");
    });
    // The next collection does not wait on the dead replica's leases, and takes what
    // its upload left: nothing is left for a later one.
    let started = Instant::now();
    let report = a.admin(&["gc"]);
    assert!(!report.contains("still running"), "{report}");
    assert!(started.elapsed() < Duration::from_secs(60), "{report}");
    assert!(!report.contains("not taken up"), "{report}");
    assert!(!report.contains("no record names"), "{report}");
    let again = a.admin(&["gc"]);
    assert_eq!(gc_figure(&again, "packs"), 0, "{again}");
    for (n, s) in [a, b].into_iter().enumerate() {
        pulls_whole(&s.url(), &token, &[&key], &kept, &format!("kept-{n}"));
        pulls_whole(&s.url(), &token, &[&key], &later, &format!("later-{n}"));
    }
    let verify = a.admin(&["verify", "--deep"]);
    assert!(verify.contains("checked"), "{verify}");
    drop(c);
}
