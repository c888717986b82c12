//! The processes' allocator: glibc's malloc, held to two arenas.
//!
//! glibc gives each thread that meets a busy arena a new one, up to eight per core,
//! and keeps in each what was freed there. sled frees and reallocates its page
//! cache's nodes from many threads, so a collection over a million chunks held far
//! more resident memory than live heap (BENCHMARKS.md, "gc at scale"). Two arenas (as
//! many as this machine kind has cores) share what is freed. mimalloc was measured
//! too: lower collection peaks, but 320 MiB under the hostile-client test, where
//! glibc stays under 140.
//!
//! The one module allowed `unsafe`: the setting is made through glibc's `mallopt`.
#![allow(unsafe_code)]

use std::os::raw::c_int;

extern "C" {
    fn mallopt(param: c_int, value: c_int) -> c_int;
}

/// glibc's `M_ARENA_MAX` (malloc.h).
const M_ARENA_MAX: c_int = -8;

/// The arenas allowed.
const ARENAS: c_int = 2;

/// Sets the allocator up; the binaries call it first thing, before other threads.
pub fn configure() -> bool {
    // SAFETY: mallopt only changes a setting of the allocator; glibc takes it at any
    // time, and arenas made later obey it.
    unsafe { mallopt(M_ARENA_MAX, ARENAS) == 1 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_the_setting() {
        assert!(super::configure());
    }
}
