//! Fuzz target `streams`: see `holdfast_fuzz::streams` in `fuzz/src/lib.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holdfast_fuzz::streams(data));
