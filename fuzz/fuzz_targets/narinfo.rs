//! The narinfo parser: any bytes give a narinfo or an error, and a narinfo prints as
//! text that parses back to itself.
#![no_main]

use cachet::nix::NarInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(info) = NarInfo::parse(data) else {
        return;
    };
    let text = info.render();
    let again = NarInfo::parse(text.as_bytes()).expect("what we print parses");
    assert_eq!(again, info);
    let _ = info.fingerprint();
});
