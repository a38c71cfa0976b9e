//! Whether the current Tokio runtime has the IO and time drivers the executor needs.
//!
//! Tokio has no query for its drivers: using a missing one panics ("A Tokio 1.x
//! context was found, but timers are disabled..."), and only when first used, deep
//! inside a supervisor. So `build()` uses each once up front under `catch_unwind`,
//! with the expected panic kept off stderr, and reports what is missing as a
//! configuration error.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;
use std::time::Duration;

thread_local! {
    /// Set while this thread probes: its panics are expected, and not printed.
    static PROBING: Cell<bool> = const { Cell::new(false) };
}

/// Why the current runtime cannot host an executor, if it cannot. Call within a
/// runtime.
pub(crate) fn check() -> Result<(), String> {
    // Creating a sleep panics without the time driver, before it is ever polled.
    let time = probe(|| drop(tokio::time::sleep(Duration::ZERO)));
    // Registering any IO resource panics without the IO driver. A socketpair that
    // cannot be created (out of descriptors) tells nothing: the real start reports it.
    let io = probe(|| drop(tokio::net::UnixStream::pair()));
    let missing = match (io, time) {
        (true, true) => return Ok(()),
        (false, true) => "the IO driver",
        (true, false) => "the time driver",
        (false, false) => "the IO and time drivers",
    };
    Err(format!(
        "the Tokio runtime lacks {missing}: an executor needs IO and time, so build the runtime \
         with `enable_all()` (as `#[tokio::main]` does)"
    ))
}

/// Whether `use_driver` ran without panicking.
fn probe(use_driver: impl FnOnce()) -> bool {
    // Under `panic = "abort"` nothing can be caught, and a panic inside a panic
    // aborts: skip the probe, and let Tokio's own panic say what is missing.
    if !cfg!(panic = "unwind") || std::thread::panicking() {
        return true;
    }
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !PROBING.try_with(Cell::get).unwrap_or(false) {
                previous(info);
            }
        }));
    });
    let was_probing = PROBING.replace(true);
    let result = panic::catch_unwind(AssertUnwindSafe(use_driver));
    PROBING.set(was_probing);
    result.is_ok()
}
