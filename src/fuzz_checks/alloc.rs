//! An allocator that measures what a piece of code allocates (the largest
//! single allocation and the peak of live bytes), so checks can bound what
//! one input makes a decoder allocate. The fuzz targets and
//! `tests/fuzz_corpus.rs` install it with `#[global_allocator]`; without it
//! the bounds are not checked.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// [`System`], measuring the current thread's allocations while
/// [`measure`] runs.
pub struct TrackingAlloc;

/// What the measured code allocated, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// The largest single allocation (or reallocation).
    pub largest: usize,
    /// The most bytes live at once, counting only what was allocated (or
    /// freed) during the measurement.
    pub peak: usize,
    /// Bytes allocated during the measurement and still live at its end
    /// (what the measured code keeps).
    pub live: usize,
}

static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    // `const` initialisers and no destructors: usable from the allocator
    // without allocating.
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

/// Books `added` new bytes (a single allocation of `size`) and `freed` ones.
fn record(size: usize, added: usize, freed: usize) {
    INSTALLED.store(true, Ordering::Relaxed);
    // try_with: the thread may be tearing down its thread-locals.
    if !TRACKING.try_with(Cell::get).unwrap_or(false) {
        return;
    }
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add_unsigned(added).saturating_sub_unsigned(freed);
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: every call is forwarded unchanged to `System`; the bookkeeping
// only touches thread-locals that never allocate.
unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size(), layout.size(), 0);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size(), layout.size(), 0);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        record(0, 0, layout.size());
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size, new_size, layout.size());
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` and returns its result with what it allocated, or `None` for
/// the usage when [`TrackingAlloc`] is not the global allocator.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Option<Usage>) {
    for cell in [&LIVE, &PEAK] {
        let _ = cell.try_with(|c| c.set(0));
    }
    let _ = LARGEST.try_with(|l| l.set(0));
    let _ = TRACKING.try_with(|t| t.set(true));
    let result = f();
    let _ = TRACKING.try_with(|t| t.set(false));
    let usage = Usage {
        largest: LARGEST.try_with(Cell::get).unwrap_or(0),
        peak: PEAK.try_with(Cell::get).unwrap_or(0).max(0).unsigned_abs(),
        live: LIVE.try_with(Cell::get).unwrap_or(0).max(0).unsigned_abs(),
    };
    (result, INSTALLED.load(Ordering::Relaxed).then_some(usage))
}
