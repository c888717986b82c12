//! Request parts every handler shares: credentials, and bodies guarded against
//! clients that stall.

use std::sync::Arc;

use axum::body::{Body, BodyDataStream};
use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use crate::app::App;
use crate::auth::Token;
use crate::body::{Guarded, Peer};
use crate::caches::Cache;
use crate::error::{Error, Result};
use crate::grants::Permission;
use crate::nix::CacheName;

/// The token a request carries: the HTTP Basic password (what a netrc `password`
/// produces, with or without a login) or an `Authorization: Bearer` token.
pub struct Credentials(pub Option<Token>);

impl FromRequestParts<Arc<App>> for Credentials {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &Arc<App>) -> Result<Self> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Ok(Self(None));
        };
        // A header we cannot read is a token that matches nothing: refused for pushes,
        // and no obstacle to reading a public cache.
        Ok(Self(Some(Token::new(
            parse(value.as_bytes()).unwrap_or_default(),
        ))))
    }
}

/// The token of an `Authorization` header, if it has one.
fn parse(value: &[u8]) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(rest.trim().to_owned())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let pair = String::from_utf8(BASE64.decode(rest.trim()).ok()?).ok()?;
        let (login, password) = pair.split_once(':').unwrap_or((pair.as_str(), ""));
        // A netrc with a login but no password sends the token as the login.
        Some(if password.is_empty() { login } else { password }.to_owned())
    } else {
        None
    }
}

impl Credentials {
    /// The token, if the request carried one.
    pub fn token(&self) -> Option<&Token> {
        self.0.as_ref()
    }

    /// The cache `name`, if these credentials may do `permission` on it.
    pub fn cache(&self, app: &App, name: &CacheName, permission: Permission) -> Result<Arc<Cache>> {
        app.auth.cache(&app.caches, self.token(), name, permission)
    }
}

/// The connection's client, as the server put it in the request (a request that did
/// not come from a connection has one that never leaves).
impl FromRequestParts<Arc<App>> for Peer {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &Arc<App>) -> Result<Self> {
        Ok(parts
            .extensions
            .get::<Peer>()
            .cloned()
            .unwrap_or_else(Peer::always))
    }
}

/// A request body as a stream, cut off when the client stalls (see `crate::body`).
pub fn guarded(app: &App, body: Body) -> Guarded<BodyDataStream> {
    crate::body::guard(
        body.into_data_stream(),
        crate::body::BodyLimits::of(&app.config.ingest),
    )
}

/// Reads a whole body of at most `limit` bytes (413 above it, 408 if it stalls).
pub async fn small_body(app: &App, body: Body, limit: usize) -> Result<bytes::Bytes> {
    Ok(crate::body::collect(guarded(app, body), limit as u64).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(pair: &str) -> String {
        format!("Basic {}", BASE64.encode(pair))
    }

    #[test]
    fn tokens_come_from_basic_passwords_logins_or_bearer() {
        assert_eq!(parse(basic(":tok").as_bytes()).as_deref(), Some("tok"));
        assert_eq!(parse(basic("ci:tok").as_bytes()).as_deref(), Some("tok"));
        // A netrc with a login and no password sends the token as the login.
        assert_eq!(parse(basic("tok:").as_bytes()).as_deref(), Some("tok"));
        assert_eq!(parse(basic("tok").as_bytes()).as_deref(), Some("tok"));
        assert_eq!(parse(b"Bearer  tok ").as_deref(), Some("tok"));
        assert_eq!(parse(b"bearer tok").as_deref(), Some("tok"));
        for bad in [&b"Basic !!!"[..], b"Digest x", b"Bearer", b"\xff\xfe"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
