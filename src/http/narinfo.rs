//! `GET`/`PUT /<cache>/<hash>.narinfo` and `GET /<cache>/<hash>.ls`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::content::stream;
use super::extract::{small_body, Credentials};
use crate::app::App;
use crate::error::{Error, Result};
use crate::grants::Permission;
use crate::nix::{CacheName, StorePathHash};
use crate::publish::{self, Published};
use crate::serve::Encoding;

/// What `/<cache>/<file>` names.
#[derive(Debug, PartialEq, Eq)]
enum File {
    NarInfo(StorePathHash),
    Listing(StorePathHash),
}

fn parse_file(file: &str) -> Result<File> {
    let hash = |stem: &str| {
        stem.parse::<StorePathHash>().map_err(|e| Error::BadPath {
            what: "store path hash",
            reason: e.to_string(),
        })
    };
    if let Some(stem) = file.strip_suffix(".narinfo") {
        Ok(File::NarInfo(hash(stem)?))
    } else if let Some(stem) = file.strip_suffix(".ls") {
        Ok(File::Listing(hash(stem)?))
    } else {
        Err(Error::NotFound("file"))
    }
}

/// `GET`: the signed narinfo, or the listing of its NAR.
pub async fn get(
    State(app): State<Arc<App>>,
    Path((cache, file)): Path<(CacheName, String)>,
    creds: Credentials,
    headers: HeaderMap,
) -> Result<Response> {
    let file = parse_file(&file)?;
    let cache = creds.cache(&app, &cache, Permission::Pull)?;
    let (File::NarInfo(hash) | File::Listing(hash)) = file;
    let record = app
        .serve
        .index
        .narinfo(&cache.name, &hash)
        .await?
        .ok_or(Error::NotFound("narinfo"))?;
    match file {
        File::NarInfo(_) => {
            app.accesses.narinfo(&cache.name, hash, crate::clock::now());
            let mut r = record.text.into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/x-nix-narinfo"),
            );
            Ok(r)
        }
        File::Listing(_) => {
            let epoch = app.coord.lease();
            let nar = app
                .serve
                .index
                .nar(&record.nar_hash)
                .await?
                .ok_or(Error::NotFound("listing"))?;
            stream(
                &app,
                epoch,
                &nar.listing,
                Encoding::Plain,
                &headers,
                "application/json",
            )
            .await
        }
    }
}

/// `PUT`: a narinfo to publish; a client's own listing is accepted and not needed.
pub async fn put(
    State(app): State<Arc<App>>,
    Path((cache, file)): Path<(CacheName, String)>,
    creds: Credentials,
    body: Body,
) -> Result<StatusCode> {
    let file = parse_file(&file)?;
    creds.cache(&app, &cache, Permission::Push)?;
    let body = small_body(&app, body, app.config.ingest.max_narinfo_bytes).await?;
    match file {
        File::NarInfo(hash) => {
            // The cache as it is now, held so: a key change waits for this commit, and
            // one made while the body arrived is signed with (see `caches`).
            let _unchanged = app.coord.shared(&cache).await?;
            if app.coord.replicated() {
                // Changed through another process just before, its notice on the way.
                app.caches.refresh(&cache).await?;
            }
            let cache = creds.cache(&app, &cache, Permission::Push)?;
            let quota = app.config.quota.of(cache.record.quota_bytes);
            let published = publish::publish(&app.index, &cache, hash, &body, quota).await?;
            match published {
                // A push counts as a fetch: retention measures age from it.
                Published::New => app.accesses.narinfo(&cache.name, hash, crate::clock::now()),
                Published::Repeat => {}
                Published::Conflict { .. } => {
                    app.metrics.narinfo_conflicts.inc();
                }
            }
        }
        // The listing is built from the NAR itself while ingesting
        // (`write-nar-listing=1` sends the client's own).
        File::Listing(_) => {}
    }
    Ok(StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_parsed_and_others_are_misses() {
        let h = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz";
        let hash: StorePathHash = h.parse().unwrap();
        assert_eq!(
            parse_file(&format!("{h}.narinfo")).unwrap(),
            File::NarInfo(hash)
        );
        assert_eq!(parse_file(&format!("{h}.ls")).unwrap(), File::Listing(hash));
        assert!(matches!(parse_file("favicon.ico"), Err(Error::NotFound(_))));
        for bad in [
            "x.narinfo",
            "7h7qgvs4kgzsn8a6rb273saxyqh4jxle.narinfo",
            ".ls",
        ] {
            assert!(
                matches!(parse_file(bad), Err(Error::BadPath { .. })),
                "{bad}"
            );
        }
    }
}
