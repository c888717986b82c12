//! A benchmark client that fetches a closure like a substituter does, minus
//! decompression: every narinfo sequentially on one keep-alive connection, each
//! followed by a miss, then every NAR the narinfos name, by N connections taking from a
//! shared queue, bodies counted and discarded. Prints one JSON object of figures.
//!
//!   cargo run --release --example fetch -- --cache URL --hashes FILE [--connections N]
//!
//! FILE lists the store path hashes (32 nix32 letters) one per line.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Base URL of the binary cache (`http://host:port/prefix`).
    #[arg(long)]
    cache: String,
    /// File with one store path hash per line.
    #[arg(long)]
    hashes: std::path::PathBuf,
    /// Concurrent connections for the NAR downloads.
    #[arg(long, default_value_t = 1)]
    connections: usize,
}

fn nar_url(narinfo: &str) -> Option<&str> {
    narinfo.lines().find_map(|l| l.strip_prefix("URL: "))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // reqwest is built without a default TLS provider (the project picks ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let cache = args.cache.trim_end_matches('/').to_owned();
    let hashes: Vec<String> = std::fs::read_to_string(&args.hashes)?
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    // One connection for the sequential phase: a pool of one idle connection.
    let one = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()?;

    // Hits and misses alternate on the connection, so drift on a shared machine hits
    // both alike; each is timed request by request, body read whole.
    let mut urls = Vec::with_capacity(hashes.len());
    let (mut narinfo_s, mut miss_s) = (0.0, 0.0);
    for h in &hashes {
        let start = Instant::now();
        let r = one.get(format!("{cache}/{h}.narinfo")).send().await?;
        anyhow::ensure!(r.status() == 200, "{h}.narinfo: {}", r.status());
        let body = r.bytes().await?;
        narinfo_s += start.elapsed().as_secs_f64();
        let text = std::str::from_utf8(&body)?;
        urls.push(
            nar_url(text)
                .ok_or_else(|| anyhow::anyhow!("{h}: no URL"))?
                .to_owned(),
        );

        let miss: String = h.chars().rev().collect();
        let start = Instant::now();
        let r = one.get(format!("{cache}/{miss}.narinfo")).send().await?;
        anyhow::ensure!(r.status() == 404, "miss {miss}: {}", r.status());
        r.bytes().await?;
        miss_s += start.elapsed().as_secs_f64();
    }

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let urls = Arc::new(urls);
    let start = Instant::now();
    let workers: Vec<_> = (0..args.connections)
        .map(|_| {
            let (client, next, bytes, urls, cache) = (
                client.clone(),
                next.clone(),
                bytes.clone(),
                urls.clone(),
                cache.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(url) = urls.get(i) else {
                        return Ok::<_, anyhow::Error>(());
                    };
                    let mut r = client.get(format!("{cache}/{url}")).send().await?;
                    anyhow::ensure!(r.status() == 200, "{url}: {}", r.status());
                    while let Some(chunk) = r.chunk().await? {
                        bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    let download_s = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "paths": hashes.len(),
            "narinfo_s": narinfo_s,
            "miss_s": miss_s,
            "connections": args.connections,
            "download_s": download_s,
            "bytes": bytes.load(Ordering::Relaxed),
        })
    );
    Ok(())
}
