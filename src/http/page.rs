//! Pages for people: `GET /` lists the public caches, `GET /<cache>/` shows how to use
//! a cache (its public key, the nix.conf lines, the `nix copy` line) and what it holds.
//! Plain HTML, no JavaScript; every value shown is escaped, since the `Host` header and
//! key names come from outside.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{Html, IntoResponse, Response};

use super::extract::Credentials;
use crate::app::App;
use crate::caches::Cache;
use crate::error::Result;
use crate::grants::Permission;
use crate::index::CacheStats;
use crate::nix::CacheName;

/// Text made safe inside HTML elements and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Bytes as people read them.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:52em;margin:2em auto;\
padding:0 1em;line-height:1.5;color:#222}\
pre{background:#f4f4f4;padding:.6em .8em;border-radius:4px;overflow-x:auto;\
user-select:all}\
dt{font-weight:600}dd{margin:0 0 .8em}h1 small{font-weight:400;color:#666}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head>\n<body>\n{body}</body></html>\n",
        escape(title)
    )
}

/// A labelled value in a block that selects whole on click, for copying.
fn copyable(out: &mut String, id: &str, label: &str, value: &str) {
    let _ = writeln!(
        out,
        "<dt>{}</dt><dd><pre id=\"{id}\">{}</pre></dd>",
        escape(label),
        escape(value)
    );
}

/// The host name of a URL, without its port: what a netrc `machine` line names.
pub fn host_of(url: &str) -> &str {
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = authority.split('/').next().unwrap_or_default();
    match authority.strip_prefix('[') {
        // An IPv6 literal, `[::1]:8080`.
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    }
}

/// The cache's page; `base` is the server's URL as the client reached it, `quota`
/// the quota that applies to the cache.
pub fn render_cache(cache: &Cache, stats: &CacheStats, quota: Option<u64>, base: &str) -> String {
    let url = format!("{base}/{}", cache.name);
    let key = cache.public_key().to_string();
    let host = host_of(base);
    let mut body = String::new();
    let visibility = if cache.public { "public" } else { "private" };
    let _ = write!(
        body,
        "<h1>{} <small id=\"visibility\">{visibility}</small></h1>\n\
         <p>A Nix binary cache: <span id=\"paths\">{}</span> store paths, \
         <span id=\"nar-bytes\">{}</span> of NARs, \
         <span id=\"stored-bytes\">{}</span> compressed.</p>\n<dl>\n",
        escape(cache.name.as_str()),
        stats.paths,
        escape(&human(stats.nar_bytes)),
        escape(&human(stats.stored_bytes)),
    );
    let used = stats.used_bytes();
    let quota_line = match quota {
        Some(q) => format!(
            "<span id=\"used\">{}</span> of its <span id=\"quota\">{}</span> quota \
             (<span id=\"used-percent\">{:.0}%</span>)",
            escape(&human(used)),
            escape(&human(q)),
            used as f64 * 100.0 / q.max(1) as f64
        ),
        None => format!(
            "<span id=\"used\">{}</span> (no quota)",
            escape(&human(used))
        ),
    };
    let _ = writeln!(body, "<dt>Stored</dt><dd>{quota_line}</dd>");
    copyable(&mut body, "public-key", "Public key", &key);
    copyable(
        &mut body,
        "nix-conf",
        "In nix.conf, to substitute from it",
        &format!("extra-substituters = {url}\nextra-trusted-public-keys = {key}"),
    );
    let netrc_use = if cache.public {
        "to push"
    } else {
        "to pull and to push"
    };
    copyable(
        &mut body,
        "netrc",
        &format!("In the netrc file that nix.conf's netrc-file names, {netrc_use}"),
        &format!("machine {host} password <token>"),
    );
    copyable(
        &mut body,
        "push",
        "To push a build",
        &format!("nix copy --to '{url}?compression=zstd' ./result"),
    );
    body.push_str("</dl>\n");
    page(&format!("{} · cachet", cache.name), &body)
}

/// The server's page: its public caches.
pub fn render_index(caches: &[Arc<Cache>]) -> String {
    let mut body =
        String::from("<h1>cachet</h1>\n<p>Nix binary caches on this server:</p>\n<ul>\n");
    let public: Vec<_> = caches.iter().filter(|c| c.public).collect();
    for c in &public {
        let name = escape(c.name.as_str());
        let _ = writeln!(body, "<li><a href=\"/{name}/\">{name}</a></li>");
    }
    if public.is_empty() {
        body.push_str("<li>none public</li>\n");
    }
    body.push_str("</ul>\n");
    page("cachet", &body)
}

/// The server's URL as the client reached it: the `Host` it asked for, and `https`
/// over the server's own TLS or behind a reverse proxy that says it forwarded that.
fn base_url(headers: &HeaderMap, tls: bool) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|p| *p == "https")
        .unwrap_or(if tls { "https" } else { "http" });
    format!("{scheme}://{host}")
}

/// `GET /<cache>/`.
pub async fn cache(
    State(app): State<Arc<App>>,
    Path(cache): Path<CacheName>,
    creds: Credentials,
    tls: Option<axum::Extension<super::OverTls>>,
    headers: HeaderMap,
) -> Result<Response> {
    let cache = creds.cache(&app, &cache, Permission::Pull)?;
    let stats = app.index.cache_stats(&cache.name).await?;
    let base = base_url(&headers, tls.is_some());
    let quota = app.config.quota.of(cache.record.quota_bytes);
    Ok(Html(render_cache(&cache, &stats, quota, &base)).into_response())
}

/// `GET /`.
pub async fn index(State(app): State<Arc<App>>) -> Html<String> {
    Html(render_index(&app.caches.all()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::signing::SecretKey;

    const MARKUP: &str = "<script>alert('x')</script>&\"";

    #[test]
    fn every_value_shown_is_escaped() {
        // Key names may hold any printable character but ':'.
        let key = SecretKey::generate("<script>alert('x')</script>&\"").unwrap();
        let cache = Cache::for_test("main", false, key);
        let stats = CacheStats {
            paths: 3,
            nar_bytes: 3 << 30,
            stored_bytes: 1000,
            ..CacheStats::default()
        };
        let html = render_cache(&cache, &stats, Some(4000), &format!("http://{MARKUP}"));
        assert!(
            html.contains("<span id=\"used-percent\">25%</span>"),
            "{html}"
        );
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains(MARKUP));
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"));
        assert!(html.contains("<span id=\"paths\">3</span>"));
        assert!(html.contains("3.0 GiB") && html.contains("1000 bytes"));
        assert!(
            html.contains("to pull and to push"),
            "a private cache needs its token to pull"
        );
        assert!(html.contains("private"));
    }

    #[test]
    fn netrc_lines_name_the_host_without_its_port() {
        assert_eq!(host_of("http://cache.example:8080"), "cache.example");
        assert_eq!(host_of("https://cache.example"), "cache.example");
        assert_eq!(host_of("http://[::1]:8080"), "::1");
        assert_eq!(host_of("http://10.0.0.1"), "10.0.0.1");
    }

    #[test]
    fn the_index_lists_public_caches_only() {
        let make = |name: &str, public| {
            Arc::new(Cache::for_test(
                name,
                public,
                SecretKey::generate("k-1").unwrap(),
            ))
        };
        let html = render_index(&[make("open", true), make("secret", false)]);
        assert!(html.contains("href=\"/open/\""));
        assert!(!html.contains("secret"));
    }
}
