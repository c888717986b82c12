//! The server's configuration: built-in defaults, then a TOML file, then flags and
//! `CACHET_*` environment variables (applied by the binary), in that order.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ingest::chunker::ChunkParams;
use crate::ingest::IngestSettings;
use crate::nix::CacheName;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub storage: StorageConfig,
    pub chunking: ChunkParams,
    pub ingest: IngestConfig,
    pub serve: ServeConfig,
    pub index: IndexConfig,
    /// Caches created at start when missing. With none, a public `main` is created on
    /// an empty data directory.
    #[serde(rename = "cache")]
    pub caches: Vec<CacheConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "lowercase")]
pub enum StorageConfig {
    /// Chunks on the local filesystem; `path` defaults to `<data_dir>/store`.
    Local { path: Option<PathBuf> },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub zstd_level: i32,
    pub concurrency: usize,
    pub max_narinfo_bytes: usize,
    pub max_small_body_bytes: usize,
    pub pack_bytes: usize,
    pub max_uploads: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Largest single read from a pack.
    pub read_bytes: u64,
    /// Reads in flight ahead of the one being sent, per download.
    pub read_ahead: usize,
    /// Socket send buffer asked for on every connection; 0 leaves it to the kernel.
    pub send_buffer_bytes: usize,
}

impl ServeConfig {
    pub fn read_plan(&self) -> crate::serve::ReadPlan {
        crate::serve::ReadPlan {
            read_bytes: self.read_bytes,
            read_ahead: self.read_ahead,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexConfig {
    /// Memory sled may use for its page cache. Its own default (1 GiB) would dwarf the
    /// rest of the server, whose working set is a few MiB per transfer.
    pub cache_mib: u64,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self { cache_mib: 64 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    pub name: CacheName,
    #[serde(default = "yes")]
    pub public: bool,
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// Name of the generated key; `<cache>-1` when unset.
    pub key_name: Option<String>,
    /// A secret key file in Nix's format (from `nix-store --generate-binary-cache-key`,
    /// or provided by a secrets manager); generated into the data directory when unset.
    pub secret_key_file: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

/// What cache.nixos.org uses; lower wins, so a self-hosted cache can sit before or after it.
fn default_priority() -> u32 {
    40
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./cachet-data"),
            storage: StorageConfig::Local { path: None },
            chunking: ChunkParams {
                // Measured on the benchmark closure (1.3 GiB of NARs, 407 paths) and its
                // mass rebuild (BENCHMARKS.md): average 16 / 32 / 64 KiB stored both
                // builds in 1.05 / 1.07 / 1.10 times one, served 628 / 615 / 604 MB, and
                // cost 9.5 / 9.6 / 8.2 s of server CPU to push. 32 KiB keeps dedup far
                // within the 1.2 target, also on small closures (1.21 on 64 MiB).
                min_size: 8 * 1024,
                avg_size: 32 * 1024,
                max_size: 128 * 1024,
            },
            ingest: IngestConfig::default(),
            serve: ServeConfig::default(),
            index: IndexConfig::default(),
            caches: Vec::new(),
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            // Level 1 compresses chunks at 340 MiB/s against 250 MiB/s for level 3 (the
            // server's largest cost in a zstd push), for 2% more stored bytes; see
            // BENCHMARKS.md.
            zstd_level: 1,
            // Enough to keep both cores busy compressing while the two front threads read.
            concurrency: 4,
            max_narinfo_bytes: 1024 * 1024,
            // Build logs and realisations.
            max_small_body_bytes: 64 * 1024 * 1024,
            // Few objects (one PUT per 4 MiB on S3) and large sequential reads when
            // serving, with at most a few packs buffered per upload.
            pack_bytes: 4 * 1024 * 1024,
            // Each takes two threads and up to about 16 MiB; tokio's blocking pool has
            // 512 threads. 32 NARs at once serve many CI runners (each sends one NAR
            // at a time, or two).
            max_uploads: 32,
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            read_bytes: 256 * 1024,
            read_ahead: 4,
            // The kernel's own growth starts at 16 KiB: with it four downloads took
            // 0.267-0.278 s against 0.230-0.235 s with 4 MiB (BENCHMARKS.md). The
            // kernel caps the request at net.core.wmem_max; 4 MiB is also the most its
            // own growth reaches by default, so slow or distant clients lose nothing.
            send_buffer_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        let config: Self =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.chunking.validate().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            self.ingest.concurrency > 0,
            "ingest.concurrency must be positive"
        );
        anyhow::ensure!(
            (1..=128).contains(&self.ingest.max_uploads),
            "ingest.max_uploads must be 1 to 128"
        );
        anyhow::ensure!(
            self.serve.read_ahead > 0,
            "serve.read_ahead must be positive"
        );
        anyhow::ensure!(
            (0..=22).contains(&self.ingest.zstd_level),
            "ingest.zstd_level must be 0 (uncompressed) to 22"
        );
        Ok(())
    }

    pub fn ingest_settings(&self) -> IngestSettings {
        IngestSettings {
            chunking: self.chunking,
            zstd_level: self.ingest.zstd_level,
            concurrency: self.ingest.concurrency,
            pack_bytes: self.ingest.pack_bytes,
            max_uploads: self.ingest.max_uploads,
        }
    }

    pub fn storage_path(&self) -> PathBuf {
        match &self.storage {
            StorageConfig::Local { path } => {
                path.clone().unwrap_or_else(|| self.data_dir.join("store"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_matches_the_defaults() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/cachet.toml"))
                .unwrap();
        let example: Config = toml::from_str(&text).unwrap();
        example.validate().unwrap();
        let d = Config::default();
        assert_eq!(example.listen, d.listen);
        assert_eq!(example.chunking, d.chunking);
        assert_eq!(example.ingest.zstd_level, d.ingest.zstd_level);
        assert_eq!(example.serve.read_ahead, d.serve.read_ahead);
        assert_eq!(example.ingest.max_uploads, d.ingest.max_uploads);
        assert_eq!(example.serve.send_buffer_bytes, d.serve.send_buffer_bytes);
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<Config>("listn = \"127.0.0.1:1\"").is_err());
    }
}
