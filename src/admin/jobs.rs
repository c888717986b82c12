//! Following a job of the server (a garbage collection, a verification) to its end:
//! polled, drawn as a progress bar on a terminal, silent otherwise.

use std::io::IsTerminal as _;
use std::time::Duration;

use reqwest::Method;

use super::client::Client;
use super::output;
use crate::http::api::types::JobStarted;
use crate::jobs::JobStatus;

/// Starts a job with `POST <path>` and waits for its end; returns its report.
pub async fn run(
    client: &Client,
    what: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let started: JobStarted = client.call(what, Method::POST, path, body).await?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let status = loop {
        let status: JobStatus = client
            .call(what, Method::GET, &format!("jobs/{}", started.id), None)
            .await?;
        if let Some(bar) = &bar {
            bar.set_message(format!(
                "{}: {} items, {}",
                status.phase,
                status.items,
                output::bytes(status.bytes)
            ));
        }
        if status.done {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match (status.result, status.error) {
        (Some(report), _) => Ok(report),
        (None, Some(e)) => anyhow::bail!("{what}: {e}"),
        (None, None) => anyhow::bail!("{what}: the server reported no result"),
    }
}
