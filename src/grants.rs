//! What a token may do: permissions on caches named by patterns, and the form of token
//! secrets. Pure types and rules; the decisions with the recorded tokens are in `auth`.

use std::fmt;
use std::str::FromStr;

use crate::nix::{CacheName, Sha256};

/// What a request wants to do to a cache. Each permission includes the ones before it
/// that it needs: pushing needs reading (`nix copy --to` first asks which paths the
/// cache has), an admin of a cache may do everything to it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Read narinfos, NARs, listings, logs, the cache's settings.
    Pull,
    /// Upload NARs and publish narinfos, logs, realisations.
    Push,
    /// Delete store paths.
    Delete,
    /// Change the cache's settings and keys, delete the cache.
    Admin,
}

impl Permission {
    /// Whether holding `self` allows `wanted`.
    pub fn allows(self, wanted: Permission) -> bool {
        use Permission::*;
        match self {
            Admin => true,
            Delete => matches!(wanted, Pull | Delete),
            Push => matches!(wanted, Pull | Push),
            Pull => wanted == Pull,
        }
    }
}

impl FromStr for Permission {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "pull" => Self::Pull,
            "push" => Self::Push,
            "delete" => Self::Delete,
            "admin" => Self::Admin,
            other => {
                return Err(format!(
                    "unknown permission {other:?} (pull, push, delete, admin)"
                ))
            }
        })
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pull => "pull",
            Self::Push => "push",
            Self::Delete => "delete",
            Self::Admin => "admin",
        })
    }
}

/// Cache names a token covers: a name, or a pattern where `*` stands for any run of
/// characters (`team-*`, `*`). `*` alone covers every cache, present and future.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CachePattern(String);

impl CachePattern {
    /// Every cache.
    pub fn any() -> Self {
        Self("*".into())
    }

    /// Whether it covers every cache.
    pub fn is_any(&self) -> bool {
        self.0 == "*"
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &CacheName) -> bool {
        glob(self.0.as_bytes(), name.as_str().as_bytes())
    }
}

/// `*`-only globbing, iterative with one backtrack point: linear in practice.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

impl FromStr for CachePattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.*".contains(&c));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "cache pattern {s:?} must be 1 to 64 of a-z, 0-9, '-', '_', '.' and '*'"
            ))
        }
    }
}

impl fmt::Display for CachePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CachePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl serde::Serialize for CachePattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for CachePattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a token grants: permissions on the caches its patterns cover.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grants {
    /// The permissions.
    pub permissions: Vec<Permission>,
    /// The caches they apply to.
    pub caches: Vec<CachePattern>,
}

impl Grants {
    /// Whether these grants allow `wanted` on `cache`.
    pub fn allow(&self, cache: &CacheName, wanted: Permission) -> bool {
        self.caches.iter().any(|p| p.matches(cache))
            && self.permissions.iter().any(|p| p.allows(wanted))
    }

    /// Whether they make their holder the server's administrator: admin of `*`, which
    /// covers every cache, present and future, and the server's own administration
    /// (creating caches and tokens).
    pub fn server_admin(&self) -> bool {
        self.caches.iter().any(CachePattern::is_any)
            && self.permissions.contains(&Permission::Admin)
    }
}

/// The prefix of every token cachet makes, so that secret scanners can find leaked ones.
pub const TOKEN_PREFIX: &str = "cachet_";

/// How a token is recorded and looked up: the SHA-256 of its secret (a random secret
/// of 256 bits needs no slow hash).
pub fn token_hash(secret: &str) -> Sha256 {
    Sha256::digest(secret.as_bytes())
}

/// A new token secret: the prefix, then 32 random bytes in nix32.
pub fn new_token_secret() -> zeroize::Zeroizing<String> {
    let mut raw = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(raw.as_mut()).expect("the operating system's random source failed");
    zeroize::Zeroizing::new(format!(
        "{TOKEN_PREFIX}{}",
        crate::nix::base32::encode(raw.as_ref())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> CacheName {
        s.parse().unwrap()
    }

    #[test]
    fn patterns_match_names() {
        let p = |s: &str| s.parse::<CachePattern>().unwrap();
        assert!(p("*").matches(&name("main")));
        assert!(p("team-*").matches(&name("team-x")));
        assert!(p("team-*").matches(&name("team-")));
        assert!(!p("team-*").matches(&name("other")));
        assert!(p("*-ci").matches(&name("a-ci")));
        assert!(p("a*b*c").matches(&name("axxbyyc")));
        assert!(!p("a*b*c").matches(&name("axxbyy")));
        assert!(p("main").matches(&name("main")));
        assert!(!p("main").matches(&name("main2")));
        assert!("Main".parse::<CachePattern>().is_err());
        assert!("a/b".parse::<CachePattern>().is_err());
    }

    #[test]
    fn permissions_include_what_they_need() {
        use Permission::*;
        assert!(Push.allows(Pull) && Push.allows(Push) && !Push.allows(Delete));
        assert!(Delete.allows(Pull) && !Delete.allows(Push));
        assert!(Admin.allows(Delete) && Admin.allows(Push));
        assert!(!Pull.allows(Push));
        let g = Grants {
            permissions: vec![Push],
            caches: vec!["ci-*".parse().unwrap()],
        };
        assert!(g.allow(&name("ci-a"), Pull));
        assert!(!g.allow(&name("ci-a"), Admin));
        assert!(!g.allow(&name("main"), Pull));
        assert!(!g.server_admin());
        let admin = Grants {
            permissions: vec![Admin],
            caches: vec![CachePattern::any()],
        };
        assert!(admin.server_admin());
    }

    #[test]
    fn secrets_are_recognisable_and_random() {
        let (a, b) = (new_token_secret(), new_token_secret());
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 52);
        assert_ne!(*a, *b);
        assert_ne!(token_hash(&a), token_hash(&b));
    }
}
