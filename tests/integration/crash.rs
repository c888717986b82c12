//! Interrupted uploads and killed servers never leave a served narinfo without its data.

use std::io::Write as _;
use std::net::TcpStream;
use std::process::Stdio;
use std::time::Duration;

use cachet::nix::nar::write::{nar, Entry};
use cachet::nix::Sha256;

use crate::harness::{closure, ok, with_each_client, Closure, Nix, NixHost, Server};

with_each_client!(a_killed_server_restarts_and_everything_it_serves_verifies);

#[test]
fn a_client_that_disconnects_mid_upload_leaves_nothing() {
    let server = Server::start();
    let big: Vec<u8> = (0..4_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let body = nar(&Entry::File {
        executable: false,
        contents: &big,
    });
    let url = format!("/main/nar/{}.nar", Sha256::digest(&body).to_nix32());

    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    write!(
        stream,
        "PUT {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        server.token(),
        body.len()
    )
    .unwrap();
    stream.write_all(&body[..body.len() / 2]).unwrap();
    stream.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(stream);
    std::thread::sleep(Duration::from_millis(300));

    let file = url.strip_prefix("/main/").unwrap();
    assert_eq!(server.head_status(file), 404);
    // The server is still serving, and the same upload completes when sent whole.
    assert_eq!(server.put(file, body).status(), 200);
    assert_eq!(server.head_status(file), 200);
}

/// Downloads every narinfo the server serves for `paths`, and checks each NAR.
pub fn check_served(server: &Server, paths: &[String]) -> usize {
    let mut served = 0;
    for p in paths {
        let hash = &p["/nix/store/".len()..][..32];
        let r = server.get(&format!("{hash}.narinfo"));
        match r.status().as_u16() {
            404 => continue,
            200 => {}
            s => panic!("narinfo {hash}: status {s}"),
        }
        let info = cachet::nix::NarInfo::parse(&r.bytes().unwrap()).unwrap();
        let body = server.get(&info.url);
        assert_eq!(body.status(), 200, "the NAR of a served narinfo is there");
        let nar = zstd::decode_all(&body.bytes().unwrap()[..]).unwrap();
        assert_eq!(Sha256::digest(&nar), info.nar_hash, "{p}");
        served += 1;
    }
    served
}

/// Starts a `nix copy` of `c` to `server` from a fresh host and returns, the push
/// still running, once `k` more paths are published (or two minutes passed: fewer may
/// be left to push).
pub(crate) fn push_until_published(
    server: &Server,
    nix: Nix,
    c: &Closure,
    k: usize,
) -> std::process::Child {
    let host = NixHost::new(server, nix);
    host.import(c);
    let to = format!("{}?compression=zstd", server.url());
    let before = server.log().matches("published").count();
    let child = host
        .cmd("nix")
        .args(["copy", "--to", &to, &c.top])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(server.dir.path().join("push.err")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while server.log().matches("published").count() < before + k
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

fn a_killed_server_restarts_and_everything_it_serves_verifies(nix: Nix) {
    killed_during_pushes_restarts_whole(&mut Server::start(), nix);
}

/// Kills `server` at several moments of a push, restarts it, checks what it serves,
/// and completes the closure.
pub(crate) fn killed_during_pushes_restarts_whole(server: &mut Server, nix: Nix) {
    let c = closure(48, "v1");
    let paths: Vec<String> = c.nar_hashes.keys().cloned().collect();
    // Kill at several moments of an upload in flight: after the k-th publication.
    for k in [1usize, 8, 20] {
        let mut child = push_until_published(server, nix, &c, k);
        server.kill();
        let _ = child.wait();
        server.restart();
        let served = check_served(server, &paths);
        eprintln!(
            "killed after publication {k}: {served} of {} paths served and verified",
            paths.len()
        );
        assert!(
            served > 0 || k == 1,
            "publications acknowledged before the kill survive it"
        );
    }
    // Pushing again completes the closure, and the real client verifies all of it.
    let pusher = NixHost::new(server, nix);
    ok(pusher.push(server, "zstd", &c));
    assert_eq!(check_served(server, &paths), paths.len());
    // Another machine (the pusher's own client cache holds its unsigned narinfos)
    // verifies every signature and every NAR.
    let verifier = NixHost::new(server, nix);
    ok(verifier.nix(&["store", "verify", "--store", &server.url(), "-r", &c.top]));
}
