//! The executor: a cheap, cloneable handle to a pool of worker processes.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::parent::builder::Builder;
use crate::parent::dispatch::{CallOptions, CancelPolicy, Completion, Job, decode_record};
use crate::parent::error::{Error, Result};
use crate::parent::map::{Map, MapStream, MapUnordered};
use crate::parent::output::Capture;
use crate::parent::pool::Shared;
use crate::parent::stats::Stats;
use crate::task::IntoTask;

// Here rather than in `builder`, which then needs nothing from this module: imports
// go downwards (see the top of lib.rs).
impl Builder {
    /// Checks the configuration, starts the workers and completes each handshake
    /// (and initializer).
    ///
    /// Must be called within a Tokio runtime with IO and time enabled (as
    /// `#[tokio::main]` and `#[tokio::test]` provide, and `enable_all()` on a
    /// runtime builder).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a value out of range, a missing runtime, or a runtime
    /// without the IO or the time driver;
    /// [`Error::WorkerStart`] if the program is missing or not executable, or a
    /// worker fails to start, to complete the handshake or to run its initializer
    /// (the error quotes its stderr). No process outlives a failed `build`.
    pub async fn build(self) -> Result<Executor> {
        let (shared, options) = self.start().await?;
        Ok(Executor::new(shared, options))
    }
}

/// A pool of worker processes that runs [`Task`](crate::Task)s: like Python's
/// `multiprocessing.Pool`, with futures and streams.
///
/// An `Executor` is a cheap handle: clone it into every request handler or tokio
/// task that needs it (it is `Clone + Send + Sync`). Calls from all clones share the
/// same workers and queue.
///
/// - [`spawn`](Executor::spawn) runs one task (like `Process.start()` + `join()`, or
///   `Pool.apply_async`) and returns a [`TaskHandle`] future.
/// - [`map`](Executor::map) runs a task over an iterator and collects the results in
///   input order (like `Pool.map`); [`map_stream`](Executor::map_stream) and
///   [`map_unordered`](Executor::map_unordered) stream them (like `Pool.imap` and
///   `Pool.imap_unordered`).
///
/// # Failures
///
/// A panicking task fails its own call with [`Error::TaskPanicked`], and the worker
/// serves on. A worker that dies (abort, `exit`, a signal) fails the call it was
/// running with [`Error::WorkerCrashed`], which names the exit status and quotes its
/// stderr; calls it had received but not started are sent to another worker, and a
/// new worker takes its place. Nobody else notices.
///
/// # Caveats
///
/// An executor belongs to the Tokio runtime that built it, as a
/// `tokio::process::Child` does: its supervisors and pipes live on that runtime.
/// When that runtime shuts down, the executor stops working (its workers are
/// killed; calls fail with [`Error::Shutdown`]). So a `static` executor shared by
/// several `#[tokio::test]`s (each with its own runtime) breaks after the first
/// test: build one per test, or run the tests on one runtime you keep.
///
/// # Drop
///
/// When the last clone is dropped the workers are killed, calls still waiting fail
/// with [`Error::Shutdown`], and every process is reaped. Use
/// [`shutdown`](Executor::shutdown) to finish the queued work first. Should the whole
/// parent process die, even by `SIGKILL`, each worker exits within moments: Linux
/// delivers `SIGKILL` to it (`PR_SET_PDEATHSIG`), and a watcher thread in the worker
/// exits when its request pipe hangs up.
///
/// # Examples
///
/// ```
/// procexec::tasks! {
///     pub fn square(x: u64) -> u64 { x * x }
/// }
///
/// #[tokio::main]
/// async fn main() -> procexec::Result<()> {
///     procexec::init_worker(&TASKS);
///     let exec = procexec::Executor::builder().processes(4).build().await?;
///     assert_eq!(exec.spawn(square, 7).await?, 49);
///     assert_eq!(exec.map(square, 0..5).await?, [0, 1, 4, 9, 16]);
///     exec.shutdown().await;
///     Ok(())
/// }
/// ```
#[derive(Clone)]
pub struct Executor {
    handle: Arc<Handle>,
    options: CallOptions,
}

/// Owned only by `Executor` clones: its drop terminates the pool.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.terminate();
    }
}

impl Executor {
    /// A [`Builder`] with the defaults: [`cpu_count()`](crate::cpu_count) workers
    /// running the current executable.
    pub fn builder() -> Builder {
        Builder::default()
    }

    pub(crate) fn new(shared: Arc<Shared>, options: CallOptions) -> Self {
        Executor { handle: Arc::new(Handle { shared }), options }
    }

    /// This executor with another time limit for its calls (see
    /// [`Builder::timeout`]; `Duration::ZERO` means no limit): a cheap clone sharing
    /// the same workers.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// procexec::tasks! {
    ///     pub fn spin() -> u64 { loop { std::hint::spin_loop() } }
    /// }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let err = exec.with_timeout(Duration::from_millis(100)).spawn(spin, ()).await.unwrap_err();
    /// assert!(err.is_timeout()); // and the spinning worker was killed
    /// # Ok(()) }
    /// ```
    pub fn with_timeout(&self, timeout: Duration) -> Executor {
        let mut exec = self.clone();
        exec.options.timeout = Some(timeout).filter(|t| !t.is_zero());
        exec
    }

    /// This executor with another retry count for its calls (see
    /// [`Builder::retries`]): a cheap clone sharing the same workers.
    ///
    /// ```
    /// procexec::tasks! {
    ///     pub fn flaky(path: String) -> u32 {
    ///         // Crashes its worker the first time, succeeds the second.
    ///         if std::fs::metadata(&path).is_err() {
    ///             std::fs::write(&path, b"").unwrap();
    ///             std::process::abort();
    ///         }
    ///         7
    ///     }
    /// }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let marker = std::env::temp_dir().join(format!("flaky-{}", std::process::id()));
    /// # let _ = std::fs::remove_file(&marker);
    /// assert_eq!(exec.with_retries(1).spawn(flaky, marker.display().to_string()).await?, 7);
    /// # std::fs::remove_file(&marker).unwrap();
    /// # Ok(()) }
    /// ```
    pub fn with_retries(&self, retries: u32) -> Executor {
        let mut exec = self.clone();
        exec.options.retries = retries;
        exec
    }

    /// This executor with another [`CancelPolicy`] for its calls: a cheap clone
    /// sharing the same workers.
    ///
    /// ```
    /// # procexec::tasks! {}
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let patient = exec.with_cancel_policy(procexec::CancelPolicy::Finish);
    /// # Ok(()) }
    /// ```
    pub fn with_cancel_policy(&self, policy: CancelPolicy) -> Executor {
        let mut exec = self.clone();
        exec.options.cancel = policy;
        exec
    }

    /// A snapshot of the executor's health: workers alive, calls queued and
    /// running, inputs completed and failed, and why workers stopped.
    pub fn stats(&self) -> Stats {
        self.shared().stats()
    }

    /// Runs `task` on `input` in a worker process.
    ///
    /// The call is queued at once, whether or not the handle is polled (like
    /// `tokio::spawn`); await the [`TaskHandle`] for the output. Errors found before
    /// sending (an unknown task, a type mismatch, an input above the frame limit)
    /// come out of the handle too. Dropping the handle cancels the call (unlike
    /// `tokio::spawn`'s `JoinHandle`); [`TaskHandle::detach`] lets it run.
    ///
    /// # Examples
    ///
    /// ```
    /// procexec::tasks! {
    ///     pub fn add(a: i64, b: i64) -> i64 { a + b }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// # let exec = procexec::Executor::builder().processes(2).build().await?;
    /// let handles: Vec<_> = (0..10).map(|i| exec.spawn(add, (i, i))).collect();
    /// for (i, handle) in handles.into_iter().enumerate() {
    ///     assert_eq!(handle.await?, 2 * i as i64);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn spawn<T>(&self, task: T, input: T::Input) -> TaskHandle<T::Output>
    where
        T: IntoTask,
        T::Input: Serialize,
        T::Output: DeserializeOwned,
    {
        self.spawn_with(task, input, None)
    }

    /// Like [`spawn`](Executor::spawn), but what the call prints to stdout and
    /// stderr is kept and returned with its result, rather than forwarded (see
    /// [`WorkerStderr`](crate::WorkerStderr)): GNU parallel's grouped output, and a
    /// way for tests to assert on what a task printed. Output of concurrent calls
    /// is never mixed.
    ///
    /// It holds whatever the call printed: through Rust's `print!` and
    /// `eprint!`, C's stdio, or programs it ran that inherited its stdout and
    /// stderr, up to the moment its reply was sent. A call that crashed or timed
    /// out keeps all of its stderr, and its stdout but for what it printed in its
    /// last 100 ms. A call that was retried holds the output of every attempt.
    /// Threads a task leaves running print into whichever call runs when they print.
    /// All of it is kept in memory.
    ///
    /// Only for worker processes that read their own output: a worker on another
    /// host ([`WorkerGroup::ssh`](crate::WorkerGroup::ssh) and the like), or behind a
    /// [`worker_wrapper`](crate::Builder::worker_wrapper) that pipes its stderr
    /// elsewhere, prints through that pipe, unattributed; an in-process worker
    /// ([`Builder::in_process`](crate::Builder::in_process)) prints to this
    /// process's own stdout and stderr. Their calls capture nothing.
    ///
    /// # Examples
    ///
    /// ```
    /// procexec::tasks! {
    ///     pub fn greet(name: String) -> usize {
    ///         println!("hello, {name}");
    ///         eprintln!("greeted {name}");
    ///         name.len()
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// let exec = procexec::Executor::builder().processes(2).build().await?;
    /// let captured = exec.spawn_captured(greet, "Ada".to_string()).await;
    /// assert_eq!(captured.result?, 3);
    /// assert_eq!(captured.stdout, "hello, Ada\n");
    /// assert_eq!(captured.stderr, "greeted Ada\n");
    /// # Ok(()) }
    /// ```
    pub fn spawn_captured<T>(&self, task: T, input: T::Input) -> CapturedHandle<T::Output>
    where
        T: IntoTask,
        T::Input: Serialize,
        T::Output: DeserializeOwned,
    {
        let printed = Capture::default();
        CapturedHandle { handle: self.spawn_with(task, input, Some(printed.clone())), printed }
    }

    fn spawn_with<T>(&self, task: T, input: T::Input, capture: Option<Capture>) -> TaskHandle<T::Output>
    where
        T: IntoTask,
        T::Input: Serialize,
        T::Output: DeserializeOwned,
    {
        let task = task.into_task();
        let state = match self.prepare(&task, &input, capture) {
            Prepared::Ready(state) => state,
            Prepared::Full(job, receiver) => {
                // The queue is full: the call waits for room, in line (the semaphore is
                // fair), without its handle having to be polled.
                let shared = self.shared();
                let room = shared.room_for(&job);
                let admission = Box::pin(shared.queue_room.semaphore.clone().acquire_many_owned(room));
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => {
                        drop(runtime.spawn(admit(shared.clone(), *job, admission)));
                        HandleState::Waiting(receiver)
                    }
                    // Outside a runtime, it gets in line when the handle is polled.
                    Err(_) => {
                        let (job, receiver) = (Some(job), Some(receiver));
                        HandleState::Admitting { shared: shared.clone(), job, receiver, admission }
                    }
                }
            }
        };
        TaskHandle { task: task.name(), state, _output: PhantomData }
    }

    /// Encodes a call and queues it if the queue has room for it now.
    fn prepare<I: Serialize, O>(
        &self,
        task: &crate::Task<I, O>,
        input: &I,
        capture: Option<Capture>,
    ) -> Prepared {
        let shared = self.shared();
        let options = CallOptions { capture: capture.is_some(), ..self.options };
        match shared.encode_one(task, input, options) {
            Ok((mut job, receiver)) => {
                job.capture = capture;
                if shared.try_admit(&mut job) {
                    Prepared::Ready(queue(shared, job, receiver))
                } else {
                    Prepared::Full(Box::new(job), receiver)
                }
            }
            Err(err) => Prepared::Ready(HandleState::Failed(Some(Box::new(err)))),
        }
    }

    /// Like [`spawn`](Executor::spawn), but refuses the call, handing the input
    /// back, when the queue has no room for it now (see
    /// [`Builder::max_queued_bytes`]): for services that shed load rather than wait.
    ///
    /// Errors found before sending still come out of the handle, as with `spawn`.
    ///
    /// ```
    /// procexec::tasks! {
    ///     pub fn nap(ms: u64) { std::thread::sleep(std::time::Duration::from_millis(ms)) }
    /// }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// let exec = procexec::Executor::builder().processes(1).max_queued_bytes(1024).build().await?;
    /// let mut accepted = Vec::new();
    /// let refused = loop {
    ///     match exec.try_spawn(nap, 100) {
    ///         Ok(call) => accepted.push(call),
    ///         Err(full) => break full,
    ///     }
    /// };
    /// assert_eq!(refused.into_input(), 100); // shed: answer "503, retry later"
    /// for call in accepted {
    ///     call.await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn try_spawn<T>(&self, task: T, input: T::Input) -> Result<TaskHandle<T::Output>, QueueFull<T::Input>>
    where
        T: IntoTask,
        T::Input: Serialize,
        T::Output: DeserializeOwned,
    {
        let task = task.into_task();
        let state = match self.prepare(&task, &input, None) {
            Prepared::Ready(state) => state,
            Prepared::Full(..) => return Err(QueueFull { input }),
        };
        Ok(TaskHandle { task: task.name(), state, _output: PhantomData })
    }

    /// Runs `task` on every item and collects the outputs in input order: Python's
    /// `Pool.map`.
    ///
    /// Items are pulled lazily, encoded in chunks sized from measured task times (so
    /// tiny tasks cost little per item), and only a bounded window of chunks is in
    /// flight, so a map over millions of items never holds them all. The future
    /// resolves to the first error, if any, and then abandons the rest.
    ///
    /// # Examples
    ///
    /// ```
    /// procexec::tasks! {
    ///     pub fn square(x: u64) -> u64 { x * x }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// # let exec = procexec::Executor::builder().processes(2).build().await?;
    /// let squares = exec.map(square, 0..5).await?;
    /// assert_eq!(squares, [0, 1, 4, 9, 16]);
    /// # Ok(()) }
    /// ```
    pub fn map<'a, T, It>(&self, task: T, items: It) -> Map<'a, T::Output>
    where
        T: IntoTask,
        T::Input: Serialize + 'a,
        T::Output: DeserializeOwned,
        It: IntoIterator<Item = T::Input>,
        It::IntoIter: Send + 'a,
    {
        Map::new(self.map_stream(task, futures::stream::iter(items)))
    }

    /// Runs `task` on every item of a stream and yields the results in input order:
    /// Python's `Pool.imap`.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    ///
    /// procexec::tasks! {
    ///     pub fn len(s: String) -> usize { s.len() }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// # let exec = procexec::Executor::builder().processes(2).build().await?;
    /// let words = stream::iter(["a", "bb", "ccc"].map(String::from));
    /// let lengths: Vec<usize> = exec.map_stream(len, words).map(Result::unwrap).collect().await;
    /// assert_eq!(lengths, [1, 2, 3]);
    /// # Ok(()) }
    /// ```
    pub fn map_stream<'a, T, S>(&self, task: T, items: S) -> MapStream<'a, T::Output>
    where
        T: IntoTask,
        T::Input: Serialize + 'a,
        T::Output: DeserializeOwned,
        S: Stream<Item = T::Input> + Send + 'a,
    {
        MapStream::new(self.shared().clone(), task.into_task(), items, self.options)
    }

    /// Runs `task` on every item of a stream and yields the results as they
    /// complete: Python's `Pool.imap_unordered`.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    ///
    /// procexec::tasks! {
    ///     pub fn square(x: u64) -> u64 { x * x }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// # let exec = procexec::Executor::builder().processes(2).build().await?;
    /// let mut squares: Vec<u64> =
    ///     exec.map_unordered(square, stream::iter(0..5)).map(Result::unwrap).collect().await;
    /// squares.sort();
    /// assert_eq!(squares, [0, 1, 4, 9, 16]);
    /// # Ok(()) }
    /// ```
    pub fn map_unordered<'a, T, S>(&self, task: T, items: S) -> MapUnordered<'a, T::Output>
    where
        T: IntoTask,
        T::Input: Serialize + 'a,
        T::Output: DeserializeOwned,
        S: Stream<Item = T::Input> + Send + 'a,
    {
        MapUnordered::new(self.shared().clone(), task.into_task(), items, self.options)
    }

    /// Finishes every call already queued or running, then stops the workers and
    /// waits until each has exited and been reaped.
    ///
    /// New calls (from any clone) fail with [`Error::Shutdown`] from the moment
    /// this is called. Calling it again, or from several clones, waits for the same
    /// shutdown.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not undo the shutdown; the workers still finish and
    /// exit in the background.
    ///
    /// # Examples
    ///
    /// ```
    /// procexec::tasks! {
    ///     pub fn nap(ms: u64) { std::thread::sleep(std::time::Duration::from_millis(ms)) }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// let exec = procexec::Executor::builder().processes(2).build().await?;
    /// let queued: Vec<_> = (0..4).map(|_| exec.spawn(nap, 50)).collect();
    /// exec.shutdown().await;
    /// for call in queued {
    ///     call.await?; // queued work finished before the workers were let go
    /// }
    /// assert!(exec.spawn(nap, 1).await.unwrap_err().is_shutdown());
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self) {
        self.shared().drain();
        self.shared().stopped().await;
    }

    /// Stops now: kills every worker, fails every call still queued or running
    /// with [`Error::Shutdown`], and waits until each worker has been reaped.
    /// Python's `Pool.terminate()`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not undo it; the workers are still killed and
    /// reaped in the background.
    ///
    /// ```
    /// procexec::tasks! {
    ///     pub fn nap(ms: u64) { std::thread::sleep(std::time::Duration::from_millis(ms)) }
    /// }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let long = exec.spawn(nap, 60_000);
    /// exec.shutdown_now().await;
    /// assert!(long.await.unwrap_err().is_shutdown());
    /// # Ok(()) }
    /// ```
    pub async fn shutdown_now(&self) {
        self.shared().terminate();
        self.shared().stopped().await;
    }

    /// The number of worker processes.
    ///
    /// ```
    /// # procexec::tasks! {}
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// let exec = procexec::Executor::builder().processes(3).build().await?;
    /// assert_eq!(exec.processes(), 3);
    /// # Ok(()) }
    /// ```
    pub fn processes(&self) -> usize {
        self.shared().processes
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }
}

impl fmt::Debug for Executor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Executor")
            .field("program", &self.shared().config.program)
            .field("processes", &self.shared().processes)
            .finish_non_exhaustive()
    }
}

/// The future of one [`Executor::spawn`] call: resolves to the task's output.
///
/// # Cancel safety
///
/// Unlike a `tokio::task::JoinHandle`, dropping a `TaskHandle` **cancels** the call
/// (use [`detach`](TaskHandle::detach) to let it run). A call no worker has started
/// is withdrawn (one sent ahead to a worker is skipped by it). A call already
/// running is handled by the executor's [`CancelPolicy`]: by default its worker is
/// killed (and replaced) if the call is still running 10 ms after the drop; under
/// [`CancelPolicy::Finish`] it runs to the end and its output is discarded.
#[must_use = "a TaskHandle does nothing useful unless awaited; dropping it withdraws the call"]
pub struct TaskHandle<O> {
    task: &'static str,
    state: HandleState,
    _output: PhantomData<fn() -> O>,
}

/// A call encoded for `spawn` or `try_spawn`.
enum Prepared {
    /// Queued, or failed before it could be.
    Ready(HandleState),
    /// Encoded, but the queue has no room for it now.
    /// Boxed: a job is large, and a full queue is rare.
    Full(Box<Job>, oneshot::Receiver<Completion>),
}

/// Waits for room in the queue for `job`, then queues it, unless its caller left.
async fn admit(shared: Arc<Shared>, mut job: Job, admission: Admission) {
    let Ok(permit) = admission.await else {
        return;
    };
    if job.is_cancelled() {
        return;
    }
    job.admission = Some(permit);
    if shared.submit(job).is_err() {
        // Dropped: its caller learns of the shutdown from the closed channel.
    }
}

/// Queues an admitted job; the handle then waits for its completion.
fn queue(shared: &Shared, job: Job, receiver: oneshot::Receiver<Completion>) -> HandleState {
    match shared.submit(job) {
        Ok(()) => HandleState::Waiting(receiver),
        Err(_) => HandleState::Failed(Some(Box::new(shared.refused()))),
    }
}

/// The call [`Executor::try_spawn`] refused because the queue was full, with its
/// input.
pub struct QueueFull<I> {
    input: I,
}

impl<I> QueueFull<I> {
    /// The input of the refused call.
    pub fn into_input(self) -> I {
        self.input
    }
}

impl<I> fmt::Debug for QueueFull<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueFull").finish_non_exhaustive()
    }
}

impl<I> fmt::Display for QueueFull<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the executor's queue is full")
    }
}

impl<I> std::error::Error for QueueFull<I> {}

type Admission =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>> + Send + Sync>>;

enum HandleState {
    /// Queued (or running): waits for the completion.
    Waiting(oneshot::Receiver<Completion>),
    /// Not queued yet: waits for room in the queue.
    Admitting {
        shared: Arc<Shared>,
        /// Boxed: only calls made outside a runtime into a full queue wait here.
        job: Option<Box<Job>>,
        receiver: Option<oneshot::Receiver<Completion>>,
        admission: Admission,
    },
    /// Boxed: handles are often collected by the thousand, and failing early is rare.
    Failed(Option<Box<Error>>),
}

impl<O> TaskHandle<O> {
    /// Lets the call run to completion without waiting for it; its output (or error)
    /// is discarded.
    ///
    /// A `TaskHandle` is not a `tokio::task::JoinHandle`: dropping it *cancels* the
    /// call. Detach it instead when the work should happen anyway, like a spawned
    /// task whose handle is dropped.
    ///
    /// ```
    /// procexec::tasks! {
    ///     pub fn touch(path: String) { std::fs::write(path, b"done").unwrap() }
    /// }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let path = std::env::temp_dir().join(format!("detached-{}", std::process::id()));
    /// exec.spawn(touch, path.display().to_string()).detach();
    /// exec.shutdown().await; // finishes what was accepted, detached calls included
    /// assert!(path.exists());
    /// # std::fs::remove_file(path).unwrap();
    /// # Ok(()) }
    /// ```
    pub fn detach(self) {
        let runtime = tokio::runtime::Handle::try_current();
        match (self.state, runtime) {
            // The call counts as cancelled once nobody holds its receiver.
            (HandleState::Waiting(receiver), Ok(runtime)) => {
                drop(runtime.spawn(async move { drop(receiver.await) }));
            }
            // Not queued yet: it still needs someone to get it in when there is room.
            (
                HandleState::Admitting { shared, job: Some(mut job), receiver: Some(receiver), admission },
                Ok(runtime),
            ) => {
                drop(runtime.spawn(async move {
                    if let Ok(permit) = admission.await {
                        job.admission = Some(permit);
                        if let HandleState::Waiting(receiver) = queue(&shared, *job, receiver) {
                            drop(receiver.await);
                        }
                    }
                }));
            }
            // Outside a runtime nobody could await it either: keep it open for good.
            (HandleState::Waiting(receiver), Err(_)) => std::mem::forget(receiver),
            _ => {}
        }
    }

    /// The name of the task this handle runs.
    ///
    /// ```
    /// procexec::tasks! {
    ///     pub fn square(x: u64) -> u64 { x * x }
    /// }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// # let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let handle = exec.spawn(square, 3);
    /// assert_eq!(handle.task_name(), "square");
    /// assert_eq!(handle.await?, 9);
    /// # Ok(()) }
    /// ```
    pub fn task_name(&self) -> &'static str {
        self.task
    }
}

impl<O: DeserializeOwned> Future for TaskHandle<O> {
    type Output = Result<O>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<O>> {
        let task = self.task;
        if let HandleState::Admitting { shared, job, receiver, admission } = &mut self.state {
            let permit = std::task::ready!(admission.as_mut().poll(cx));
            let (Some(mut job), Some(receiver)) = (job.take(), receiver.take()) else {
                return Poll::Ready(Err(Error::Shutdown));
            };
            let next = match permit {
                Ok(permit) => {
                    job.admission = Some(permit);
                    queue(shared, *job, receiver)
                }
                Err(_) => HandleState::Failed(Some(Box::new(Error::Shutdown))),
            };
            self.state = next;
        }
        match &mut self.state {
            HandleState::Waiting(receiver) => match Pin::new(receiver).poll(cx) {
                Poll::Pending => {
                    yield_visibly(cx);
                    Poll::Pending
                }
                Poll::Ready(Ok(Completion::Done(delivery))) => {
                    let mut body: &[u8] = &delivery.body;
                    let _registered = crate::wire::blob::register(&delivery.body);
                    Poll::Ready(decode_record(task, &mut body))
                }
                Poll::Ready(Ok(Completion::Failed(err) | Completion::Broken { error: err, .. })) => {
                    Poll::Ready(Err(err))
                }
                Poll::Ready(Err(_)) => Poll::Ready(Err(Error::Shutdown)),
            },
            HandleState::Failed(err) => Poll::Ready(Err(err.take().map_or(Error::Shutdown, |err| *err))),
            HandleState::Admitting { .. } => Poll::Pending,
        }
    }
}

/// A call's result, with what it printed: the output of
/// [`CapturedHandle`] (see [`Executor::spawn_captured`]).
///
/// The fields are independent: `captured.result?` may come before or after a look
/// at `captured.stdout`.
#[derive(Debug)]
#[non_exhaustive]
pub struct Captured<O> {
    /// What the call returned, or how it failed.
    pub result: Result<O>,
    /// What it printed to stdout.
    pub stdout: Printed,
    /// What it printed to stderr.
    pub stderr: Printed,
}

/// What a call printed to one stream: bytes, compared and shown as text.
///
/// ```
/// # procexec::tasks! { pub fn hi() -> u8 { println!("hi"); 1 } }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// # let exec = procexec::Executor::builder().processes(1).build().await?;
/// let captured = exec.spawn_captured(hi, ()).await;
/// assert_eq!(captured.result?, 1);
/// assert_eq!(captured.stdout, "hi\n");
/// assert_eq!(captured.stdout.text(), "hi\n");
/// assert_eq!(captured.stdout.as_bytes(), b"hi\n");
/// assert!(captured.stderr.is_empty());
/// # Ok(()) }
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Printed(Vec<u8>);

impl Printed {
    /// The bytes as text, invalid UTF-8 replaced by `�`.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// How many bytes were printed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing was printed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Printed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text(), f)
    }
}

impl fmt::Display for Printed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl AsRef<[u8]> for Printed {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl PartialEq<str> for Printed {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for Printed {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<String> for Printed {
    fn eq(&self, other: &String) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<[u8]> for Printed {
    fn eq(&self, other: &[u8]) -> bool {
        self.0 == other
    }
}

/// The future of a call made with [`Executor::spawn_captured`]: a [`TaskHandle`]
/// whose output comes with what the call printed. Dropping it cancels the call.
#[must_use = "a CapturedHandle does nothing useful unless awaited; dropping it withdraws the call"]
pub struct CapturedHandle<O> {
    handle: TaskHandle<O>,
    printed: Capture,
}

impl<O> CapturedHandle<O> {
    /// The name of the task this handle runs.
    ///
    /// ```
    /// # procexec::tasks! { pub fn square(x: u64) -> u64 { x * x } }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// # let exec = procexec::Executor::builder().processes(1).build().await?;
    /// let handle = exec.spawn_captured(square, 3);
    /// assert_eq!(handle.task_name(), "square");
    /// assert_eq!(handle.await.result?, 9);
    /// # Ok(()) }
    /// ```
    pub fn task_name(&self) -> &'static str {
        self.handle.task
    }
}

impl<O: DeserializeOwned> Future for CapturedHandle<O> {
    type Output = Captured<O>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Captured<O>> {
        let result = std::task::ready!(Pin::new(&mut self.handle).poll(cx));
        // Everything the call printed arrived before its completion.
        let printed = std::mem::take(&mut *self.printed.lock().unwrap_or_else(|p| p.into_inner()));
        Poll::Ready(Captured { result, stdout: Printed(printed.stdout), stderr: Printed(printed.stderr) })
    }
}

impl<O> fmt::Debug for CapturedHandle<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CapturedHandle").field("task", &self.handle.task).finish_non_exhaustive()
    }
}

impl<O> fmt::Debug for TaskHandle<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskHandle").field("task", &self.task).finish_non_exhaustive()
    }
}

/// Makes a yield forced by tokio's task budget visible to the combinator polling
/// this handle.
///
/// Once the budget is spent, the receiver returns `Pending` even when its result
/// has arrived, and tokio wakes it only after the whole task returns (its defer
/// list). `FuturesUnordered` (and so `join_all` over more than 30 handles) stops
/// early only when a future wakes itself while being polled; without that it polls
/// every queued handle in vain, tokio wakes them all again, and the next poll does
/// it again: with a backlog of n finished calls, O(n) polls per 128 results, which
/// made 100,000 joined spawns 40-70x slower than 10,000. Waking now lets it stop
/// after two; the deferred wake-up that follows is absorbed.
fn yield_visibly(cx: &Context<'_>) {
    if !tokio::task::coop::has_budget_remaining() {
        cx.waker().wake_by_ref();
    }
}
