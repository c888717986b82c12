//! Property tests of the round trips of Nix's formats: what is printed parses back to
//! the same value, for values drawn at random rather than picked by hand.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::nar::second_implementation;
use super::nar_url::NarUrl;
use super::narinfo::NarInfo;
use super::store_path::{StorePath, StorePathHash};
use super::{Compression, Sha256};

fn sha256() -> impl Strategy<Value = Sha256> {
    any::<[u8; 32]>().prop_map(Sha256::from_bytes)
}

fn path_hash() -> impl Strategy<Value = StorePathHash> {
    any::<[u8; 20]>().prop_map(StorePathHash::from_bytes)
}

/// Names as Nix allows them (not `.` or `..`).
fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9+._?=-]{1,40}".prop_filter("not . or ..", |n| n != "." && n != "..")
}

fn store_path() -> impl Strategy<Value = StorePath> {
    (path_hash(), name())
        .prop_map(|(h, n)| StorePath::from_basename(&format!("{h}-{n}")).expect("valid"))
}

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![
        Just(Compression::None),
        Just(Compression::Xz),
        Just(Compression::Zstd),
        Just(Compression::Bzip2),
        Just(Compression::Brotli),
        Just(Compression::Lz4),
    ]
}

fn signature() -> impl Strategy<Value = super::signing::Signature> {
    (
        "[a-zA-Z0-9._-]{1,20}",
        proptest::collection::vec(any::<u8>(), 64),
    )
        .prop_map(|(n, b)| {
            use base64::Engine as _;
            let text = format!(
                "{n}:{}",
                base64::engine::general_purpose::STANDARD.encode(b)
            );
            text.parse().expect("a valid signature")
        })
}

prop_compose! {
    fn narinfo()(
        store_path in store_path(),
        url_hash in sha256(),
        compression in compression(),
        file_hash in proptest::option::of(sha256()),
        file_size in proptest::option::of(any::<u64>()),
        nar_hash in sha256(),
        nar_size in 1..u64::MAX,
        references in proptest::collection::btree_map(path_hash(), name(), 0..6),
        deriver in proptest::option::of(name()),
        sigs in proptest::collection::vec(signature(), 0..3),
        ca in proptest::option::of((prop_oneof!["text:", "fixed:", "fixed:r:"], sha256())),
    ) -> NarInfo {
        let url = NarUrl { hash: url_hash, compression }.to_string();
        let references = references
            .into_iter()
            .map(|(h, n)| StorePath::from_basename(&format!("{h}-{n}")).expect("valid"))
            .collect();
        let deriver = deriver.map(|d| {
            let base = format!("{}-{d}.drv", store_path.hash());
            StorePath::from_basename(&base).expect("valid")
        });
        NarInfo {
            store_path,
            url,
            compression,
            file_hash,
            file_size,
            nar_hash,
            nar_size,
            references,
            deriver,
            sigs,
            ca: ca.map(|(kind, h)| format!("{kind}sha256:{}", h.to_nix32())),
        }
    }
}

proptest! {
    #[test]
    fn narinfos_print_and_parse_back(info in narinfo()) {
        let text = info.render();
        let parsed = NarInfo::parse(text.as_bytes()).unwrap();
        prop_assert_eq!(&parsed, &info);
        prop_assert_eq!(parsed.fingerprint(), info.fingerprint());
        prop_assert_eq!(parsed.render(), text);
    }

    #[test]
    fn nar_urls_print_and_parse_back(hash in sha256(), compression in compression()) {
        let url = NarUrl { hash, compression };
        prop_assert_eq!(url.to_string().parse::<NarUrl>().unwrap(), url);
        prop_assert_eq!(NarUrl::from_file_name(&url.file_name()).unwrap(), url);
    }

    #[test]
    fn store_paths_print_and_parse_back(path in store_path()) {
        prop_assert_eq!(StorePath::from_full(&path.full()).unwrap(), path.clone());
        prop_assert_eq!(StorePath::from_basename(&path.to_string()).unwrap(), path.clone());
        prop_assert_eq!(path.hash().to_string().parse::<StorePathHash>().unwrap(), path.hash());
    }

    #[test]
    fn hashes_print_and_parse_back_in_every_form(hash in sha256()) {
        prop_assert_eq!(Sha256::from_nix32(&hash.to_nix32()).unwrap(), hash);
        prop_assert_eq!(hash.to_string().parse::<Sha256>().unwrap(), hash);
    }
}

/// A tree of files, symlinks and directories, each directory's entries named apart.
#[derive(Debug, Clone)]
enum Tree {
    File(bool, Vec<u8>),
    Link(String),
    Dir(BTreeMap<String, Tree>),
}

fn tree() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..3000)
        )
            .prop_map(|(x, c)| Tree::File(x, c)),
        "[a-z./]{1,30}".prop_map(Tree::Link),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        proptest::collection::btree_map("[a-zA-Z0-9_.-]{1,12}", inner, 0..6).prop_map(|m| {
            // `.` and `..` are no names; the filter keeps what a directory can hold.
            Tree::Dir(
                m.into_iter()
                    .filter(|(n, _)| n != "." && n != "..")
                    .collect(),
            )
        })
    })
}

/// `tree` as `nar::write` takes it; entries in byte order, as in a NAR.
fn entry(t: &Tree) -> super::nar::write::Entry<'_> {
    use super::nar::write::Entry;
    match t {
        Tree::File(x, c) => Entry::File {
            executable: *x,
            contents: c,
        },
        Tree::Link(target) => Entry::Symlink(target),
        Tree::Dir(m) => Entry::Dir(m.iter().map(|(n, t)| (n.as_str(), entry(t))).collect()),
    }
}

/// `tree` written under `path` on disk.
fn materialise(t: &Tree, path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    match t {
        Tree::File(x, c) => {
            std::fs::write(path, c).unwrap();
            let mode = if *x { 0o755 } else { 0o644 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        Tree::Link(target) => std::os::unix::fs::symlink(target, path).unwrap(),
        Tree::Dir(m) => {
            std::fs::create_dir(path).unwrap();
            for (n, child) in m {
                materialise(child, &path.join(n));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A tree written by the `nix-nar` crate, an implementation of its own, is the
    /// archive `nar::write` makes; it validates, and its listing says what the
    /// crate's decoder reads, each offset pointing at the file's contents.
    #[test]
    fn nars_agree_with_a_second_implementation(t in tree()) {
        use std::io::Read as _;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        materialise(&t, &root);
        let mut theirs = Vec::new();
        nix_nar::Encoder::new(&root).unwrap().read_to_end(&mut theirs).unwrap();
        let ours = super::nar::write::nar(&entry(&t));
        prop_assert_eq!(&ours, &theirs);

        let mut listing = Vec::new();
        let summary = super::nar::validate(&ours[..], &mut listing, u64::MAX).unwrap();
        prop_assert_eq!(summary.size, ours.len() as u64);
        let listed = second_implementation::listed(&listing);
        let decoded = second_implementation::decoded(&ours);
        prop_assert_eq!(&listed, &decoded);
        prop_assert_eq!(summary.entries, decoded.len() as u64);
        for (kind, size, _, offset, _) in listed.values() {
            if kind == "regular" {
                let at = *offset as usize;
                prop_assert!(at + *size as usize <= ours.len());
            }
        }
    }
}
