//! Fuzz target `config`: the `--config` file parser of the command-line program
//! (`config::check_text` in `src/cli/config.rs`, with the flags of `src/cli/args.rs`). Both live
//! in the binary, not the library, so they are included here as they are; the seed corpus also
//! runs in the binary's tests (`config::tests::the_fuzz_seeds_parse_without_a_panic`).
#![no_main]

// Formatted with the main crate (`cargo fmt --all` at the root), not here: from this path,
// rustfmt would look for config.rs's test module in the wrong directory.
#[path = "../../src/cli/args.rs"]
#[allow(dead_code)]
#[rustfmt::skip]
mod args;
#[path = "../../src/cli/config.rs"]
#[allow(dead_code)]
#[rustfmt::skip]
mod config;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        config::check_text(text);
    }
});
