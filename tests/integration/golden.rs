//! Formats checked against files the real `nix` wrote (tests/fixtures/golden: a key
//! pair from `nix-store --generate-binary-cache-key`, and a two-path closure copied to
//! a `file://` cache with that key).

use std::path::PathBuf;

use cachet::nix::signing::{PublicKey, SecretKey};
use cachet::nix::NarInfo;

use crate::harness::{client, ok, Nix, NixHost, Server};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(name)
}

pub const TOP: &str = "amhfscnw2qd9i5di3h12m34ryr5zf403";
pub const LEAF: &str = "k0x70y21h4zak08k9zwn2a3mjy91i46r";

pub fn narinfo_text(hash: &str) -> String {
    std::fs::read_to_string(fixture(&format!("{hash}.narinfo"))).unwrap()
}

pub fn nar_file(info: &NarInfo) -> Vec<u8> {
    std::fs::read(fixture(info.url.strip_prefix("nar/").unwrap())).unwrap()
}

#[test]
fn narinfos_nix_wrote_round_trip_byte_exact() {
    for hash in [TOP, LEAF] {
        let text = narinfo_text(hash);
        assert_eq!(NarInfo::parse(text.as_bytes()).unwrap().render(), text);
    }
}

#[test]
fn our_signatures_are_the_ones_nix_makes() {
    let sk: SecretKey = std::fs::read_to_string(fixture("sk"))
        .unwrap()
        .parse()
        .unwrap();
    let pk: PublicKey = std::fs::read_to_string(fixture("pk"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(sk.public(), pk);
    for hash in [TOP, LEAF] {
        let info = NarInfo::parse(narinfo_text(hash).as_bytes()).unwrap();
        let ours = sk.sign(&info.fingerprint());
        assert_eq!(
            info.sigs,
            vec![ours.clone()],
            "ed25519 is deterministic: same bytes as nix"
        );
        assert!(pk.verify(&info.fingerprint(), &ours));
    }
}

/// Uploads the golden closure as `nix copy` would: NARs, then narinfos, leaf first.
pub fn upload_golden(server: &Server) {
    for hash in [LEAF, TOP] {
        let text = narinfo_text(hash);
        let info = NarInfo::parse(text.as_bytes()).unwrap();
        let r = server.put(&info.url, nar_file(&info));
        assert_eq!(r.status(), 200, "{}", r.text().unwrap());
        let r = server.put(&format!("{hash}.narinfo"), text);
        assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    }
}

#[test]
fn the_served_narinfo_has_nix_format_and_a_signature_nix_accepts() {
    let server = Server::start();
    upload_golden(&server);
    let pk = server.public_key();
    for hash in [TOP, LEAF] {
        let r = server.get(&format!("{hash}.narinfo"));
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/x-nix-narinfo");
        let served = r.text().unwrap();
        let original = NarInfo::parse(narinfo_text(hash).as_bytes()).unwrap();
        let info = NarInfo::parse(served.as_bytes()).unwrap();

        // Field for field what Nix writes, with the URL and sizes of what we serve.
        let nar = server.get(&info.url);
        assert_eq!(nar.status(), 200);
        let body = nar.bytes().unwrap();
        let ours = info.sigs.iter().find(|s| s.key_name() == "main-1").unwrap();
        let mut expected = format!(
            "StorePath: {}\nURL: nar/{}.nar.zst\nCompression: zstd\nFileSize: {}\nNarHash: {}\nNarSize: {}\nReferences: {}\n",
            original.store_path.full(),
            original.nar_hash.to_nix32(),
            body.len(),
            original.nar_hash,
            original.nar_size,
            original.references.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" "),
        );
        expected += &format!("Deriver: {}\n", original.deriver.as_ref().unwrap());
        expected += &format!("Sig: {}\nSig: {ours}\n", original.sigs[0]);
        assert_eq!(served, expected);

        // The body is a zstd stream of exactly the NAR the narinfo describes.
        let nar = zstd::decode_all(&body[..]).unwrap();
        assert_eq!(nar.len() as u64, info.nar_size);
        assert_eq!(cachet::nix::Sha256::digest(&nar), info.nar_hash);
        let key: PublicKey = pk.parse().unwrap();
        assert!(key.verify(&info.fingerprint(), ours));
    }
    // And the real client agrees: it checks the signature and the NAR contents.
    let host = NixHost::new(&server, Nix::V2_8);
    let top = format!("/nix/store/{TOP}-golden-top");
    ok(host.nix(&["store", "verify", "--store", &server.url(), "-r", &top]));
}

#[test]
fn listing_is_built_from_the_nar() {
    let server = Server::start();
    upload_golden(&server);
    let r = server.get(&format!("{LEAF}.ls"));
    assert_eq!(r.status(), 200);
    let json: serde_json::Value = r.json().unwrap();
    assert_eq!(json["version"], 1);
    assert_eq!(json["root"]["type"], "regular");
    assert_eq!(json["root"]["size"], 5, "the leaf is the file \"leaf\\n\"");
}

#[test]
fn cache_admin_shows_the_cache() {
    let server = Server::start();
    let text = server.admin(&["cache", "info", "main"]);
    let line = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_owned()
    };
    assert_eq!(line("public key"), server.public_key());
    assert_eq!(line("visibility"), "public");
    let info: serde_json::Value = client()
        .get(format!("{}/_api/v1/caches/main", server.base()))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(info["name"], "main");
    assert_eq!(info["public"], true);
    assert!(info["public_key"].as_str().unwrap().starts_with("main-1:"));
    // Secrets are readable by their owner only.
    use std::os::unix::fs::PermissionsExt as _;
    for secret in ["admin-token", "keys/main.secret"] {
        let mode = std::fs::metadata(server.data_dir().join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{secret}");
    }
    // Without a token a missing cache looks like a private one; with one, it is missing.
    let missing = client()
        .get(format!("{}/_api/v1/caches/nope", server.base()))
        .send()
        .unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(server.admin_get("/_api/v1/caches/nope").status(), 404);
}

#[test]
fn the_url_a_client_uploaded_under_serves_the_nar_once_published() {
    // Nix keeps the narinfo it pushed (with its own URL) in its client cache, so the
    // pushing machine later asks for the URL it chose.
    let server = Server::start();
    let text = narinfo_text(LEAF);
    let info = NarInfo::parse(text.as_bytes()).unwrap();
    let xz = nar_file(&info);
    let mut nar = Vec::new();
    std::io::Read::read_to_end(&mut xz2::read::XzDecoder::new(&xz[..]), &mut nar).unwrap();
    let zst = zstd::encode_all(&nar[..], 19).unwrap();
    let url = format!(
        "nar/{}.nar.zst",
        cachet::nix::Sha256::digest(&zst).to_nix32()
    );
    let put = |path: &str, body: Vec<u8>| server.put(path, body).status();
    assert_eq!(put(&url, zst.clone()), 200);
    assert_eq!(
        server.get_status(&url),
        404,
        "not readable before a narinfo names it"
    );
    let mine = text
        .replace(&info.url, &url)
        .replace("Compression: xz", "Compression: zstd")
        .replace(
            &format!("FileHash: {}", info.file_hash.unwrap()),
            &format!("FileHash: {}", cachet::nix::Sha256::digest(&zst)),
        )
        .replace(
            &format!("FileSize: {}", info.file_size.unwrap()),
            &format!("FileSize: {}", zst.len()),
        );
    assert_eq!(put(&format!("{LEAF}.narinfo"), mine.into_bytes()), 200);
    let body = server.get(&url);
    assert_eq!(body.status(), 200);
    assert_eq!(zstd::decode_all(&body.bytes().unwrap()[..]).unwrap(), nar);
}
