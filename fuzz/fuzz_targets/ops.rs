//! Random operation sequences on every VM type and design (the decoder and the rules are in
//! `fuzz/driver.rs`, shared with the replay test `rust/tdpmmu-core/tests/fuzz_corpus.rs`).
#![no_main]

#[path = "../driver.rs"]
mod driver;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    driver::fuzz_one(data);
});
