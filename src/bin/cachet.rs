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
    cachet::server::run(config).await
}
