//! The `.narinfo` text format: parsing what clients upload, writing what we serve.

use std::fmt::Write as _;

use super::compression::Compression;
use super::hash::Sha256;
use super::signing::{self, Signature};
use super::store_path::StorePath;

/// A narinfo: what a binary cache says of one store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// The store path.
    pub store_path: StorePath,
    /// Where its NAR is, relative to the cache.
    pub url: String,
    /// The compression of the file at `url`.
    pub compression: Compression,
    /// The SHA-256 of the file at `url`.
    pub file_hash: Option<Sha256>,
    /// The size of the file at `url`.
    pub file_size: Option<u64>,
    /// The SHA-256 of the NAR.
    pub nar_hash: Sha256,
    /// The size of the NAR.
    pub nar_size: u64,
    /// The store paths it refers to (itself included, if it does).
    pub references: Vec<StorePath>,
    /// The derivation that built it.
    pub deriver: Option<StorePath>,
    /// Signatures of its fingerprint.
    pub sigs: Vec<Signature>,
    /// Its content address, if it has one.
    pub ca: Option<String>,
}

/// Why a narinfo does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarInfoError {
    /// It is not text.
    #[error("narinfo is not UTF-8")]
    NotUtf8,
    /// A line (1-based) is not `Key: value`.
    #[error("narinfo line {0} is not `Key: value`")]
    MalformedLine(usize),
    /// A field that may appear once appears twice.
    #[error("narinfo field {0} appears more than once")]
    DuplicateField(&'static str),
    /// A required field is missing.
    #[error("narinfo field {0} is missing")]
    MissingField(&'static str),
    /// A field's value is malformed.
    #[error("narinfo field {field} is invalid: {reason}")]
    InvalidField {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A reference is malformed or repeated.
    #[error("narinfo reference {index} ({value:?}) is invalid or repeated")]
    InvalidReference {
        /// Its position in `References`.
        index: usize,
        /// The word.
        value: String,
    },
}

fn invalid(field: &'static str, reason: impl ToString) -> NarInfoError {
    NarInfoError::InvalidField {
        field,
        reason: reason.to_string(),
    }
}

/// Fields that may appear once; `Sig` may repeat and unknown keys are ignored, as in Nix.
const SINGLE_FIELDS: [&str; 10] = [
    "StorePath",
    "URL",
    "Compression",
    "FileHash",
    "FileSize",
    "NarHash",
    "NarSize",
    "References",
    "Deriver",
    "CA",
];

fn set_once<T>(slot: &mut Option<T>, field: &'static str, value: T) -> Result<(), NarInfoError> {
    if slot.replace(value).is_some() {
        return Err(NarInfoError::DuplicateField(field));
    }
    Ok(())
}

fn parse_size(field: &'static str, v: &str) -> Result<u64, NarInfoError> {
    v.parse().map_err(|_| invalid(field, "not a whole number"))
}

impl NarInfo {
    /// Parses a narinfo as Nix writes it.
    pub fn parse(bytes: &[u8]) -> Result<Self, NarInfoError> {
        let text = std::str::from_utf8(bytes).map_err(|_| NarInfoError::NotUtf8)?;
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut ca = None;
        let mut sigs = Vec::new();

        for (n, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(": ")
                .ok_or(NarInfoError::MalformedLine(n + 1))?;
            let Some(field) = SINGLE_FIELDS.iter().copied().find(|f| *f == key) else {
                if key == "Sig" {
                    sigs.push(value.parse().map_err(|e| invalid("Sig", e))?);
                }
                continue;
            };
            match field {
                "StorePath" => set_once(
                    &mut store_path,
                    field,
                    StorePath::from_full(value).map_err(|e| invalid(field, e))?,
                )?,
                "URL" => {
                    if value.is_empty() {
                        return Err(invalid(field, "empty"));
                    }
                    set_once(&mut url, field, value.to_owned())?
                }
                "Compression" => set_once(
                    &mut compression,
                    field,
                    value.parse().map_err(|e| invalid(field, e))?,
                )?,
                "FileHash" => set_once(
                    &mut file_hash,
                    field,
                    value.parse().map_err(|e| invalid(field, e))?,
                )?,
                "FileSize" => set_once(&mut file_size, field, parse_size(field, value)?)?,
                "NarHash" => set_once(
                    &mut nar_hash,
                    field,
                    value.parse().map_err(|e| invalid(field, e))?,
                )?,
                "NarSize" => set_once(&mut nar_size, field, parse_size(field, value)?)?,
                "References" => set_once(&mut references, field, parse_references(value)?)?,
                "Deriver" => {
                    // Nix writes `unknown-deriver` for paths without one.
                    if value != "unknown-deriver" {
                        let d = StorePath::from_basename(value).map_err(|e| invalid(field, e))?;
                        set_once(&mut deriver, field, d)?
                    }
                }
                "CA" => {
                    if !valid_ca(value) {
                        return Err(invalid(field, "not text:<hash> or fixed:[r:]<hash>"));
                    }
                    set_once(&mut ca, field, value.to_owned())?
                }
                _ => unreachable!("every name in SINGLE_FIELDS has an arm"),
            }
        }

        let nar_size = nar_size.ok_or(NarInfoError::MissingField("NarSize"))?;
        if nar_size == 0 {
            return Err(invalid("NarSize", "must be positive"));
        }
        Ok(Self {
            store_path: store_path.ok_or(NarInfoError::MissingField("StorePath"))?,
            url: url.ok_or(NarInfoError::MissingField("URL"))?,
            // A missing Compression means bzip2: the format's oldest default.
            compression: compression.unwrap_or(Compression::Bzip2),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::MissingField("NarHash"))?,
            nar_size,
            references: references.unwrap_or_default(),
            deriver,
            sigs,
            ca,
        })
    }

    /// The text Nix writes, field for field in Nix's order; optional fields only when set.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(512);
        let _ = writeln!(out, "StorePath: {}", self.store_path.full());
        let _ = writeln!(out, "URL: {}", self.url);
        let _ = writeln!(out, "Compression: {}", self.compression);
        if let Some(h) = &self.file_hash {
            let _ = writeln!(out, "FileHash: {h}");
        }
        if let Some(s) = self.file_size {
            let _ = writeln!(out, "FileSize: {s}");
        }
        let _ = writeln!(out, "NarHash: {}", self.nar_hash);
        let _ = writeln!(out, "NarSize: {}", self.nar_size);
        let refs: Vec<String> = self.references.iter().map(|r| r.to_string()).collect();
        let _ = writeln!(out, "References: {}", refs.join(" "));
        if let Some(d) = &self.deriver {
            let _ = writeln!(out, "Deriver: {d}");
        }
        for sig in &self.sigs {
            let _ = writeln!(out, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(out, "CA: {ca}");
        }
        out
    }

    /// What its signatures sign.
    pub fn fingerprint(&self) -> String {
        signing::fingerprint(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// References other than the path itself (a path may refer to itself).
    pub fn foreign_references(&self) -> impl Iterator<Item = &StorePath> {
        self.references.iter().filter(|r| **r != self.store_path)
    }
}

/// A content address as Nix writes it: `text:<algo>:<hash>` or
/// `fixed:[r:|git:]<algo>:<hash>`. Nix refuses a narinfo whose CA it cannot parse, so
/// one that slipped through would make the path unreadable for every client.
fn valid_ca(value: &str) -> bool {
    let rest = value.strip_prefix("text:").or_else(|| {
        value.strip_prefix("fixed:").map(|r| {
            r.strip_prefix("r:")
                .or_else(|| r.strip_prefix("git:"))
                .unwrap_or(r)
        })
    });
    let Some((algo, hash)) = rest.and_then(|r| r.split_once(':')) else {
        return false;
    };
    ["md5", "sha1", "sha256", "sha512"].contains(&algo)
        && !hash.is_empty()
        && hash
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+/=".contains(&c))
}

fn parse_references(value: &str) -> Result<Vec<StorePath>, NarInfoError> {
    let mut refs: Vec<StorePath> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (index, word) in value.split(' ').filter(|w| !w.is_empty()).enumerate() {
        let bad = || NarInfoError::InvalidReference {
            index,
            value: word.to_owned(),
        };
        let path = StorePath::from_basename(word).map_err(|_| bad())?;
        if !seen.insert(path.hash()) {
            return Err(bad());
        }
        refs.push(path);
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "StorePath: /nix/store/0a5ym8j4ycmssbbmrcd1iv3lz8mfghb6-hello-2.12.1\n\
URL: nar/1b4i2y0k1mhhk6hmm4axrhv3gq3m9c8rnqbz7sr3gnhv2rlcdhx8.nar.xz\n\
Compression: xz\n\
FileHash: sha256:1b4i2y0k1mhhk6hmm4axrhv3gq3m9c8rnqbz7sr3gnhv2rlcdhx8\n\
FileSize: 50088\n\
NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n\
NarSize: 226560\n\
References: 0a5ym8j4ycmssbbmrcd1iv3lz8mfghb6-hello-2.12.1 1x5vmr3a5v6aadm0zq9nd6jq2k1rkzgz-glibc-2.35\n\
Deriver: 2qab3m0b2h2pqvl9f0yrj4ynr8z4y0xn-hello-2.12.1.drv\n\
Sig: cache.example.org-1:Ozsz9HJ8G9A8hrTsgHMhZH4sWcYfOQkxEkTR7L8ivtAeVuO9k4a+NQFjVZ5Cw0QjvTP8b9YAozaCprBpDBXmDg==\n";

    #[test]
    fn round_trips_byte_exact() {
        let info = NarInfo::parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(info.compression, Compression::Xz);
        assert_eq!(info.references.len(), 2);
        assert_eq!(info.foreign_references().count(), 1);
        assert_eq!(info.render(), SAMPLE);
    }

    #[test]
    fn empty_references_keep_the_line() {
        let text = SAMPLE.replace(
            "References: 0a5ym8j4ycmssbbmrcd1iv3lz8mfghb6-hello-2.12.1 1x5vmr3a5v6aadm0zq9nd6jq2k1rkzgz-glibc-2.35",
            "References: ",
        );
        let info = NarInfo::parse(text.as_bytes()).unwrap();
        assert!(info.references.is_empty());
        assert_eq!(info.render(), text);
    }

    #[test]
    fn rejects_malformed() {
        let cases: Vec<(String, &str)> = vec![
            (SAMPLE.replace("NarHash: ", "NarHosh: "), "missing"),
            (SAMPLE.replace("NarSize: 226560", "NarSize: 0"), "positive"),
            (
                SAMPLE.replace("NarSize: 226560", "NarSize: -1"),
                "whole number",
            ),
            (SAMPLE.replace("sha256:0mdq", "sha256:Amdq"), "NarHash"),
            (format!("{SAMPLE}URL: nar/x.nar\n"), "more than once"),
            (SAMPLE.replace("Sig: cache.example.org-1:", "Sig: "), "Sig"),
            (
                SAMPLE.replace(
                    "glibc-2.35",
                    "glibc-2.35 1x5vmr3a5v6aadm0zq9nd6jq2k1rkzgz-glibc-2.35",
                ),
                "repeated",
            ),
            (SAMPLE.replace("StorePath: ", "StorePath "), "Key: value"),
            (
                SAMPLE.replace("/nix/store/0a5y", "/nix/stor/0a5y"),
                "StorePath",
            ),
            (format!("{SAMPLE}CA: fixed:r:sha256\n"), "CA"),
            (format!("{SAMPLE}CA: nonsense\n"), "CA"),
        ];
        for (text, needle) in cases {
            let err = NarInfo::parse(text.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }

    #[test]
    fn content_addresses_nix_writes_are_kept() {
        for ca in [
            "fixed:r:sha256:1b4i2y0k1mhhk6hmm4axrhv3gq3m9c8rnqbz7sr3gnhv2rlcdhx8",
            "fixed:sha256:1b4i2y0k1mhhk6hmm4axrhv3gq3m9c8rnqbz7sr3gnhv2rlcdhx8",
            "text:sha256:1b4i2y0k1mhhk6hmm4axrhv3gq3m9c8rnqbz7sr3gnhv2rlcdhx8",
        ] {
            let text = format!("{SAMPLE}CA: {ca}\n");
            let info = NarInfo::parse(text.as_bytes()).unwrap();
            assert_eq!(info.ca.as_deref(), Some(ca));
            assert_eq!(info.render(), text);
        }
    }

    #[test]
    fn missing_compression_means_bzip2() {
        let text = SAMPLE.replace("Compression: xz\n", "");
        assert_eq!(
            NarInfo::parse(text.as_bytes()).unwrap().compression,
            Compression::Bzip2
        );
    }
}

#[cfg(test)]
mod robustness {
    use super::*;

    /// Any bytes give a narinfo or an error, never a panic.
    #[test]
    fn arbitrary_text_never_panics() {
        let base = "StorePath: /nix/store/0a5ym8j4ycmssbbmrcd1iv3lz8mfghb6-hello\nURL: nar/x.nar\n\
                    NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\nNarSize: 1\n\
                    References: 0a5ym8j4ycmssbbmrcd1iv3lz8mfghb6-hello\nCA: fixed:r:sha256:abc\nSig: k:AAAA\n";
        let alphabet: &[u8] = b"StorePathURLNarHashSize: /\n-0123456789abcdfgsha256:\xff\x00";
        let mut rng = crate::testing::Xorshift(0x9e37_79b9_7f4a_7c15);
        let mut next = || rng.next();
        for _ in 0..20_000 {
            let mut m = base.as_bytes().to_vec();
            for _ in 0..(next() % 4 + 1) {
                let i = next() as usize % m.len();
                match next() % 3 {
                    0 => m[i] = alphabet[next() as usize % alphabet.len()],
                    1 => {
                        m.remove(i);
                    }
                    _ => m.insert(i, alphabet[next() as usize % alphabet.len()]),
                }
            }
            let _ = NarInfo::parse(&m);
        }
    }
}
