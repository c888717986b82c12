//! The caches this server holds, with their signing keys loaded: made from the config
//! file at start, and created, changed and deleted at run time through the admin API.
//!
//! Each cache has its own locks (`coord`). A publication holds `shared` from before it
//! looks its cache up until its narinfo is committed; a change of the cache's keys,
//! settings or existence takes `exclusive`, which waits for the publications under
//! way, so every narinfo published after the change sees it and every one before it
//! is done (and found by a walk over the narinfos that follows). The methods that
//! change a cache take the `Exclusive` guard as proof. `key_change` is held through a
//! whole key rotation or re-signing, its walk included, and by a deletion, so that
//! two walks never interleave their rewrites.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::clock::now;
use crate::config::{CacheConfig, Config};
use crate::coord::{Change, Coordination, Exclusive};
use crate::error::{Error, Result};
use crate::index::{CacheRecord, Index, KeyRecord, Retention};
use crate::keyfiles::{self, KeyFiles};
use crate::keyseal::Sealer;
use crate::nix::signing::{PublicKey, SecretKey};
use crate::nix::CacheName;

/// A cache as requests see it.
pub struct Cache {
    /// Its name.
    pub name: CacheName,
    /// Whether anyone may pull from it.
    pub public: bool,
    /// The priority its `nix-cache-info` announces.
    pub priority: u32,
    /// Whether the signatures clients send are served beside the cache's own.
    pub keep_client_signatures: bool,
    /// The keys that sign what it publishes, oldest first: one, or two while a key
    /// rotation is under way. Never empty.
    pub signers: Vec<SecretKey>,
    /// The names of all its keys, retired ones included: signatures under these names
    /// are the cache's own, never a client's.
    pub key_names: Vec<String>,
    /// Whether it is declared in the config file (which then owns its settings).
    pub declared: bool,
    /// Its record, as stored.
    pub record: CacheRecord,
}

impl Cache {
    /// The newest signing key's public half: what hosts should trust.
    pub fn public_key(&self) -> PublicKey {
        self.signers
            .last()
            .expect("a cache always has a signing key")
            .public()
    }

    /// The public halves of every signing key, oldest first.
    pub fn signing_keys(&self) -> Vec<String> {
        self.signers
            .iter()
            .map(|k| k.public().to_string())
            .collect()
    }

    /// A cache signing with `key`, for tests of what lies above.
    pub fn for_test(name: &str, public: bool, key: SecretKey) -> Self {
        let record = CacheRecord {
            name: name.parse().expect("a valid name"),
            public,
            priority: 40,
            keys: vec![key_record(&key, None)],
            keep_client_signatures: true,
            retention: Retention::default(),
            quota_bytes: None,
            created: 0,
        };
        Self::new(record, vec![key], false)
    }

    fn new(record: CacheRecord, signers: Vec<SecretKey>, declared: bool) -> Self {
        Self {
            name: record.name.clone(),
            public: record.public,
            priority: record.priority,
            keep_client_signatures: record.keep_client_signatures,
            key_names: record.keys.iter().map(|k| k.name.clone()).collect(),
            signers,
            declared,
            record,
        }
    }
}

/// A cache to create at run time.
pub struct NewCache {
    /// Whether anyone may pull from it.
    pub public: bool,
    /// The priority its `nix-cache-info` announces.
    pub priority: u32,
    /// Whether client signatures are served.
    pub keep_client_signatures: bool,
    /// What the garbage collector keeps.
    pub retention: Retention,
    /// The most stored bytes it may hold.
    pub quota_bytes: Option<u64>,
    /// An imported signing key; a key named `<cache>-1` is generated when none.
    pub key: Option<SecretKey>,
}

/// A change to a cache's settings; `None` leaves a setting as it is.
#[derive(Debug, Default, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheChange {
    /// Public or private.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<bool>,
    /// The announced priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Whether client signatures are served (to narinfos published from now on, and
    /// to all of them at the next `key resign`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_client_signatures: Option<bool>,
    /// The maximum age, in seconds; `Some(None)` removes the limit.
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_age_secs: Option<Option<u64>>,
    /// The maximum size, in bytes; `Some(None)` removes the limit.
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_size_bytes: Option<Option<u64>>,
    /// The quota, in stored bytes; `Some(None)` removes it (the server's default, if
    /// any, applies then).
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub quota_bytes: Option<Option<u64>>,
}

/// `null` as "remove the limit", a missing field as "leave it".
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Option<u64>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(inner) => inner.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
        Option::<u64>::deserialize(d).map(Some)
    }
}

/// Names that would shadow the server's own routes.
const RESERVED: &[&str] = &["_api", "api", "metrics", "health", "ready", "static"];

/// Refuses a name the server keeps for itself.
pub fn check_name(name: &CacheName) -> Result<()> {
    if RESERVED.contains(&name.as_str()) {
        return Err(Error::BadBody(format!(
            "cache name {name} is reserved ({})",
            RESERVED.join(", ")
        )));
    }
    Ok(())
}

/// Every cache of the server, by name.
pub struct Caches {
    map: RwLock<HashMap<CacheName, Arc<Cache>>>,
    index: Arc<dyn Index>,
    keys: KeyFiles,
    declared: HashMap<CacheName, CacheConfig>,
    /// Where changes are announced, for the copies other processes keep.
    coord: Arc<dyn Coordination>,
    /// With a key encryption file, new keys are sealed in their records (every
    /// process can sign) instead of written to files of this machine.
    sealer: Option<Sealer>,
    /// Held by a change from its write to the index until this process's copy follows,
    /// and by a reading again of the caches.
    changing: tokio::sync::Mutex<()>,
}

impl Caches {
    /// The cache `name`, if there is one.
    pub fn get(&self, name: &CacheName) -> Option<Arc<Cache>> {
        self.map
            .read()
            .expect("cache map lock is never poisoned")
            .get(name)
            .cloned()
    }

    /// Every cache, by name.
    pub fn all(&self) -> Vec<Arc<Cache>> {
        let mut all: Vec<_> = self
            .map
            .read()
            .expect("never poisoned")
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Creates the configured caches that are missing (or `main` on an empty data
    /// directory), updates the settings of those that changed in the config, loads
    /// every cache and its keys, and removes key files no cache names.
    pub async fn open(
        index: Arc<dyn Index>,
        coord: Arc<dyn Coordination>,
        config: &Config,
    ) -> anyhow::Result<Self> {
        let mut records = index.caches().await?;
        let wanted: Vec<CacheConfig> = if config.caches.is_empty() && records.is_empty() {
            vec![CacheConfig {
                name: "main".parse().expect("a valid name"),
                public: true,
                priority: 40,
                key_name: None,
                secret_key_file: None,
            }]
        } else {
            config.caches.clone()
        };
        let keys = KeyFiles::new(config.data_dir.join("keys"));
        let sealer = config
            .index
            .key_encryption_file
            .as_deref()
            .map(Sealer::from_file)
            .transpose()?;
        // Only what changed is written: a start on a full disk must not need to write.
        let mut changed = false;
        for record in &mut records {
            changed |= complete_migrated_keys(record)?;
        }
        for c in &wanted {
            check_name(&c.name).map_err(|e| anyhow::anyhow!("config: {e}"))?;
            if let Some(existing) = records.iter_mut().find(|r| r.name == c.name) {
                changed |= apply_config(existing, c)?;
                continue;
            }
            // What a deletion interrupted by a crash left under this name goes first.
            index.purge_cache(&c.name).await?;
            let (key, file) = match &c.secret_key_file {
                Some(file) => (keyfiles::read(file)?, Some(file.clone())),
                None => {
                    let name = c
                        .key_name
                        .clone()
                        .unwrap_or_else(|| format!("{}-1", c.name));
                    let file = keys.first(&c.name);
                    match (&sealer, file.exists()) {
                        (_, true) => (keyfiles::read(&file)?, Some(file)),
                        (Some(_), false) => (new_key(&name)?, None),
                        (None, false) => (keys.generate(&file, &name)?, Some(file)),
                    }
                }
            };
            let mut kept = key_record(&key, None);
            match file {
                Some(file) => kept.secret_key_file = Some(file),
                None => {
                    let sealer = sealer.as_ref().expect("a key without a file is sealed");
                    kept.sealed_secret_key = Some(sealer.seal(&c.name, &key));
                }
            }
            records.push(CacheRecord {
                name: c.name.clone(),
                public: c.public,
                priority: c.priority,
                keys: vec![kept],
                keep_client_signatures: true,
                retention: Retention::default(),
                quota_bytes: None,
                created: now(),
            });
            tracing::info!(cache = %c.name, "created cache");
            changed = true;
        }
        if changed {
            for r in &records {
                index.put_cache(r).await?;
            }
            index.flush().await?;
        }
        let named: HashSet<PathBuf> = records
            .iter()
            .flat_map(|r| r.keys.iter().filter_map(|k| k.secret_key_file.clone()))
            .collect();
        keys.sweep(&named);
        let declared: HashMap<CacheName, CacheConfig> = config
            .caches
            .iter()
            .map(|c| (c.name.clone(), c.clone()))
            .collect();
        let mut map = HashMap::new();
        for r in records {
            let is_declared = declared.contains_key(&r.name);
            let cache = load(r, is_declared, sealer.as_ref())?;
            map.insert(cache.name.clone(), Arc::new(cache));
        }
        Ok(Self {
            map: RwLock::new(map),
            index,
            keys,
            declared,
            coord,
            sealer,
            changing: tokio::sync::Mutex::new(()),
        })
    }

    /// Keeps a new key of `cache`: sealed in its record with a key encryption file,
    /// else in a file of its own.
    fn keep(&self, cache: &CacheName, key: &SecretKey) -> Result<KeyRecord> {
        let mut kept = key_record(key, None);
        match &self.sealer {
            Some(sealer) => kept.sealed_secret_key = Some(sealer.seal(cache, key)),
            None => {
                let file = self.keys.fresh(cache);
                self.keys.write(&file, key).map_err(internal)?;
                kept.secret_key_file = Some(file);
            }
        }
        Ok(kept)
    }

    /// Brings this process's copy of cache `name` up to the index's, if another
    /// process changed it and its notice has not arrived yet: a publication under
    /// `shared` then signs with the keys the cache has now. One read of the caches'
    /// records; the copies are loaded again only when that one differs.
    pub async fn refresh(&self, name: &CacheName) -> Result<()> {
        let records = self.index.caches().await?;
        let stored = records.iter().find(|r| &r.name == name);
        let current = self.get(name);
        if stored != current.as_ref().map(|c| &c.record) {
            self.reload().await.map_err(internal)?;
        }
        Ok(())
    }

    /// Reads the caches again (another process changed them): a cache whose record
    /// is unchanged is kept as it is, one changed is loaded anew, one gone goes.
    pub async fn reload(&self) -> anyhow::Result<()> {
        // Not between a change's write and its copy here: the snapshot read would
        // bring back what the change just removed, or an older record.
        let _changing = self.changing.lock().await;
        let records = self.index.caches().await?;
        let current = self.map.read().expect("never poisoned").clone();
        let mut map = HashMap::with_capacity(records.len());
        for r in records {
            let cache = match current.get(&r.name) {
                Some(c) if c.record == r => c.clone(),
                _ => {
                    let declared = self.declared.contains_key(&r.name);
                    Arc::new(load(r, declared, self.sealer.as_ref())?)
                }
            };
            map.insert(cache.name.clone(), cache);
        }
        *self.map.write().expect("never poisoned") = map;
        Ok(())
    }

    /// Creates a cache at run time: its record and key, durably.
    pub async fn create(&self, lock: &Exclusive, new: NewCache) -> Result<Arc<Cache>> {
        let name = lock.name();
        check_name(name)?;
        if self.get(name).is_some() {
            return Err(Error::Conflict(format!("cache {name} exists")));
        }
        // A deletion cut short may have left records under the name: they go first.
        self.index.purge_cache(name).await?;
        let key = match new.key {
            Some(key) => key,
            None => new_key(&format!("{name}-1")).map_err(internal)?,
        };
        let record = CacheRecord {
            name: name.clone(),
            public: new.public,
            priority: new.priority,
            keys: vec![self.keep(name, &key)?],
            keep_client_signatures: new.keep_client_signatures,
            retention: new.retention,
            quota_bytes: new.quota_bytes,
            created: now(),
        };
        self.store(record).await
    }

    /// Changes a cache's settings. The config file owns a declared cache's public and
    /// priority settings. Under `exclusive` because whether client signatures are kept
    /// changes what publications sign.
    pub async fn update(&self, lock: &Exclusive, change: &CacheChange) -> Result<Arc<Cache>> {
        let name = lock.name();
        let cache = self.get(name).ok_or(Error::NotFound("cache"))?;
        if cache.declared && (change.public.is_some() || change.priority.is_some()) {
            return Err(Error::Conflict(format!(
                "cache {name} is declared in the config file: change its public and priority settings there"
            )));
        }
        let mut record = cache.record.clone();
        record.public = change.public.unwrap_or(record.public);
        record.priority = change.priority.unwrap_or(record.priority);
        record.keep_client_signatures = change
            .keep_client_signatures
            .unwrap_or(record.keep_client_signatures);
        if let Some(age) = change.max_age_secs {
            record.retention.max_age_secs = age;
        }
        if let Some(size) = change.max_size_bytes {
            record.retention.max_size_bytes = size;
        }
        if let Some(quota) = change.quota_bytes {
            record.quota_bytes = quota;
        }
        self.store(record).await
    }

    /// Deletes a cache: it stops being served at once; then its record goes durably,
    /// then its narinfos, claims, uploads, logs and realisations, then its key files.
    pub async fn delete(&self, lock: &Exclusive) -> Result<()> {
        let name = lock.name();
        let cache = self.get(name).ok_or(Error::NotFound("cache"))?;
        if cache.declared {
            return Err(Error::Conflict(format!(
                "cache {name} is declared in the config file: remove it there first"
            )));
        }
        let changing = self.changing.lock().await;
        self.map.write().expect("never poisoned").remove(name);
        if let Err(e) = self.index.delete_cache(name).await {
            // Served again if its record is still there.
            if self
                .index
                .caches()
                .await
                .is_ok_and(|all| all.iter().any(|r| r.name == *name))
            {
                self.map
                    .write()
                    .expect("never poisoned")
                    .insert(name.clone(), cache);
            }
            return Err(e.into());
        }
        for k in &cache.record.keys {
            if let Some(file) = &k.secret_key_file {
                self.keys.remove(file);
            }
        }
        drop(changing);
        self.coord.announce(Change::Caches).await;
        tracing::info!(cache = %name, "deleted cache");
        Ok(())
    }

    /// Adds a signing key (`imported`, or a new `<cache>-N`) beside the current one:
    /// from now on both sign. During a rotation under way (two signers already), adds
    /// nothing: the caller's walk finishes that rotation. Returns the cache and whether
    /// a key was added.
    pub async fn add_signer(
        &self,
        lock: &Exclusive,
        imported: Option<SecretKey>,
    ) -> Result<(Arc<Cache>, bool)> {
        let name = lock.name();
        let cache = self.get(name).ok_or(Error::NotFound("cache"))?;
        if cache.signers.len() > 1 {
            return match imported {
                None => Ok((cache, false)),
                Some(_) => Err(Error::Conflict(format!(
                    "a key rotation of {name} is under way: run `key resign` to finish it first"
                ))),
            };
        }
        if self
            .declared
            .get(name)
            .is_some_and(|c| c.secret_key_file.is_some())
        {
            return Err(Error::Conflict(format!(
                "the key of {name} is set in the config file (secret_key_file): change it there"
            )));
        }
        let key = match imported {
            Some(key) => key,
            None => {
                let mut n = cache.record.keys.len() + 1;
                while cache.key_names.contains(&format!("{name}-{n}")) {
                    n += 1;
                }
                SecretKey::generate(&format!("{name}-{n}")).map_err(internal)?
            }
        };
        if cache.key_names.iter().any(|k| k == key.name()) {
            return Err(Error::Conflict(format!(
                "cache {name} already has a key named {}",
                key.name()
            )));
        }
        let mut record = cache.record.clone();
        record.keys.push(self.keep(name, &key)?);
        Ok((self.store(record).await?, true))
    }

    /// Retires every signing key but the newest. A retired key signs nothing more, so
    /// its file goes as soon as the record no longer names it (the walk that follows
    /// only removes its signatures). Returns the cache and the retired keys' names.
    pub async fn retire_old_signers(&self, lock: &Exclusive) -> Result<(Arc<Cache>, Vec<String>)> {
        let cache = self.get(lock.name()).ok_or(Error::NotFound("cache"))?;
        let newest = cache.signers.last().map(|k| k.name().to_owned());
        let mut record = cache.record.clone();
        let mut files = Vec::new();
        let mut retired = Vec::new();
        for k in &mut record.keys {
            if k.signing && Some(&k.name) != newest.as_ref() {
                k.signing = false;
                k.sealed_secret_key = None;
                files.extend(k.secret_key_file.take());
                retired.push(k.name.clone());
            }
        }
        if retired.is_empty() {
            return Ok((cache, retired));
        }
        let stored = self.store(record).await?;
        for file in &files {
            self.keys.remove(file);
        }
        Ok((stored, retired))
    }

    /// Records a cache durably and serves it from now on.
    async fn store(&self, record: CacheRecord) -> Result<Arc<Cache>> {
        let _changing = self.changing.lock().await;
        self.index.put_cache(&record).await?;
        self.index.flush().await?;
        let declared = self.declared.contains_key(&record.name);
        let cache = Arc::new(load(record, declared, self.sealer.as_ref()).map_err(internal)?);
        self.map
            .write()
            .expect("never poisoned")
            .insert(cache.name.clone(), cache.clone());
        self.coord.announce(Change::Caches).await;
        Ok(cache)
    }
}

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

/// A new key named `name`.
fn new_key(name: &str) -> anyhow::Result<SecretKey> {
    SecretKey::generate(name).map_err(|e| anyhow::anyhow!("key name {name:?}: {e}"))
}

fn key_record(key: &SecretKey, file: Option<PathBuf>) -> KeyRecord {
    KeyRecord {
        name: key.name().to_owned(),
        public_key: key.public().to_string(),
        secret_key_file: file,
        sealed_secret_key: None,
        signing: true,
        created: now(),
    }
}

/// Fills in the name and public key of keys migrated from a format that recorded only
/// their file; true if it changed the record.
fn complete_migrated_keys(record: &mut CacheRecord) -> anyhow::Result<bool> {
    let mut changed = false;
    for k in record.keys.iter_mut().filter(|k| k.name.is_empty()) {
        let Some(file) = &k.secret_key_file else {
            anyhow::bail!("cache {}: a key without a name or a file", record.name);
        };
        let key = keyfiles::read(file)?;
        k.name = key.name().to_owned();
        k.public_key = key.public().to_string();
        changed = true;
    }
    Ok(changed)
}

/// Applies the config's settings to a declared cache's record; true if it changed it.
fn apply_config(record: &mut CacheRecord, c: &CacheConfig) -> anyhow::Result<bool> {
    let before = record.clone();
    record.public = c.public;
    record.priority = c.priority;
    // A configured key file the cache does not sign with takes over as its one
    // signer: the operator changed the file in the config.
    if let Some(file) = &c.secret_key_file {
        let signs = record
            .keys
            .iter()
            .any(|k| k.signing && k.secret_key_file.as_ref() == Some(file));
        if !signs {
            let key = keyfiles::read(file)?;
            for k in &mut record.keys {
                k.signing = false;
            }
            record.keys.retain(|k| k.name != key.name());
            record.keys.push(key_record(&key, Some(file.clone())));
        }
    }
    Ok(*record != before)
}

/// Loads a cache's signing keys: from their files, or sealed in the record.
fn load(record: CacheRecord, declared: bool, sealer: Option<&Sealer>) -> anyhow::Result<Cache> {
    let mut signers = Vec::new();
    for k in record.keys.iter().filter(|k| k.signing) {
        if let Some(sealed) = &k.sealed_secret_key {
            let sealer = sealer.ok_or_else(|| {
                anyhow::anyhow!(
                    "cache {}: signing key {} is sealed in the index; set \
                     index.key_encryption_file to the file it was sealed with",
                    record.name,
                    k.name
                )
            })?;
            signers.push(sealer.open(&record.name, &k.name, sealed)?);
            continue;
        }
        let file = k.secret_key_file.as_ref().ok_or_else(|| {
            anyhow::anyhow!("cache {}: signing key {} has no file", record.name, k.name)
        })?;
        let key = keyfiles::read(file)?;
        anyhow::ensure!(
            key.name() == k.name,
            "cache {}: {} holds key {:?}, not {:?}",
            record.name,
            file.display(),
            key.name(),
            k.name
        );
        signers.push(key);
    }
    anyhow::ensure!(
        !signers.is_empty(),
        "cache {} has no signing key",
        record.name
    );
    Ok(Cache::new(record, signers, declared))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::MemoryIndex;

    fn local() -> Arc<dyn Coordination> {
        Arc::new(crate::coord::LocalCoordination::default())
    }

    fn config(dir: &std::path::Path, toml_text: &str) -> Config {
        let mut c: Config = toml::from_str(toml_text).unwrap();
        c.data_dir = dir.to_owned();
        c
    }

    fn name(s: &str) -> CacheName {
        s.parse().unwrap()
    }

    fn new_cache() -> NewCache {
        NewCache {
            public: true,
            priority: 40,
            keep_client_signatures: true,
            retention: Retention::default(),
            quota_bytes: None,
            key: None,
        }
    }

    #[tokio::test]
    async fn with_a_key_encryption_file_every_process_signs_with_keys_sealed_in_the_index() {
        let index: Arc<dyn Index> = Arc::new(MemoryIndex::new());
        let shared = tempfile::tempdir().unwrap();
        let kek = shared.path().join("kek");
        std::fs::write(&kek, "k".repeat(48)).unwrap();
        let replica = |dir: &std::path::Path, kek: &std::path::Path| {
            let mut c = config(dir, "");
            c.index.key_encryption_file = Some(kek.to_owned());
            c
        };
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Caches::open(index.clone(), local(), &replica(dir_a.path(), &kek))
            .await
            .unwrap();
        let b = Caches::open(index.clone(), local(), &replica(dir_b.path(), &kek))
            .await
            .unwrap();
        let coord = crate::coord::LocalCoordination::default();
        let made = a
            .create(&coord.exclusive(&name("ci")).await.unwrap(), new_cache())
            .await
            .unwrap();
        // No key file anywhere; the record holds the key sealed, not in plain text.
        assert!(!dir_a.path().join("keys").exists());
        let record = index.caches().await.unwrap();
        let ci = record.iter().find(|r| r.name == name("ci")).unwrap();
        let sealed = ci.keys[0].sealed_secret_key.clone().unwrap();
        let plain = made.signers[0].to_file_text();
        assert!(!sealed.contains(plain.split(':').nth(1).unwrap()));
        assert!(ci.keys[0].secret_key_file.is_none());
        // The other process signs with it as soon as it reads the caches again.
        b.reload().await.unwrap();
        let seen = b.get(&name("ci")).unwrap();
        assert_eq!(seen.public_key(), made.public_key());
        let sig = seen.signers[0].sign("fingerprint");
        assert!(made.public_key().verify("fingerprint", &sig));
        // A rotation through one is the other's too.
        let (rotated, added) = a
            .add_signer(&coord.exclusive(&name("ci")).await.unwrap(), None)
            .await
            .unwrap();
        assert!(added && rotated.signers.len() == 2);
        b.reload().await.unwrap();
        assert_eq!(b.get(&name("ci")).unwrap().signers.len(), 2);
        // Without the file, a sealed key cannot be loaded: said, not ignored.
        let bare = Caches::open(index.clone(), local(), &config(dir_b.path(), "")).await;
        let e = bare.err().expect("no key encryption file").to_string();
        assert!(e.contains("key_encryption_file"), "{e}");
        // With another file, neither.
        let wrong = shared.path().join("wrong");
        std::fs::write(&wrong, "w".repeat(48)).unwrap();
        let e = Caches::open(index, local(), &replica(dir_b.path(), &wrong))
            .await
            .err()
            .expect("another key encryption file")
            .to_string();
        assert!(e.contains("does not open"), "{e}");
    }

    #[tokio::test]
    async fn keys_migrated_without_their_names_are_completed_from_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let files = KeyFiles::new(dir.path().join("keys"));
        let file = files.first(&name("main"));
        let key = files.generate(&file, "main-1").unwrap();
        let index: Arc<dyn Index> = Arc::new(MemoryIndex::new());
        let migrated = KeyRecord {
            name: String::new(),
            public_key: String::new(),
            secret_key_file: Some(file),
            sealed_secret_key: None,
            signing: true,
            created: 0,
        };
        index
            .put_cache(&CacheRecord {
                name: name("main"),
                public: true,
                priority: 40,
                keys: vec![migrated],
                keep_client_signatures: true,
                retention: Retention::default(),
                quota_bytes: None,
                created: 0,
            })
            .await
            .unwrap();
        let caches = Caches::open(index.clone(), local(), &config(dir.path(), ""))
            .await
            .unwrap();
        assert_eq!(
            caches.get(&name("main")).unwrap().public_key(),
            key.public()
        );
        let stored = &index.caches().await.unwrap()[0].keys[0];
        assert_eq!(
            (stored.name.as_str(), stored.public_key.clone()),
            ("main-1", key.public().to_string())
        );
    }

    #[tokio::test]
    async fn the_config_owns_its_caches_and_run_time_caches_come_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let index: Arc<dyn Index> = Arc::new(MemoryIndex::new());
        let toml_text = "[[cache]]\nname = \"ci\"\npublic = false\n";
        let caches = Caches::open(index, local(), &config(dir.path(), toml_text))
            .await
            .unwrap();
        let coord = crate::coord::LocalCoordination::default();
        let ci = caches.get(&name("ci")).unwrap();
        assert!(ci.declared && !ci.public);
        let lock = coord.exclusive(&name("ci")).await.unwrap();
        let publish = CacheChange {
            public: Some(true),
            ..CacheChange::default()
        };
        assert!(matches!(
            caches.update(&lock, &publish).await,
            Err(Error::Conflict(_))
        ));
        let keep = CacheChange {
            max_age_secs: Some(Some(60)),
            ..CacheChange::default()
        };
        assert_eq!(
            caches
                .update(&lock, &keep)
                .await
                .unwrap()
                .record
                .retention
                .max_age_secs,
            Some(60)
        );
        assert!(matches!(
            caches.delete(&lock).await,
            Err(Error::Conflict(_))
        ));
        let (rotated, added) = caches.add_signer(&lock, None).await.unwrap();
        assert!(added);
        assert_eq!(rotated.signers.len(), 2);
        let (again, added) = caches.add_signer(&lock, None).await.unwrap();
        assert!(
            !added && again.signers.len() == 2,
            "a rotation under way is finished, not doubled"
        );
        let (resigned, retired) = caches.retire_old_signers(&lock).await.unwrap();
        assert_eq!(
            (resigned.signers.len(), retired),
            (1, vec!["ci-1".to_owned()])
        );
        drop(lock);

        let tmp = coord.exclusive(&name("tmp")).await.unwrap();
        let made = caches.create(&tmp, new_cache()).await.unwrap();
        assert!(matches!(
            caches.create(&tmp, new_cache()).await,
            Err(Error::Conflict(_))
        ));
        let file = made.record.keys[0].secret_key_file.clone().unwrap();
        assert!(file.exists());
        caches.delete(&tmp).await.unwrap();
        assert!(!file.exists() && caches.get(&name("tmp")).is_none());
        let reserved = coord.exclusive(&name("metrics")).await.unwrap();
        assert!(matches!(
            caches.create(&reserved, new_cache()).await,
            Err(Error::BadBody(_))
        ));
    }
}
