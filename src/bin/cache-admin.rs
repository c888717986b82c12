//! `cache-admin`: the operator's client of the server's admin API.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use reqwest::Method;
use serde_json::json;

use cachet::admin::client::{request, Client, FileSettings};
use cachet::admin::jobs;
use cachet::admin::output::{self, fields, Limit, Table};
use cachet::caches::CacheChange;
use cachet::gc::stats::Stats;
use cachet::gc::Report as GcReport;
use cachet::grants::{CachePattern, Permission};
use cachet::http::api::types::{
    AddPin, CacheInfo, CreateCache, CreateToken, CreatedToken, DeletePaths, Deleted, GcRequest,
    KeyChange, KeysInfo, Rotate, SecretText, TokenInfo, VerifyRequest,
};
use cachet::http::page::host_of;
use cachet::index::{PinRecord, Retention};
use cachet::nix::CacheName;
use cachet::verify::Report as VerifyReport;

#[derive(Parser)]
#[command(
    version,
    about = "Administer a cachet server: caches, tokens, signing keys, store paths",
    after_help = "The server and token come from --server/--token, else CACHET_SERVER/CACHET_TOKEN, \
                  else the config file (~/.config/cachet/cache-admin.toml: server, token, token_file, ca_file)."
)]
struct Cli {
    /// The server's base URL [default: http://127.0.0.1:8080].
    #[arg(long, env = "CACHET_SERVER", global = true)]
    server: Option<String>,
    /// A token (server admin for tokens and new caches).
    #[arg(long, env = "CACHET_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// A file holding the token.
    #[arg(long, env = "CACHET_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust beside the system's (for https://).
    #[arg(long, env = "CACHET_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// The config file [default: $XDG_CONFIG_HOME/cachet/cache-admin.toml].
    #[arg(long, env = "CACHET_ADMIN_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Print JSON, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Caches: create, list, show, change, delete.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Tokens: create, list, revoke.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// A cache's signing keys: show, rotate, re-sign.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Store paths of a cache.
    Path {
        #[command(subcommand)]
        command: PathCommand,
    },
    /// Print the nix.conf (and netrc) lines a host needs to use a cache.
    Use {
        /// The cache.
        cache: CacheName,
    },
    /// Pins: paths a cache keeps, with their closures, whatever its retention.
    Pin {
        #[command(subcommand)]
        command: PinCommand,
    },
    /// Collect garbage: apply retention, then remove what no cache needs.
    Gc {
        /// Apply the retention of this cache only.
        #[arg(long)]
        cache: Option<CacheName>,
        /// Report what would go; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Rewrite every pack with dead bytes now, whatever gc.compact_dead_fraction
        /// (after deleting what must not stay, a secret pushed by mistake, say).
        #[arg(long)]
        compact: bool,
    },
    /// Check that everything the records name is stored (non-zero exit on a problem).
    Verify {
        /// Check the paths of this cache only.
        #[arg(long)]
        cache: Option<CacheName>,
        /// Also read every frame and NAR back and check their hashes.
        #[arg(long)]
        deep: bool,
    },
    /// Storage figures of the server, or of a cache.
    Stats {
        /// The cache.
        cache: Option<CacheName>,
    },
}

#[derive(Subcommand)]
enum PinCommand {
    /// Pin a store path under a name (adding a revision if the name exists).
    Add {
        cache: CacheName,
        name: String,
        store_path: String,
        /// Keep this many revisions of the pin (the oldest go first).
        #[arg(long, conflicts_with = "keep_days")]
        keep_revisions: Option<u32>,
        /// Keep revisions this many days (the newest always stays).
        #[arg(long)]
        keep_days: Option<u32>,
    },
    /// List a cache's pins.
    List { cache: CacheName },
    /// Remove a pin.
    Remove { cache: CacheName, name: String },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Create a cache (public unless --private), with a new signing key or an imported one.
    Create {
        name: CacheName,
        /// Only token holders may pull.
        #[arg(long)]
        private: bool,
        /// The priority announced to clients (lower is tried first) [default: 40].
        #[arg(long)]
        priority: Option<u32>,
        /// Import this Nix secret key (`nix-store --generate-binary-cache-key`) instead of generating one.
        #[arg(long)]
        secret_key_file: Option<PathBuf>,
        #[command(flatten)]
        retention: RetentionArgs,
        /// Whether the signatures clients push are served beside the cache's: keep or drop [default: keep].
        #[arg(long, value_parser = ["keep", "drop"])]
        client_signatures: Option<String>,
    },
    /// List the caches.
    List,
    /// Show a cache.
    Info { name: CacheName },
    /// Change a cache's settings.
    Update {
        name: CacheName,
        /// Anyone may pull.
        #[arg(long, conflicts_with = "private")]
        public: bool,
        /// Only token holders may pull.
        #[arg(long)]
        private: bool,
        /// The priority announced to clients.
        #[arg(long)]
        priority: Option<u32>,
        #[command(flatten)]
        retention: RetentionArgs,
        /// Whether the signatures clients push are served: keep or drop (stored narinfos follow at the next `key resign`).
        #[arg(long, value_parser = ["keep", "drop"])]
        client_signatures: Option<String>,
    },
    /// Delete a cache and its store paths (their data is reclaimed by gc).
    Delete {
        name: CacheName,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
struct RetentionArgs {
    /// Paths not fetched for this long (e.g. 30d) may go, or `none` (see `cache-admin gc`).
    #[arg(long, value_parser = output::parse_age)]
    keep_age: Option<Limit>,
    /// The least recently fetched paths may go above this size (e.g. 500GiB), or `none`.
    #[arg(long, value_parser = output::parse_limit_size)]
    keep_size: Option<Limit>,
    /// The quota: pushes that would take the cache's stored bytes past this (e.g.
    /// 100GiB) are refused with 507; `none` clears it (the server's default applies).
    #[arg(long, value_parser = output::parse_limit_size)]
    max_size: Option<Limit>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; its secret is printed once, alone on the last line.
    Create {
        /// A name to list and revoke it by.
        #[arg(long, value_parser = token_name)]
        name: String,
        /// Permissions, comma-separated: pull, push, delete, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        perm: Vec<Permission>,
        /// A cache it covers: a name or a pattern such as `team-*` or `*`; repeatable.
        #[arg(long = "cache", required = true)]
        caches: Vec<CachePattern>,
        /// It stops working after this long (e.g. 30d); never when absent.
        #[arg(long, value_parser = output::parse_expiry)]
        expires: Option<u64>,
    },
    /// List the tokens (never their secrets).
    List,
    /// Revoke a token, from its next request on.
    Revoke {
        #[arg(value_parser = token_name)]
        name: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// The cache's keys, and how many paths each signs.
    Info { cache: CacheName },
    /// Add a new signing key: until `resign`, paths carry both the old and the new signature.
    Rotate {
        cache: CacheName,
        /// Import this Nix secret key as the new key instead of generating one.
        #[arg(long)]
        secret_key_file: Option<PathBuf>,
    },
    /// Finish a rotation: retire the old keys; paths keep only the newest key's signature.
    Resign { cache: CacheName },
}

#[derive(Subcommand)]
enum PathCommand {
    /// Delete store paths; refused if other paths refer to them, unless --with-referrers.
    Delete {
        cache: CacheName,
        /// Store paths (/nix/store/... or their base names).
        #[arg(required = true)]
        paths: Vec<String>,
        /// Delete the paths that refer to them too (transitively).
        #[arg(long)]
        with_referrers: bool,
    },
}

/// A token name as the server takes it (checked here too: it goes into a URL).
fn token_name(s: &str) -> Result<String, String> {
    if cachet::auth::valid_token_name(s) {
        Ok(s.to_owned())
    } else {
        Err("a token name is 1 to 64 letters, digits, '.', '_', '-' or '@'".into())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let token_on_command_line = matches.value_source("token") == Some(ValueSource::CommandLine);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli, token_on_command_line).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cache-admin: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read_secret_file(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the {what} from {}", path.display()))?;
    Ok(text.trim().to_owned())
}

async fn run(cli: Cli, token_on_command_line: bool) -> anyhow::Result<()> {
    let file = FileSettings::load(cli.config.as_deref())?;
    let server = cli
        .server
        .or(file.server)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let token = match (cli.token, cli.token_file) {
        (Some(t), _) => Some(t),
        (None, Some(f)) => Some(read_secret_file(&f, "token")?),
        (None, None) => match (file.token, file.token_file) {
            (Some(t), _) => Some(t),
            (None, Some(f)) => Some(read_secret_file(&f, "token")?),
            (None, None) => None,
        },
    };
    let ca_file = cli.ca_file.or(file.ca_file);
    let client = Client::new(&server, token.clone(), ca_file.as_deref())?;
    let json = cli.json;
    match cli.command {
        Command::Cache { command } => cache(&client, command, json).await,
        Command::Token { command } => token_command(&client, command, json).await,
        Command::Key { command } => key(&client, command, json).await,
        Command::Path { command } => path(&client, command, json).await,
        Command::Pin { command } => pin(&client, command, json).await,
        Command::Gc {
            cache,
            dry_run,
            compact,
        } => gc(&client, cache, (dry_run, compact), json).await,
        Command::Verify { cache, deep } => verify(&client, cache, deep, json).await,
        Command::Stats { cache } => stats(&client, cache, json).await,
        Command::Use { cache } => {
            let host_token = token.filter(|_| token_on_command_line);
            use_cache(&client, &cache, host_token.as_deref(), json).await
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn cache_fields(c: &CacheInfo) -> String {
    let limit =
        |v: Option<u64>, show: fn(u64) -> String| v.map(show).unwrap_or_else(|| "none".into());
    let mut pairs = vec![
        ("name", c.name.clone()),
        (
            "visibility",
            if c.public { "public" } else { "private" }.into(),
        ),
        ("public key", c.public_key.clone()),
    ];
    if c.signing_keys.len() > 1 {
        pairs.push((
            "signing keys",
            format!(
                "{} (rotation under way: run `key resign` to finish)",
                c.signing_keys.join(" ")
            ),
        ));
    }
    pairs.extend([
        ("priority", c.priority.to_string()),
        ("paths", c.paths.to_string()),
        ("nar size", output::bytes(c.nar_bytes)),
        ("used", used_of(c)),
        (
            "client signatures",
            if c.keep_client_signatures {
                "kept"
            } else {
                "dropped"
            }
            .into(),
        ),
        (
            "keep age",
            limit(c.retention.max_age_secs, output::duration),
        ),
        (
            "keep size",
            limit(c.retention.max_size_bytes, output::bytes),
        ),
        (
            "declared in config",
            if c.declared { "yes" } else { "no" }.into(),
        ),
        ("created", output::time(c.created)),
        ("store dir", c.store_dir.clone()),
    ]);
    fields(&pairs)
}

/// What a cache holds, against its quota if it has one.
fn used_of(c: &CacheInfo) -> String {
    let used = output::bytes(c.used_bytes);
    match c.effective_quota_bytes {
        Some(q) => {
            let percent = c.used_bytes as f64 * 100.0 / q.max(1) as f64;
            let whose = if c.quota_bytes.is_some() {
                ""
            } else {
                ", the server's default"
            };
            format!(
                "{used} of its {} quota ({percent:.0}%{whose})",
                output::bytes(q)
            )
        }
        None => format!("{used} (no quota)"),
    }
}

async fn cache(client: &Client, command: CacheCommand, json: bool) -> anyhow::Result<()> {
    match command {
        CacheCommand::Create {
            name,
            private,
            priority,
            secret_key_file,
            retention,
            client_signatures,
        } => {
            let secret_key = match &secret_key_file {
                Some(f) => Some(SecretText(read_secret_file(f, "secret key")?)),
                None => None,
            };
            let body = CreateCache {
                name: name.to_string(),
                public: Some(!private),
                priority,
                keep_client_signatures: Some(client_signatures.as_deref() != Some("drop")),
                retention: Retention {
                    max_age_secs: retention.keep_age.and_then(Limit::value),
                    max_size_bytes: retention.keep_size.and_then(Limit::value),
                },
                quota_bytes: retention.max_size.and_then(Limit::value),
                secret_key,
            };
            let what = format!("creating cache {name}");
            let info: CacheInfo = client
                .call(&what, Method::POST, "caches", request(&body))
                .await?;
            if json {
                return print_json(&info);
            }
            print!("{}", cache_fields(&info));
        }
        CacheCommand::List => {
            let all: Vec<CacheInfo> = client
                .call("listing caches", Method::GET, "caches", None)
                .await?;
            if json {
                return print_json(&all);
            }
            let mut t = Table::new(&[
                "NAME",
                "VISIBILITY",
                "PRIORITY",
                "PATHS",
                "NAR SIZE",
                "PUBLIC KEY",
            ]);
            for c in &all {
                t.row(vec![
                    c.name.clone(),
                    if c.public { "public" } else { "private" }.into(),
                    c.priority.to_string(),
                    c.paths.to_string(),
                    output::bytes(c.nar_bytes),
                    c.public_key.clone(),
                ]);
            }
            print!("{}", t.render());
        }
        CacheCommand::Info { name } => {
            let what = format!("reading cache {name}");
            let info: CacheInfo = client
                .call(&what, Method::GET, &format!("caches/{name}"), None)
                .await?;
            if json {
                return print_json(&info);
            }
            print!("{}", cache_fields(&info));
        }
        CacheCommand::Update {
            name,
            public,
            private,
            priority,
            retention,
            client_signatures,
        } => {
            let body = CacheChange {
                public: (public || private).then_some(public),
                priority,
                keep_client_signatures: client_signatures.map(|c| c == "keep"),
                max_age_secs: retention.keep_age.map(Limit::value),
                max_size_bytes: retention.keep_size.map(Limit::value),
                quota_bytes: retention.max_size.map(Limit::value),
            };
            let nothing = serde_json::to_value(&body)?
                .as_object()
                .is_none_or(|o| o.is_empty());
            anyhow::ensure!(!nothing, "nothing to change: give --public, --private, --priority, --keep-age, --keep-size, --max-size or --client-signatures");
            let what = format!("updating cache {name}");
            let info: CacheInfo = client
                .call(
                    &what,
                    Method::PATCH,
                    &format!("caches/{name}"),
                    request(&body),
                )
                .await?;
            if json {
                return print_json(&info);
            }
            print!("{}", cache_fields(&info));
        }
        CacheCommand::Delete { name, yes } => {
            anyhow::ensure!(
                yes,
                "deleting cache {name} removes all its store paths: give --yes to confirm"
            );
            let what = format!("deleting cache {name}");
            client
                .send(
                    &what,
                    Method::DELETE,
                    &format!("caches/{name}?confirm={name}"),
                    None,
                )
                .await?;
            if json {
                return print_json(&json!({ "deleted": name }));
            }
            println!("deleted cache {name}");
        }
    }
    Ok(())
}

fn token_status(t: &TokenInfo) -> String {
    match (t.revoked, t.expires) {
        (Some(at), _) => format!("revoked {}", output::time(at)),
        (None, Some(e)) if e <= output::now() => "expired".into(),
        _ => "active".into(),
    }
}

fn joined<T: ToString>(items: &[T]) -> String {
    items.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

async fn token_command(client: &Client, command: TokenCommand, json: bool) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            name,
            perm,
            caches,
            expires,
        } => {
            let body = CreateToken {
                name: name.clone(),
                permissions: perm,
                caches,
                expires_in_secs: expires,
            };
            let what = format!("creating token {name}");
            let made: CreatedToken = client
                .call(&what, Method::POST, "tokens", request(&body))
                .await?;
            if json {
                return print_json(&made);
            }
            let t = &made.token;
            print!(
                "{}",
                fields(&[
                    ("name", t.name.clone()),
                    ("permissions", joined(&t.permissions)),
                    ("caches", joined(&t.caches)),
                    (
                        "expires",
                        t.expires
                            .map(output::time)
                            .unwrap_or_else(|| "never".into())
                    ),
                ])
            );
            println!("# the secret, shown this once:");
            println!("{}", made.secret.0);
        }
        TokenCommand::List => {
            let all: Vec<TokenInfo> = client
                .call("listing tokens", Method::GET, "tokens", None)
                .await?;
            if json {
                return print_json(&all);
            }
            let mut t = Table::new(&[
                "NAME",
                "PERMISSIONS",
                "CACHES",
                "CREATED",
                "EXPIRES",
                "LAST USED",
                "STATUS",
            ]);
            for token in &all {
                t.row(vec![
                    token.name.clone(),
                    joined(&token.permissions),
                    joined(&token.caches),
                    output::time(token.created),
                    token
                        .expires
                        .map(output::time)
                        .unwrap_or_else(|| "never".into()),
                    output::maybe_time(token.last_used),
                    token_status(token),
                ]);
            }
            print!("{}", t.render());
        }
        TokenCommand::Revoke { name } => {
            let what = format!("revoking token {name}");
            let revoked: TokenInfo = client
                .call(&what, Method::DELETE, &format!("tokens/{name}"), None)
                .await?;
            if json {
                return print_json(&revoked);
            }
            println!("revoked token {}", revoked.name);
        }
    }
    Ok(())
}

fn print_key_change(change: &KeyChange, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(change);
    }
    let mut pairs = vec![
        ("trust", change.public_key.clone()),
        ("signing keys", change.signing_keys.join(" ")),
    ];
    if !change.retired.is_empty() {
        pairs.push(("retired", change.retired.join(" ")));
    }
    pairs.push(("paths", change.paths.to_string()));
    pairs.push(("re-signed", change.rewritten.to_string()));
    print!("{}", fields(&pairs));
    if change.resumed {
        println!(
            "# a rotation was under way: no key was added, and every path now has both signatures"
        );
    }
    Ok(())
}

async fn key(client: &Client, command: KeyCommand, json: bool) -> anyhow::Result<()> {
    match command {
        KeyCommand::Info { cache } => {
            let what = format!("reading the keys of {cache}");
            let info: KeysInfo = client
                .call(&what, Method::GET, &format!("caches/{cache}/keys"), None)
                .await?;
            if json {
                return print_json(&info);
            }
            let mut t = Table::new(&["NAME", "STATUS", "CREATED", "PATHS SIGNED", "PUBLIC KEY"]);
            for k in &info.keys {
                t.row(vec![
                    k.name.clone(),
                    if k.signing { "signing" } else { "retired" }.into(),
                    output::time(k.created),
                    format!("{} of {}", k.paths_signed, info.paths),
                    k.public_key.clone(),
                ]);
            }
            print!("{}", t.render());
            for (name, count) in &info.other_signatures {
                println!("client signature {name}: {count} of {} paths", info.paths);
            }
        }
        KeyCommand::Rotate {
            cache,
            secret_key_file,
        } => {
            let secret_key = match &secret_key_file {
                Some(f) => Some(SecretText(read_secret_file(f, "secret key")?)),
                None => None,
            };
            let body = Rotate { secret_key };
            let what = format!("rotating the key of {cache}");
            let change: KeyChange = client
                .call(
                    &what,
                    Method::POST,
                    &format!("caches/{cache}/keys/rotate"),
                    request(&body),
                )
                .await?;
            print_key_change(&change, json)?;
            if !json {
                println!("# hosts may trust either key now; add the new one to their trusted-public-keys, then run `cache-admin key resign {cache}`");
            }
        }
        KeyCommand::Resign { cache } => {
            let what = format!("re-signing {cache}");
            let change: KeyChange = client
                .call(
                    &what,
                    Method::POST,
                    &format!("caches/{cache}/keys/resign"),
                    None,
                )
                .await?;
            print_key_change(&change, json)?;
        }
    }
    Ok(())
}

async fn path(client: &Client, command: PathCommand, json: bool) -> anyhow::Result<()> {
    match command {
        PathCommand::Delete {
            cache,
            paths,
            with_referrers,
        } => {
            let body = DeletePaths {
                paths,
                with_referrers,
            };
            let what = format!("deleting paths from {cache}");
            let deleted: Deleted = client
                .call(
                    &what,
                    Method::POST,
                    &format!("caches/{cache}/paths/delete"),
                    request(&body),
                )
                .await?;
            if json {
                return print_json(&deleted);
            }
            for p in &deleted.deleted {
                println!("deleted {p}");
            }
            for p in &deleted.missing {
                println!("not in {cache}: {p}");
            }
        }
    }
    Ok(())
}

async fn pin(client: &Client, command: PinCommand, json: bool) -> anyhow::Result<()> {
    match command {
        PinCommand::Add {
            cache,
            name,
            store_path,
            keep_revisions,
            keep_days,
        } => {
            let body = AddPin {
                name: name.clone(),
                store_path: store_path.clone(),
                keep_revisions,
                keep_days,
            };
            let what = format!("pinning {store_path} in {cache}");
            let pin: PinRecord = client
                .call(
                    &what,
                    Method::POST,
                    &format!("caches/{cache}/pins"),
                    request(&body),
                )
                .await?;
            if json {
                return print_json(&pin);
            }
            println!(
                "pinned {store_path} as {name} in {cache} ({} revisions kept)",
                pin.revisions.len()
            );
        }
        PinCommand::List { cache } => {
            let what = format!("listing the pins of {cache}");
            let pins: Vec<PinRecord> = client
                .call(&what, Method::GET, &format!("caches/{cache}/pins"), None)
                .await?;
            if json {
                return print_json(&pins);
            }
            let mut table = Table::new(&["NAME", "STORE PATH", "PINNED", "REVISIONS", "KEEP"]);
            for p in &pins {
                let Some(newest) = p.revisions.last() else {
                    continue;
                };
                let keep = match (p.keep_revisions, p.keep_days) {
                    (Some(n), _) => format!("{n} revisions"),
                    (None, Some(d)) => format!("{d} days"),
                    (None, None) => "all".to_owned(),
                };
                table.row(vec![
                    p.name.clone(),
                    newest.store_path.clone(),
                    output::time(newest.added),
                    p.revisions.len().to_string(),
                    keep,
                ]);
            }
            print!("{}", table.render());
        }
        PinCommand::Remove { cache, name } => {
            let what = format!("removing pin {name} of {cache}");
            client
                .send(
                    &what,
                    Method::DELETE,
                    &format!("caches/{cache}/pins/{name}"),
                    None,
                )
                .await?;
            if !json {
                println!("removed pin {name} of {cache}");
            }
        }
    }
    Ok(())
}

async fn gc(
    client: &Client,
    cache: Option<CacheName>,
    (dry_run, compact): (bool, bool),
    json: bool,
) -> anyhow::Result<()> {
    let body = GcRequest {
        cache: cache.map(|c| c.to_string()),
        dry_run,
        compact,
    };
    let report = jobs::run(client, "collecting garbage", "gc", request(&body)).await?;
    if json {
        return print_json(&report);
    }
    let r: GcReport = serde_json::from_value(report)?;
    let verb = if r.dry_run { "would remove" } else { "removed" };
    let paths: u64 = r.paths.values().sum();
    let per_cache: Vec<String> = r.paths.iter().map(|(c, n)| format!("{c}: {n}")).collect();
    println!(
        "{}",
        fields(&[
            (
                "paths",
                format!(
                    "{paths} {}",
                    if per_cache.is_empty() {
                        String::new()
                    } else {
                        format!("({})", per_cache.join(", "))
                    }
                )
            ),
            ("nars", r.nars.to_string()),
            ("uploads", r.uploads.to_string()),
            ("chunks", r.chunks.to_string()),
            ("manifests", r.manifests.to_string()),
            ("packs", r.packs.to_string()),
            ("bytes", output::bytes(r.bytes_freed)),
            (
                "packs rewritten",
                format!(
                    "{} ({} dead in them)",
                    r.packs_compacted,
                    output::bytes(r.dead_bytes_compacted)
                )
            ),
        ])
        .lines()
        .map(|l| format!("{verb} {l}"))
        .collect::<Vec<_>>()
        .join("\n")
    );
    if !r.dry_run && r.packs_compacted > 0 {
        println!(
            "compaction: {} packs of {} rewritten into {} of {}; recompression saved {}",
            r.packs_compacted,
            output::bytes(r.bytes_compacted),
            r.packs_written,
            output::bytes(r.bytes_written),
            output::bytes(r.recompression_saved)
        );
    }
    if r.waited_out {
        println!("downloads or uploads from before were still running: their data is left for the next gc");
    }
    let mut left = Vec::new();
    if r.left_pending_uploads > 0 {
        left.push(format!(
            "{} uploads not taken up by a narinfo yet (a push may be under way; gc.pending_upload_secs)",
            r.left_pending_uploads
        ));
    }
    if r.left_young_packs > 0 {
        left.push(format!(
            "{} packs ({}) no record names, younger than gc.grace_secs",
            r.left_young_packs,
            output::bytes(r.left_young_bytes)
        ));
    }
    if r.left_partly_dead_packs > 0 {
        left.push(format!(
            "{} of dead frames in {} packs below gc.compact_dead_fraction (gc --compact rewrites them)",
            output::bytes(r.left_dead_bytes),
            r.left_partly_dead_packs
        ));
    }
    if r.left_no_room_packs > 0 {
        left.push(format!(
            "{} packs to rewrite for want of free space (storage.min_free_mib)",
            r.left_no_room_packs
        ));
    }
    for l in left {
        println!("left {l}");
    }
    println!("took {:.1} s", r.seconds);
    Ok(())
}

async fn verify(
    client: &Client,
    cache: Option<CacheName>,
    deep: bool,
    json: bool,
) -> anyhow::Result<()> {
    let body = VerifyRequest {
        cache: cache.map(|c| c.to_string()),
        deep,
    };
    let report = jobs::run(client, "verifying", "verify", request(&body)).await?;
    let r: VerifyReport = serde_json::from_value(report.clone())?;
    if json {
        print_json(&report)?;
    } else {
        println!(
            "checked {} paths, {} chunks, {} packs{}",
            r.paths,
            r.chunks,
            r.packs,
            if deep {
                format!(", read {}", output::bytes(r.bytes_read))
            } else {
                String::new()
            }
        );
        for p in &r.problems {
            println!("problem: {}", p.what);
            for path in &p.paths {
                println!("  affects {path}");
            }
        }
    }
    if !r.problems.is_empty() {
        anyhow::bail!("verification found {} problems", r.problems.len());
    }
    Ok(())
}

async fn stats(client: &Client, cache: Option<CacheName>, json: bool) -> anyhow::Result<()> {
    let path = match &cache {
        Some(c) => format!("stats?cache={c}"),
        None => "stats".to_owned(),
    };
    let s: Stats = client
        .call("reading stats", Method::GET, &path, None)
        .await?;
    if json {
        return print_json(&s);
    }
    let mut rows = vec![
        ("paths", s.paths.to_string()),
        ("nar bytes", output::bytes(s.nar_bytes)),
        ("stored bytes", output::bytes(s.stored_bytes)),
        ("dedup ratio", format!("{:.2}", s.dedup_ratio)),
    ];
    if cache.is_some() {
        let used = match s.quota_bytes {
            Some(q) => format!(
                "{} of its {} quota ({:.0}%)",
                output::bytes(s.used_bytes),
                output::bytes(q),
                s.used_bytes as f64 * 100.0 / q.max(1) as f64
            ),
            None => format!("{} (no quota)", output::bytes(s.used_bytes)),
        };
        rows.push(("used", used));
    }
    if cache.is_none() {
        rows.push(("chunks", s.chunks.to_string()));
        rows.push(("packs", s.packs.to_string()));
        rows.push(("dead bytes", output::bytes(s.dead_bytes)));
    }
    let last = match &s.last_gc {
        Some(r) => format!(
            "{} (freed {})",
            output::time(r.started),
            output::bytes(r.bytes_freed)
        ),
        None => "never".to_owned(),
    };
    rows.push(("last gc", last));
    print!("{}", fields(&rows));
    Ok(())
}

async fn use_cache(
    client: &Client,
    cache: &CacheName,
    token: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let what = format!("reading cache {cache}");
    let info: CacheInfo = client
        .call(&what, Method::GET, &format!("caches/{cache}"), None)
        .await?;
    let url = format!("{}/{}", client.base(), info.name);
    let host = host_of(client.base());
    if json {
        return print_json(&json!({
            "substituter": url,
            "public_key": info.public_key,
            "netrc": token.map(|t| format!("machine {host} password {t}")),
        }));
    }
    println!("# in nix.conf (or nix.settings in NixOS):");
    println!("extra-substituters = {url}");
    println!("extra-trusted-public-keys = {}", info.public_key);
    if !info.public {
        println!("netrc-file = /etc/nix/netrc");
        println!("# in /etc/nix/netrc (mode 0600):");
        match token {
            Some(t) => println!("machine {host} password {t}"),
            None => println!("# machine {host} password <a pull token: cache-admin token create --perm pull --cache {}>", info.name),
        }
    }
    Ok(())
}
