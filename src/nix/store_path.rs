//! Store paths: `/nix/store/<32 nix32 letters>-<name>`.

use std::fmt;
use std::str::FromStr;

use super::base32;

/// The store directory every path served lives in.
pub const STORE_DIR: &str = "/nix/store";

/// The 160-bit hash part of a store path, the key a binary cache files narinfos under.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePathHash([u8; 20]);

/// Why a string is not a store path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    /// The hash part is not 32 nix32 letters.
    #[error("store path hash must be 32 nix32 letters")]
    BadHash,
    /// The name part is not one Nix allows.
    #[error("store path name is empty, too long, or has a character Nix does not allow")]
    BadName,
    /// It is not under the store directory.
    #[error("store path is not under {STORE_DIR}")]
    WrongStoreDir,
}

impl StorePathHash {
    /// Letters of the hash in its nix32 form.
    pub const TEXT_LEN: usize = 32;

    /// The hash of these bytes (as stored by the index).
    pub const fn from_bytes(bytes: [u8; 20]) -> Self {
        Self(bytes)
    }

    /// The hash's bytes.
    pub fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }
}

impl FromStr for StorePathHash {
    type Err = StorePathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        base32::decode::<20>(s)
            .map(Self)
            .ok_or(StorePathError::BadHash)
    }
}

impl fmt::Display for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base32::encode(&self.0))
    }
}

impl fmt::Debug for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A store path, held as its hash and name; `Display` gives the basename
/// (`<hash>-<name>`), `full()` the absolute path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    hash: StorePathHash,
    name: String,
}

/// The characters Nix allows in a store path name.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 211
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
}

impl StorePath {
    /// Parses a basename, `<hash>-<name>`.
    pub fn from_basename(s: &str) -> Result<Self, StorePathError> {
        let (hash, name) = s
            .split_at_checked(StorePathHash::TEXT_LEN)
            .ok_or(StorePathError::BadHash)?;
        let hash: StorePathHash = hash.parse()?;
        let name = name.strip_prefix('-').ok_or(StorePathError::BadName)?;
        if !valid_name(name) {
            return Err(StorePathError::BadName);
        }
        Ok(Self {
            hash,
            name: name.to_owned(),
        })
    }

    /// Parses an absolute path under the store directory.
    pub fn from_full(s: &str) -> Result<Self, StorePathError> {
        let base = s
            .strip_prefix(STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(StorePathError::WrongStoreDir)?;
        Self::from_basename(base)
    }

    /// The hash part.
    pub fn hash(&self) -> StorePathHash {
        self.hash
    }

    /// The name part.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The full path, under the store directory.
    pub fn full(&self) -> String {
        format!("{STORE_DIR}/{self}")
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.hash, self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let full = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1";
        let p = StorePath::from_full(full).unwrap();
        assert_eq!(p.name(), "hello-2.12.1");
        assert_eq!(p.full(), full);
        assert_eq!(p.to_string(), &full[11..]);
        assert_eq!(StorePath::from_basename(&full[11..]).unwrap(), p);
    }

    #[test]
    fn rejects_bad_paths() {
        let bad = [
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a/b",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-..",
            "/nix/store/eh7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello",
            "/gnu/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxl-hello",
        ];
        for b in bad {
            assert!(StorePath::from_full(b).is_err(), "{b}");
        }
    }
}
