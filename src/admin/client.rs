//! The admin API over HTTP or HTTPS: where the server and the token come from, TLS
//! with the system's roots and an optional CA file, and errors that say what failed
//! and the server's reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Settings read from the user's config file (`cache-admin.toml`). `Debug` never
/// shows the token.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    /// The server's base URL.
    pub server: Option<String>,
    /// A token.
    pub token: Option<String>,
    /// A file holding the token (e.g. one a secrets manager writes).
    pub token_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust beside the system's.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for FileSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSettings")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Where the user's config file is: `$XDG_CONFIG_HOME/cachet/cache-admin.toml`, or
/// under `~/.config`.
pub fn default_config_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("cachet").join("cache-admin.toml"))
}

impl FileSettings {
    /// Reads `path`; a missing default file is no settings, a missing named one an
    /// error.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let (path, named) = match path {
            Some(p) => (p.to_owned(), true),
            None => match default_config_file() {
                Some(p) => (p, false),
                None => return Ok(Self::default()),
            },
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("reading {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// A client of one server.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// TLS with the system's roots, plus those of `ca_file`.
fn tls_config(ca_file: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped: a CA file may be all that is needed.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(file) = ca_file {
        use rustls_pki_types::pem::PemObject as _;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(file)
            .and_then(|c| c.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow::anyhow!("reading CA certificates from {}: {e}", file.display()))?;
        anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", file.display());
        for cert in certs {
            roots
                .add(cert)
                .with_context(|| format!("a certificate in {}", file.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // The HTTP client's own defaults look for a process-wide provider: the same one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The body of a request, from its type in `http::api::types` (the server reads the
/// same type, so the two cannot drift).
pub fn request<T: serde::Serialize>(body: &T) -> Option<serde_json::Value> {
    Some(serde_json::to_value(body).expect("a request body always serialises"))
}

impl Client {
    /// A client of `base` (an `http://` or `https://` URL) sending `token`.
    pub fn new(base: &str, token: Option<String>, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        anyhow::ensure!(
            base.starts_with("http://") || base.starts_with("https://"),
            "the server {base:?} must be an http:// or https:// URL"
        );
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config(ca_file)?)
            .build()
            .context("setting up the HTTP client")?;
        Ok(Self { http, base, token })
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request to `path` under the API and decodes the JSON answer; `what`
    /// names the action in errors.
    pub async fn call<T: DeserializeOwned>(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let text = self.send(what, method, path, body).await?;
        serde_json::from_str(&text).with_context(|| {
            format!("{what}: the server's answer is not what this cache-admin expects")
        })
    }

    /// Like `call`, for answers without a body.
    pub async fn send(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<String> {
        let url = format!("{}/_api/v1/{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{what}: could not reach {}: {}", self.base, chain(&e)))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| anyhow::anyhow!("{what}: reading the answer: {}", chain(&e)))?;
        if status.is_success() {
            return Ok(text);
        }
        let reason = text.trim();
        let hint = match status {
            StatusCode::UNAUTHORIZED if self.token.is_none() => {
                " (no token given: use --token, CACHET_TOKEN or the config file)"
            }
            StatusCode::UNAUTHORIZED => {
                " (the token is unknown, revoked or expired, or the cache does not exist)"
            }
            _ => "",
        };
        anyhow::bail!("{what}: the server answered {status}: {reason}{hint}")
    }
}

/// An error with its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
