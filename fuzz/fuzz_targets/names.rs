//! The names clients put in URLs: NAR URLs, store paths and their hashes, the names of
//! logs and realisations, cache names. Whatever parses prints back the same, and the
//! keys of logs and realisations never climb out of their place.
#![no_main]

use cachet::nix::blob_name;
use cachet::nix::store_path::{StorePath, StorePathHash};
use cachet::nix::{CacheName, NarUrl};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(url) = text.parse::<NarUrl>() {
        assert_eq!(url.to_string().parse::<NarUrl>().unwrap(), url);
    }
    if let Ok(url) = NarUrl::from_file_name(text) {
        assert_eq!(NarUrl::from_file_name(&url.file_name()).unwrap(), url);
    }
    if let Ok(p) = StorePath::from_full(text) {
        assert_eq!(p.full(), text);
    }
    if let Ok(p) = StorePath::from_basename(text) {
        assert_eq!(p.to_string(), text);
    }
    if let Ok(h) = text.parse::<StorePathHash>() {
        assert_eq!(h.to_string().parse::<StorePathHash>().unwrap(), h);
    }
    if let Ok(c) = text.parse::<CacheName>() {
        assert_eq!(c.as_str(), text);
    }
    for key in [
        blob_name::log_key(text),
        blob_name::realisation_key(text),
    ]
    .into_iter()
    .flatten()
    {
        assert!(!key.contains('/') && !key.starts_with('.'), "{key:?}");
    }
    if let Some((drv, output)) = text.split_once('/') {
        if let Some(key) = blob_name::trace_key(drv, output) {
            assert_eq!(key.matches('/').count(), 1, "{key:?}");
            assert!(!key.split('/').any(|part| part == ".." || part == "."));
        }
    }
});
