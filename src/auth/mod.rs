//! Who may do what. Tokens are random secrets (`grants::new_token_secret`); the index
//! keeps only their SHA-256, and this module a copy of every record in memory, so a
//! request costs one hash and one map lookup, and a revocation or expiry, made by this
//! same process or reached by the clock, holds from the next request on.
//!
//! The rule (`decide`) keeps private caches private: without a valid token, a private
//! cache and one that does not exist answer alike (401), so nobody can probe for
//! names; a valid token that lacks the permission is told so (403).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use zeroize::Zeroizing;

use crate::caches::{Cache, Caches};
use crate::clock::now;
use crate::coord::{Change, Coordination};
use crate::error::{Error, Result};
use crate::grants::{self, CachePattern, Grants, Permission};
use crate::index::{Index, TokenRecord};
use crate::nix::{CacheName, Sha256};

/// A token as presented by a client. `Debug` never shows it.
pub struct Token(Zeroizing<String>);

impl Token {
    /// A token as received.
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// The secret itself, to write it where its owner will find it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn digest(&self) -> Sha256 {
        grants::token_hash(&self.0)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// How long a token's `last_used` may lag: it is written at most this often.
const LAST_USED_STEP: u64 = 60;

/// The name of the token made at first start.
pub const FIRST_ADMIN: &str = "admin";

/// Decides who may do what, from the tokens it keeps in memory.
pub struct Authorizer {
    index: Arc<dyn Index>,
    tokens: Arc<RwLock<HashMap<Sha256, TokenRecord>>>,
    /// Held by every write of a token record, so that writes never interleave.
    writes: Arc<tokio::sync::Mutex<()>>,
    /// Where changes are announced, for the copies other processes keep.
    coord: Arc<dyn Coordination>,
    /// Where the first-start admin token was written; removed when it is revoked.
    admin_file: PathBuf,
}

/// Whether a token record lets its holder in at `at`.
fn usable(t: &TokenRecord, at: u64) -> bool {
    t.revoked.is_none() && t.expires.is_none_or(|e| at < e)
}

/// The rule: may the holder of `token` (a valid one, or none) do `wanted` on the cache
/// `name` (which is `cache`, if it exists)?
pub fn decide(
    token: Option<&TokenRecord>,
    name: &CacheName,
    cache: Option<&Cache>,
    wanted: Permission,
) -> Result<()> {
    let public_read = wanted == Permission::Pull && cache.is_some_and(|c| c.public);
    match token {
        Some(t) if t.grants.allow(name, wanted) => match cache {
            Some(_) => Ok(()),
            None => Err(Error::NotFound("cache")),
        },
        _ if public_read => Ok(()),
        Some(_) => Err(Error::Forbidden(format!(
            "the token may not {wanted} on {name}"
        ))),
        None => Err(Error::Unauthorized),
    }
}

/// A token just made: its record and its secret, shown this once.
pub struct NewToken {
    /// Its record.
    pub record: TokenRecord,
    /// Its secret.
    pub secret: Zeroizing<String>,
}

/// Whether `name` may name a token: 1 to 64 letters, digits, `.`, `_`, `-` or `@`.
pub fn valid_token_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-@".contains(&c))
}

impl Authorizer {
    /// Loads the tokens. A token file from before tokens were recorded (or from a start
    /// that died before its record was durable) is taken in as the first admin token.
    /// When no usable server admin token is left (the first start, or all of them
    /// expired), makes one, written to `<data_dir>/admin-token` (mode 0600): whoever
    /// can restart the server and read its data directory can always administer it.
    /// Returns the authorizer and the secret of a token made now.
    pub async fn open(
        index: Arc<dyn Index>,
        coord: Arc<dyn Coordination>,
        data_dir: &Path,
    ) -> anyhow::Result<(Self, Option<Token>)> {
        let admin_file = data_dir.join("admin-token");
        let mut tokens: HashMap<Sha256, TokenRecord> = index
            .tokens()
            .await?
            .into_iter()
            .map(|t| (t.hash, t))
            .collect();
        let file = match std::fs::read_to_string(&admin_file) {
            Ok(text) => Some(Token::new(text.trim().to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => anyhow::bail!("reading {}: {e}", admin_file.display()),
        };
        if let Some(t) = file {
            anyhow::ensure!(!t.expose().is_empty(), "{} is empty", admin_file.display());
            match tokens.get(&t.digest()) {
                // Revoked, and the start that revoked it died before removing the file.
                Some(r) if r.revoked.is_some() => remove_file(&admin_file),
                Some(_) => {}
                None if tokens.is_empty() => {
                    let record = first_admin(FIRST_ADMIN, t.digest());
                    index.put_token(&record).await?;
                    index.flush().await?;
                    tokens.insert(record.hash, record);
                }
                None => tracing::warn!(
                    file = %admin_file.display(),
                    "this file holds a token the server does not know; it is ignored"
                ),
            }
        }
        let at = now();
        let mut created = None;
        if !tokens
            .values()
            .any(|t| usable(t, at) && t.grants.server_admin())
        {
            let taken = tokens
                .values()
                .any(|t| t.name == FIRST_ADMIN && t.revoked.is_none());
            let name = match taken {
                true => format!("{FIRST_ADMIN}-{at}"),
                false => FIRST_ADMIN.to_owned(),
            };
            if !tokens.is_empty() {
                tracing::warn!(token = %name, file = %admin_file.display(), "no server admin token was usable (all expired): made a new one");
            }
            // The file first: a start that dies before the record is durable finds
            // the file and records it then.
            let secret = Token::new(grants::new_token_secret().to_string());
            crate::secret_file::write(&admin_file, secret.expose())?;
            let record = first_admin(&name, secret.digest());
            index.put_token(&record).await?;
            index.flush().await?;
            tokens.insert(record.hash, record);
            created = Some(secret);
        }
        let auth = Self {
            index,
            coord,
            tokens: Arc::new(RwLock::new(tokens)),
            writes: Arc::new(tokio::sync::Mutex::new(())),
            admin_file,
        };
        Ok((auth, created))
    }

    /// The record of a usable token, if `token` is one. Notes its use, at most once
    /// a minute.
    pub fn identify(&self, token: Option<&Token>) -> Option<TokenRecord> {
        let token = token.filter(|t| !t.expose().is_empty())?;
        let hash = token.digest();
        let at = now();
        let record = {
            let tokens = self.tokens.read().expect("never poisoned");
            tokens.get(&hash).filter(|t| usable(t, at))?.clone()
        };
        if record.last_used.is_some_and(|u| u + LAST_USED_STEP > at) {
            return Some(record);
        }
        let current = {
            let mut tokens = self.tokens.write().expect("never poisoned");
            let current = tokens.get_mut(&hash).filter(|t| usable(t, at))?;
            // Another request noted it meanwhile: one write a minute.
            if current.last_used.is_some_and(|u| u + LAST_USED_STEP > at) {
                return Some(current.clone());
            }
            current.last_used = Some(at);
            current.clone()
        };
        // Written in the background, not flushed: a lost last-used time costs nothing.
        // The write holds `writes` and writes the record as it is then, so it cannot
        // put back a record that a revocation replaced meanwhile.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (index, tokens, writes) =
                (self.index.clone(), self.tokens.clone(), self.writes.clone());
            runtime.spawn(async move {
                let _writing = writes.lock().await;
                let now = tokens.read().expect("never poisoned").get(&hash).cloned();
                if let Some(record) = now {
                    if let Err(e) = index.put_token(&record).await {
                        tracing::warn!(token = %record.name, error = %e, "could not record a token's use");
                    }
                }
            });
        }
        Some(current)
    }

    /// The cache `name`, if the holder of `token` may do `wanted` on it.
    pub fn cache(
        &self,
        caches: &Caches,
        token: Option<&Token>,
        name: &CacheName,
        wanted: Permission,
    ) -> Result<Arc<Cache>> {
        let cache = caches.get(name);
        let holder = match (token, &cache) {
            // Anyone may read a public cache: no token is looked up.
            (_, Some(c)) if c.public && wanted == Permission::Pull => return Ok(c.clone()),
            (None, _) => None,
            (Some(_), _) => self.identify(token),
        };
        decide(holder.as_ref(), name, cache.as_deref(), wanted)?;
        Ok(cache.expect("decide allows only existing caches"))
    }

    /// The record of `token` if it is usable; 401 if it is not.
    pub fn bearer(&self, token: Option<&Token>) -> Result<TokenRecord> {
        self.identify(token).ok_or(Error::Unauthorized)
    }

    /// The record of `token` if it makes its holder the server's administrator.
    pub fn server_admin(&self, token: Option<&Token>) -> Result<TokenRecord> {
        let record = self.bearer(token)?;
        if !record.grants.server_admin() {
            return Err(Error::Forbidden(
                "the token is not a server admin token (admin on '*')".into(),
            ));
        }
        Ok(record)
    }

    /// Every token, by name.
    pub fn list(&self) -> Vec<TokenRecord> {
        let mut all: Vec<_> = self
            .tokens
            .read()
            .expect("never poisoned")
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Writes `record` durably, then serves it. Called holding `writes`; the map's lock
    /// is not held while the disk syncs, so requests go on meanwhile.
    async fn store(&self, record: &TokenRecord) -> Result<()> {
        self.index.put_token(record).await?;
        self.index.flush().await?;
        self.tokens
            .write()
            .expect("never poisoned")
            .insert(record.hash, record.clone());
        self.coord.announce(Change::Tokens).await;
        Ok(())
    }

    /// Reads the tokens again (another process changed them).
    pub async fn reload(&self) -> Result<()> {
        let _writing = self.writes.lock().await;
        let tokens = self.index.tokens().await?;
        *self.tokens.write().expect("never poisoned") =
            tokens.into_iter().map(|t| (t.hash, t)).collect();
        Ok(())
    }

    /// Makes a token. Names are unique among tokens not revoked.
    pub async fn create(
        &self,
        name: &str,
        grants: Grants,
        expires: Option<u64>,
    ) -> Result<NewToken> {
        if !valid_token_name(name) {
            return Err(Error::BadBody(format!(
                "token name {name:?} must be 1 to 64 letters, digits, '.', '_', '-' or '@'"
            )));
        }
        if grants.permissions.is_empty() || grants.caches.is_empty() {
            return Err(Error::BadBody(
                "a token needs at least one permission and one cache pattern".into(),
            ));
        }
        let at = now();
        if expires.is_some_and(|e| e <= at) {
            return Err(Error::BadBody("the expiry is in the past".into()));
        }
        let _writing = self.writes.lock().await;
        if self
            .list()
            .iter()
            .any(|t| t.name == name && t.revoked.is_none())
        {
            return Err(Error::Conflict(format!("a token named {name} exists")));
        }
        let secret = grants::new_token_secret();
        let record = TokenRecord {
            name: name.to_owned(),
            hash: grants::token_hash(&secret),
            grants,
            created: at,
            expires,
            last_used: None,
            revoked: None,
        };
        self.store(&record).await?;
        Ok(NewToken { record, secret })
    }

    /// Revokes the token `name`, from its holder's next request on. The last usable
    /// server admin token stays: without it nobody could administer the server.
    pub async fn revoke(&self, name: &str) -> Result<TokenRecord> {
        let at = now();
        let _writing = self.writes.lock().await;
        let all = self.list();
        let Some(record) = all.iter().find(|t| t.name == name && t.revoked.is_none()) else {
            return Err(Error::NotFound("token"));
        };
        let other_admins = all
            .iter()
            .filter(|t| t.hash != record.hash && usable(t, at) && t.grants.server_admin())
            .count();
        if record.grants.server_admin() && usable(record, at) && other_admins == 0 {
            return Err(Error::Conflict(format!(
                "token {name} is the last server admin token: create another one first"
            )));
        }
        let revoked = TokenRecord {
            revoked: Some(at),
            ..record.clone()
        };
        self.store(&revoked).await?;
        if self.file_holds(&revoked.hash) {
            remove_file(&self.admin_file);
        }
        Ok(revoked)
    }

    fn file_holds(&self, hash: &Sha256) -> bool {
        std::fs::read_to_string(&self.admin_file)
            .map(|t| grants::token_hash(t.trim()) == *hash)
            .unwrap_or(false)
    }
}

fn first_admin(name: &str, hash: Sha256) -> TokenRecord {
    TokenRecord {
        name: name.into(),
        hash,
        grants: Grants {
            permissions: vec![Permission::Admin],
            caches: vec![CachePattern::any()],
        },
        created: now(),
        expires: None,
        last_used: None,
        revoked: None,
    }
}

fn remove_file(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(file = %path.display(), error = %e, "could not remove the revoked admin token's file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::MemoryIndex;

    fn local() -> Arc<dyn Coordination> {
        Arc::new(crate::coord::LocalCoordination::default())
    }
    use crate::nix::signing::SecretKey;

    fn grants(perms: &[Permission], caches: &[&str]) -> Grants {
        Grants {
            permissions: perms.to_vec(),
            caches: caches.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    fn token(g: Grants) -> TokenRecord {
        TokenRecord {
            name: "t".into(),
            hash: Sha256::digest(b"t"),
            grants: g,
            created: 0,
            expires: None,
            last_used: None,
            revoked: None,
        }
    }

    fn status(r: Result<()>) -> u16 {
        match r {
            Ok(()) => 200,
            Err(Error::NotFound(_)) => 404,
            Err(Error::Unauthorized) => 401,
            Err(Error::Forbidden(_)) => 403,
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn private_and_missing_caches_look_alike_without_a_token() {
        use Permission::*;
        let key = || SecretKey::generate("k-1").unwrap();
        let public = Cache::for_test("a", true, key());
        let private = Cache::for_test("b", false, key());
        let a: CacheName = "a".parse().unwrap();
        let b: CacheName = "b".parse().unwrap();
        let gone: CacheName = "gone".parse().unwrap();
        assert_eq!(status(decide(None, &a, Some(&public), Pull)), 200);
        assert_eq!(status(decide(None, &a, Some(&public), Push)), 401);
        assert_eq!(status(decide(None, &b, Some(&private), Pull)), 401);
        assert_eq!(status(decide(None, &gone, None, Pull)), 401);
        let push_a = token(grants(&[Push], &["a"]));
        assert_eq!(status(decide(Some(&push_a), &a, Some(&public), Push)), 200);
        assert_eq!(
            status(decide(Some(&push_a), &a, Some(&public), Delete)),
            403
        );
        assert_eq!(status(decide(Some(&push_a), &b, Some(&private), Pull)), 403);
        assert_eq!(status(decide(Some(&push_a), &gone, None, Pull)), 403);
        let all = token(grants(&[Pull], &["*"]));
        assert_eq!(status(decide(Some(&all), &b, Some(&private), Pull)), 200);
        assert_eq!(status(decide(Some(&all), &gone, None, Pull)), 404);
    }

    #[tokio::test]
    async fn the_first_admin_token_is_made_once_and_revocable_only_with_another() {
        let dir = tempfile::tempdir().unwrap();
        let index: Arc<dyn Index> = Arc::new(MemoryIndex::new());
        let (auth, made) = Authorizer::open(index.clone(), local(), dir.path())
            .await
            .unwrap();
        let first = made.expect("made on the first start");
        assert!(first.expose().starts_with(grants::TOKEN_PREFIX));
        let (again, none) = Authorizer::open(index.clone(), local(), dir.path())
            .await
            .unwrap();
        assert!(none.is_none());
        assert!(again.server_admin(Some(&first)).is_ok());
        assert!(matches!(
            auth.revoke(FIRST_ADMIN).await,
            Err(Error::Conflict(_))
        ));
        let second = auth
            .create("ops", grants(&[Permission::Admin], &["*"]), None)
            .await
            .unwrap();
        auth.revoke(FIRST_ADMIN).await.unwrap();
        assert!(matches!(
            auth.server_admin(Some(&first)),
            Err(Error::Unauthorized)
        ));
        assert!(!dir.path().join("admin-token").exists());
        let second = Token::new(second.secret.to_string());
        assert_eq!(auth.server_admin(Some(&second)).unwrap().name, "ops");
        assert!(matches!(auth.revoke("ops").await, Err(Error::Conflict(_))));
        // A restart knows the revocation.
        let (restarted, none) = Authorizer::open(index, local(), dir.path()).await.unwrap();
        assert!(none.is_none());
        assert!(restarted.identify(Some(&first)).is_none());
        assert!(restarted.identify(Some(&second)).is_some());
    }

    #[tokio::test]
    async fn a_server_whose_admin_tokens_all_expired_makes_a_new_one_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let index: Arc<dyn Index> = Arc::new(MemoryIndex::new());
        let (auth, _) = Authorizer::open(index.clone(), local(), dir.path())
            .await
            .unwrap();
        let ops = auth
            .create(
                "ops",
                grants(&[Permission::Admin], &["*"]),
                Some(now() + 3600),
            )
            .await
            .unwrap();
        auth.revoke(FIRST_ADMIN).await.unwrap();
        // The clock passes its expiry.
        let expired = TokenRecord {
            expires: Some(now() - 1),
            ..ops.record
        };
        index.put_token(&expired).await.unwrap();
        let (restarted, made) = Authorizer::open(index, local(), dir.path()).await.unwrap();
        let made = made.expect("a new admin token");
        assert_eq!(
            restarted.server_admin(Some(&made)).unwrap().name,
            FIRST_ADMIN
        );
        let file = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
        assert_eq!(file.trim(), made.expose());
        assert!(restarted
            .identify(Some(&Token::new(ops.secret.to_string())))
            .is_none());
    }

    #[tokio::test]
    async fn a_token_file_from_before_records_is_taken_in_and_expiry_holds() {
        let dir = tempfile::tempdir().unwrap();
        let old = "ab".repeat(32);
        std::fs::write(dir.path().join("admin-token"), format!("{old}\n")).unwrap();
        let index: Arc<dyn Index> = Arc::new(MemoryIndex::new());
        let (auth, made) = Authorizer::open(index, local(), dir.path()).await.unwrap();
        assert!(made.is_none());
        assert!(auth.server_admin(Some(&Token::new(old))).is_ok());
        let soon = auth
            .create(
                "soon",
                grants(&[Permission::Pull], &["a"]),
                Some(now() + 3600),
            )
            .await
            .unwrap();
        let t = Token::new(soon.secret.to_string());
        assert!(auth.identify(Some(&t)).is_some());
        // Expired, as the clock would make it.
        auth.tokens
            .write()
            .unwrap()
            .get_mut(&soon.record.hash)
            .unwrap()
            .expires = Some(now());
        assert!(auth.identify(Some(&t)).is_none());
        assert!(auth
            .create("x", grants(&[Permission::Pull], &["a"]), Some(1))
            .await
            .is_err());
        assert!(auth
            .create("bad name", grants(&[Permission::Pull], &["a"]), None)
            .await
            .is_err());
        assert!(matches!(
            auth.create("soon", grants(&[Permission::Pull], &["a"]), None)
                .await,
            Err(Error::Conflict(_))
        ));
    }
}
