//! Bad input gets a 4xx with a reason and changes nothing; misses are 404, never 5xx.

use cachet::nix::nar::write::{nar, Entry};
use cachet::nix::{NarInfo, Sha256};
use reqwest::blocking::Response;

use crate::golden::{nar_file, narinfo_text, upload_golden, LEAF, TOP};
use crate::harness::{client, Server};

fn assert_refused(r: Response, status: u16, reason: &str) {
    let got = r.status().as_u16();
    let text = r.text().unwrap();
    assert_eq!(got, status, "{text}");
    assert!(
        text.to_lowercase().contains(&reason.to_lowercase()),
        "{text:?} should say {reason:?}"
    );
}

fn leaf() -> (String, NarInfo) {
    let text = narinfo_text(LEAF);
    let info = NarInfo::parse(text.as_bytes()).unwrap();
    (text, info)
}

#[test]
fn narinfos_that_do_not_match_their_nar_are_refused() {
    let server = Server::start();
    let (text, info) = leaf();
    let narinfo = format!("{LEAF}.narinfo");

    // A narinfo whose NAR was never uploaded here.
    assert_refused(
        server.put(&narinfo, text.clone()),
        400,
        "names no NAR uploaded",
    );
    assert_eq!(server.put(&info.url, nar_file(&info)).status(), 200);

    let other_hash = Sha256::digest(b"something else");
    let cases = [
        (
            text.replace(&info.nar_hash.to_string(), &other_hash.to_string()),
            "NarHash",
        ),
        (text.replace("NarSize: 120", "NarSize: 121"), "NarSize"),
        (text.replace("FileSize: 128", "FileSize: 127"), "FileSize"),
        (
            text.replace(
                &format!("URL: {}", info.url),
                "URL: nar/0000000000000000000000000000000000000000000000000000.nar.xz",
            ),
            "names no NAR",
        ),
        (text.replace("NarHash: ", "NarHosh: "), "missing"),
        (
            text.replace("NarHash: sha256:0", "NarHash: sha256:!"),
            "NarHash",
        ),
        (text.replace("Sig: golden-1:", "Sig: golden-1"), "Sig"),
        (
            text.replace(
                "References: ",
                &format!("References: {LEAF}-golden-leaf {LEAF}-golden-leaf"),
            ),
            "repeated",
        ),
        (format!("{text}References: \n"), "more than once"),
        (
            text.replace(LEAF, "00000000000000000000000000000000"),
            "hash in the URL",
        ),
    ];
    for (body, reason) in cases {
        assert_refused(server.put(&narinfo, body), 400, reason);
        assert_eq!(
            server.get_status(&narinfo),
            404,
            "nothing became visible after {reason}"
        );
    }
    // A body over the narinfo limit.
    assert_refused(
        server.put(&narinfo, vec![b'a'; 1024 * 1024 + 1]),
        413,
        "larger than",
    );

    // The top path names the leaf, which is not in the cache yet.
    let top = narinfo_text(TOP);
    let top_info = NarInfo::parse(top.as_bytes()).unwrap();
    assert_eq!(server.put(&top_info.url, nar_file(&top_info)).status(), 200);
    assert_refused(
        server.put(&format!("{TOP}.narinfo"), top),
        400,
        "not in this cache",
    );
    assert_eq!(server.get_status(&format!("{TOP}.narinfo")), 404);
    // The NAR uploaded for it is not served: only a narinfo makes a NAR readable.
    let served_url = format!("nar/{}.nar.zst", top_info.nar_hash.to_nix32());
    assert_eq!(server.get_status(&served_url), 404);

    // The unmodified narinfo still goes through after all that.
    assert_eq!(server.put(&narinfo, text).status(), 200);
    assert_eq!(server.get_status(&narinfo), 200);
}

fn upload_raw_nar(server: &Server, body: Vec<u8>) -> Response {
    let url = format!("nar/{}.nar", Sha256::digest(&body).to_nix32());
    server.put(&url, body)
}

#[test]
fn bodies_that_are_not_valid_nars_are_refused() {
    let server = Server::start();
    let file = || Entry::File {
        executable: false,
        contents: b"x",
    };
    let good = nar(&Entry::Dir(vec![("a", file()), ("b", file())]));
    let mut bad_magic = good.clone();
    bad_magic[8] = b'X';
    let mut bad_padding = nar(&file());
    let at = bad_padding.len() - 23;
    bad_padding[at] = 7;
    let cases = [
        (bad_magic, "magic"),
        (
            nar(&Entry::Dir(vec![("b", file()), ("a", file())])),
            "out of order",
        ),
        (
            nar(&Entry::Dir(vec![("a", file()), ("a", file())])),
            "out of order",
        ),
        (nar(&Entry::Dir(vec![("..", file())])), "invalid entry name"),
        (
            nar(&Entry::Dir(vec![("a/b", file())])),
            "invalid entry name",
        ),
        (bad_padding, "padding"),
        (good[..good.len() - 16].to_vec(), "truncated"),
        ([good.clone(), vec![0; 8]].concat(), "after the end"),
    ];
    for (body, reason) in cases {
        let url = format!("nar/{}.nar", Sha256::digest(&body).to_nix32());
        assert_refused(upload_raw_nar(&server, body), 400, reason);
        assert_eq!(
            server.head_status(&url),
            404,
            "nothing stored after {reason}"
        );
    }
    assert_eq!(
        server.chunk_files().0,
        0,
        "no chunk was kept from a refused upload"
    );

    // A compressed body that does not decompress, and a URL naming another body.
    let garbage = b"this is not xz at all".to_vec();
    let url = format!("nar/{}.nar.xz", Sha256::digest(&garbage).to_nix32());
    assert_refused(server.put(&url, garbage), 400, "does not decompress");
    let wrong_name = format!("nar/{}.nar", Sha256::digest(b"other").to_nix32());
    assert_refused(
        server.put(&wrong_name, good.clone()),
        400,
        "does not name the hash",
    );
    assert_eq!(server.head_status(&wrong_name), 404);
    assert_refused(server.put("nar/abc.nar.lz4", good.clone()), 400, "nix32");

    // The good one is accepted.
    assert_eq!(upload_raw_nar(&server, good).status(), 200);
}

#[test]
fn pushing_needs_the_right_token() {
    let server = Server::start();
    let (text, info) = leaf();
    let http = client();
    let url = format!("{}/{}", server.url(), info.url);
    let r = http.put(&url).body(nar_file(&info)).send().unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let r = http
        .put(&url)
        .basic_auth("ci", Some("wrong"))
        .body(nar_file(&info))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .put(&url)
        .bearer_auth("wrong")
        .body(nar_file(&info))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(server.head_status(&info.url), 404);
    // A netrc without a login sends the token as the Basic password of an empty user.
    let r = http
        .put(&url)
        .basic_auth("", Some(server.token()))
        .body(nar_file(&info))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .put(format!("{}/{LEAF}.narinfo", server.url()))
        .body(text)
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(server.get_status(&format!("{LEAF}.narinfo")), 404);
    // A header we cannot read does not lock anyone out of a public cache.
    let r = http
        .get(format!("{}/nix-cache-info", server.url()))
        .header("authorization", "Negotiate xyz")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .put(&url)
        .header("authorization", "Basic !!!")
        .body(nar_file(&info))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[test]
fn misses_are_404_and_traversal_goes_nowhere() {
    let server = Server::start();
    upload_golden(&server);
    let misses = [
        "00000000000000000000000000000000.narinfo",
        "00000000000000000000000000000000.ls",
        "nar/0000000000000000000000000000000000000000000000000000.nar.zst",
        "nar/0000000000000000000000000000000000000000000000000000.nar",
        "log/00000000000000000000000000000000-x.drv",
        "realisations/sha256:abc!out.doi",
        "build-trace-v2/00000000000000000000000000000000-x.drv/out.doi",
        "no-such-file",
    ];
    for m in misses {
        assert_eq!(server.get_status(m), 404, "{m}");
    }
    // A cache that does not exist answers as a private one would, without a token.
    assert_eq!(
        client()
            .get(format!("{}/nosuchcache/nix-cache-info", server.base()))
            .send()
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        server.admin_get("/nosuchcache/nix-cache-info").status(),
        404
    );
    let traversal = [
        "/main/..%2F..%2Fadmin-token",
        "/main/nar/..%2F..%2Fadmin-token",
        "/main/nar/..%2Findex%2Fdb",
        "/main/log/..%2F..%2F..%2Fetc%2Fpasswd",
        "/..%2Fdata/admin-token",
        "/main/%2e%2e/%2e%2e/admin-token",
        "/main/../../admin-token",
        "/main/realisations/..%2F..%2Fkeys%2Fmain.secret",
    ];
    for t in traversal {
        let status = client()
            .get(format!("{}{t}", server.base()))
            .send()
            .unwrap()
            .status();
        assert!(status.is_client_error(), "{t}: {status}");
    }
}

#[test]
fn nar_downloads_support_ranges_and_plain_nar() {
    let server = Server::start();
    upload_golden(&server);
    let info = NarInfo::parse(
        server
            .get(&format!("{TOP}.narinfo"))
            .text()
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let url = format!("{}/{}", server.url(), info.url);
    let whole = client().get(&url).send().unwrap();
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert!(whole.headers().get("content-encoding").is_none());
    let whole = whole.bytes().unwrap();
    assert_eq!(whole.len() as u64, info.file_size.unwrap());

    let part = client()
        .get(&url)
        .header("range", "bytes=3-9")
        .send()
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 3-9/{}", whole.len())
    );
    assert_eq!(part.bytes().unwrap(), whole.slice(3..10));
    let past = client()
        .get(&url)
        .header("range", format!("bytes={}-", whole.len()))
        .send()
        .unwrap();
    assert_eq!(past.status(), 416);

    // The uncompressed NAR, decompressed on the fly, with ranges too.
    let plain_url = format!("{}/nar/{}.nar", server.url(), info.nar_hash.to_nix32());
    let plain = client().get(&plain_url).send().unwrap().bytes().unwrap();
    assert_eq!(plain.len() as u64, info.nar_size);
    assert_eq!(Sha256::digest(&plain), info.nar_hash);
    let tail = client()
        .get(&plain_url)
        .header("range", "bytes=-10")
        .send()
        .unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(tail.bytes().unwrap(), plain.slice(plain.len() - 10..));

    let head = client().head(&url).send().unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], whole.len().to_string());
}

#[test]
fn logs_and_realisations_round_trip() {
    let server = Server::start();
    let drv = "4yncvzfm86cppqd91p6dvnpbbdx5d126-golden-top.drv";
    assert_eq!(
        server.put(&format!("log/{drv}"), "building\n").status(),
        200
    );
    let log = server.get(&format!("log/{drv}"));
    assert_eq!(log.status(), 200);
    assert_eq!(log.text().unwrap(), "building\n");
    let id = "realisations/sha256:1b4i2y0k1mhhk6hmm4axrhv3gq3m9c8rnqbz7sr3gnhv2rlcdhx8!out.doi";
    assert_eq!(server.put(id, r#"{"id":"x"}"#).status(), 200);
    assert_eq!(server.get_status(id), 200);
    assert_refused(server.put(id, "not json"), 400, "json");
    let trace = format!("build-trace-v2/{drv}/out.doi");
    assert_eq!(server.put(&trace, r#"{"x":1}"#).status(), 200);
    assert_eq!(server.get_status(&trace), 200);
    assert_refused(server.put("log/not-a-drv", "x"), 400, "derivation");
}

#[test]
fn a_path_pushed_again_with_another_nar_keeps_the_first() {
    // An unreproducible build: same store path, different contents.
    let server = Server::start();
    upload_golden(&server);
    let original = server.get(&format!("{LEAF}.narinfo")).text().unwrap();

    let other = nar(&Entry::File {
        executable: false,
        contents: b"leaf, built again\n",
    });
    let url = format!("nar/{}.nar", Sha256::digest(&other).to_nix32());
    assert_eq!(server.put(&url, other.clone()).status(), 200);
    let (text, info) = leaf();
    let rebuilt = text
        .replace(&format!("URL: {}", info.url), &format!("URL: {url}"))
        .replace("Compression: xz", "Compression: none")
        .replace(
            &info.nar_hash.to_string(),
            &Sha256::digest(&other).to_string(),
        )
        .replace("NarSize: 120", &format!("NarSize: {}", other.len()))
        .lines()
        .filter(|l| !l.starts_with("FileHash") && !l.starts_with("FileSize"))
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    // Accepted (the client must not fail), and the first stays.
    assert_eq!(
        server.put(&format!("{LEAF}.narinfo"), rebuilt).status(),
        200
    );
    let now = server.get(&format!("{LEAF}.narinfo")).text().unwrap();
    assert_eq!(now, original);
    assert!(
        server.log().contains("different NarHash"),
        "the conflict is logged"
    );
}
