//! cargo fuzz target: see `longlink::fuzz_checks::ws` for the input format and
//! the invariants checked.
#![no_main]

use longlink::fuzz_checks::{alloc::TrackingAlloc, ws};

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| ws::check_decoder(data));
