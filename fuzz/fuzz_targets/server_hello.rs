//! Fuzz target `server_hello`: see `holdfast_fuzz::server_hello` in `fuzz/src/lib.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holdfast_fuzz::server_hello(data));
