//! The companion worker binary: everything it serves is defined in the library.
fn main() {
    procexec::serve_worker(&procexec_worker::TASKS)
}
