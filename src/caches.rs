//! The caches this server holds, with their signing keys loaded: made from the config
//! file at start, and created, changed and deleted at run time through the admin API.
//!
//! Every change of a cache's keys or existence takes `Caches::exclusive`, which waits
//! for the publications under way (each holds `Caches::shared` from before it looks
//! the cache up until its narinfo is committed): after it, every new narinfo is signed
//! by the new set of keys, so a walk over the narinfos that follows misses none.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::config::{CacheConfig, Config};
use crate::error::{Error, Result};
use crate::index::{CacheRecord, Index, KeyRecord, Retention};
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

    /// A cache signing with `key`, for tests of what lies above.
    pub fn for_test(name: &str, public: bool, key: SecretKey) -> Self {
        let name: CacheName = name.parse().expect("a valid name");
        let record = CacheRecord {
            name: name.clone(),
            public,
            priority: 40,
            keys: vec![KeyRecord {
                name: key.name().to_owned(),
                public_key: key.public().to_string(),
                secret_key_file: None,
                signing: true,
                created: 0,
            }],
            keep_client_signatures: true,
            retention: Retention::default(),
            created: 0,
        };
        Self {
            name,
            public,
            priority: 40,
            keep_client_signatures: true,
            key_names: vec![key.name().to_owned()],
            signers: vec![key],
            declared: false,
            record,
        }
    }
}

/// A cache to create at run time.
pub struct NewCache {
    /// Its name.
    pub name: CacheName,
    /// Whether anyone may pull from it.
    pub public: bool,
    /// The priority its `nix-cache-info` announces.
    pub priority: u32,
    /// Whether client signatures are served.
    pub keep_client_signatures: bool,
    /// What the garbage collector keeps.
    pub retention: Retention,
    /// An imported signing key; a key named `<cache>-1` is generated when none.
    pub key: Option<SecretKey>,
}

/// A change to a cache's settings; `None` leaves a setting as it is.
#[derive(Debug, Default, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheChange {
    /// Public or private.
    pub public: Option<bool>,
    /// The announced priority.
    pub priority: Option<u32>,
    /// Whether client signatures are served.
    pub keep_client_signatures: Option<bool>,
    /// The maximum age, in seconds; `Some(None)` removes the limit.
    #[serde(default, with = "double_option")]
    pub max_age_secs: Option<Option<u64>>,
    /// The maximum size, in bytes; `Some(None)` removes the limit.
    #[serde(default, with = "double_option")]
    pub max_size_bytes: Option<Option<u64>>,
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
    keys_dir: PathBuf,
    declared: HashMap<CacheName, CacheConfig>,
    changes: Arc<tokio::sync::RwLock<()>>,
    key_changes: Arc<tokio::sync::Mutex<()>>,
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

    /// Held by a publication from before it looks its cache up until it has committed.
    pub async fn shared(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.changes.read().await
    }

    /// Held by a change of a cache's keys or existence: no publication is under way.
    /// Owned, so that it can be held by a blocking task.
    pub async fn exclusive(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.changes.clone().write_owned().await
    }

    /// Held through a whole change of keys, the walk over the narinfos included, so
    /// that two such changes never interleave their rewrites.
    pub async fn key_change(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.key_changes.clone().lock_owned().await
    }

    /// The index the caches are recorded in.
    pub fn index(&self) -> &Arc<dyn Index> {
        &self.index
    }

    /// Creates the configured caches that are missing (or `main` on an empty data
    /// directory), updates the settings of those that changed in the config, then
    /// loads every cache and its keys.
    pub fn open(index: Arc<dyn Index>, config: &Config) -> anyhow::Result<Self> {
        let mut records = index.caches()?;
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
        let keys_dir = config.data_dir.join("keys");
        // Only what changed is written: a start on a full disk must not need to write.
        let mut changed = false;
        for c in &wanted {
            check_name(&c.name).map_err(|e| anyhow::anyhow!("config: {e}"))?;
            if let Some(existing) = records.iter_mut().find(|r| r.name == c.name) {
                let mut updated = existing.clone();
                updated.public = c.public;
                updated.priority = c.priority;
                // A configured key file the cache does not have takes over as its one
                // signer: the operator changed the file in the config.
                if let Some(file) = &c.secret_key_file {
                    let known = updated
                        .keys
                        .iter()
                        .any(|k| k.signing && k.secret_key_file.as_ref() == Some(file));
                    if !known {
                        let key = read_key(file)?;
                        for k in &mut updated.keys {
                            k.signing = false;
                        }
                        updated.keys.retain(|k| k.name != key.name());
                        updated.keys.push(key_record(&key, Some(file.clone())));
                    }
                }
                if updated != *existing {
                    index.put_cache(&updated)?;
                    *existing = updated;
                    changed = true;
                }
                continue;
            }
            // What a deletion interrupted by a crash left under this name goes first.
            index.purge_cache(&c.name)?;
            let key = match &c.secret_key_file {
                Some(file) => (read_key(file)?, file.clone()),
                None => {
                    let name = c
                        .key_name
                        .clone()
                        .unwrap_or_else(|| format!("{}-1", c.name));
                    // A key already there is one generated by a start that died before
                    // its cache record was durable: keep it, as clients may trust it.
                    let file = keys_dir.join(format!("{}.secret", c.name));
                    match file.exists() {
                        true => (read_key(&file)?, file),
                        false => (generate_key(&keys_dir, &file, &name)?, file),
                    }
                }
            };
            let record = CacheRecord {
                name: c.name.clone(),
                public: c.public,
                priority: c.priority,
                keys: vec![key_record(&key.0, Some(key.1))],
                keep_client_signatures: true,
                retention: Retention::default(),
                created: now(),
            };
            index.put_cache(&record)?;
            tracing::info!(cache = %record.name, "created cache");
            records.push(record);
            changed = true;
        }
        if changed {
            index.flush()?;
        }
        let declared: HashMap<CacheName, CacheConfig> = config
            .caches
            .iter()
            .map(|c| (c.name.clone(), c.clone()))
            .collect();
        let mut map = HashMap::new();
        for r in records {
            let is_declared = declared.contains_key(&r.name);
            let cache = load(r, is_declared)?;
            map.insert(cache.name.clone(), Arc::new(cache));
        }
        Ok(Self {
            map: RwLock::new(map),
            index,
            keys_dir,
            declared,
            changes: Arc::new(tokio::sync::RwLock::new(())),
            key_changes: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Creates a cache at run time: its record and keys, durably. Call under
    /// `exclusive`.
    pub fn create(&self, new: NewCache) -> Result<Arc<Cache>> {
        check_name(&new.name)?;
        if self.get(&new.name).is_some() {
            return Err(Error::Conflict(format!("cache {} exists", new.name)));
        }
        self.index.purge_cache(&new.name)?;
        let (key, file) = match new.key {
            Some(key) => {
                let file = self.new_key_file(&new.name);
                write_key(&self.keys_dir, &file, &key)?;
                (key, file)
            }
            None => {
                let file = self.new_key_file(&new.name);
                let key = generate_key(&self.keys_dir, &file, &format!("{}-1", new.name))
                    .map_err(|e| Error::Internal(e.to_string()))?;
                (key, file)
            }
        };
        let record = CacheRecord {
            name: new.name.clone(),
            public: new.public,
            priority: new.priority,
            keys: vec![key_record(&key, Some(file))],
            keep_client_signatures: new.keep_client_signatures,
            retention: new.retention,
            created: now(),
        };
        self.store(record)
    }

    /// Changes a cache's settings. Caches declared in the config file are changed there.
    pub fn update(&self, name: &CacheName, change: &CacheChange) -> Result<Arc<Cache>> {
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
        self.store(record)
    }

    /// Deletes a cache: its record, then its narinfos, claims, uploads, logs and
    /// realisations, then its key files. Call under `exclusive`.
    pub fn delete(&self, name: &CacheName) -> Result<()> {
        let cache = self.get(name).ok_or(Error::NotFound("cache"))?;
        if cache.declared {
            return Err(Error::Conflict(format!(
                "cache {name} is declared in the config file: remove it there first"
            )));
        }
        self.index.delete_cache(name)?;
        self.map.write().expect("never poisoned").remove(name);
        for k in &cache.record.keys {
            self.remove_key_file(k);
        }
        tracing::info!(cache = %name, "deleted cache");
        Ok(())
    }

    /// Adds a signing key (`imported`, or a new `<cache>-N`) beside the current one:
    /// from now on both sign. Call under `exclusive`.
    pub fn add_signer(&self, name: &CacheName, imported: Option<SecretKey>) -> Result<Arc<Cache>> {
        let cache = self.get(name).ok_or(Error::NotFound("cache"))?;
        if cache.signers.len() > 1 {
            return Err(Error::Conflict(format!(
                "a key rotation of {name} is under way: run `key resign` to finish it first"
            )));
        }
        if self.declared_key_file(name) {
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
                SecretKey::generate(&format!("{name}-{n}"))
                    .map_err(|e| Error::Internal(e.to_string()))?
            }
        };
        if cache.key_names.iter().any(|k| k == key.name()) {
            return Err(Error::Conflict(format!(
                "cache {name} already has a key named {}",
                key.name()
            )));
        }
        let file = self.new_key_file(name);
        write_key(&self.keys_dir, &file, &key)?;
        let mut record = cache.record.clone();
        record.keys.push(key_record(&key, Some(file)));
        self.store(record)
    }

    /// Retires every signing key but the newest and removes their files. Call under
    /// `exclusive`. Returns the cache and the retired keys' names.
    pub fn retire_old_signers(&self, name: &CacheName) -> Result<(Arc<Cache>, Vec<String>)> {
        let cache = self.get(name).ok_or(Error::NotFound("cache"))?;
        let newest = cache.signers.last().map(|k| k.name().to_owned());
        let mut record = cache.record.clone();
        let mut files = Vec::new();
        let mut retired = Vec::new();
        for k in &mut record.keys {
            if k.signing && Some(&k.name) != newest.as_ref() {
                k.signing = false;
                files.push(k.clone());
                k.secret_key_file = None;
                retired.push(k.name.clone());
            }
        }
        if retired.is_empty() {
            return Ok((cache, retired));
        }
        let stored = self.store(record)?;
        // The files go once the record no longer names them.
        for k in &files {
            self.remove_key_file(k);
        }
        Ok((stored, retired))
    }

    /// Whether the config file sets the key of `name`.
    fn declared_key_file(&self, name: &CacheName) -> bool {
        self.declared
            .get(name)
            .is_some_and(|c| c.secret_key_file.is_some())
    }

    /// Records a cache durably and serves it from now on.
    fn store(&self, record: CacheRecord) -> Result<Arc<Cache>> {
        self.index.put_cache(&record)?;
        self.index.flush()?;
        let declared = self.declared.contains_key(&record.name);
        let cache = Arc::new(load(record, declared).map_err(|e| Error::Internal(e.to_string()))?);
        self.map
            .write()
            .expect("never poisoned")
            .insert(cache.name.clone(), cache.clone());
        Ok(cache)
    }

    /// A file name for a new key of `cache`, unused.
    fn new_key_file(&self, cache: &CacheName) -> PathBuf {
        let mut raw = [0u8; 6];
        getrandom::fill(&mut raw).expect("the operating system's random source failed");
        let suffix: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        self.keys_dir.join(format!("{cache}.{suffix}.secret"))
    }

    /// Removes a key's file if the server made it (under its keys directory); a file
    /// the operator provides stays where it is.
    fn remove_key_file(&self, key: &KeyRecord) {
        if let Some(file) = &key.secret_key_file {
            if file.starts_with(&self.keys_dir) {
                if let Err(e) = std::fs::remove_file(file) {
                    tracing::warn!(file = %file.display(), error = %e, "could not remove a key file");
                }
            }
        }
    }
}

fn key_record(key: &SecretKey, file: Option<PathBuf>) -> KeyRecord {
    KeyRecord {
        name: key.name().to_owned(),
        public_key: key.public().to_string(),
        secret_key_file: file,
        signing: true,
        created: now(),
    }
}

/// Loads a cache's signing keys.
fn load(record: CacheRecord, declared: bool) -> anyhow::Result<Cache> {
    let mut signers = Vec::new();
    for k in record.keys.iter().filter(|k| k.signing) {
        let file = k.secret_key_file.as_ref().ok_or_else(|| {
            anyhow::anyhow!("cache {}: signing key {} has no file", record.name, k.name)
        })?;
        let key = read_key(file)?;
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
    Ok(Cache {
        name: record.name.clone(),
        public: record.public,
        priority: record.priority,
        keep_client_signatures: record.keep_client_signatures,
        key_names: record.keys.iter().map(|k| k.name.clone()).collect(),
        signers,
        declared,
        record,
    })
}

fn generate_key(dir: &Path, file: &Path, name: &str) -> anyhow::Result<SecretKey> {
    let key = SecretKey::generate(name).map_err(|e| anyhow::anyhow!("key name {name:?}: {e}"))?;
    write_key(dir, file, &key).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(key)
}

fn write_key(dir: &Path, file: &Path, key: &SecretKey) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Internal(format!("creating {}: {e}", dir.display())))?;
    crate::secret_file::write(file, &key.to_file_text()).map_err(|e| Error::Internal(e.to_string()))
}

fn read_key(path: &Path) -> anyhow::Result<SecretKey> {
    let text = crate::secret_file::read(path)?;
    text.parse()
        .map_err(|e| anyhow::anyhow!("key {}: {e}", path.display()))
}
