//! Fuzz target `proxy_header`: see `holdfast_fuzz::proxy_header` in `fuzz/src/lib.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holdfast_fuzz::proxy_header(data));
