//! The admin API's JSON bodies (the first input byte picks which): any bytes give a
//! request or an error, never a panic, and what parses prints as JSON that parses to
//! the same request.
#![no_main]

use cachet::caches::CacheChange;
use cachet::http::api::types::{
    AddPin, CreateCache, CreateToken, DeletePaths, GcRequest, Rotate, VerifyRequest,
};
use libfuzzer_sys::fuzz_target;

/// Parses `json` as a `T`, and if it parses, checks that it prints and parses again.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(json: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(json) {
        let text = serde_json::to_vec(&v).expect("a request serialises");
        let again: T = serde_json::from_slice(&text).expect("what we print parses");
        assert_eq!(
            serde_json::to_value(&again).unwrap(),
            serde_json::to_value(&v).unwrap()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, json)) = data.split_first() else {
        return;
    };
    match pick % 8 {
        0 => round_trip::<CreateCache>(json),
        1 => round_trip::<CacheChange>(json),
        2 => round_trip::<CreateToken>(json),
        3 => round_trip::<DeletePaths>(json),
        4 => round_trip::<GcRequest>(json),
        5 => round_trip::<VerifyRequest>(json),
        6 => round_trip::<AddPin>(json),
        _ => round_trip::<Rotate>(json),
    }
});
