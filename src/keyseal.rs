//! Secret signing keys sealed for the metadata, so that every process over a shared
//! database can sign and none of them finds a key in plain text there: each key is
//! encrypted with XChaCha20-Poly1305 under a key derived (BLAKE3's key derivation)
//! from `index.key_encryption_file`, a file every replica is given the way a secrets
//! manager delivers it. The cache's and the key's names are bound to the ciphertext
//! as associated data, so a sealed key copied into another cache's record does not
//! open. Keys kept as files (the embedded default, and keys the config names) are not
//! sealed.

use std::path::Path;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::nix::signing::SecretKey;
use crate::nix::CacheName;

/// The form's version, first in every sealed key.
const VERSION: &str = "v1";

/// The BLAKE3 context of the key derivation: fixed for all time, for this use only.
const CONTEXT: &str = "cachet 2026-12 signing keys sealed in the index";

/// The key derivation's input must carry at least this much secret.
const MIN_SECRET_BYTES: usize = 32;

/// Seals and opens secret keys under one key-encryption key.
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<redacted>)")
    }
}

fn associated(cache: &CacheName, key_name: &str) -> Vec<u8> {
    format!("{VERSION}\0{cache}\0{key_name}").into_bytes()
}

impl Sealer {
    /// The sealer of the key-encryption file at `path`: its whole content (at least 32
    /// bytes; surrounding white space is not part of it) is the secret.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| {
            anyhow::anyhow!("reading the key encryption file {}: {e}", path.display())
        })?);
        let secret = text.trim_ascii();
        anyhow::ensure!(
            secret.len() >= MIN_SECRET_BYTES,
            "the key encryption file {} holds {} bytes; it needs at least {MIN_SECRET_BYTES} \
             (for example `head -c 48 /dev/urandom | base64 > {}`)",
            path.display(),
            secret.len(),
            path.display()
        );
        let key = zeroize::Zeroizing::new(blake3::derive_key(CONTEXT, secret));
        Ok(Self {
            cipher: XChaCha20Poly1305::new(key.as_ref().into()),
        })
    }

    /// `key` of `cache`, sealed: `v1:<base64 of the nonce and the ciphertext>`.
    pub fn seal(&self, cache: &CacheName, key: &SecretKey) -> String {
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce).expect("the operating system's random source failed");
        let text = key.to_file_text();
        let aad = associated(cache, key.name());
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: text.as_bytes(),
                    aad: &aad,
                },
            )
            .expect("encryption of a short message does not fail");
        let mut raw = nonce.to_vec();
        raw.extend_from_slice(&sealed);
        format!(
            "{VERSION}:{}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// The key `key_name` of `cache` that `sealed` holds.
    pub fn open(
        &self,
        cache: &CacheName,
        key_name: &str,
        sealed: &str,
    ) -> anyhow::Result<SecretKey> {
        let unreadable = || {
            anyhow::anyhow!(
                "cache {cache}: the sealed signing key {key_name} does not open with this key \
                 encryption file (is it the file the other replicas have?)"
            )
        };
        let encoded = sealed
            .strip_prefix(VERSION)
            .and_then(|s| s.strip_prefix(':'))
            .ok_or_else(unreadable)?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| unreadable())?;
        anyhow::ensure!(raw.len() > 24, unreadable());
        let (nonce, ciphertext) = raw.split_at(24);
        let aad = associated(cache, key_name);
        let text = zeroize::Zeroizing::new(
            self.cipher
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| unreadable())?,
        );
        let text = std::str::from_utf8(&text).map_err(|_| unreadable())?;
        let key: SecretKey = text.parse().map_err(|_| unreadable())?;
        anyhow::ensure!(key.name() == key_name, unreadable());
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(dir: &Path, secret: &str) -> anyhow::Result<Sealer> {
        let path = dir.join(format!("kek-{}", secret.len()));
        std::fs::write(&path, secret)?;
        Sealer::from_file(&path)
    }

    #[test]
    fn a_sealed_key_opens_only_with_its_file_under_its_cache_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let main: CacheName = "main".parse().unwrap();
        let key = SecretKey::generate("main-1").unwrap();
        let a = sealer(dir.path(), &"a".repeat(40)).unwrap();
        let sealed = a.seal(&main, &key);
        assert!(sealed.starts_with("v1:"));
        // Nothing of the key's text is in the sealed form.
        let text = key.to_file_text();
        let secret_part = text.split(':').nth(1).unwrap();
        assert!(!sealed.contains(&secret_part[..20]));
        let opened = a.open(&main, "main-1", &sealed).unwrap();
        assert_eq!(opened.public().to_string(), key.public().to_string());
        // Two seals of one key differ (a random nonce each).
        assert_ne!(a.seal(&main, &key), sealed);
        let b = sealer(dir.path(), &"b".repeat(41)).unwrap();
        assert!(b.open(&main, "main-1", &sealed).is_err());
        let other: CacheName = "other".parse().unwrap();
        assert!(a.open(&other, "main-1", &sealed).is_err());
        assert!(a.open(&main, "main-2", &sealed).is_err());
        let mut broken = sealed.clone();
        broken.pop();
        assert!(a.open(&main, "main-1", &broken).is_err());
        assert!(a.open(&main, "main-1", "v0:AAAA").is_err());
    }

    #[test]
    fn a_short_file_is_refused_with_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let e = sealer(dir.path(), "short\n").unwrap_err().to_string();
        assert!(
            e.contains("at least 32") && e.contains("/dev/urandom"),
            "{e}"
        );
    }
}
