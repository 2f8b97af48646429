//! The process's memory allocator: the system's, asking for transparent
//! huge pages on large blocks.
//!
//! Each password check (scrypt at OWASP's cost) takes a fresh 128 MiB block.
//! In 4 KiB pages that is 32,768 page faults, each zeroing its page: about
//! 30% of a login's CPU time as measured on a 2-core VM. With huge pages it is
//! 64 faults, and a login costs about a fifth less. The kernel gives huge
//! pages to ranges marked `MADV_HUGEPAGE` under its default THP mode
//! (`madvise`), and ignores the mark when THP is off.

use std::alloc::{GlobalAlloc, Layout, System};

pub struct Allocator;

/// Blocks at least this large are marked for huge pages. glibc serves
/// blocks above its mmap threshold (at most 32 MiB) from their own mappings;
/// smaller ones may sit in a heap that the mark would outlive. Transfer
/// buffers (at most 4 MiB) stay unmarked, away from the kernel's compaction
/// stalls on marked ranges.
const HUGE_BLOCK: usize = 32 << 20;
/// Huge pages are this large and this aligned (x86-64 and arm64 with 4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

// SAFETY: every call goes to the system allocator with the caller's own
// arguments; `advise` only changes how the pages of a block it was just
// given are backed, never its contents or extent.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let block = unsafe { System.alloc(layout) };
        advise(block, layout.size());
        block
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let block = unsafe { System.alloc_zeroed(layout) };
        advise(block, layout.size());
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        unsafe { System.dealloc(block, layout) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let block = unsafe { System.realloc(block, layout, new_size) };
        advise(block, new_size);
        block
    }
}

/// Marks the whole huge pages inside a large block for huge-page backing.
fn advise(block: *mut u8, size: usize) {
    if block.is_null() || size < HUGE_BLOCK {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let start = (block as usize).next_multiple_of(HUGE_PAGE);
        let end = (block as usize + size) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: [start, end) lies inside the block just allocated; the
            // advice changes the backing of those pages, not their contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
}
