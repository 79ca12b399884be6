//! The binary's memory allocator: mimalloc, asked for plain blocks wherever a
//! plain block is aligned enough.
//!
//! A request allocates a few header maps and buffers above glibc's per-thread
//! cache size, each a trip through its arenas; mimalloc's size-class pages
//! serve them from a free list. The `mimalloc` crate's own allocator asks for
//! every block by its alignment, and mimalloc serves an aligned request above
//! 1 KiB (the exchange, a header map) by over-allocating and adjusting, about
//! 200 instructions each. A plain block is already aligned to 16 bytes (to
//! its size, when smaller), so only stricter layouts need the aligned calls,
//! as std's `System` allocator decides for `malloc`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Alignment of every mimalloc block of at least this many bytes
/// (`MI_MAX_ALIGN_SIZE`); smaller blocks are aligned to a machine word.
const PLAIN_ALIGN: usize = 16;

/// Whether a plain block of `size` bytes is aligned enough for `align`.
fn plain(align: usize, size: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

/// A new block for `layout`, from `plain` (by size) when a plain block is
/// aligned enough, else from `aligned` (by size and alignment).
#[inline(always)]
unsafe fn new_block(
    layout: Layout,
    plain_block: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned_block: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let block = match plain(layout.align(), layout.size()) {
        true => unsafe { plain_block(layout.size()) },
        false => unsafe { aligned_block(layout.size(), layout.align()) },
    };
    block.cast()
}

/// mimalloc as the global allocator (`#[global_allocator]` in the binary).
pub struct Allocator;

// SAFETY: each method forwards to the mimalloc call with the same contract,
// for a layout whose alignment the call meets: a plain block when `plain`
// holds, an aligned one otherwise. Every block, however allocated, is freed
// and resized by mimalloc, which accepts any pointer it handed out.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { new_block(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { new_block(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let block = match plain(layout.align(), new_size) {
            true => unsafe { mi::mi_realloc(ptr.cast::<c_void>(), new_size) },
            false => unsafe {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align())
            },
        };
        block.cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fill `len` bytes at `block` with a pattern, or check that they hold it.
    unsafe fn pattern(block: *mut u8, len: usize, write: bool) -> bool {
        (0..len).all(|i| unsafe {
            if write {
                *block.add(i) = i as u8;
            }
            *block.add(i) == i as u8
        })
    }

    /// Every size class the hot path touches (small, above 1 KiB, above a
    /// page) at every alignment a type or a caller may ask for: blocks come
    /// back aligned, zeroed when asked, and keep their bytes through growing
    /// and shrinking.
    #[test]
    fn blocks_are_aligned_zeroed_and_kept_through_resizing() {
        let a = Allocator;
        for size in [1, 7, 8, 15, 16, 24, 48, 100, 1024, 1025, 5 * 1024, 70_000] {
            for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
                let layout = Layout::from_size_align(size, align).unwrap();
                let aligned = |p: *mut u8| !p.is_null() && (p as usize).is_multiple_of(align);
                unsafe {
                    let zeroed = a.alloc_zeroed(layout);
                    assert!(aligned(zeroed), "zeroed {size} @ {align}");
                    assert!(std::slice::from_raw_parts(zeroed, size)
                        .iter()
                        .all(|&b| b == 0));
                    a.dealloc(zeroed, layout);

                    let block = a.alloc(layout);
                    assert!(aligned(block), "{size} @ {align}");
                    pattern(block, size, true);
                    let grown_size = size * 3 + 5;
                    let grown = a.realloc(block, layout, grown_size);
                    assert!(aligned(grown), "{size} -> {grown_size} @ {align}");
                    assert!(
                        pattern(grown, size, false),
                        "{size} -> {grown_size} @ {align}"
                    );
                    pattern(grown, grown_size, true);
                    let grown_layout = Layout::from_size_align(grown_size, align).unwrap();
                    let shrunk_size = size.div_ceil(2);
                    let shrunk = a.realloc(grown, grown_layout, shrunk_size);
                    assert!(aligned(shrunk), "{grown_size} -> {shrunk_size} @ {align}");
                    assert!(pattern(shrunk, shrunk_size, false));
                    a.dealloc(shrunk, Layout::from_size_align(shrunk_size, align).unwrap());
                }
            }
        }
    }
}
