//! Fuzz target `metrics_head`: see `holdfast_fuzz::metrics_head` in `fuzz/src/lib.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holdfast_fuzz::metrics_head(data));
