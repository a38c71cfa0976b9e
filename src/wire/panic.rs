//! Panic capture: a panicking task, serde impl or `Deserialize` trace becomes an
//! [`Outcome::Panicked`] report rather than a message on stderr and a dead worker.
//!
//! Below the task and shape modules, which both trace or run user code, and free of
//! parent-side code, so a worker built alone has it.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use crate::wire::protocol::Outcome;

thread_local! {
    /// Set while a task runs under [`catch_panic`], whose panics are reported, not printed.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// Location and backtrace of the last captured panic on this thread.
    static LAST_PANIC: RefCell<Option<(String, Option<String>)>> = const { RefCell::new(None) };
}

/// Runs `f`, turning a panic into an [`Outcome::Panicked`] with its message,
/// location and (under `RUST_BACKTRACE`) backtrace.
pub(crate) fn catch_panic<R>(f: impl FnOnce() -> R) -> Result<R, Outcome> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !CAPTURING.get() {
                return default(info);
            }
            let location = info.location().map(|l| l.to_string()).unwrap_or_default();
            let backtrace = std::backtrace::Backtrace::capture();
            let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
                .then(|| backtrace.to_string());
            LAST_PANIC.set(Some((location, backtrace)));
        }));
    });

    let was_capturing = CAPTURING.replace(true);
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CAPTURING.set(was_capturing);
    result.map_err(|payload| {
        let message = panic_message(&*payload);
        // A payload whose destructor panics would abort the worker; leak it instead.
        std::mem::forget(payload);
        let (location, backtrace) = match LAST_PANIC.take() {
            Some((location, backtrace)) => (Some(location).filter(|l| !l.is_empty()), backtrace),
            None => (None, None),
        };
        Outcome::Panicked { message, location, backtrace }
    })
}

/// The message of a panic payload (`panic!` makes it a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "Box<dyn Any>".to_owned()
    }
}
