//! Replays what fuzzing saved, on stable, through the same checks the
//! fuzz targets run (`longlink::fuzz_checks`): the seeds (made from real
//! frames; also saved in `fuzz/seeds/` for the fuzzer), the minimized
//! corpus (`fuzz/corpus/`) and the inputs that once failed
//! (`fuzz/artifacts/`). Any check that fails fails the test, naming the
//! file. See `scripts/fuzz` to fuzz.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use longlink::fuzz_checks::{TARGETS, alloc::TrackingAlloc, seeds::seeds};

// The allocation bounds of the checks are only enforced with this.
#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Every file under `fuzz/<kind>/<target>/`, sorted.
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

/// Runs `check` on each input; returns the names of those that failed.
fn failures(check: fn(&[u8]), named: impl IntoIterator<Item = (String, Vec<u8>)>) -> Vec<String> {
    let mut failed = Vec::new();
    for (name, data) in named {
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(name);
        }
    }
    failed
}

fn replay(kind: &str) -> usize {
    let mut failed = Vec::new();
    let mut count = 0;
    for &(target, check) in TARGETS {
        let files = inputs(kind, target);
        count += files.len();
        let named = files.into_iter().map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            (p.display().to_string(), data)
        });
        failed.extend(failures(check, named));
    }
    assert!(failed.is_empty(), "checks failed on (replay with `scripts/fuzz --replay FILE`):\n{}", failed.join("\n"));
    count
}

#[test]
fn seeds_pass_their_checks() {
    let mut failed = Vec::new();
    for &(target, check) in TARGETS {
        let seeds = seeds(target);
        assert!(!seeds.is_empty(), "no seeds for {target}");
        failed.extend(failures(check, seeds.into_iter().map(|(name, data)| (format!("{target}/{name}"), data))));
    }
    assert!(failed.is_empty(), "seeds failed: {failed:?}");
}

#[test]
fn saved_seeds_pass_every_check() {
    let count = replay("seeds");
    assert!(count > 0, "fuzz/seeds is empty: run `scripts/fuzz --write-seeds`");
}

#[test]
fn minimized_corpus_passes_every_check() {
    let count = replay("corpus");
    assert!(count > 0, "fuzz/corpus is empty");
}

#[test]
fn saved_crashes_stay_fixed() {
    replay("artifacts");
}

/// Not a test: `scripts/fuzz --write-seeds` runs it to (re)write
/// `fuzz/seeds/` from [`seeds`].
#[test]
#[ignore = "writes fuzz/seeds; run by scripts/fuzz --write-seeds"]
fn write_seed_files() {
    for &(target, _) in TARGETS {
        let dir = fuzz_dir().join("seeds").join(target);
        std::fs::create_dir_all(&dir).expect("create the seed directory");
        for (name, data) in seeds(target) {
            std::fs::write(dir.join(name), data).expect("write a seed");
        }
    }
}
