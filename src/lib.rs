// The tree shows the three parts: `parent/` (the executor, behind the default
// `executor` feature), `worker/` (what a worker process runs), `wire/` (what both
// share on the pipes), plus `task` (shared) and `sys` (platform calls).
//
// Layers, top to bottom. A module imports only from rows below its own, never
// upwards, so the module graph has no cycle, and the worker side builds without
// the parent side (without the `executor` feature, see Cargo.toml).
// tests/module_layers.rs checks both.
//
//   parent/      channels
//                executor
//                builder, map
//                supervisor/
//                pool
//                dispatch, process
//                in_process, output
//                stats, drivers, progress
//                error
//   worker/      worker, state
//                context, output
//   shared/      handles
//                lock
//                segment
//                memory
//   channel/     queue, ends (the handles)
//                link (a worker's side), broker (the parent's side)
//   shared       task (Task, Registry, tasks!)
//   wire/        shape
//                panic
//                codec, blob, protocol
//   bottom       sys, shared::error
//
// A name two modules use lives in the lower one (the test worker's name and the
// initializer in `process`, `decode_exactly` in `codec`), and a method that needs
// an upper module is written there (`Builder::build` in `executor`, the worker-side
// `invoke` of a task in `worker`).
//! Process parallelism for async Rust: typed tasks run in worker processes, and
//! their results come back as futures and streams.
//!
//! procexec is Python's `multiprocessing.Pool` for Tokio code. An [`Executor`]
//! starts a pool of worker processes (a companion binary, or the current executable
//! run again) and speaks a small framed protocol with them over pipes. You call
//! [`Task`]s by name: [`Executor::spawn`] returns a future of the output,
//! [`Executor::map`] a future of all outputs in input order, and
//! [`Executor::map_stream`] / [`Executor::map_unordered`] streams. Process
//! parallelism then composes with the rest of an async program: a web service
//! offloading CPU work, a pipeline mixing IO and compute, a test that needs real
//! processes.
//!
//! ```rust,standalone_crate
//! // Tasks are plain functions over serde types, compiled into parent and worker.
//! procexec::tasks! {
//!     pub fn square(x: u64) -> u64 { x * x }
//! }
//!
//! fn main() -> procexec::Result<()> {
//!     // This binary is also its own worker: in a worker process this call serves
//!     // tasks and never returns. First thing, before any runtime exists.
//!     procexec::init_worker(&TASKS);
//!     tokio::runtime::Runtime::new().expect("a Tokio runtime").block_on(run())
//! }
//!
//! async fn run() -> procexec::Result<()> {
//!     let exec = procexec::Executor::builder().processes(2).build().await?;
//!     assert_eq!(exec.spawn(square, 7).await?, 49);
//!     assert_eq!(exec.map(square, 0..5).await?, [0, 1, 4, 9, 16]);
//!     exec.shutdown().await;
//!     Ok(())
//! }
//! ```
//!
//! # Providing the worker
//!
//! - **Self-executing** (the default): the executor re-runs the current executable
//!   with a marker in its environment, and [`init_worker`], called first in `main`,
//!   turns that process into a worker. One binary, nothing else to ship.
//! - **Companion binary**: a binary whose `main` is `procexec::serve_worker(&TASKS)`,
//!   passed to [`Builder::program`]. Put the `tasks!` block in a library both
//!   binaries depend on.
//! - **In a crate's own tests**: [`test_worker!`] adds a test that serves as the
//!   worker, and [`Builder::test_harness`] re-runs the test binary through it.
//! - **In-process**: [`Builder::in_process`] runs the workers as threads of the
//!   parent, through the same pipes and encoding, to step through a task in a
//!   debugger or test tasks without processes (and without their isolation).
//!
//! # Beyond one machine
//!
//! Workers can run elsewhere, the protocol going over any launcher that connects
//! their stdin and stdout: [`WorkerGroup::ssh`] (OpenSSH, optionally shipping the
//! worker binary), [`WorkerGroup::slurm`] (steps of a Slurm allocation), and
//! [`WorkerGroup::command`] (`docker exec -i`, `kubectl exec -i`), mixed with local
//! workers in one executor ([`Builder::group`]), or read from a hosts file
//! ([`Hosts`]). The same prefix mechanism runs workers under a debugging wrapper
//! ([`Builder::worker_wrapper`]: `valgrind`, `strace`, `gdb`).
//!
//! # Failures
//!
//! Every failure is a typed [`Error`] delivered to exactly the calls it affects;
//! the executor keeps serving everyone else.
//!
//! | what happens | the caller gets | the executor |
//! |---|---|---|
//! | the task panics | [`Error::TaskPanicked`] with message and location | the worker serves on |
//! | the worker aborts, exits, is killed or crashes | [`Error::WorkerCrashed`] with the exit status and stderr tail | calls the worker had not started go to another worker; a new worker replaces it |
//! | the worker lacks the task, or has other types | [`Error::UnknownTask`], [`Error::TaskMismatch`], before anything is sent | unaffected |
//! | an input above the frame limit | [`Error::FrameTooLarge`], before anything is sent | unaffected |
//! | an output above the frame limit | [`Error::FrameTooLarge`] | the worker serves on |
//! | a corrupt or unexpected frame from a worker | [`Error::Protocol`], for the calls that worker held | the worker is killed and replaced |
//!
//! Worker stderr (including a task's `println!`, which never touches the protocol)
//! is forwarded line by line with the worker's slot and pid. Every worker is reaped,
//! and none outlives its executor, nor its parent process, even one killed by
//! `SIGKILL`.
#![deny(missing_docs)]
#![deny(unsafe_code)]
// In a worker-only build the wire and platform modules' parent half goes unused;
// a build with the executor still reports dead code.
#![cfg_attr(not(feature = "executor"), allow(dead_code))]
#![cfg(unix)]

mod channel;
#[cfg(feature = "executor")]
mod parent;
mod shared;
mod sys;
mod task;
mod wire;
mod worker;

pub use channel::{
    ChannelError, Delivery, JoinableQueue, Pipe, Queue, QueueIter, Receiver, RecvIter, Sender, TryPutError,
};
#[cfg(feature = "executor")]
pub use parent::builder::{Builder, InitOutput, cpu_count};
#[cfg(feature = "executor")]
pub use parent::channels::{StreamInput, TaskStream};
#[cfg(feature = "executor")]
pub use parent::dispatch::CancelPolicy;
#[cfg(feature = "executor")]
pub use parent::error::{
    Direction, Error, ExitReason, ProtocolViolation, Result, TaskPanic, WorkerCrash, WorkerStartError,
};
#[cfg(feature = "executor")]
pub use parent::executor::{Captured, CapturedHandle, Executor, Printed, QueueFull, TaskHandle};
#[cfg(feature = "executor")]
pub use parent::launch::{HOST_ENV, HOSTS_ENV, Hosts, Launcher, Slurm, Ssh, WorkerGroup};
#[cfg(feature = "executor")]
pub use parent::map::{Map, MapStream, MapUnordered};
#[cfg(feature = "executor")]
pub use parent::output::WorkerStderr;
#[cfg(feature = "executor")]
pub use parent::progress::Progress;
#[cfg(feature = "executor")]
pub use parent::stats::{ExitCause, ExitCounts, LiveWorker, RunningCall, Stats, WorkerExit};
pub use shared::{
    ArrayGuard, LockGuard, LockResult, PoisonCause, Poisoned, SharedArray, SharedBytes, SharedError,
    SharedLock, SharedValue, ValueGuard,
};
#[doc(hidden)]
pub use task::lint as __lint;
pub use task::{AnyTask, IntoTask, Registry, Task};
pub use wire::blob::Blob;
pub use worker::state::WorkerState;
pub use worker::{init_worker, is_cancelled, report_progress, serve_worker};

/// Adds the test through which a test binary serves as its own worker.
///
/// Invoke it once at the top level of an integration test file that defines its
/// tasks with [`tasks!`], and build executors with [`Builder::test_harness`]. The
/// executor re-runs the test binary selecting only this test, which then serves
/// the registry; in a normal test run it passes without doing anything.
///
/// # Examples
///
/// ```no_run
/// // tests/squares.rs
/// procexec::tasks! {
///     pub fn square(x: u64) -> u64 { x * x }
/// }
/// procexec::test_worker!(TASKS);
///
/// #[tokio::test]
/// async fn squares_in_worker_processes() {
///     let exec = procexec::Executor::builder().test_harness().build().await.unwrap();
///     assert_eq!(exec.map(square, 0..4).await.unwrap(), [0, 1, 4, 9]);
/// }
/// ```
#[macro_export]
macro_rules! test_worker {
    ($registry:path) => {
        #[test]
        fn procexec_test_worker() {
            $crate::init_worker(&$registry);
        }
    };
}

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
