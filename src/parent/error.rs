//! The one error type of the executor, and the reports it carries.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

// Where the supervisor, which also catches panics, has always found it.
pub(crate) use crate::wire::panic::panic_message;

/// A `Result` whose error is procexec's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when running a task in a worker process.
///
/// Each variant names what happened and to which task. An error affects only the
/// callers it names: a panic, a crash or a corrupt reply fails the calls involved,
/// and the executor replaces the worker and keeps serving everyone else.
///
/// `Error` is `Clone` (large reports are shared through `Arc`), because one failure
/// can reach several callers, such as every item of a map chunk.
///
/// # Examples
///
/// ```
/// use procexec::Error;
///
/// fn describe(err: &Error) -> &'static str {
///     if err.is_panic() {
///         "the task panicked; the worker lives on"
///     } else if err.is_worker_crash() {
///         "the worker died; it has been replaced"
///     } else {
///         "something else"
///     }
/// }
///
/// let err = Error::Shutdown;
/// assert_eq!(describe(&err), "something else");
/// assert!(err.is_shutdown());
/// assert_eq!(err.to_string(), "the executor has shut down");
/// ```
///
/// Variants with named fields are `#[non_exhaustive]` (match them with `..`); the
/// others carry one opaque report with accessors, which can grow without a new
/// field: match them as `Error::WorkerCrashed(crash)`. The reports
/// the variants carry are the error itself, not its cause: `source()` skips them and
/// returns what they wrap (a [`WorkerStartError`]'s IO error), so printing each
/// `source()` in turn never repeats a message.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The task panicked. The worker caught the panic and serves on.
    #[error(transparent)]
    TaskPanicked(Arc<TaskPanic>),

    /// The worker process died while running the task: it aborted, called `exit`,
    /// was killed, or crashed. The worker has been replaced.
    #[error(transparent)]
    WorkerCrashed(Arc<WorkerCrash>),

    /// The call ran longer than its timeout (measured from when it started running
    /// in a worker), or a map passed its deadline. A call that timed out had its
    /// worker killed and replaced.
    #[error("task `{task}` ran past its time limit of {timeout:?}")]
    #[non_exhaustive]
    TimedOut {
        /// The task that ran too long.
        task: String,
        /// The limit it ran past.
        timeout: std::time::Duration,
    },

    /// The worker binary has no task of this name.
    #[error("the worker has no task named `{task}` (is the worker binary up to date?)")]
    #[non_exhaustive]
    UnknownTask {
        /// The task that was called.
        task: String,
    },

    /// The worker has a task of this name, but with other input or output types.
    #[error("task `{task}` is `{parent}` here but `{worker}` in the worker binary (rebuild the worker?)")]
    #[non_exhaustive]
    TaskMismatch {
        /// The task that was called.
        task: String,
        /// Its signature in the calling process, as `input -> output`.
        parent: String,
        /// Its signature in the worker.
        worker: String,
    },

    /// A frame would exceed the executor's `max_frame_len`. A request that is too
    /// large is refused before anything is sent; a reply that is too large fails its
    /// call in the worker, which serves on.
    #[error("task `{task}`: the {direction} is {size} bytes, above the frame limit of {limit} bytes")]
    #[non_exhaustive]
    FrameTooLarge {
        /// The task whose input or output was too large.
        task: String,
        /// Which way the frame was going.
        direction: Direction,
        /// The encoded size.
        size: u64,
        /// The limit (`Builder::max_frame_len`).
        limit: u64,
    },

    /// A value could not be serialized or deserialized: the caller's input, or the
    /// task's output. Also returned before anything is sent for a type that needs a
    /// serde feature postcard cannot carry (see [`tasks!`](crate::tasks#types)).
    #[error("task `{task}`: cannot {action} its {direction}: {message}")]
    #[non_exhaustive]
    Codec {
        /// The task concerned.
        task: String,
        /// Input (request) or output (reply).
        direction: Direction,
        /// `"encode"` or `"decode"`.
        action: &'static str,
        /// What went wrong, as the type's serde impl (or postcard) said it, with
        /// the path to the failing field when it is known: ``cannot decode a
        /// `Order`: invalid quantity (at lines[2].qty)``.
        message: String,
    },

    /// The worker broke the protocol (a corrupt, oversized or unexpected frame). It
    /// has been killed and replaced; every call it held fails with this error.
    #[error(transparent)]
    Protocol(Arc<ProtocolViolation>),

    /// A worker process could not be started, or did not complete the handshake.
    #[error(transparent)]
    WorkerStart(Arc<WorkerStartError>),

    /// The executor's configuration is invalid.
    #[error("invalid executor configuration: {0}")]
    Config(String),

    /// The executor was shut down or dropped before the task could finish.
    #[error("the executor has shut down")]
    Shutdown,

    /// A channel operation failed (a [`Queue`](crate::Queue), a channel's ends, a
    /// [`Pipe`](crate::Pipe)).
    #[error(transparent)]
    Channel(#[from] crate::channel::ChannelError),

    /// A shared-memory operation failed: making it, mapping it in a worker (a
    /// handle from another machine, or whose memory is gone), a wrong type or an
    /// access out of bounds, or a poisoned lock (converted by `?`).
    #[error(transparent)]
    Shared(#[from] crate::shared::SharedError),
}

impl Error {
    /// Whether a shared-memory operation failed.
    pub fn is_shared(&self) -> bool {
        matches!(self, Error::Shared(_))
    }

    /// Whether a channel operation failed.
    pub fn is_channel(&self) -> bool {
        matches!(self, Error::Channel(_))
    }

    /// Whether the task panicked.
    pub fn is_panic(&self) -> bool {
        matches!(self, Error::TaskPanicked(_))
    }

    /// Whether the worker running the task died.
    pub fn is_worker_crash(&self) -> bool {
        matches!(self, Error::WorkerCrashed(_))
    }

    /// Whether a worker broke the protocol.
    pub fn is_protocol(&self) -> bool {
        matches!(self, Error::Protocol(_))
    }

    /// Whether the call or map ran past its time limit.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::TimedOut { .. })
    }

    /// Whether the executor had shut down.
    pub fn is_shutdown(&self) -> bool {
        matches!(self, Error::Shutdown)
    }

    /// Whether the worker binary has no task of the called name.
    pub fn is_unknown_task(&self) -> bool {
        matches!(self, Error::UnknownTask { .. })
    }

    /// Whether the worker's task of that name has other input or output types.
    pub fn is_task_mismatch(&self) -> bool {
        matches!(self, Error::TaskMismatch { .. })
    }

    /// Whether an input or output was above the frame limit.
    pub fn is_frame_too_large(&self) -> bool {
        matches!(self, Error::FrameTooLarge { .. })
    }

    /// Whether an input or output could not be serialized or deserialized.
    pub fn is_codec(&self) -> bool {
        matches!(self, Error::Codec { .. })
    }

    /// Whether a worker process could not be started.
    pub fn is_worker_start(&self) -> bool {
        matches!(self, Error::WorkerStart(_))
    }

    /// Whether the executor's configuration (or its runtime) was invalid.
    pub fn is_config(&self) -> bool {
        matches!(self, Error::Config(_))
    }

    /// The panic, if the task panicked.
    pub fn panic(&self) -> Option<&TaskPanic> {
        match self {
            Error::TaskPanicked(panic) => Some(panic),
            _ => None,
        }
    }

    /// The crash report, if the worker died.
    pub fn crash(&self) -> Option<&WorkerCrash> {
        match self {
            Error::WorkerCrashed(crash) => Some(crash),
            _ => None,
        }
    }

    pub(crate) fn codec(
        task: &str,
        direction: Direction,
        action: &'static str,
        err: impl fmt::Display,
    ) -> Error {
        Error::Codec { task: task.into(), direction, action, message: err.to_string() }
    }
}

/// Which way a frame was going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Direction {
    /// From the caller to the worker: a task's input.
    Input,
    /// From the worker to the caller: a task's output.
    Output,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Input => "input",
            Direction::Output => "output",
        })
    }
}

/// A panic inside a task, carried back from the worker as data.
///
/// ```
/// procexec::tasks! {
///     pub fn divide(a: u32, b: u32) -> u32 { a / b }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// let exec = procexec::Executor::builder().processes(1).build().await?;
/// let err = exec.spawn(divide, (1, 0)).await.unwrap_err();
/// let panic = err.panic().expect("it panicked");
/// assert_eq!(panic.task(), "divide");
/// assert_eq!(panic.message(), "attempt to divide by zero");
/// assert!(panic.location().is_some());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPanic {
    pub(crate) task: String,
    pub(crate) message: String,
    pub(crate) location: Option<String>,
    pub(crate) backtrace: Option<String>,
}

impl TaskPanic {
    /// The task that panicked.
    pub fn task(&self) -> &str {
        &self.task
    }

    /// The panic message (`"index out of bounds: ..."`).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Where it panicked, as `file:line:column`.
    pub fn location(&self) -> Option<&str> {
        self.location.as_deref()
    }

    /// The worker's backtrace, captured when `RUST_BACKTRACE` is set.
    pub fn backtrace(&self) -> Option<&str> {
        self.backtrace.as_deref()
    }
}

impl fmt::Display for TaskPanic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task `{}` panicked", self.task)?;
        if let Some(location) = &self.location {
            write!(f, " at {location}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for TaskPanic {}

/// How a process ended.
///
/// ```
/// use procexec::ExitReason;
///
/// assert_eq!(ExitReason::Code(3).to_string(), "exit code 3");
/// assert_eq!(ExitReason::Signal(9).to_string(), "signal 9 (SIGKILL)");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// Its exit status could not be collected.
    Unknown,
    /// An in-process worker's thread (see
    /// [`Builder::in_process`](crate::Builder::in_process)), given up when it was
    /// stopped: a thread cannot be killed, so it runs on until its task returns.
    Abandoned,
}

impl ExitReason {
    pub(crate) fn from_status(status: &std::process::ExitStatus) -> Self {
        match crate::sys::describe_exit(status) {
            (Some(code), _) => ExitReason::Code(code),
            (None, Some(signal)) => ExitReason::Signal(signal),
            (None, None) => ExitReason::Unknown,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitReason::Code(code) => write!(f, "exit code {code}"),
            ExitReason::Signal(signal) => match crate::sys::signal_name(signal) {
                Some(name) => write!(f, "signal {signal} ({name})"),
                None => write!(f, "signal {signal}"),
            },
            ExitReason::Unknown => f.write_str("an unknown exit status"),
            ExitReason::Abandoned => f.write_str("its thread abandoned, running on"),
        }
    }
}

/// What is known about a worker that died under a task.
///
/// ```
/// use procexec::ExitReason;
///
/// procexec::tasks! {
///     pub fn give_up(code: i32) -> u32 {
///         eprintln!("giving up with {code}");
///         std::process::exit(code)
///     }
///     pub fn double(x: u32) -> u32 { 2 * x }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// let exec = procexec::Executor::builder()
///     .processes(1)
///     .stderr(procexec::WorkerStderr::Discard)
///     .build()
///     .await?;
/// let err = exec.spawn(give_up, 3).await.unwrap_err();
/// let crash = err.crash().expect("the worker died");
/// assert_eq!(crash.task(), "give_up");
/// assert_eq!(crash.exit(), ExitReason::Code(3));
/// assert_eq!(crash.stderr_tail(), "giving up with 3\n");
/// // A fresh worker took its place.
/// assert_eq!(exec.spawn(double, 21).await?, 42);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCrash {
    pub(crate) task: String,
    pub(crate) worker: usize,
    pub(crate) pid: u32,
    pub(crate) exit: ExitReason,
    pub(crate) stderr_tail: String,
    pub(crate) attempts: u32,
}

impl WorkerCrash {
    /// The task the worker was running.
    pub fn task(&self) -> &str {
        &self.task
    }

    /// The worker's slot in the executor (`0..processes`).
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How it ended.
    pub fn exit(&self) -> ExitReason {
        self.exit
    }

    /// The last lines the worker wrote to stderr (up to a few KiB).
    pub fn stderr_tail(&self) -> &str {
        &self.stderr_tail
    }

    /// How many times the call ran: 1, or more when retries were allowed and every
    /// run crashed its worker.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

impl fmt::Display for WorkerCrash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "worker {} (pid {}) died with {} while running task `{}`",
            self.worker, self.pid, self.exit, self.task
        )?;
        if self.attempts > 1 {
            write!(f, " (attempt {}; every attempt crashed)", self.attempts)?;
        }
        write_tail(f, &self.stderr_tail)
    }
}

impl std::error::Error for WorkerCrash {}

fn write_tail(f: &mut fmt::Formatter<'_>, tail: &str) -> fmt::Result {
    let tail = tail.trim_end();
    if tail.is_empty() { Ok(()) } else { write!(f, "; its stderr ended with:\n{tail}") }
}

/// A worker that broke the protocol: it sent a frame that was corrupt, above the
/// frame limit, or not the reply expected next. The executor kills and replaces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolViolation {
    pub(crate) worker: usize,
    pub(crate) pid: u32,
    pub(crate) message: String,
}

impl ProtocolViolation {
    /// The worker's slot in the executor.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What was wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ProtocolViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {} (pid {}) broke the protocol: {}", self.worker, self.pid, self.message)
    }
}

impl std::error::Error for ProtocolViolation {}

/// Why a worker process could not be started.
///
/// The IO error behind it, when there is one (the spawn or a pipe failed), is its
/// [`source()`](std::error::Error::source), not part of its message.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let err = procexec::Executor::builder().program("/bin/true").build().await.unwrap_err();
/// let procexec::Error::WorkerStart(start) = err else { panic!("{err}") };
/// assert_eq!(start.program(), std::path::Path::new("/bin/true"));
/// assert!(start.message().starts_with("it exited before the handshake"));
/// # }
/// ```
#[derive(Debug)]
pub struct WorkerStartError {
    pub(crate) program: PathBuf,
    pub(crate) host: Option<String>,
    pub(crate) message: String,
    pub(crate) stderr_tail: String,
    pub(crate) source: Option<std::io::Error>,
}

impl WorkerStartError {
    pub(crate) fn new(program: &std::path::Path, message: impl Into<String>) -> Self {
        WorkerStartError {
            program: program.to_path_buf(),
            host: None,
            message: message.into(),
            stderr_tail: String::new(),
            source: None,
        }
    }

    /// The worker program.
    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// The host (the label of its [`WorkerGroup`](crate::WorkerGroup)) of a
    /// worker that runs on another machine or in a container; `None` for this one.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// What went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The last lines the worker wrote to stderr, if it got that far.
    pub fn stderr_tail(&self) -> &str {
        &self.stderr_tail
    }
}

impl fmt::Display for WorkerStartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The IO error, if any, is the `source()`: printing it here too would repeat
        // it in every report that walks the chain.
        write!(f, "cannot start worker `{}`", self.program.display())?;
        if let Some(host) = &self.host {
            write!(f, " on host {host}")?;
        }
        write!(f, ": {}", self.message)?;
        write_tail(f, &self.stderr_tail)
    }
}

impl std::error::Error for WorkerStartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|err| err as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_names_task_worker_signal_and_stderr() {
        let crash = WorkerCrash {
            task: "explode".into(),
            worker: 1,
            pid: 4242,
            exit: ExitReason::Signal(9),
            stderr_tail: "last words\n".into(),
            attempts: 1,
        };
        assert_eq!(
            Error::WorkerCrashed(Arc::new(crash)).to_string(),
            "worker 1 (pid 4242) died with signal 9 (SIGKILL) while running task `explode`; \
             its stderr ended with:\nlast words"
        );
    }

    #[test]
    fn a_panic_names_task_location_and_message() {
        let panic = TaskPanic {
            task: "divide".into(),
            message: "attempt to divide by zero".into(),
            location: Some("src/lib.rs:3:5".into()),
            backtrace: None,
        };
        let err = Error::TaskPanicked(Arc::new(panic));
        assert!(err.is_panic());
        assert_eq!(err.to_string(), "task `divide` panicked at src/lib.rs:3:5: attempt to divide by zero");
    }

    /// The message of `err`, then of each `source()` in turn.
    fn chain(err: &dyn std::error::Error) -> Vec<String> {
        std::iter::successors(Some(err), |err| err.source()).map(|err| err.to_string()).collect()
    }

    fn start_error(source: Option<std::io::Error>) -> Error {
        let mut start = WorkerStartError::new(std::path::Path::new("/bin/worker"), "cannot spawn it");
        start.stderr_tail = "last words\n".into();
        start.source = source;
        Error::WorkerStart(Arc::new(start))
    }

    #[test]
    fn printing_the_source_chain_never_repeats_a_message() {
        let errors = [
            Error::TaskPanicked(Arc::new(TaskPanic {
                task: "divide".into(),
                message: "attempt to divide by zero".into(),
                location: None,
                backtrace: None,
            })),
            Error::WorkerCrashed(Arc::new(WorkerCrash {
                task: "explode".into(),
                worker: 0,
                pid: 7,
                exit: ExitReason::Code(3),
                stderr_tail: "last words\n".into(),
                attempts: 1,
            })),
            Error::Protocol(Arc::new(ProtocolViolation { worker: 0, pid: 7, message: "garbage".into() })),
            start_error(None),
            start_error(Some(std::io::Error::other("the disk is on fire"))),
            Error::Config("processes must be 1 to 4096, not 0".into()),
            Error::Shutdown,
        ];
        for err in &errors {
            let chain = chain(err);
            for (at, outer) in chain.iter().enumerate() {
                for inner in &chain[at + 1..] {
                    assert!(!outer.contains(inner.as_str()), "{chain:?}");
                }
            }
        }
        // The IO error is printed once, as the last link.
        let chain = chain(&errors[4]);
        assert_eq!(
            chain,
            [
                "cannot start worker `/bin/worker`: cannot spawn it; its stderr ended with:\nlast words",
                "the disk is on fire"
            ]
        );
    }

    #[test]
    fn a_start_error_caused_by_io_has_that_io_error_as_its_source() {
        let err = start_error(Some(std::io::Error::from(std::io::ErrorKind::PermissionDenied)));
        let source = std::error::Error::source(&err).expect("the IO error is the source");
        let io = source.downcast_ref::<std::io::Error>().expect("an io::Error");
        assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(std::error::Error::source(&start_error(None)).is_none());
    }

    #[test]
    fn each_predicate_names_its_variant() {
        let unknown = Error::UnknownTask { task: "t".into() };
        let mismatch =
            Error::TaskMismatch { task: "t".into(), parent: "u8 -> u8".into(), worker: "u16 -> u16".into() };
        let large = Error::FrameTooLarge { task: "t".into(), direction: Direction::Input, size: 2, limit: 1 };
        let codec = Error::codec("t", Direction::Output, "decode", "eof");
        let start = start_error(None);
        let config = Error::Config("bad".into());
        let all = [&unknown, &mismatch, &large, &codec, &start, &config];
        let predicates: [fn(&Error) -> bool; 6] = [
            Error::is_unknown_task,
            Error::is_task_mismatch,
            Error::is_frame_too_large,
            Error::is_codec,
            Error::is_worker_start,
            Error::is_config,
        ];
        for (i, predicate) in predicates.iter().enumerate() {
            for (j, err) in all.iter().enumerate() {
                assert_eq!(predicate(err), i == j, "predicate {i} on {err:?}");
            }
        }
    }

    #[test]
    fn errors_stay_small() {
        assert!(std::mem::size_of::<Error>() <= 80, "{}", std::mem::size_of::<Error>());
    }
}
