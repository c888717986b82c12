//! ed25519 keys and signatures in Nix's text formats, and the fingerprint they sign.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, Verifier as _};

use super::hash::Sha256;
use super::store_path::StorePath;

/// Why a key does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not `<name>:<base64>`.
    #[error("key must be <name>:<base64>")]
    Syntax,
    /// An empty name, or one with spaces or colons.
    #[error("key name must be non-empty and printable without spaces or colons")]
    BadName,
    /// Not a key of the right length.
    #[error("key is not base64 of the right length")]
    BadKey,
}

fn split_named(s: &str) -> Result<(&str, Vec<u8>), KeyError> {
    let (name, b64) = s.trim().split_once(':').ok_or(KeyError::Syntax)?;
    if !valid_key_name(name) {
        return Err(KeyError::BadName);
    }
    let bytes = BASE64.decode(b64).map_err(|_| KeyError::BadKey)?;
    Ok((name, bytes))
}

/// Whether Nix accepts `name` as a key name.
pub fn valid_key_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|c| c.is_ascii_graphic() && c != b':')
}

/// A secret signing key, `<name>:<base64 of seed ‖ public>` as
/// `nix-store --generate-binary-cache-key` writes it. `Debug` never shows the key,
/// and ed25519-dalek zeroes it on drop.
pub struct SecretKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl SecretKey {
    /// A new random key named `name`.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        if !valid_key_name(name) {
            return Err(KeyError::BadName);
        }
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).expect("the operating system's random source failed");
        Ok(Self {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its public half.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs a narinfo's fingerprint.
    pub fn sign(&self, fingerprint: &str) -> Signature {
        Signature {
            key_name: self.name.clone(),
            bytes: self.key.sign(fingerprint.as_bytes()).to_bytes(),
        }
    }

    /// The key file's text. Only for writing the file (mode 0600): never log it.
    pub fn to_file_text(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        ))
    }
}

impl FromStr for SecretKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split_named(s)?;
        let bytes = zeroize::Zeroizing::new(bytes);
        let pair: &[u8; 64] = bytes.as_slice().try_into().map_err(|_| KeyError::BadKey)?;
        // Nix stores seed ‖ public; from_keypair_bytes checks that they belong together.
        let key =
            ed25519_dalek::SigningKey::from_keypair_bytes(pair).map_err(|_| KeyError::BadKey)?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:<redacted>)", self.name)
    }
}

/// A public key, `<name>:<base64 of 32 bytes>`, as `trusted-public-keys` lists it.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl PublicKey {
    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `sig` is this key's valid signature of `fingerprint`.
    pub fn verify(&self, fingerprint: &str, sig: &Signature) -> bool {
        sig.key_name == self.name
            && self
                .key
                .verify(
                    fingerprint.as_bytes(),
                    &ed25519_dalek::Signature::from_bytes(&sig.bytes),
                )
                .is_ok()
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split_named(s)?;
        let raw: [u8; 32] = bytes.try_into().map_err(|_| KeyError::BadKey)?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw).map_err(|_| KeyError::BadKey)?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One `Sig:` value: `<key name>:<base64 of 64 bytes>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    key_name: String,
    bytes: [u8; 64],
}

impl Signature {
    /// The name of the key that made it.
    pub fn key_name(&self) -> &str {
        &self.key_name
    }
}

impl FromStr for Signature {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = split_named(s)?;
        let bytes: [u8; 64] = bytes.try_into().map_err(|_| KeyError::BadKey)?;
        Ok(Self {
            key_name: name.to_owned(),
            bytes,
        })
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, BASE64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a narinfo signature covers:
/// `1;<path>;<sha256:nix32 narhash>;<narsize>;<sorted full reference paths, comma-joined>`.
pub fn fingerprint(
    path: &StorePath,
    nar_hash: &Sha256,
    nar_size: u64,
    references: &[StorePath],
) -> String {
    let mut refs: Vec<String> = references.iter().map(StorePath::full).collect();
    refs.sort();
    format!(
        "1;{};{};{};{}",
        path.full(),
        nar_hash,
        nar_size,
        refs.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_key_round_trips_and_signs() {
        let sk = SecretKey::generate("test-1").unwrap();
        let text = sk.to_file_text();
        let back: SecretKey = text.parse().unwrap();
        assert_eq!(back.public(), sk.public());
        let sig = back.sign("hello");
        assert!(sk.public().verify("hello", &sig));
        assert!(!sk.public().verify("hellO", &sig));
        let sig_text = sig.to_string();
        assert_eq!(sig_text.parse::<Signature>().unwrap(), sig);
        assert!(!format!("{sk:?}").contains(&text[7..20]));
    }

    #[test]
    fn rejects_malformed_keys_and_signatures() {
        assert_eq!("nocolon".parse::<Signature>(), Err(KeyError::Syntax));
        assert_eq!(":AAAA".parse::<Signature>(), Err(KeyError::BadName));
        assert_eq!("k:!!!".parse::<Signature>(), Err(KeyError::BadKey));
        assert_eq!("k:AAAA".parse::<Signature>(), Err(KeyError::BadKey));
        assert!("k:AAAA".parse::<PublicKey>().is_err());
        assert!("k:AAAA".parse::<SecretKey>().is_err());
    }

    #[test]
    fn fingerprint_sorts_references() {
        let p = |s: &str| StorePath::from_basename(s).unwrap();
        let a = p("00000000000000000000000000000000-a");
        let b = p("11111111111111111111111111111111-b");
        let fp = fingerprint(&a, &Sha256::digest(b""), 8, &[b.clone(), a.clone()]);
        assert_eq!(
            fp,
            "1;/nix/store/00000000000000000000000000000000-a;\
             sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73;8;\
             /nix/store/00000000000000000000000000000000-a,/nix/store/11111111111111111111111111111111-b"
        );
    }
}
