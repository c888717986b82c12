//! The allocator of cachet's processes: mimalloc, built without transparent huge
//! pages, giving freed memory back to the system at once instead of a second later.
//!
//! sled frees and reallocates its page cache's nodes from many threads; glibc's
//! malloc keeps what one thread's arena freed for that arena, so a collection over a
//! million chunks peaked at 430 MiB of resident memory for about 230 MiB of live
//! heap. mimalloc keeps resident memory close to the live heap (BENCHMARKS.md, "gc at
//! scale") when it purges soon: at its default of a second, a burst of frees followed
//! by a burst of allocations (a scan after a batch of deletions) adds pages instead
//! of reusing them (a collection at a million chunks: 251 MiB with THP off alone,
//! 250 to 257 MiB purging after 10 ms, 220 to 237 MiB at once). Purging at once costs
//! the hot path some CPU, pages given back and faulted in again (BENCHMARKS.md).
//!
//! The one module allowed `unsafe`: the option is set through mimalloc's C API.
#![allow(unsafe_code)]

/// The allocator the binaries install with `#[global_allocator]`.
pub use mimalloc::MiMalloc as Allocator;

/// mimalloc 3's `mi_option_purge_delay` (the 16th member of its option enum; the
/// build links the version Cargo.lock names, and a test checks the option's default).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays with the process, in milliseconds.
const PURGE_AFTER_MS: std::os::raw::c_long = 0;

/// Sets the allocator up; the binaries call it first thing.
pub fn configure() {
    // SAFETY: setting an option is allowed at any time; mimalloc reads it when it
    // next purges.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, PURGE_AFTER_MS) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: reading an option.
        let delay = || unsafe { libmimalloc_sys::mi_option_get(super::PURGE_DELAY) };
        // mimalloc 3 documents the purge delay's default as 1000 ms; another option
        // at this index would have another default. The tests do not configure.
        assert_eq!(delay(), 1000);
        super::configure();
        assert_eq!(delay(), super::PURGE_AFTER_MS);
    }
}
