//! Test support for the fuzz tests of sela's readers (IDX, tables, config): each fuzzed input is
//! read on its own thread under a time limit, and, where the test binary installs [`PeakAlloc`]
//! as its global allocator, under a limit on the largest single allocation — so a reader that
//! sizes a buffer from an unchecked header fails the test instead of the machine.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::mpsc;
use std::time::Duration;

use proptest::test_runner::{Config as ProptestConfig, RngSeed};

/// Longest a reader may take on one fuzzed input (debug build, busy machine).
pub const TIME_LIMIT: Duration = Duration::from_secs(20);

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

/// A global allocator that forwards to the system allocator and records each thread's largest
/// single allocation. Install it with
/// `#[global_allocator] static ALLOC: sela_fuzz::PeakAlloc = sela_fuzz::PeakAlloc;`.
pub struct PeakAlloc;

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Runs `f` on its own thread and returns its result; panics, naming `what`, when `f` panics,
/// gives no answer within [`TIME_LIMIT`], or (with [`PeakAlloc`] installed) made a single
/// allocation above `alloc_limit` bytes.
pub fn guarded<T: Send + 'static>(
    what: &str,
    alloc_limit: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        LARGEST.with(|l| l.set(0));
        let out = f();
        let _ = tx.send((out, LARGEST.with(Cell::get)));
    });
    match rx.recv_timeout(TIME_LIMIT) {
        Ok((out, largest)) => {
            assert!(
                largest <= alloc_limit,
                "{what}: allocated {largest} bytes at once (limit {alloc_limit})"
            );
            out
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no answer within {TIME_LIMIT:?}")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let payload = handle
                .join()
                .expect_err("the reader thread ended without answering");
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what} panicked: {msg}")
        }
    }
}

/// Proptest settings for a fuzz test: `cases` cases from the fixed `seed`, no failure files;
/// `PROPTEST_CASES=<n>` and `PROPTEST_RNG_SEED=<n>` override them to explore further.
pub fn config(cases: u32, seed: u64) -> ProptestConfig {
    let mut c = ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        c.rng_seed = RngSeed::Fixed(seed);
    }
    c
}
