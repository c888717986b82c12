//! The bodies of the admin API's requests and answers, shared with `cache-admin`.

use serde::{Deserialize, Serialize};

use crate::grants::{CachePattern, Permission};
use crate::index::{Retention, TokenRecord};
use crate::nix::signing::SecretKey;

/// A cache as the admin API describes it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheInfo {
    /// Its name.
    pub name: String,
    /// Whether anyone may pull from it.
    pub public: bool,
    /// The public key of its newest signing key, for `trusted-public-keys`.
    pub public_key: String,
    /// The public keys of every key that signs (two during a rotation).
    pub signing_keys: Vec<String>,
    /// The priority its `nix-cache-info` announces.
    pub priority: u32,
    /// The store directory its paths live in.
    pub store_dir: String,
    /// Whether client signatures are served beside the cache's.
    pub keep_client_signatures: bool,
    /// What the garbage collector keeps.
    pub retention: Retention,
    /// Its own quota, in stored bytes (not the retention's `max_size_bytes`).
    #[serde(default)]
    pub quota_bytes: Option<u64>,
    /// The quota that applies: its own, else the server's default.
    #[serde(default)]
    pub effective_quota_bytes: Option<u64>,
    /// Whether the config file declares it (and so owns its settings).
    pub declared: bool,
    /// Store paths it serves.
    pub paths: u64,
    /// The sum of their NAR sizes.
    pub nar_bytes: u64,
    /// What it holds against its quota: its paths' stored bytes, its uploads waiting
    /// for a narinfo, its logs and realisations.
    #[serde(default)]
    pub used_bytes: u64,
    /// When it was created, in seconds since the epoch.
    pub created: u64,
}

/// `POST /_api/v1/caches`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCache {
    /// Its name.
    pub name: String,
    /// Whether anyone may pull from it (default: yes).
    #[serde(default)]
    pub public: Option<bool>,
    /// The priority to announce (default 40).
    #[serde(default)]
    pub priority: Option<u32>,
    /// Whether client signatures are served (default: yes).
    #[serde(default)]
    pub keep_client_signatures: Option<bool>,
    /// Retention, read by the garbage collector.
    #[serde(default)]
    pub retention: Retention,
    /// The most stored bytes it may hold.
    #[serde(default)]
    pub quota_bytes: Option<u64>,
    /// A secret key to import, in the text of a Nix secret-key file; generated when
    /// absent.
    #[serde(default)]
    pub secret_key: Option<SecretText>,
}

/// A secret in a request or an answer: a key's text, a token. `Debug` never shows it,
/// and it is zeroed when dropped.
#[derive(Serialize, Deserialize, Clone)]
#[serde(transparent)]
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretText(<redacted>)")
    }
}

impl Drop for SecretText {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl SecretText {
    /// The key it holds.
    pub fn key(&self) -> Result<SecretKey, crate::nix::signing::KeyError> {
        self.0.parse()
    }
}

/// `GET /_api/v1/caches/<cache>/keys`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeysInfo {
    /// The cache's store paths.
    pub paths: u64,
    /// Its keys, oldest first.
    pub keys: Vec<KeyInfo>,
    /// Signatures under other names (clients'), and how many paths carry each.
    pub other_signatures: Vec<(String, u64)>,
}

/// One of a cache's keys.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyInfo {
    /// Its name.
    pub name: String,
    /// Its public key.
    pub public_key: String,
    /// Whether it signs what the cache publishes.
    pub signing: bool,
    /// When it was added.
    pub created: u64,
    /// How many paths carry its signature.
    pub paths_signed: u64,
}

/// `POST /_api/v1/caches/<cache>/keys/rotate`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    /// A secret key to import as the new key; generated when absent.
    #[serde(default)]
    pub secret_key: Option<SecretText>,
}

/// What a rotation or a re-signing did.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyChange {
    /// The public key hosts should trust from now on.
    pub public_key: String,
    /// The keys that sign now.
    pub signing_keys: Vec<String>,
    /// Keys retired by this change.
    pub retired: Vec<String>,
    /// Whether this finished a rotation already under way (no key was added).
    pub resumed: bool,
    /// Paths looked at.
    pub paths: u64,
    /// Paths whose signatures were rewritten.
    pub rewritten: u64,
}

/// `POST /_api/v1/caches/<cache>/paths/delete`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeletePaths {
    /// Store paths, full (`/nix/store/…`) or base names, or their hashes.
    pub paths: Vec<String>,
    /// Whether the paths that refer to them go too.
    #[serde(default)]
    pub with_referrers: bool,
}

/// What a deletion of paths did.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Deleted {
    /// The paths deleted.
    pub deleted: Vec<String>,
    /// The paths asked for that the cache does not have (a deletion done before, say).
    pub missing: Vec<String>,
}

/// A token as the admin API describes it: never its secret.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenInfo {
    /// Its name.
    pub name: String,
    /// What it may do.
    pub permissions: Vec<Permission>,
    /// The caches it covers.
    pub caches: Vec<CachePattern>,
    /// When it was made.
    pub created: u64,
    /// When it stops working.
    pub expires: Option<u64>,
    /// When it was last used, to about a minute.
    pub last_used: Option<u64>,
    /// When it was revoked.
    pub revoked: Option<u64>,
}

impl From<&TokenRecord> for TokenInfo {
    fn from(t: &TokenRecord) -> Self {
        Self {
            name: t.name.clone(),
            permissions: t.grants.permissions.clone(),
            caches: t.grants.caches.clone(),
            created: t.created,
            expires: t.expires,
            last_used: t.last_used,
            revoked: t.revoked,
        }
    }
}

/// `POST /_api/v1/tokens`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Its name, unique among tokens not revoked.
    pub name: String,
    /// What it may do.
    pub permissions: Vec<Permission>,
    /// The caches it covers: names, or patterns with `*`.
    pub caches: Vec<CachePattern>,
    /// Seconds from now until it stops working; never when absent.
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}

/// A token just made, with its secret: shown this once. `Debug` never shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct CreatedToken {
    /// The token.
    pub token: TokenInfo,
    /// Its secret.
    pub secret: SecretText,
}

/// `POST /_api/v1/gc`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcRequest {
    /// Apply the retention of this cache only.
    #[serde(default)]
    pub cache: Option<String>,
    /// Report, change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Rewrite every pack with a dead byte now.
    #[serde(default)]
    pub compact: bool,
}

/// `POST /_api/v1/verify`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyRequest {
    /// Check the narinfos of this cache only.
    #[serde(default)]
    pub cache: Option<String>,
    /// Read every frame and NAR back.
    #[serde(default)]
    pub deep: bool,
}

/// A job started: poll `GET /_api/v1/jobs/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStarted {
    /// Its number.
    pub id: u64,
}

/// `POST /_api/v1/caches/<cache>/pins`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddPin {
    /// The pin's name.
    pub name: String,
    /// The store path to pin, in full or by its base name.
    pub store_path: String,
    /// How many revisions the pin keeps.
    #[serde(default)]
    pub keep_revisions: Option<u32>,
    /// How many days a revision is kept.
    #[serde(default)]
    pub keep_days: Option<u32>,
}
