//! The caches this server holds, with their signing keys loaded.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use crate::auth::write_secret_file;
use crate::config::{CacheConfig, Config};
use crate::error::{Error, Result};
use crate::index::{CacheRecord, Index};
use crate::nix::CacheName;
use crate::nix::signing::{PublicKey, SecretKey};

pub struct Cache {
    pub name: CacheName,
    pub public: bool,
    pub priority: u32,
    pub key: SecretKey,
    pub public_key: PublicKey,
}

pub struct Caches {
    map: RwLock<HashMap<CacheName, Arc<Cache>>>,
}

impl Caches {
    pub fn get(&self, name: &CacheName) -> Result<Arc<Cache>> {
        self.map
            .read()
            .expect("cache map lock is never poisoned")
            .get(name)
            .cloned()
            .ok_or(Error::NotFound("cache"))
    }

    pub fn all(&self) -> Vec<Arc<Cache>> {
        let mut all: Vec<_> = self.map.read().expect("never poisoned").values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Creates the configured caches that are missing (or `main` on an empty data
    /// directory), then loads every cache and its key.
    pub fn open(index: &dyn Index, config: &Config) -> anyhow::Result<Self> {
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
        for c in wanted {
            if let Some(existing) = records.iter_mut().find(|r| r.name == c.name) {
                // A configured key file takes over (keys rotate through the config).
                if let Some(file) = &c.secret_key_file {
                    existing.secret_key_file = file.clone();
                }
                existing.public = c.public;
                existing.priority = c.priority;
                index.put_cache(existing)?;
                continue;
            }
            let record = create(&c, &config.data_dir)?;
            index.put_cache(&record)?;
            tracing::info!(cache = %record.name, "created cache");
            records.push(record);
        }
        let mut map = HashMap::new();
        for r in records {
            let key = read_key(&r.secret_key_file)?;
            let public_key = key.public();
            map.insert(
                r.name.clone(),
                Arc::new(Cache {
                    name: r.name,
                    public: r.public,
                    priority: r.priority,
                    key,
                    public_key,
                }),
            );
        }
        Ok(Self {
            map: RwLock::new(map),
        })
    }
}

fn create(c: &CacheConfig, data_dir: &Path) -> anyhow::Result<CacheRecord> {
    let secret_key_file = match &c.secret_key_file {
        Some(file) => file.clone(),
        None => {
            let dir = data_dir.join("keys");
            std::fs::create_dir_all(&dir)?;
            let file = dir.join(format!("{}.secret", c.name));
            let key_name = c.key_name.clone().unwrap_or_else(|| format!("{}-1", c.name));
            let key = SecretKey::generate(&key_name).map_err(|e| anyhow::anyhow!("key name {key_name:?}: {e}"))?;
            write_secret_file(&file, &key.to_file_text())?;
            file
        }
    };
    Ok(CacheRecord {
        name: c.name.clone(),
        public: c.public,
        priority: c.priority,
        secret_key_file,
    })
}

fn read_key(path: &Path) -> anyhow::Result<SecretKey> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading key {}: {e}", path.display()))?,
    );
    text.parse()
        .map_err(|e| anyhow::anyhow!("key {}: {e}", path.display()))
}
