//! Fuzz target `session_events`: see `holdfast_fuzz::session_events` in `fuzz/src/lib.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holdfast_fuzz::session_events(data));
