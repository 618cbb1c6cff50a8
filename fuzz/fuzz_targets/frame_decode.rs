//! Fuzz target `frame_decode`: see `holdfast_fuzz::frame_decode` in `fuzz/src/lib.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holdfast_fuzz::frame_decode(data));
