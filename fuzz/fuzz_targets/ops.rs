//! Random operation sequences on every VM type and design (the decoder and the rules are in
//! `fuzz/driver.rs`, shared with the replay test `rust/tdpmmu-core/tests/fuzz_corpus.rs`).
#![no_main]

#[path = "../driver.rs"]
mod driver;

// TDPMMU_FUZZ_STRICT=1: known engine bugs (driver::KNOWN_BUGS) are findings too.
static STRICT: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
    std::env::var_os("TDPMMU_FUZZ_STRICT").is_some_and(|v| !v.is_empty())
});

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    driver::fuzz_one(data, *STRICT);
});
