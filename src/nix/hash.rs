//! SHA-256 digests as Nix writes and reads them (`sha256:<nix32>` and friends).

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use super::base32;

/// A SHA-256 digest, such as a NarHash or a FileHash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256([u8; 32]);

/// Why a string is not a SHA-256 hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    /// Another algorithm than SHA-256.
    #[error("hash must be sha256")]
    UnsupportedAlgorithm,
    /// A digest in no encoding Nix accepts.
    #[error("hash digest is not valid nix32, base16, base64 or SRI")]
    BadDigest,
}

impl Sha256 {
    /// The digest `bytes`.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The SHA-256 of `data`.
    pub fn digest(data: &[u8]) -> Self {
        use sha2::Digest as _;
        Self(sha2::Sha256::digest(data).into())
    }

    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 52-letter nix32 form without the `sha256:` prefix, as used in NAR URLs.
    pub fn to_nix32(&self) -> String {
        base32::encode(&self.0)
    }

    /// Parses the 52-letter nix32 form.
    pub fn from_nix32(text: &str) -> Option<Self> {
        base32::decode::<32>(text).map(Self)
    }

    /// The digest in lower-case hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_digest_text(text: &str) -> Result<Self, HashError> {
        let bytes = match text.len() {
            52 => base32::decode::<32>(text),
            64 => decode_hex(text),
            44 => BASE64
                .decode(text)
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok()),
            _ => None,
        };
        bytes.map(Self).ok_or(HashError::BadDigest)
    }
}

fn decode_hex(text: &str) -> Option<[u8; 32]> {
    if !text.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        *out.get_mut(i)? = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Accepts `sha256:<nix32|base16|base64>` and SRI `sha256-<base64>`, as Nix's parser does.
impl FromStr for Sha256 {
    type Err = HashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("sha256:") {
            Self::from_digest_text(rest)
        } else if let Some(rest) = s.strip_prefix("sha256-") {
            let bytes = BASE64.decode(rest).map_err(|_| HashError::BadDigest)?;
            <[u8; 32]>::try_from(bytes)
                .map(Self)
                .map_err(|_| HashError::BadDigest)
        } else {
            Err(HashError::UnsupportedAlgorithm)
        }
    }
}

/// Always the canonical `sha256:<nix32>` form, which is also what fingerprints use.
impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_nix32())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// As its `Display` form, in records and in the admin API.
impl serde::Serialize for Sha256 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Sha256 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_NIX32: &str = "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";

    #[test]
    fn parses_every_spelling_nix_accepts() {
        let empty = Sha256::digest(b"");
        let spellings = [
            EMPTY_NIX32.to_string(),
            format!("sha256:{}", empty.to_hex()),
            format!("sha256:{}", BASE64.encode(empty.as_bytes())),
            format!("sha256-{}", BASE64.encode(empty.as_bytes())),
        ];
        for s in spellings {
            assert_eq!(s.parse::<Sha256>().unwrap(), empty, "{s}");
        }
        assert_eq!(empty.to_string(), EMPTY_NIX32);
    }

    #[test]
    fn rejects_other_algorithms_and_garbage() {
        assert_eq!(
            "md5:abc".parse::<Sha256>(),
            Err(HashError::UnsupportedAlgorithm)
        );
        assert_eq!("sha256:xyz".parse::<Sha256>(), Err(HashError::BadDigest));
        assert_eq!(
            format!("sha256:{}", "g".repeat(64)).parse::<Sha256>(),
            Err(HashError::BadDigest)
        );
    }
}
