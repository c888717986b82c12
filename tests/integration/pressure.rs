//! Connection pressure, under the common 1,024-file limit (hard, so the server cannot
//! raise it, and 256 connection slots): floods of silent, trickling and kept-alive
//! connections, from one address and from many, do not lock out a fresh client, the
//! admin API, or a real `nix copy --from` made during the attack.

use std::time::Duration;

use crate::flood::{fresh_clients, loopback, Behaviour, Flood};
use crate::harness::{closure, heavy, ok, Nix, NixHost, Server, Start};
use crate::hostile::{metric, status_of};

/// The server's timeouts as shipped: the attack must be beaten by making room, not by
/// timing connections out early.
fn server() -> Server {
    Server::launch(
        Start {
            open_files: Some(1024),
            ..Start::default()
        },
        &[],
    )
}

/// While `flood` runs: fresh clients are served 19 times in 20 or better, each within
/// 2 s; the admin API answers; `nix copy --from` succeeds.
fn still_served(server: &Server, what: &str) {
    let c = closure(8, "pressure");
    let puller = NixHost::new(server, Nix::V2_8);
    let pulling = std::thread::scope(|s| {
        let pull = s.spawn(|| puller.copy_from(&server.url(), "pulled", &c.top));
        let tries = fresh_clients(
            server,
            "/main/nix-cache-info",
            20,
            Duration::from_millis(700),
            Duration::from_secs(2),
        );
        eprintln!("{what}: {tries:?}");
        assert!(
            tries.served >= 19,
            "{what}: fresh clients served {} of {}: {:?}",
            tries.served,
            tries.tries,
            tries.failures
        );
        let admin = server.admin_get("/_api/v1/caches");
        assert_eq!(admin.status(), 200, "{what}: the admin API answers");
        pull.join().unwrap()
    });
    ok(pulling);
    assert_eq!(
        puller.nar_hashes(Some(&puller.store("pulled")), &c.top),
        c.nar_hashes
    );
}

/// Pushes the closure the pulls fetch.
fn push(server: &Server) {
    let c = closure(8, "pressure");
    ok(NixHost::new(server, Nix::V2_8).push(server, "zstd", &c));
}

/// After a push of the closure the pulls fetch: 4,000 connections from `sources`,
/// each sending a request at once and every 30 s, and reconnecting a second after the
/// server closes it, under way for 3 s.
fn kept_alive_flood(server: &Server, sources: &[std::net::IpAddr]) -> Flood {
    push(server);
    let every = Duration::from_secs(30);
    let flood = Flood::start(
        server,
        4000,
        sources,
        Behaviour::KeepAlive(every),
        Duration::from_secs(1),
    );
    std::thread::sleep(Duration::from_secs(3));
    flood
}

#[test]
fn silent_and_trickling_floods_leave_room_for_fresh_clients() {
    let _heavy = heavy();
    let server = server();
    push(&server);
    let (silent, slow) = (loopback(1, 1), loopback(2, 9));
    let reconnect = Duration::from_millis(500);
    let _silent = Flood::start(&server, 1500, &silent, Behaviour::Silent, reconnect);
    let every = Duration::from_millis(250);
    let _slow = Flood::start(&server, 500, &slow, Behaviour::SlowHead(every), reconnect);
    std::thread::sleep(Duration::from_secs(3));
    still_served(&server, "silent and slow-header flood");
    let evicted = metric(&server, "cachet_connections_evicted_total", "");
    assert!(evicted > 500.0, "connections made room: {evicted}");
}

#[test]
fn kept_alive_floods_from_one_address_leave_room_for_fresh_clients() {
    let _heavy = heavy();
    let server = server();
    let flood = kept_alive_flood(&server, &loopback(1, 1));
    still_served(&server, "kept-alive flood from one address");
    let idle = metric(
        &server,
        "cachet_connections_evicted_total",
        "reason=\"idle\"",
    );
    assert!(idle > 1000.0, "kept-alive connections made room: {idle}");
    assert!(flood.answered.load(std::sync::atomic::Ordering::Relaxed) > 1000);
}

#[test]
fn kept_alive_floods_from_many_addresses_leave_room_for_fresh_clients() {
    let _heavy = heavy();
    let server = server();
    let flood = kept_alive_flood(&server, &loopback(2, 50));
    still_served(&server, "kept-alive flood from 49 addresses");
    // Long enough for every connection that stayed to send its second request.
    std::thread::sleep(Duration::from_secs(20));
    let tries = fresh_clients(
        &server,
        "/health",
        20,
        Duration::from_millis(100),
        Duration::from_secs(2),
    );
    assert!(tries.served >= 19, "after 30 s: {tries:?}");
    assert!(flood.connects.load(std::sync::atomic::Ordering::Relaxed) > 4000);
}

#[test]
fn the_admin_listener_answers_when_every_slot_is_handling_a_request() {
    use std::io::Write as _;
    let admin_port = crate::harness::free_port();
    let config =
        format!("[server]\nmax_connections = 4\nadmin_listen = \"127.0.0.1:{admin_port}\"\n");
    let server = Server::with_config(&config);
    // Four uploads whose bodies trickle: busy, so none can make room.
    let busy: Vec<std::net::TcpStream> = (0..4)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
            write!(
                s,
                "PUT /main/nar/{}.nar HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
                 Content-Length: 1048576\r\n\r\nnix-archive",
                cachet::nix::Sha256::digest(&[i]).to_nix32(),
                server.token()
            )
            .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let r = crate::harness::client()
        .get(format!("{}/health", server.base()))
        .send()
        .unwrap();
    assert_eq!(r.status(), 503, "every main slot is busy");
    let admin = format!("http://127.0.0.1:{admin_port}");
    let r = crate::harness::client()
        .get(format!("{admin}/_api/v1/caches"))
        .bearer_auth(server.token())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let metrics = crate::harness::client()
        .get(format!("{admin}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("cachet_connections_refused_total{reason=\"cap\"} 1"),
        "{metrics}"
    );
    drop(busy);
}

/// Opens a connection from `source` and starts an upload whose body never comes: the
/// connection is busy from then on. `forwarded` goes in `X-Forwarded-For`.
fn busy_upload(server: &Server, source: [u8; 4], forwarded: &str, n: u8) -> std::net::TcpStream {
    use std::io::Write as _;
    let socket = connect_from(source, server.port);
    let mut s = socket;
    write!(
        s,
        "PUT /main/nar/{}.nar HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         X-Forwarded-For: {forwarded}\r\nContent-Length: 1048576\r\n\r\nnix-archive",
        cachet::nix::Sha256::digest(&[n]).to_nix32(),
        server.token()
    )
    .unwrap();
    s
}

/// A blocking connection from `source` to the server's port.
fn connect_from(source: [u8; 4], port: u16) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(std::net::SocketAddr::from((source, 0)))
            .unwrap();
        socket
            .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .unwrap()
    });
    let std = stream.into_std().unwrap();
    std.set_nonblocking(false).unwrap();
    std
}

#[test]
fn a_trusted_proxy_has_no_connection_limit_but_each_client_behind_it_has_one() {
    let server = Server::with_config(
        "[server]\nmax_connections_per_address = 2\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
    );
    // Through the proxy: two requests of one client are its limit; a third is 429,
    // another client's goes through, and the proxy itself holds three connections.
    let _a = busy_upload(&server, [127, 0, 0, 1], "198.51.100.1, 203.0.113.9", 1);
    let _b = busy_upload(&server, [127, 0, 0, 1], "203.0.113.9", 2);
    std::thread::sleep(Duration::from_millis(300));
    let mut third = busy_upload(&server, [127, 0, 0, 1], "203.0.113.9", 3);
    assert_eq!(status_of(&mut third), "HTTP/1.1 429 Too Many Requests");
    let r = crate::harness::client()
        .get(format!("{}/health", server.base()))
        .header("X-Forwarded-For", "203.0.113.10")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // Not through a trusted proxy: the header is the client's own claim, and the
    // address's connections are what is limited.
    let _c = busy_upload(&server, [127, 0, 0, 2], "203.0.113.11", 4);
    let _d = busy_upload(&server, [127, 0, 0, 2], "203.0.113.12", 5);
    std::thread::sleep(Duration::from_millis(300));
    let mut e = busy_upload(&server, [127, 0, 0, 2], "203.0.113.13", 6);
    assert_eq!(status_of(&mut e), "HTTP/1.1 503 Service Unavailable");
    assert!(
        metric(
            &server,
            "cachet_connections_refused_total",
            "reason=\"address\""
        ) >= 1.0
    );
    assert_eq!(
        metric(&server, "cachet_http_requests_total", "status=\"429\""),
        1.0
    );
}
