//! The cachet server.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use cachet::config::Config;

/// A self-hosted Nix binary cache. With no arguments it serves on 127.0.0.1:8080 with
/// its data in ./cachet-data.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// A TOML config file (see config/cachet.toml).
    #[arg(long, env = "CACHET_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "CACHET_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory for metadata, keys and local chunks.
    #[arg(long, env = "CACHET_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Log filter, e.g. `info` or `cachet=debug,tower_http=debug`.
    #[arg(long, env = "CACHET_LOG", default_value = "info")]
    log: String,
    /// Log lines as text for people, or as JSON objects for a log collector.
    #[arg(long, env = "CACHET_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Copy the embedded index (sled, in the data directory) into an empty PostgreSQL
    /// database, check the copy, and say how to switch the config. Stop the server
    /// first: the embedded index is one process's.
    MigrateIndex {
        /// The database to copy into: postgres://user@host:port/database.
        #[arg(long)]
        to: String,
        /// A file holding the database's password (or give it in the URL).
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    // Before the runtime's threads exist.
    cachet::allocator::configure();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)?;
    // Colours only for a terminal: a log file or a journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match args.log_format {
        LogFormat::Text => logs.init(),
        // One object per line, with the request's span (and its id) in each.
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    match args.command {
        None => cachet::server::run(config).await,
        Some(Command::MigrateIndex { to, password_file }) => {
            migrate_index(&config, to, password_file).await
        }
    }
}

/// `cachet migrate-index`.
async fn migrate_index(
    config: &Config,
    to: String,
    password_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.index.backend == cachet::config::IndexBackend::Sled,
        "the config's index is PostgreSQL already: migrate-index copies the embedded one"
    );
    let dir = config.data_dir.join("index");
    anyhow::ensure!(dir.exists(), "no embedded index in {}", dir.display());
    let from = cachet::index::SledIndex::open(&dir, config.index.cache_mib * 1024 * 1024)?;
    let password = match &password_file {
        Some(f) => Some(cachet::secret_file::read(f)?.trim().to_owned()),
        None => None,
    };
    let settings = cachet::index::PgSettings {
        url: to.clone(),
        password,
        pool_size: 4,
        connect_timeout: std::time::Duration::from_secs(config.index.connect_timeout_secs),
        cache_bytes: 0,
    };
    let target = cachet::index::PgIndex::open(&settings).await?;
    let c = cachet::migrate::copy(&from, &target).await?;
    println!(
        "copied {} caches, {} tokens, {} narinfos, {} NARs, {} uploads, {} manifests, \
         {} chunks, {} logs and realisations, {} pins",
        c.caches, c.tokens, c.narinfos, c.nars, c.uploads, c.manifests, c.chunks, c.blobs, c.pins
    );
    let problems = cachet::migrate::check(&from, &target).await?;
    if !problems.is_empty() {
        for p in &problems {
            println!("problem: {p}");
        }
        anyhow::bail!("the copy is not whole ({} problems)", problems.len());
    }
    println!("checked: every cache's counts agree; every narinfo's NAR, manifests and chunks are recorded");
    println!(
        "to switch, keep this data directory (its packs and key files) and set in the config:"
    );
    println!("\n[index]\ntype = \"postgres\"\nurl = \"{to}\"");
    if let Some(f) = password_file {
        println!("password_file = \"{}\"", f.display());
    }
    println!("\nthen start the server and run `cache-admin verify --deep`");
    Ok(())
}
