//! Fuzz target `tunnel_request`: see `holdfast_fuzz::tunnel_request` in `fuzz/src/lib.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holdfast_fuzz::tunnel_request(data));
