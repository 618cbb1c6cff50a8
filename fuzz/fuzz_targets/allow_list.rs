//! Fuzz target `allow_list`: see `holdfast_fuzz::allow_list` in `fuzz/src/lib.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holdfast_fuzz::allow_list(data));
