//! Replays the `ops` fuzz target's kept corpus (`tests/fuzz-corpus/`: its findings and a
//! minimized set of inputs covering what the fuzzer reached) through the same decoder, driver
//! and rules as the fuzz target (`fuzz/driver.rs`, included here), so every finding stays a
//! regression test on stable Rust with no fuzzer installed. `scripts/fuzz` adds new findings.
//!
//! `FUZZ_CORPUS_DIR=DIR` replays another directory instead (e.g. the fuzzer's working corpus
//! `fuzz/corpus/ops`); `TDPMMU_FUZZ_VERBOSE=1` prints every operation and its result;
//! `TDPMMU_FUZZ_STATS=1` prints the outcomes (bugged VMs by KVM_BUG_ON message, flaws).

#[path = "../../../fuzz/driver.rs"]
mod driver;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Corpus entries that fail because of an engine bug not fixed yet: (file name, reason).
/// Each is still run and must still fail; once the engine is fixed it passes, and this test
/// then asks for its mark to be removed.
const KNOWN_FAILURES: &[(&str, &str)] = &[];

/// Corpus entries that hit a racy engine bug not fixed yet (they fail in some runs only):
/// (file name, reason). Run, and allowed either outcome; remove the mark once fixed.
const KNOWN_RACY: &[(&str, &str)] = &[];

/// Runs of an input with a memstress or a concurrent step (a race shows in some runs only).
const THREADED_REPEATS: usize = 10;

fn corpus_dir() -> PathBuf {
    match std::env::var_os("FUZZ_CORPUS_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus"),
    }
}

/// Every file under `dir` (recursively), sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Run one input on its own thread with the driver's time bound; Err = the finding, the
/// panic message or the hang.
fn replay(data: Vec<u8>) -> Result<driver::Outcome, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(|| driver::fuzz_one(&data, true));
        let _ = tx.send(r.map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into())
        }));
    });
    match rx.recv_timeout(driver::RUN_TIME_BOUND) {
        Ok(r) => r,
        Err(_) => Err(format!(
            "hang: still running after {:?}",
            driver::RUN_TIME_BOUND
        )),
    }
}

#[test]
fn fuzz_corpus_replays() {
    let dir = corpus_dir();
    let inputs = files(&dir);
    assert!(!inputs.is_empty(), "no corpus files in {}", dir.display());
    let stats = std::env::var_os("TDPMMU_FUZZ_STATS").is_some();
    let mut bugs: BTreeMap<String, usize> = BTreeMap::new();
    let mut flaws = 0;
    let mut failed = Vec::new();
    let mut fixed = Vec::new();
    for path in &inputs {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if KNOWN_RACY.iter().any(|(n, _)| *n == name) {
            let _ = replay(std::fs::read(path).unwrap());
            continue;
        }
        let known = KNOWN_FAILURES.iter().find(|(n, _)| *n == name);
        let data = std::fs::read(path).unwrap();
        // A race may show in one run of many: inputs with threads run several times.
        let threaded = driver::decode(&data)
            .ops
            .iter()
            .any(|o| matches!(o, driver::Op::Memstress(_) | driver::Op::Concurrent { .. }));
        let mut r = replay(data.clone());
        for _ in 1..if threaded { THREADED_REPEATS } else { 1 } {
            if r.is_err() {
                break;
            }
            r = replay(data.clone());
        }
        match (r, known) {
            (Ok(o), None) => {
                if let Some(b) = o.bug {
                    // Group messages by their text before the first number.
                    let msg = b.split("0x").next().unwrap_or(&b);
                    let status = b
                        .rsplit(": ")
                        .next()
                        .filter(|_| b.contains(": "))
                        .unwrap_or("");
                    let key = format!("{:<28} {msg} .. {status}", o.kind);
                    *bugs.entry(key).or_default() += 1;
                }
                flaws += usize::from(o.flawed.is_some());
            }
            (Ok(_), Some((_, why))) => fixed.push(format!("{name} (known failure: {why})")),
            (Err(_), Some(_)) => {}
            (Err(e), None) => failed.push(format!("{}:\n{e}", path.display())),
        }
    }
    if stats {
        eprintln!("{} inputs from {}", inputs.len(), dir.display());
        eprintln!("runs whose VM showed the private design's flaw: {flaws}");
        for (m, n) in &bugs {
            eprintln!("bugged ({n}): {m}");
        }
    }
    let default_dir = std::env::var_os("FUZZ_CORPUS_DIR").is_none();
    for (n, _) in KNOWN_FAILURES
        .iter()
        .chain(KNOWN_RACY)
        .filter(|_| default_dir)
    {
        assert!(
            inputs.iter().any(|p| p.file_name().unwrap() == *n),
            "KNOWN_FAILURES names {n}, which is not in {}",
            dir.display()
        );
    }
    assert!(
        failed.is_empty(),
        "{} of {} corpus inputs broke a rule (reproduce one with \
         TDPMMU_FUZZ_VERBOSE=1 FUZZ_CORPUS_DIR=<dir holding it> cargo test --test fuzz_corpus):\n\n{}",
        failed.len(),
        inputs.len(),
        failed.join("\n\n")
    );
    assert!(
        fixed.is_empty(),
        "these inputs pass now: remove them from KNOWN_FAILURES in tests/fuzz_corpus.rs:\n{}",
        fixed.join("\n")
    );
}
