//! Hostile clients against one real server, started under the common 1,024-file limit
//! (256 connection slots) with its data on a small filesystem: idle and slow-header connections, trickling
//! uploads, slow readers, compression bombs, archives of too many entries, a full disk.
//! Real `nix` pushes and pulls go through meanwhile, memory stays bounded, and what
//! was pushed before still verifies afterwards.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cachet::nix::nar::write::{nar, Entry};
use cachet::nix::Sha256;

use crate::harness::{closure, ok, Nix, NixHost, Server, Start};

/// A tmpfs of a few hundred MiB, unmounted when dropped.
pub(crate) struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub(crate) fn mount(mib: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        ok(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount (the tests run as root)"));
        Self { dir }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .output();
    }
}

const CONFIG: &str = "
[server]
header_timeout_secs = 2
idle_timeout_secs = 4
send_timeout_secs = 4

[storage]
min_free_mib = 64

[ingest]
max_uploads = 4
max_nar_bytes = 268435456
max_nar_entries = 100000
body_stall_secs = 3
# The bound on expansion would stop the bombs below first (tested with the defaults in
# `quota`): off, so that these reach the size limit and the client's leaving.
max_expansion = 0
";
const MAX_NAR_BYTES: usize = 268_435_456;
const MAX_ENTRIES: usize = 100_000;
const RSS_LIMIT_KIB: u64 = 256 * 1024;

fn connect(server: &Server) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Whether the server has closed `s` (reading gives its end or an error, not "later").
fn closed(mut s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a response (a 408, say) before the end
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Waits up to `limit` for every connection to be closed by the server.
fn all_closed(conns: &[TcpStream], limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let open = conns.iter().filter(|c| !closed(c)).count();
        if open == 0 || Instant::now() > deadline {
            return open;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A counter or gauge of `/metrics`, summed over the samples whose labels include
/// `labels`.
pub(crate) fn metric(server: &Server, name: &str, labels: &str) -> f64 {
    let text = crate::harness::client()
        .get(format!("{}/metrics", server.base()))
        .send()
        .unwrap()
        .text()
        .unwrap();
    sample(&text, name, labels)
}

/// `metric`, as the server admin reads it (with each cache's figures).
pub(crate) fn admin_metric(server: &Server, name: &str, labels: &str) -> f64 {
    let text = server.admin_get("/metrics").text().unwrap();
    sample(&text, name, labels)
}

/// The sum of the samples of `name` whose labels include `labels` in `text`.
fn sample(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The status line of the response that `s` got, if any.
pub(crate) fn status_of(s: &mut TcpStream) -> String {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A NAR of one regular file of `size` zero bytes, of which only the header is given:
/// the contents follow as zeros in the compressed streams.
fn zero_file_header(size: u64) -> Vec<u8> {
    let mut whole = nar(&Entry::File {
        executable: false,
        contents: b"",
    });
    // The archive ends with the empty contents' length (8 bytes), then ")" (a length
    // and a padded byte): cut both and write the real length instead.
    whole.truncate(whole.len() - 24);
    whole.extend_from_slice(&size.to_le_bytes());
    whole
}

/// A body of `streams` concatenated compressed streams of 16 MiB of zeros each, the
/// first starting with `head`, then one of `tail`: small on the wire, huge decompressed.
fn bomb(compression: &str, head: &[u8], streams: usize, tail: &[u8]) -> Vec<u8> {
    let zeros = vec![0u8; 16 << 20];
    let first = [head, &zeros].concat();
    let encode = |data: &[u8]| -> Vec<u8> {
        match compression {
            "xz" => {
                let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            "zst" => zstd::encode_all(data, 3).unwrap(),
            "bz2" => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            _ => unreachable!(),
        }
    };
    let rest = encode(&zeros);
    let mut body = encode(&first);
    for _ in 1..streams {
        body.extend_from_slice(&rest);
    }
    if !tail.is_empty() {
        body.extend(encode(tail));
    }
    body
}

fn put_nar(server: &Server, ext: &str, body: Vec<u8>) -> (u16, String) {
    let url = format!("nar/{}.nar{ext}", Sha256::digest(&body).to_nix32());
    let r = server.put(&url, body);
    (r.status().as_u16(), r.text().unwrap())
}

/// A narinfo for an uploaded uncompressed NAR, so that its listing is served.
fn publish_plain(server: &Server, hash: &str, name: &str, data: &[u8]) {
    let nar_hash = Sha256::digest(data);
    let url = format!("nar/{}.nar", nar_hash.to_nix32());
    assert_eq!(server.put(&url, data.to_vec()).status(), 200);
    let text = format!(
        "StorePath: /nix/store/{hash}-{name}\nURL: {url}\nCompression: none\n\
         NarHash: {nar_hash}\nNarSize: {}\nReferences: \n",
        data.len()
    );
    let r = server.put(&format!("{hash}.narinfo"), text);
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
}

/// Opens `n` connections that send a request and then read nothing past the first
/// KiB of the response.
fn slow_readers(server: &Server, path: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = connect(server);
            write!(s, "GET /main/{path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut first = [0u8; 1024];
            s.read_exact(&mut first).unwrap();
            assert!(first.starts_with(b"HTTP/1.1 200"));
            s
        })
        .collect()
}

/// Writes one byte to each connection every `every`, `times` times, ignoring the
/// connections the server has closed.
fn drip(conns: &[TcpStream], every: Duration, times: usize) -> std::thread::JoinHandle<()> {
    let mut copies: Vec<TcpStream> = conns.iter().map(|s| s.try_clone().unwrap()).collect();
    std::thread::spawn(move || {
        for _ in 0..times {
            for s in &mut copies {
                let _ = s.write_all(b"X");
            }
            std::thread::sleep(every);
        }
    })
}

/// Fills the filesystem of `dir` until `leave` bytes are free (0: until it is full).
pub(crate) fn fill(dir: &Path, leave: u64) -> PathBuf {
    let path = dir.join(format!("filler-{leave}"));
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0xa5u8; 1 << 20];
    loop {
        let free = cachet::store::space::free_bytes(dir).unwrap();
        if free <= leave {
            break;
        }
        let n = ((free - leave) as usize).min(block.len());
        if f.write_all(&block[..n]).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
    path
}

#[test]
fn hostile_clients_do_not_lock_out_real_ones() {
    let _heavy = crate::harness::heavy();
    let fs = Tmpfs::mount(640);
    let mut server = Server::launch(
        Start {
            config: Some(CONFIG),
            data_dir: Some(fs.path().join("data")),
            open_files: Some(1024),
            ..Start::default()
        },
        &[],
    );
    let v1 = closure(32, "v1");
    let v2 = closure(24, "v2");
    let v3 = closure(24, "v3");
    ok(NixHost::new(&server, Nix::V2_8).push(&server, "zstd", &v1));

    // 1,500 idle connections and 500 whose request head trickles in, while a real
    // client pulls a closure: it succeeds, and the slow ones are cut.
    let idle: Vec<TcpStream> = (0..1500).map(|_| connect(&server)).collect();
    let slow: Vec<TcpStream> = (0..500)
        .map(|_| {
            let mut s = connect(&server);
            s.write_all(b"GET /main/nix-cache-info HTTP/1.1\r\n")
                .unwrap();
            s
        })
        .collect();
    let trickling = drip(&slow, Duration::from_millis(250), 40);
    let puller = NixHost::new(&server, Nix::V2_8);
    assert_eq!(puller.pull(&server, "pulled", &v1.top), v1.nar_hashes);
    assert_eq!(
        all_closed(&idle, Duration::from_secs(20)),
        0,
        "idle ones cut"
    );
    assert_eq!(
        all_closed(&slow, Duration::from_secs(20)),
        0,
        "slow heads cut"
    );
    trickling.join().unwrap();
    // With 256 slots, most made room for the others at once; the rest timed out.
    let cut = metric(&server, "cachet_connections_timed_out_total", "")
        + metric(&server, "cachet_connections_evicted_total", "")
        + metric(&server, "cachet_connections_refused_total", "");
    assert!(cut >= 2000.0, "{cut} of 2,000 cut");
    drop((idle, slow));

    // More trickling uploads than ingest slots, each past the bytes that name its
    // decoder, then a byte every half second: a real push still goes through.
    let start = nar(&Entry::File {
        executable: false,
        contents: &[1u8; 1 << 20],
    });
    let mut trickles: Vec<TcpStream> = (0..8)
        .map(|i| {
            let mut s = connect(&server);
            write!(
                s,
                "PUT /main/nar/{}.nar HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
                 Content-Length: {}\r\n\r\n",
                Sha256::digest(&[i]).to_nix32(),
                server.token(),
                start.len()
            )
            .unwrap();
            s.write_all(&start[..8192]).unwrap();
            s
        })
        .collect();
    let dripping = drip(&trickles, Duration::from_millis(500), 40);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        metric(&server, "cachet_uploads_in_flight", "") >= 4.0,
        "the trickles hold the slots"
    );
    ok(NixHost::new(&server, Nix::V2_8).push(&server, "zstd", &v2));
    for s in &mut trickles {
        assert_eq!(status_of(s), "HTTP/1.1 408 Request Timeout");
    }
    dripping.join().unwrap();
    assert!(
        metric(
            &server,
            "cachet_uploads_rejected_total",
            "reason=\"stalled\""
        ) >= 8.0
    );

    // Slow readers of a 64 MiB build log and of a large listing hold one read each.
    let log = cachet::testing::Xorshift(5)
        .bytes(64 << 20)
        .into_iter()
        .map(|b| b"abcdefghijklmnopqrstuvwxyz \n"[usize::from(b) % 28])
        .collect::<Vec<u8>>();
    let drv = "4yncvzfm86cppqd91p6dvnpbbdx5d126-big-log.drv";
    assert_eq!(server.put(&format!("log/{drv}"), log).status(), 200);
    let names: Vec<String> = (0..60_000)
        .map(|i| format!("{i:08}-{}", "n".repeat(190)))
        .collect();
    let many = nar(&Entry::Dir(
        names
            .iter()
            .map(|n| {
                let file = Entry::File {
                    executable: false,
                    contents: b"",
                };
                (n.as_str(), file)
            })
            .collect(),
    ));
    let listed = "3mkvw9vwaq0k0mfdacm1rqwkdfljfsmn";
    publish_plain(&server, listed, "many-files", &many);
    let mut readers = slow_readers(&server, &format!("log/{drv}"), 40);
    readers.extend(slow_readers(&server, &format!("{listed}.ls"), 40));
    // Reading would make them fast readers: wait past the send timeout first, then
    // find each one closed behind the bytes already sent.
    std::thread::sleep(Duration::from_secs(10));
    let open = readers.iter().filter(|r| !closed(r)).count();
    assert_eq!(open, 0, "slow readers dropped");
    assert!(
        metric(
            &server,
            "cachet_connections_timed_out_total",
            "reason=\"send\""
        ) >= 80.0
    );
    // The listing is whole for a reader that reads it.
    let listing: serde_json::Value = server.get(&format!("{listed}.ls")).json().unwrap();
    assert_eq!(
        listing["root"]["entries"].as_object().unwrap().len(),
        60_000
    );

    // Compression bombs: small bodies that inflate past the largest NAR accepted.
    let head = zero_file_header(1 << 40);
    for ext in ["xz", "zst", "bz2"] {
        let body = bomb(ext, &head, MAX_NAR_BYTES / (16 << 20) + 4, b"");
        assert!(body.len() < 4 << 20, "{ext} bomb of {} bytes", body.len());
        let (status, text) = put_nar(&server, &format!(".{ext}"), body);
        assert_eq!(status, 413, "{ext}: {text}");
        assert!(text.contains("larger than 268435456"), "{text}");
    }
    // A zstd stream that asks for a 128 MiB window, more than all uploads may take.
    let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    e.window_log(27).unwrap();
    e.write_all(&nar(&Entry::File {
        executable: false,
        contents: &[3u8; 1 << 20],
    }))
    .unwrap();
    let (status, text) = put_nar(&server, ".zst", e.finish().unwrap());
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("ingest.memory_mib"), "{text}");
    // A valid NAR of 240 MiB of zeros, sent whole, whose client goes away once its
    // ingest runs: the ingest stops instead of inflating it all.
    let decoded_before = metric(&server, "cachet_upload_decoded_bytes_total", "");
    let file = 15 * (16u64 << 20);
    let end = &nar(&Entry::File {
        executable: false,
        contents: b"",
    })[..][zero_file_header(0).len()..];
    let gone = bomb("zst", &zero_file_header(file), 15, end);
    let mut s = connect(&server);
    write!(
        s,
        "PUT /main/nar/{}.nar.zst HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\n\r\n",
        Sha256::digest(&gone).to_nix32(),
        server.token(),
        gone.len()
    )
    .unwrap();
    s.write_all(&gone).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&server, "cachet_uploads_in_flight", "") < 1.0 {
        assert!(Instant::now() < deadline, "the upload started");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(30);
    let gone_ones = || {
        metric(
            &server,
            "cachet_uploads_rejected_total",
            "reason=\"client_gone\"",
        )
    };
    while gone_ones() < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned upload was noticed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let decoded = metric(&server, "cachet_upload_decoded_bytes_total", "") - decoded_before;
    assert!(
        decoded < file as f64,
        "{decoded} bytes decoded after the client left"
    );

    // An archive of more entries than the limit.
    let too_many: Vec<String> = (0..=MAX_ENTRIES).map(|i| format!("{i:07}")).collect();
    let archive = nar(&Entry::Dir(
        too_many
            .iter()
            .map(|n| (n.as_str(), Entry::Symlink("x")))
            .collect(),
    ));
    let (status, text) = put_nar(&server, "", archive);
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("more than 100000 entries"), "{text}");

    let peak = server.peak_rss_kib();
    eprintln!("peak RSS through hostile traffic: {} MiB", peak / 1024);
    assert!(peak < RSS_LIMIT_KIB, "peak RSS {peak} KiB");

    // A full disk: pushes are refused with 507 and nothing becomes visible.
    let v3_top = &v3.top["/nix/store/".len()..][..32];
    let filler = fill(fs.path(), 32 << 20);
    let out = NixHost::new(&server, Nix::V2_8).push(&server, "zstd", &v3);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("507"), "{stderr}");
    assert_eq!(server.get_status(&format!("{v3_top}.narinfo")), 404);
    let (status, text) = put_nar(&server, "", nar(&Entry::Symlink("y")));
    assert_eq!(status, 507, "{text}");
    // A 5xx says only its status; the log says why.
    assert_eq!(text, "Insufficient Storage\n");
    assert!(server.log().contains("storage.min_free_mib"));

    // Restarted on a disk with no byte free, it still serves what it has.
    let full = fill(fs.path(), 0);
    server.restart_unchecked();
    let deadline = Instant::now() + Duration::from_secs(30);
    let served = loop {
        if let Some(status) = server.exited() {
            break Err(status);
        }
        if crate::harness::client()
            .get(format!("{}/health", server.base()))
            .send()
            .is_ok()
        {
            break Ok(());
        }
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    match served {
        Ok(()) => {
            eprintln!("restarted on a full disk, the server serves reads");
            let all = crate::crash::check_served(&server, &paths(&v1));
            assert_eq!(all, v1.nar_hashes.len());
        }
        Err(status) => {
            let log = server.log();
            assert!(
                log.contains("is full"),
                "exited {status} without saying why:\n{log}"
            );
            eprintln!("restarted on a full disk, the server said why it could not start");
        }
    }

    // With room again, pushes work, and everything pushed before verifies.
    std::fs::remove_file(filler).unwrap();
    std::fs::remove_file(full).unwrap();
    server.restart();
    ok(NixHost::new(&server, Nix::V2_8).push(&server, "zstd", &v3));
    let checker = NixHost::new(&server, Nix::V2_8);
    for c in [&v1, &v2, &v3] {
        ok(checker.nix(&["store", "verify", "--store", &server.url(), "-r", &c.top]));
    }
    let peak = server.peak_rss_kib();
    assert!(
        peak < RSS_LIMIT_KIB,
        "peak RSS {peak} KiB after the restart"
    );
}

fn paths(c: &crate::harness::Closure) -> Vec<String> {
    c.nar_hashes.keys().cloned().collect()
}
