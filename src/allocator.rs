//! The allocator of cachet's processes: mimalloc, built without transparent huge
//! pages and set to give freed memory back to the system at once.
//!
//! sled frees and reallocates its page cache's nodes from many threads; glibc's
//! malloc keeps what one thread's arena freed for that arena, so a collection over a
//! million chunks peaked at 430 MiB of resident memory for about 230 MiB of live
//! heap. mimalloc with these two settings keeps resident memory close to the live
//! heap (BENCHMARKS.md, "gc at scale").
//!
//! The one module allowed `unsafe`: the option is set through mimalloc's C API.
#![allow(unsafe_code)]

/// The allocator the binaries install with `#[global_allocator]`.
pub use mimalloc::MiMalloc as Allocator;

/// mimalloc 3's `mi_option_purge_delay` (the 16th member of its option enum; the
/// build links the version Cargo.lock names, and a test checks the option's default).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Frees memory at once instead of a second later: a burst of frees followed by a
/// burst of allocations (a scan after a batch of deletions) then reuses pages
/// instead of adding to them.
pub fn configure() {
    // SAFETY: setting an option is allowed at any time; mimalloc reads it when it
    // next purges.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // mimalloc 3 documents the purge delay's default as 1000 ms; another
        // option at this index would have another default.
        // SAFETY: reading an option.
        let delay = unsafe { libmimalloc_sys::mi_option_get(super::PURGE_DELAY) };
        assert_eq!(delay, 1000);
    }
}
