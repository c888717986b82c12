//! Everything a request handler can reach, opened once at start.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::auth::{self, Authorizer, Token};
use crate::caches::Caches;
use crate::config::Config;
use crate::index::{Index, SledIndex};
use crate::ingest::Ingestor;
use crate::store::PackStore;

pub struct App {
    pub config: Config,
    pub index: Arc<dyn Index>,
    pub packs: PackStore,
    pub ingestor: Ingestor,
    pub caches: Caches,
    pub auth: Authorizer,
    pub stats: Stats,
}

/// Counters an operator wants to see.
#[derive(Default)]
pub struct Stats {
    /// Pushes of a path already present with a different NarHash (unreproducible builds).
    pub narinfo_conflicts: AtomicU64,
}

/// What the first start created, to tell the operator.
pub struct Opened {
    pub app: Arc<App>,
    pub admin_token: Token,
    pub admin_token_created: bool,
}

/// Creates a directory only its owner can enter: it holds keys and the admin token.
fn create_private_dir(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))
}

impl App {
    pub fn open(config: Config) -> anyhow::Result<Opened> {
        config.validate()?;
        create_private_dir(&config.data_dir)?;
        let index: Arc<dyn Index> = Arc::new(SledIndex::open(
            &config.data_dir.join("index"),
            config.index.cache_mib * 1024 * 1024,
        )?);
        let storage_path = config.storage_path();
        std::fs::create_dir_all(&storage_path)?;
        let packs = PackStore::local(storage_path)?;
        let ingestor = Ingestor::new(index.clone(), packs.clone(), config.ingest_settings());
        let caches = Caches::open(index.as_ref(), &config)?;
        let (admin_token, admin_token_created) =
            auth::load_or_create_admin_token(&config.data_dir)?;
        let app = Arc::new(App {
            auth: Authorizer::new(&admin_token),
            config,
            index,
            packs,
            ingestor,
            caches,
            stats: Stats::default(),
        });
        Ok(Opened {
            app,
            admin_token,
            admin_token_created,
        })
    }
}
