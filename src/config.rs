//! The server's configuration: built-in defaults, then a TOML file, then flags and
//! `CACHET_*` environment variables (applied by the binary), in that order. Every limit
//! is a setting here with its default and what it protects; `config/cachet.toml` shows
//! them all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::nix::CacheName;

const MIB: u64 = 1024 * 1024;

/// Everything the server is told at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The address to serve on.
    pub listen: SocketAddr,
    /// Where metadata, keys, the admin token and local chunks live.
    pub data_dir: PathBuf,
    /// Connections: how many, and how long they may idle or stall.
    pub server: ServerConfig,
    /// Where chunks are stored.
    pub storage: StorageConfig,
    /// Content-defined chunk sizes.
    pub chunking: ChunkParams,
    /// Uploads.
    pub ingest: IngestConfig,
    /// Downloads.
    pub serve: ServeConfig,
    /// The metadata database.
    pub index: IndexConfig,
    /// TLS, when the server terminates it itself.
    pub tls: TlsConfig,
    /// The garbage collector.
    pub gc: GcConfig,
    /// Limits on what caches hold.
    pub quota: QuotaConfig,
    /// Caches created at start when missing. With none, a public `main` is created on
    /// an empty data directory.
    #[serde(rename = "cache")]
    pub caches: Vec<CacheConfig>,
}

/// Connection limits: what keeps idle, slow or too many clients from locking others
/// out.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Connections open at once; more are answered 503 and closed. Each takes up to
    /// three file descriptors (the server raises its soft limit to the hard one at
    /// start and keeps this under what that allows) and some memory (see
    /// ARCHITECTURE.md).
    pub max_connections: usize,
    /// A request head (request line and headers) must arrive within this many seconds
    /// of its first byte, or the connection is closed (slow-header clients).
    pub header_timeout_secs: u64,
    /// A connection with no request for this many seconds is closed (idle clients).
    pub idle_timeout_secs: u64,
    /// A response that keeps the server waiting this many seconds while the client
    /// takes fewer than `send_min_bytes` is dropped (slow readers holding buffers).
    pub send_timeout_secs: u64,
    /// See `send_timeout_secs`.
    pub send_min_bytes: u64,
    /// On SIGTERM, requests in flight get this many seconds to finish.
    pub shutdown_grace_secs: u64,
    /// Connections from one address at once (a trusted proxy's excepted); requests in
    /// flight from one client that a trusted proxy forwards. At the limit the
    /// address's own idle connections make room; when all of them are handling
    /// requests, the newcomer is refused (503; 429 for a forwarded request).
    pub max_connections_per_address: usize,
    /// Reverse proxies (addresses or networks, `10.0.0.0/8`) whose
    /// `forwarded_header` names the client; their own connections have no per-address
    /// limit. Anyone else's such headers are ignored.
    #[serde(deserialize_with = "networks")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The header trusted proxies name the client in: the one they append to
    /// (`x-forwarded-for`, or `forwarded`); the other is passed through as the
    /// client sent it, so it is never read.
    pub forwarded_header: ForwardedHeader,
    /// A second address to serve on (the same routes), with slots of its own: for the
    /// operator, to reach the admin API and `/metrics` whatever happens on the main one.
    pub admin_listen: Option<SocketAddr>,
    /// Connections the admin listener takes at once.
    pub admin_max_connections: usize,
}

/// Addresses or networks, as `server.trusted_proxies` takes them.
fn networks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|t| parse_net(t).map_err(serde::de::Error::custom))
        .collect()
}

/// Parses the networks of `server.trusted_proxies`: `10.0.0.0/8`, or a bare address
/// for that one address.
pub fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{text:?} is neither an address nor a network (10.0.0.0/8)"))
}

/// The header a trusted proxy names the client in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For`, which nginx (`$proxy_add_x_forwarded_for`), HAProxy and most
    /// others append to.
    #[default]
    XForwardedFor,
    /// `Forwarded` (RFC 7239).
    Forwarded,
}

/// FastCDC's chunk sizes, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkParams {
    /// No cut before this many bytes.
    pub min_size: u32,
    /// The size cuts aim for.
    pub avg_size: u32,
    /// A cut at this many bytes at the latest.
    pub max_size: u32,
}

impl ChunkParams {
    /// Refuses sizes FastCDC cannot use.
    pub fn validate(&self) -> Result<(), String> {
        let ok = fastcdc::v2020::MINIMUM_MIN as u32 <= self.min_size
            && self.min_size <= self.avg_size
            && self.avg_size <= self.max_size
            && self.max_size <= fastcdc::v2020::MAXIMUM_MAX as u32
            && self.avg_size >= fastcdc::v2020::AVERAGE_MIN as u32
            && self.avg_size <= fastcdc::v2020::AVERAGE_MAX as u32
            && [self.min_size, self.avg_size, self.max_size]
                .iter()
                .all(|s| s % 2 == 0);
        if ok {
            Ok(())
        } else {
            Err(format!(
                "chunk sizes must be even with {} <= min <= avg <= max <= {}",
                fastcdc::v2020::MINIMUM_MIN,
                fastcdc::v2020::MAXIMUM_MAX
            ))
        }
    }
}

/// Where chunks are stored. One flat table for every backend, so that the file reads
/// as operators write it; `validate` refuses settings of another backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// The backend.
    #[serde(rename = "type")]
    pub backend: StorageBackend,
    /// For `local`: the directory of the pack files (default `<data_dir>/store`).
    pub path: Option<PathBuf>,
    /// Uploads never take the filesystem of the storage or of the metadata below this
    /// many MiB free: each reserves what it writes as it streams, and stops with 507
    /// when it gets no room. What is below is the metadata's, so that the database
    /// never meets a full disk mid-write.
    pub min_free_mib: u64,
    /// A file of this many MiB kept in the data directory and deleted when its
    /// filesystem is nearly full, so that the metadata database always has room to
    /// write: to start, to serve, and to run what frees space. 0: none.
    pub reserve_mib: u64,
    /// For `s3`: the bucket.
    pub bucket: Option<String>,
    /// For `s3`: the endpoint, for a store other than AWS (`http://127.0.0.1:3900`).
    pub endpoint: Option<String>,
    /// For `s3`: the region (AWS's, or what the store calls itself; `garage`).
    pub region: Option<String>,
    /// For `s3`: a key prefix, so that one bucket can hold several servers' data.
    pub prefix: String,
    /// For `s3`: allows an `http://` endpoint.
    pub allow_http: bool,
    /// For `s3`: `<bucket>.<endpoint>` addressing instead of `<endpoint>/<bucket>`.
    pub virtual_hosted_style: bool,
    /// For `s3`: the access key; without one, `AWS_ACCESS_KEY_ID` and the other
    /// standard variables, then the instance's or web identity's role.
    pub access_key_id: Option<String>,
    /// For `s3`: the secret key (better: `secret_access_key_file`).
    pub secret_access_key: Option<Secret>,
    /// For `s3`: a file holding the secret key (a sops-nix secret, say).
    pub secret_access_key_file: Option<PathBuf>,
    /// For `s3`: how long one request may take, connecting included.
    pub request_timeout_secs: u64,
    /// For `s3`: how long a call may go on retrying throttling, 5xx and failed
    /// connections, with backoff. A NAR download answers 503 once a read has failed
    /// for this long.
    pub retry_timeout_secs: u64,
    /// For `s3`: the directory of the cache of packs read for serving (default
    /// `<data_dir>/pack-cache`). It is emptied at every start.
    pub cache_dir: Option<PathBuf>,
    /// For `s3`: the most the cache of packs holds on local disk, in MiB; 0 turns it
    /// off (every read is a ranged GET).
    pub cache_mib: u64,
}

impl StorageConfig {
    /// Refuses the settings of the other backend, and an S3 store without a bucket.
    fn validate(&self) -> anyhow::Result<()> {
        let s3_settings = [
            ("bucket", self.bucket.is_some()),
            ("endpoint", self.endpoint.is_some()),
            ("region", self.region.is_some()),
            ("prefix", !self.prefix.is_empty()),
            ("allow_http", self.allow_http),
            ("virtual_hosted_style", self.virtual_hosted_style),
            ("access_key_id", self.access_key_id.is_some()),
            ("secret_access_key", self.secret_access_key.is_some()),
            (
                "secret_access_key_file",
                self.secret_access_key_file.is_some(),
            ),
            ("cache_dir", self.cache_dir.is_some()),
        ];
        match self.backend {
            StorageBackend::Local => {
                if let Some((name, _)) = s3_settings.iter().find(|(_, set)| *set) {
                    anyhow::bail!("storage.{name} is a setting of type = \"s3\", not \"local\"");
                }
            }
            StorageBackend::S3 => {
                anyhow::ensure!(
                    self.path.is_none(),
                    "storage.path is a setting of type = \"local\", not \"s3\""
                );
                anyhow::ensure!(
                    self.bucket.as_deref().is_some_and(|b| !b.is_empty()),
                    "storage.bucket is needed with type = \"s3\""
                );
                anyhow::ensure!(
                    !(self.secret_access_key.is_some() && self.secret_access_key_file.is_some()),
                    "storage.secret_access_key and storage.secret_access_key_file are exclusive"
                );
                if let Some(endpoint) = &self.endpoint {
                    anyhow::ensure!(
                        endpoint.starts_with("https://")
                            || (endpoint.starts_with("http://") && self.allow_http),
                        "storage.endpoint {endpoint:?} must be https://, or http:// with \
                         storage.allow_http = true"
                    );
                }
            }
        }
        Ok(())
    }
}

/// A secret setting: never shown by `Debug`, so never in a log or an error.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The chunk storage backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// Chunks on the local filesystem.
    Local,
    /// Chunks in an S3-compatible object store.
    S3,
}

/// Uploads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// zstd level of stored chunks (0: raw frames).
    pub zstd_level: i32,
    /// Chunk batches compressed at once per upload.
    pub concurrency: usize,
    /// Largest narinfo or realisation accepted (413 above).
    pub max_narinfo_bytes: usize,
    /// Largest build log accepted (413 above).
    #[serde(alias = "max_small_body_bytes")]
    pub max_log_bytes: u64,
    /// Size at which a pack object is written.
    pub pack_bytes: usize,
    /// NARs ingested at once; more wait their turn.
    pub max_uploads: usize,
    /// Largest NAR accepted, uncompressed (413 above): what a compression bomb can
    /// cost in CPU time before it is refused.
    pub max_nar_bytes: u64,
    /// Most files, directories and symlinks in a NAR (413 above): what bounds the work
    /// and the size of the listing of an archive of tiny entries.
    pub max_nar_entries: u64,
    /// Memory all uploads together may reserve: buffers, packs and decoders. An upload
    /// waits until its share is free; one whose decoder alone would need more is
    /// refused (413).
    pub memory_mib: u64,
    /// An upload body that makes the server wait this many seconds while sending
    /// fewer than `body_min_bytes` loses its slot (408): a trickling client holds an
    /// ingest slot and its memory only this long.
    pub body_stall_secs: u64,
    /// See `body_stall_secs`.
    pub body_min_bytes: u64,
    /// A NAR that decodes to more than this many times the bytes of its body, once
    /// past `expansion_floor_mib`, is refused (413) as a compression bomb: what a small
    /// body can cost in CPU. 0: no limit.
    pub max_expansion: u64,
    /// See `max_expansion`.
    pub expansion_floor_mib: u64,
}

/// Downloads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Largest single read from a pack on local disk.
    pub read_bytes: u64,
    /// Largest single read from a pack in S3: each read is a GET, whose round trip
    /// costs what reading a few hundred KiB does, so reads there are larger.
    pub remote_read_bytes: u64,
    /// Reads in flight ahead of the one being sent, per download.
    pub read_ahead: usize,
    /// Memory all downloads together may hold in bytes read and not yet sent. A
    /// download waits for its share of it for its next read, and reads ahead only
    /// with what is free: many slow readers cannot grow the process.
    pub memory_mib: u64,
    /// Socket send buffer asked for on every connection; 0 leaves it to the kernel.
    pub send_buffer_bytes: usize,
}

/// The metadata databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexBackend {
    /// sled, embedded in the data directory: one server.
    Sled,
    /// PostgreSQL at `index.url`.
    Postgres,
}

/// The metadata database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexConfig {
    /// Which database.
    #[serde(rename = "type")]
    pub backend: IndexBackend,
    /// PostgreSQL: `postgres://user@host:port/database`; a password in it, or in
    /// `password_file`.
    pub url: Option<String>,
    /// PostgreSQL: a file holding the password (its surrounding white space is not part
    /// of it), as a secrets manager delivers it.
    pub password_file: Option<PathBuf>,
    /// PostgreSQL: connections kept at most. A request holds one for a query, a
    /// publication for its commit.
    pub pool_size: usize,
    /// PostgreSQL: how long to wait for a connection to be made, or for a free one,
    /// before the request is answered 503.
    pub connect_timeout_secs: u64,
    /// Memory the index may use to cache what it reads; each backend reads it its
    /// own way.
    ///
    /// PostgreSQL: the copies of the narinfos, NAR records and manifest segments
    /// downloads read (`index::lookups`), weighed in bytes held; 0 keeps none.
    ///
    /// sled: memory it may use for its page cache. Its own default (1 GiB) would dwarf the
    /// rest of the server, whose working set is a few MiB per transfer. sled counts
    /// what it caches in bytes as stored, and holds it as nodes several times that
    /// size: at 8 MiB a collection over a million chunks peaks at 204 to 223 MiB of
    /// resident memory; at 64 MiB it took over 400.
    pub cache_mib: u64,
    /// A file of at least 32 secret bytes: with it, new signing keys are sealed in the
    /// index (see `keyseal`) instead of kept in files under `<data-dir>/keys`, so that
    /// every server over a shared index can sign. Give every replica the same file.
    pub key_encryption_file: Option<std::path::PathBuf>,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            backend: IndexBackend::Sled,
            url: None,
            password_file: None,
            pool_size: 16,
            connect_timeout_secs: 5,
            cache_mib: 8,
            key_encryption_file: None,
        }
    }
}

/// TLS terminated by the server: both files set, or neither (plain HTTP, e.g. behind
/// a reverse proxy that terminates TLS).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The certificate chain, PEM, the server's own certificate first. Read again on
    /// SIGHUP, so a renewed certificate needs no restart.
    pub cert_file: Option<PathBuf>,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

/// The garbage collector: its grace periods, its schedule, and the retention of caches
/// that set none of their own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// An upload no narinfo took up yet is kept this long, with its NAR, for the push
    /// under way that sent it (a client pushes the narinfo right after the NAR);
    /// then it is what a failed push left, and goes. An upload a narinfo took up holds
    /// nothing once no narinfo claims its NAR.
    pub pending_upload_secs: u64,
    /// A pack no record names is deleted only once this old (a crash mid-upload leaves
    /// such packs; the collector's protocol needs no grace, this is a margin). Packs
    /// the collection itself emptied or rewrote go in the same run.
    pub grace_secs: u64,
    /// How long a collection waits for downloads and uploads that began before it
    /// unlinked records; what they might use is left for the next collection.
    pub reader_wait_secs: u64,
    /// Runs a collection this often, in seconds; 0 never (run `cache-admin gc`).
    pub every_secs: u64,
    /// The maximum age since last fetch of caches that set none, in seconds.
    pub keep_age_secs: Option<u64>,
    /// The maximum size of caches that set none, in bytes.
    pub keep_size_bytes: Option<u64>,
    /// Packs at least this dead (a fraction of their bytes) are rewritten with their
    /// live frames only; 0 rewrites every pack with a dead byte.
    pub compact_dead_fraction: f64,
    /// The zstd level frames are recompressed at when their pack is rewritten.
    pub recompress_level: i32,
    /// Packs older than this many seconds that were never rewritten are recompressed
    /// even when all live; 0 never.
    pub recompress_after_secs: u64,
    /// The niceness of the thread that rewrites packs (0 to 19).
    pub compact_nice: i32,
    /// At most this many MiB of packs read per second when rewriting; 0 no limit.
    pub compact_mib_per_sec: u64,
}

impl Default for GcConfig {
    fn default() -> Self {
        Self {
            // A push sends a path's narinfo within moments of its NAR; an hour covers
            // the slowest push of one path's references first.
            pending_upload_secs: 60 * 60,
            grace_secs: 60 * 60,
            // The send timeout cuts slow readers well before.
            reader_wait_secs: 600,
            every_secs: 0,
            keep_age_secs: None,
            keep_size_bytes: None,
            // Half dead: rewriting costs about what it frees.
            compact_dead_fraction: 0.5,
            // Frames are written at level 1 for push speed; rewritten off the hot
            // path, a high level makes the cache smaller and every download faster.
            recompress_level: 19,
            recompress_after_secs: 0,
            compact_nice: 10,
            compact_mib_per_sec: 0,
        }
    }
}

/// Limits on what caches hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// The most stored bytes a cache that sets no quota of its own may hold (its
    /// paths' `.nar.zst` bytes, its uploads waiting for a narinfo, its logs and
    /// realisations); none when unset.
    pub max_size_bytes: Option<u64>,
}

impl QuotaConfig {
    /// The quota of a cache whose own is `own`.
    pub fn of(&self, own: Option<u64>) -> Option<u64> {
        own.or(self.max_size_bytes)
    }
}

/// A cache to create at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Its name.
    pub name: CacheName,
    /// Whether anyone may pull from it.
    #[serde(default = "yes")]
    pub public: bool,
    /// The priority its `nix-cache-info` announces.
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
            server: ServerConfig::default(),
            storage: StorageConfig::default(),
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
            tls: TlsConfig::default(),
            gc: GcConfig::default(),
            quota: QuotaConfig::default(),
            caches: Vec::new(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            // A CI fleet and its hosts hold a few connections each; 4096 idle ones
            // take about 80 MiB.
            max_connections: 4096,
            // curl sends a whole request head in one write; ten seconds is plenty on
            // any network a cache serves.
            header_timeout_secs: 10,
            // Nix may keep a connection idle while it compresses its next NAR (an xz
            // NAR of a GiB takes about a minute); reconnecting after that costs little.
            idle_timeout_secs: 60,
            // A client that reads less than a KiB a second is gone or hostile.
            send_timeout_secs: 60,
            send_min_bytes: 64 * 1024,
            // Long enough for an upload of a few GiB to finish; init systems wait
            // 90 s by default before they kill.
            shutdown_grace_secs: 60,
            // Nix opens up to 25 connections (http-connections); this leaves room for
            // ten busy runners behind one NAT address, and a sixteenth of the slots.
            max_connections_per_address: 256,
            trusted_proxies: Vec::new(),
            forwarded_header: Default::default(),
            admin_listen: None,
            admin_max_connections: 64,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Local,
            path: None,
            // Room for a few large NARs in flight and for the metadata to grow.
            min_free_mib: 1024,
            // What the database writes to open, delete a large cache and collect.
            reserve_mib: 64,
            bucket: None,
            endpoint: None,
            region: None,
            prefix: String::new(),
            allow_http: false,
            virtual_hosted_style: false,
            access_key_id: None,
            secret_access_key: None,
            secret_access_key_file: None,
            request_timeout_secs: 10,
            retry_timeout_secs: 15,
            cache_dir: None,
            // A few closures' worth: what a fleet pulls after a CI run.
            cache_mib: 4096,
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
            max_log_bytes: 64 * MIB,
            // Few objects (one PUT per 4 MiB on S3) and large sequential reads when
            // serving, with at most a few packs buffered per upload.
            pack_bytes: 4 * 1024 * 1024,
            // Each takes two threads of tokio's blocking pool (512); the memory budget
            // is usually what bounds them.
            max_uploads: 32,
            // The largest NARs in nixpkgs are a few GiB; 32 GiB leaves room and
            // bounds a bomb to a minute or two of CPU.
            max_nar_bytes: 32 * 1024 * MIB,
            // Far above any real package (a full TeX Live tree has some 200,000).
            max_nar_entries: 1 << 20,
            // An upload takes 22.7 MiB with the default settings (see
            // IngestSettings::upload_memory) plus its decoder (2.5 to 8.5 MiB for what
            // Nix writes): three at once, which keep two cores busy. With the sled
            // cache and the download budget this keeps the server under 256 MiB.
            memory_mib: 96,
            // A CI runner on a slow link still sends 2 KiB a second.
            body_stall_secs: 30,
            body_min_bytes: 64 * 1024,
            // NARs compress 2 to 10 times with xz or zstd; a thousand takes runs of a
            // single byte over most of the NAR. A 135 KB zstd body of a 4 GiB NAR
            // cost 8 CPU-seconds before; now it stops after 135 MB.
            max_expansion: 1000,
            // Small NARs of zeros (empty files, sparse data) are common and cheap.
            expansion_floor_mib: 64,
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            read_bytes: 256 * 1024,
            remote_read_bytes: 4 * 1024 * 1024,
            read_ahead: 4,
            // A download at full speed holds about 1.5 MiB (its reads ahead, and what
            // the connection is sending): twenty-six of them; more share it.
            memory_mib: 40,
            // The kernel's own growth starts at 16 KiB: with it four downloads took
            // 0.267-0.278 s against 0.230-0.235 s with 4 MiB (BENCHMARKS.md). The
            // kernel caps the request at net.core.wmem_max; 4 MiB is also the most its
            // own growth reaches by default, so slow or distant clients lose nothing.
            send_buffer_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        // The message and where, without the line itself: it may hold a secret.
        let config: Self = toml::from_str(&text).map_err(|e| {
            let at = e.span().map_or(String::new(), |span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(" (line {line}, column {column})")
            });
            anyhow::anyhow!("config {}: {}{at}", path.display(), e.message().trim())
        })?;
        Ok(config)
    }

    /// Refuses settings the server cannot run with.
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
            self.serve.memory_mib * MIB
                >= 2 * self.serve.read_bytes.max(self.serve.remote_read_bytes),
            "serve.memory_mib must hold at least two reads of serve.read_bytes and of \
             serve.remote_read_bytes"
        );
        anyhow::ensure!(
            (0..=22).contains(&self.ingest.zstd_level),
            "ingest.zstd_level must be 0 (uncompressed) to 22"
        );
        anyhow::ensure!(
            self.tls.cert_file.is_some() == self.tls.key_file.is_some(),
            "tls.cert_file and tls.key_file are set together, or neither"
        );
        anyhow::ensure!(
            self.server.max_connections > 0,
            "server.max_connections must be positive"
        );
        anyhow::ensure!(
            self.server.max_connections_per_address > 0,
            "server.max_connections_per_address must be positive"
        );
        anyhow::ensure!(
            self.server.admin_max_connections > 0,
            "server.admin_max_connections must be positive"
        );
        for (name, secs) in [
            (
                "server.header_timeout_secs",
                self.server.header_timeout_secs,
            ),
            ("server.idle_timeout_secs", self.server.idle_timeout_secs),
            ("server.send_timeout_secs", self.server.send_timeout_secs),
            ("ingest.body_stall_secs", self.ingest.body_stall_secs),
            (
                "storage.request_timeout_secs",
                self.storage.request_timeout_secs,
            ),
        ] {
            anyhow::ensure!(secs > 0, "{name} must be positive");
        }
        if self.index.backend == IndexBackend::Postgres {
            anyhow::ensure!(
                self.index.url.is_some(),
                "index.type = \"postgres\" needs index.url (postgres://user@host:port/database)"
            );
            anyhow::ensure!(self.index.pool_size > 0, "index.pool_size must be positive");
            anyhow::ensure!(
                self.index.connect_timeout_secs > 0,
                "index.connect_timeout_secs must be positive"
            );
        }
        self.storage.validate()
    }

    /// The directory of local packs, for the local backend.
    pub fn storage_path(&self) -> Option<PathBuf> {
        match self.storage.backend {
            StorageBackend::Local => {
                Some((self.storage.path.clone()).unwrap_or_else(|| self.data_dir.join("store")))
            }
            StorageBackend::S3 => None,
        }
    }

    /// The directory of the cache of packs of a remote store, when there is one.
    pub fn pack_cache_dir(&self) -> Option<PathBuf> {
        match self.storage.backend {
            StorageBackend::Local => None,
            StorageBackend::S3 if self.storage.cache_mib == 0 => None,
            StorageBackend::S3 => Some(
                (self.storage.cache_dir.clone())
                    .unwrap_or_else(|| self.data_dir.join("pack-cache")),
            ),
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
        // Debug shows every setting: the example must list each with its default.
        assert_eq!(format!("{example:?}"), format!("{d:?}"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<Config>("listn = \"127.0.0.1:1\"").is_err());
        assert!(toml::from_str::<Config>("[storage]\ntype = \"local\"\npth = \"/x\"").is_err());
    }

    #[test]
    fn the_defaults_are_valid_and_the_old_name_still_parses() {
        Config::default().validate().unwrap();
        let c: Config = toml::from_str("[ingest]\nmax_small_body_bytes = 5").unwrap();
        assert_eq!(c.ingest.max_log_bytes, 5);
    }

    #[test]
    fn storage_settings_of_the_other_backend_are_refused_and_the_cache_follows_s3() {
        let refused = |text: &str, says: &str| {
            let c: Config = toml::from_str(text).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        };
        refused("[storage]\nbucket = \"b\"", "storage.bucket");
        refused("[storage]\ncache_dir = \"/c\"", "storage.cache_dir");
        refused("[storage]\ntype = \"s3\"", "storage.bucket");
        refused(
            "[storage]\ntype = \"s3\"\nbucket = \"b\"\npath = \"/p\"",
            "storage.path",
        );
        refused(
            "[storage]\ntype = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:1\"",
            "allow_http",
        );
        let s3 = |extra: &str| {
            let c: Config = toml::from_str(&format!(
                "data_dir = \"/d\"\n[storage]\ntype = \"s3\"\nbucket = \"b\"\n{extra}"
            ))
            .unwrap();
            c.validate().unwrap();
            c.pack_cache_dir()
        };
        assert_eq!(s3(""), Some(PathBuf::from("/d/pack-cache")));
        assert_eq!(s3("cache_dir = \"/c\""), Some(PathBuf::from("/c")));
        assert_eq!(s3("cache_mib = 0"), None);
        assert_eq!(Config::default().pack_cache_dir(), None);
    }
}
