//! Names of caches: the first path segment of every cache URL.

use std::fmt;
use std::str::FromStr;

/// A valid cache name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct CacheName(String);

/// A string that is not a valid cache name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cache name must be 1 to 64 of a-z, 0-9, '-', '_', '.', starting with a letter or digit")]
pub struct BadCacheName;

impl CacheName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CacheName {
    type Err = BadCacheName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (1..=64).contains(&s.len())
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(&c));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(BadCacheName)
        }
    }
}

impl<'de> serde::Deserialize<'de> for CacheName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for CacheName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CacheName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates() {
        for ok in ["main", "a", "team-x_1.2"] {
            assert!(ok.parse::<CacheName>().is_ok(), "{ok}");
        }
        for bad in ["", "_api", "..", "Main", "a/b", "a b", &"a".repeat(65)] {
            assert!(bad.parse::<CacheName>().is_err(), "{bad}");
        }
    }
}
