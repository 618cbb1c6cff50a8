//! Fuzz target `client_reply`: see `holdfast_fuzz::client_reply` in `fuzz/src/lib.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holdfast_fuzz::client_reply(data));
