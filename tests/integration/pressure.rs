//! Connection pressure, under the common 1,024-file limit (hard, so the server cannot
//! raise it, and 256 connection slots): floods of silent, trickling and kept-alive
//! connections, from one address and from many, do not lock out a fresh client, the
//! admin API, or a real `nix copy --from` made during the attack.

use std::time::Duration;

use crate::flood::{fresh_clients, loopback, Behaviour, Flood};
use crate::harness::{closure, heavy, ok, Nix, NixHost, Server, Start};
use crate::hostile::metric;

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
    push(&server);
    let every = Duration::from_secs(30);
    let flood = Flood::start(
        &server,
        4000,
        &loopback(1, 1),
        Behaviour::KeepAlive(every),
        Duration::from_secs(1),
    );
    std::thread::sleep(Duration::from_secs(3));
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
    push(&server);
    let every = Duration::from_secs(30);
    let flood = Flood::start(
        &server,
        4000,
        &loopback(2, 50),
        Behaviour::KeepAlive(every),
        Duration::from_secs(1),
    );
    std::thread::sleep(Duration::from_secs(3));
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
