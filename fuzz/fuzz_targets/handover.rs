//! Fuzz target `handover`: see `holdfast_fuzz::handover_message` in `fuzz/src/lib.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holdfast_fuzz::handover_message(data));
