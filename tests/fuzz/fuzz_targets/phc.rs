//! Stored password hashes (PHC strings from var/users.toml, which an admin
//! or anyone with write access to it may have damaged):
//! `users::verify_password` with a cost cap of ln=12.
//!
//! Properties: nothing panics; only `$scrypt$` strings can verify; no
//! allocation is larger than the cap allows (scrypt needs 128·N·r bytes:
//! 16 MiB at ln=12 and the server's r ≤ 32); a refused string is refused at
//! once, before any hashing.

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ftpx::store::users::{Password, verify_password};
use libfuzzer_sys::fuzz_target;

/// Real PHC strings are about 100 bytes; longer ones only exercise the
/// base64 decoder.
const MAX_INPUT: usize = 1024;
const MAX_LOG_N: u8 = 12;
/// The largest single allocation the cap allows, with room to spare.
const MAX_ALLOC: usize = 32 << 20;
/// Requests above this fail outright, so that an absurd one aborts the run
/// (and is reported) instead of taking the machine's memory.
const REFUSE_ALLOC: usize = 1 << 30;

/// The system allocator, noting the largest request.
struct Watched;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged, or fails
// with a null pointer as `GlobalAlloc` allows.
unsafe impl GlobalAlloc for Watched {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        if layout.size() > REFUSE_ALLOC {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        if layout.size() > REFUSE_ALLOC {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        if new_size > REFUSE_ALLOC {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Watched = Watched;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let Ok(stored) = std::str::from_utf8(data) else {
        return;
    };
    LARGEST.store(0, Ordering::Relaxed);
    let started = Instant::now();
    let verdict = verify_password(&Password::new("correct horse"), stored, MAX_LOG_N);
    let took = started.elapsed();
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= MAX_ALLOC,
        "{stored:?} made an allocation of {largest} bytes"
    );
    match verdict {
        Ok(_) => assert!(
            stored.starts_with("$scrypt$"),
            "{stored:?} was taken for an scrypt hash"
        ),
        // Refusals come before any hashing, so they are quick whatever the
        // string asks for.
        Err(e) => assert!(
            took < Duration::from_secs(1),
            "{stored:?} took {took:?} to refuse ({e})"
        ),
    }
});
