//! `cache-admin`: the operator's client of the server's admin API.

use clap::{Parser, Subcommand};

use cachet::http::api::CacheInfo;

#[derive(Parser)]
#[command(version, about = "Administer a cachet server")]
struct Args {
    /// The server's base URL.
    #[arg(
        long,
        env = "CACHET_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    server: String,
    /// An admin token (the server writes one to <data-dir>/admin-token on first start).
    #[arg(long, env = "CACHET_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Caches.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Show a cache: its public key and settings.
    Info {
        name: String,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = reqwest::Client::new();
    match args.command {
        Command::Cache {
            command: CacheCommand::Info { name, json },
        } => {
            let url = format!(
                "{}/_api/v1/caches/{name}",
                args.server.trim_end_matches('/')
            );
            let mut req = client.get(&url);
            if let Some(t) = &args.token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await?;
            let status = resp.status();
            if !status.is_success() {
                let text = resp.text().await.unwrap_or_default();
                anyhow::bail!("{url}: {status}: {}", text.trim());
            }
            let info: CacheInfo = resp.json().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("name: {}", info.name);
                println!("public: {}", info.public);
                println!("public key: {}", info.public_key);
                println!("priority: {}", info.priority);
                println!("store dir: {}", info.store_dir);
            }
        }
    }
    Ok(())
}
