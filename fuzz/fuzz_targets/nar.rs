//! The NAR validator and the listing it writes: any bytes are refused or accepted,
//! never a panic, and an accepted archive's listing is JSON whose every file lies
//! within the archive.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut listing = Vec::new();
    let Ok(summary) = cachet::nix::nar::validate(data, &mut listing, 10_000) else {
        return;
    };
    assert_eq!(summary.size, data.len() as u64, "a NAR ends where its input does");
    let json: serde_json::Value =
        serde_json::from_slice(&listing).expect("the listing of a valid NAR is JSON");
    let mut stack = vec![&json["root"]];
    while let Some(node) = stack.pop() {
        match node["type"].as_str() {
            Some("regular") => {
                let size = node["size"].as_u64().expect("a file has a size");
                let offset = node["narOffset"].as_u64().expect("a file has an offset");
                assert!(offset + size <= data.len() as u64, "contents within the NAR");
            }
            Some("directory") => {
                if let Some(entries) = node["entries"].as_object() {
                    stack.extend(entries.values());
                }
            }
            Some("symlink") => assert!(node["target"].is_string()),
            other => panic!("entry of type {other:?}"),
        }
    }
});
