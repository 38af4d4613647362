//! cargo fuzz target: see `longlink::fuzz_checks::push` for the input format and
//! the invariants checked.
#![no_main]

use longlink::fuzz_checks::{alloc::TrackingAlloc, push};

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| push::check(data));
