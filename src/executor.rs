//! The executor: a cheap, cloneable handle to a pool of worker processes.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, oneshot};

use crate::dispatch::{Completion, Job, Queue, ReplyTo};
use crate::error::{Direction, Error, Result, WorkerStartError};
use crate::map::{Map, MapStream, MapUnordered};
use crate::process::{WorkerConfig, WorkerProcess, WorkerStderr};
use crate::protocol::{self, Count, Outcome, Request, TaskInfo};
use crate::task::{IntoTask, Task};

/// The name of the test that `test_worker!` defines.
pub(crate) const TEST_WORKER_NAME: &str = "procexec_test_worker";

/// The number of CPUs this process may use: the default number of worker processes.
///
/// Like Python's `multiprocessing.cpu_count()`, but it respects CPU affinity and
/// cgroup quotas (it is [`std::thread::available_parallelism`]), and falls back to 1.
/// For CPU-bound tasks one worker per CPU is right; for tasks that also wait on IO,
/// up to twice that can help.
///
/// ```
/// assert!(procexec::cpu_count() >= 1);
/// ```
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A pool of worker processes that runs [`Task`]s: like Python's
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
    /// A [`Builder`] with the defaults: [`cpu_count()`] workers running the current
    /// executable.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Runs `task` on `input` in a worker process.
    ///
    /// The call is queued at once, whether or not the handle is polled (like
    /// `tokio::spawn`); await the [`TaskHandle`] for the output. Errors found before
    /// sending (an unknown task, a type mismatch, an input above the frame limit)
    /// come out of the handle too.
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
        let task = task.into_task();
        let state = match self.shared().submit_one(&task, &input) {
            Ok(receiver) => HandleState::Waiting(receiver),
            Err(err) => HandleState::Failed(Some(err)),
        };
        TaskHandle { task: task.name(), state, _output: PhantomData }
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
        MapStream::new(self.shared().clone(), task.into_task(), items)
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
        MapUnordered::new(self.shared().clone(), task.into_task(), items)
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

    fn shared(&self) -> &Arc<Shared> {
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
/// Dropping a `TaskHandle` withdraws the call if no worker has received it yet; a
/// call already sent runs to completion and its output is discarded.
#[must_use = "a TaskHandle does nothing useful unless awaited; dropping it withdraws the call"]
pub struct TaskHandle<O> {
    task: &'static str,
    state: HandleState,
    _output: PhantomData<fn() -> O>,
}

enum HandleState {
    Waiting(oneshot::Receiver<Completion>),
    Failed(Option<Error>),
}

impl<O> TaskHandle<O> {
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
        match &mut self.state {
            HandleState::Waiting(receiver) => match Pin::new(receiver).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(Ok(delivery))) => {
                    let mut body: &[u8] = &delivery.body;
                    Poll::Ready(decode_outcome(task, &mut body))
                }
                Poll::Ready(Ok(Err(err))) => Poll::Ready(Err(err)),
                Poll::Ready(Err(_)) => Poll::Ready(Err(Error::Shutdown)),
            },
            HandleState::Failed(err) => Poll::Ready(Err(err.take().unwrap_or(Error::Shutdown))),
        }
    }
}

impl<O> fmt::Debug for TaskHandle<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskHandle").field("task", &self.task).finish_non_exhaustive()
    }
}

/// Decodes the next outcome of a reply body, advancing `body` past it.
pub(crate) fn decode_outcome<O: DeserializeOwned>(task: &str, body: &mut &[u8]) -> Result<O> {
    let (outcome, rest) = postcard::take_from_bytes::<Outcome>(body)
        .map_err(|err| Error::codec(task, Direction::Output, "decode", err))?;
    *body = rest;
    match outcome {
        Outcome::Ok => {
            let (output, rest) = postcard::take_from_bytes::<O>(body)
                .map_err(|err| Error::codec(task, Direction::Output, "decode", err))?;
            *body = rest;
            Ok(output)
        }
        Outcome::Panicked { message, location, backtrace } => {
            Err(Error::TaskPanicked(Arc::new(crate::error::TaskPanic {
                task: task.into(),
                message,
                location,
                backtrace,
            })))
        }
        Outcome::BadInput { message } => {
            Err(Error::Codec { task: task.into(), direction: Direction::Input, action: "decode", message })
        }
        Outcome::UnknownTask => Err(Error::UnknownTask { task: task.into() }),
        Outcome::TooLarge { size, limit } => {
            Err(Error::FrameTooLarge { task: task.into(), direction: Direction::Output, size, limit })
        }
    }
}

/// Configures and starts an [`Executor`].
///
/// Every setter documents its default; [`build`](Builder::build) checks the whole
/// configuration (sizes in range, the program exists and is executable) before it
/// starts any process, then starts every worker and completes its handshake.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
///
/// # async fn demo() -> procexec::Result<()> {
/// let exec = procexec::Executor::builder()
///     .program("target/release/my-worker")
///     .processes(8)
///     .max_frame_len(16 << 20)
///     .handshake_timeout(Duration::from_secs(5))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a Builder does nothing until `build` is awaited"]
pub struct Builder {
    processes: Option<usize>,
    program: Option<PathBuf>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    test_harness: bool,
    max_frame_len: usize,
    handshake_timeout: Duration,
    stderr: WorkerStderr,
    pipe_capacity: usize,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            processes: None,
            program: None,
            args: Vec::new(),
            env: Vec::new(),
            test_harness: false,
            max_frame_len: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
            stderr: WorkerStderr::Forward,
            pipe_capacity: 1 << 20,
        }
    }
}

/// Largest accepted `processes`.
const MAX_PROCESSES: usize = 4096;

impl Builder {
    /// The number of worker processes. Default: [`cpu_count()`]. Must be 1 to 4096.
    pub fn processes(mut self, processes: usize) -> Self {
        self.processes = Some(processes);
        self
    }

    /// Runs this program as the worker: a companion binary whose `main` is
    /// [`serve_worker`](crate::serve_worker). Default: the current executable,
    /// which must call [`init_worker`](crate::init_worker) first thing in `main`.
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = Some(program.into());
        self
    }

    /// Adds an argument to the worker's command line. Default: none.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Sets an environment variable for the workers, on top of the inherited
    /// environment. Default: the environment is inherited unchanged.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs the current *test binary* as the worker, through the test that
    /// [`test_worker!`](crate::test_worker) defines. For a crate's own integration
    /// tests that define their tasks with [`tasks!`](crate::tasks). Default: off.
    pub fn test_harness(mut self) -> Self {
        self.test_harness = true;
        self
    }

    /// The largest frame, in bytes, either side may send: it bounds one task's
    /// encoded input, or a map chunk's, and its output. Default: 64 MiB. Must be
    /// 1 KiB to 4 GiB - 1.
    pub fn max_frame_len(mut self, bytes: usize) -> Self {
        self.max_frame_len = bytes;
        self
    }

    /// How long a new worker may take to start and complete its handshake.
    /// Default: 30 s. Must not be zero.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// What to do with the workers' stderr (and so with their `println!`). Default:
    /// [`WorkerStderr::Forward`]. The tail is kept for crash reports either way.
    pub fn stderr(mut self, stderr: WorkerStderr) -> Self {
        self.stderr = stderr;
        self
    }

    /// The kernel buffer size requested for each request and reply pipe (Linux).
    /// Bigger pipes move large payloads in fewer wake-ups. Default: 1 MiB; the
    /// kernel may grant less. Must be 4 KiB to 1 GiB.
    pub fn pipe_capacity(mut self, bytes: usize) -> Self {
        self.pipe_capacity = bytes;
        self
    }

    /// Checks the configuration, starts the workers and completes each handshake.
    ///
    /// Must be called within a Tokio runtime with IO and time enabled (as
    /// `#[tokio::main]` and `#[tokio::test]` provide).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a value out of range or a missing runtime;
    /// [`Error::WorkerStart`] if the program is missing or not executable, or a
    /// worker fails to start or to complete the handshake (the error quotes its
    /// stderr). No process outlives a failed `build`.
    pub async fn build(self) -> Result<Executor> {
        let config = self.validate()?;
        let processes = self.processes.unwrap_or_else(cpu_count);
        let starts = (0..processes).map(|slot| WorkerProcess::start(&config, slot));
        let mut workers = Vec::with_capacity(processes);
        for started in futures::future::join_all(starts).await {
            // Dropping the workers already started kills them.
            workers.push(started.map_err(|err| Error::WorkerStart(Arc::new(err)))?);
        }
        let tasks = TaskTable::new(workers[0].tasks.clone());
        if let Some(odd) = workers.iter().find(|worker| worker.tasks != tasks.infos) {
            let message = format!("worker {} serves other tasks than worker 0", odd.index);
            return Err(Error::WorkerStart(Arc::new(WorkerStartError::new(&config.program, message))));
        }
        let shared = Arc::new(Shared {
            config,
            queue: Queue::new(processes),
            tasks,
            processes,
            next_id: AtomicU64::new(0),
            state: AtomicU8::new(RunState::Running as u8),
            supervisors: AtomicUsize::new(0),
            live_slots: AtomicUsize::new(processes),
            broken: OnceLock::new(),
            all_stopped: Notify::new(),
        });
        for worker in workers {
            // Counted before the task runs, so an early shutdown waits for it.
            shared.supervisors.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(crate::supervisor::supervise(shared.clone(), worker));
        }
        Ok(Executor { handle: Arc::new(Handle { shared }) })
    }

    fn validate(&self) -> Result<WorkerConfig> {
        let processes = self.processes.unwrap_or(1);
        if processes == 0 || processes > MAX_PROCESSES {
            return Err(Error::Config(format!("processes must be 1 to {MAX_PROCESSES}, not {processes}")));
        }
        if !(1024..=u32::MAX as usize).contains(&self.max_frame_len) {
            return Err(Error::Config(format!(
                "max_frame_len must be 1 KiB to 4 GiB - 1, not {}",
                self.max_frame_len
            )));
        }
        if !(4096..=1 << 30).contains(&self.pipe_capacity) {
            return Err(Error::Config(format!(
                "pipe_capacity must be 4 KiB to 1 GiB, not {}",
                self.pipe_capacity
            )));
        }
        if self.handshake_timeout.is_zero() {
            return Err(Error::Config("handshake_timeout must not be zero".into()));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config("build() must be called within a Tokio runtime".into()));
        }
        let program = match &self.program {
            Some(program) => program.clone(),
            None => std::env::current_exe().map_err(|err| {
                let mut start =
                    WorkerStartError::new(std::path::Path::new("<current executable>"), "cannot locate it");
                start.source = Some(err);
                Error::WorkerStart(Arc::new(start))
            })?,
        };
        if let Err(message) = crate::sys::check_executable(&program) {
            return Err(Error::WorkerStart(Arc::new(WorkerStartError::new(&program, message))));
        }
        let mut args = Vec::new();
        if self.test_harness {
            // Run only the `test_worker!` test, quietly, with output uncaptured so a
            // task's prints reach stderr.
            args.extend([TEST_WORKER_NAME, "--nocapture", "--test-threads=1", "-q"].map(OsString::from));
        }
        args.extend(self.args.iter().cloned());
        Ok(WorkerConfig {
            program,
            args,
            env: self.env.clone(),
            max_frame_len: self.max_frame_len,
            handshake_timeout: self.handshake_timeout,
            stderr: self.stderr,
            pipe_capacity: self.pipe_capacity,
            max_worker_memory: None,
        })
    }
}

/// The executor's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum RunState {
    Running = 0,
    /// `shutdown()`: finish what was accepted, accept nothing new.
    Draining = 1,
    /// Dropped: stop now.
    Terminated = 2,
}

/// The tasks the workers serve, by name.
pub(crate) struct TaskTable {
    infos: Vec<TaskInfo>,
    by_name: HashMap<String, u32>,
}

impl TaskTable {
    fn new(infos: Vec<TaskInfo>) -> Self {
        let mut by_name = HashMap::with_capacity(infos.len());
        for (index, info) in infos.iter().enumerate() {
            by_name.entry(info.name.clone()).or_insert(index as u32);
        }
        TaskTable { infos, by_name }
    }

    pub(crate) fn infos(&self) -> &[TaskInfo] {
        &self.infos
    }

    /// The worker's number for `task`, after checking both sides agree on its types.
    pub(crate) fn resolve<I, O>(&self, task: &Task<I, O>) -> Result<u32> {
        let Some(&index) = self.by_name.get(task.name()) else {
            return Err(Error::UnknownTask { task: task.name().into() });
        };
        let info = &self.infos[index as usize];
        if info.input != task.input_type() || info.output != task.output_type() {
            return Err(Error::TaskMismatch {
                task: task.name().into(),
                parent: format!("{} -> {}", task.input_type(), task.output_type()),
                worker: format!("{} -> {}", info.input, info.output),
            });
        }
        Ok(index)
    }
}

/// State shared by the executor's handles, its supervisors and its maps.
pub(crate) struct Shared {
    pub(crate) config: WorkerConfig,
    pub(crate) queue: Queue,
    pub(crate) tasks: TaskTable,
    pub(crate) processes: usize,
    next_id: AtomicU64,
    state: AtomicU8,
    /// Supervisor tasks still running.
    supervisors: AtomicUsize,
    /// Slots that have not given up restarting their worker.
    live_slots: AtomicUsize,
    /// Set when every slot gave up: the reason calls fail from then on.
    broken: OnceLock<Error>,
    all_stopped: Notify,
}

impl Shared {
    pub(crate) fn state(&self) -> RunState {
        match self.state.load(Ordering::Acquire) {
            0 => RunState::Running,
            1 => RunState::Draining,
            _ => RunState::Terminated,
        }
    }

    /// The error a call gets when the queue refuses it.
    fn refusal(&self) -> Error {
        self.broken.get().cloned().unwrap_or(Error::Shutdown)
    }

    /// Begins a call frame in `buf`; the caller appends the inputs, then ends the
    /// frame. Returns the call's id, where the frame starts, and where its item count
    /// sits (to patch when the count was not known up front).
    pub(crate) fn call_frame(&self, task: u32, items: u32, buf: &mut BytesMut) -> (u64, usize, usize) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let start = protocol::begin_frame(buf);
        let _ = protocol::encode_into(buf, &Request::Call { id, task, items: Count::new(items) });
        (id, start, buf.len() - Count::WIDTH)
    }

    fn submit_one<I: Serialize, O>(
        &self,
        task: &Task<I, O>,
        input: &I,
    ) -> Result<oneshot::Receiver<Completion>> {
        let index = self.tasks.resolve(task)?;
        let mut buf = BytesMut::with_capacity(64);
        let (id, start, _) = self.call_frame(index, 1, &mut buf);
        protocol::encode_into(&mut buf, input)
            .map_err(|err| Error::codec(task.name(), Direction::Input, "encode", err))?;
        let limit = self.config.max_frame_len;
        protocol::end_frame(&mut buf, start, limit).map_err(|size| Error::FrameTooLarge {
            task: task.name().into(),
            direction: Direction::Input,
            size: size as u64,
            limit: limit as u64,
        })?;
        let (sender, receiver) = oneshot::channel();
        let job = Job { id, task: task.name(), items: 1, frame: buf.freeze(), reply: ReplyTo::Once(sender) };
        self.submit(job).map_err(|_| self.refusal())?;
        Ok(receiver)
    }

    /// Queues a job; hands it back if the executor no longer accepts work.
    pub(crate) fn submit(&self, job: Job) -> Result<(), Job> {
        self.queue.push(job)
    }

    /// The error for a refused submission.
    pub(crate) fn refused(&self) -> Error {
        self.refusal()
    }

    pub(crate) fn max_frame_len(&self) -> usize {
        self.config.max_frame_len
    }

    /// `shutdown()`: stop accepting, let the supervisors finish the queue.
    fn drain(&self) {
        let _ = self.state.compare_exchange(
            RunState::Running as u8,
            RunState::Draining as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.queue.close();
    }

    /// Drop of the last handle: stop now, fail whatever waits.
    fn terminate(&self) {
        self.state.store(RunState::Terminated as u8, Ordering::Release);
        for job in self.queue.close_and_drain() {
            job.complete(Err(Error::Shutdown));
        }
    }

    /// Called by a slot that cannot start a worker any more. When it was the last
    /// one, queued calls fail with `reason`, and so does every later call.
    pub(crate) fn slot_gave_up(&self, reason: Error) {
        if self.live_slots.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _ = self.broken.set(reason.clone());
            for job in self.queue.close_and_drain() {
                job.complete(Err(reason.clone()));
            }
        }
    }

    /// Marks a supervisor as running until the guard drops.
    pub(crate) fn supervisor_guard(&self) -> SupervisorGuard<'_> {
        SupervisorGuard { shared: self }
    }

    async fn stopped(&self) {
        loop {
            let notified = self.all_stopped.notified();
            if self.supervisors.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Counts a running supervisor; see [`Shared::supervisor_guard`].
pub(crate) struct SupervisorGuard<'a> {
    shared: &'a Shared,
}

impl Drop for SupervisorGuard<'_> {
    fn drop(&mut self) {
        if self.shared.supervisors.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.all_stopped.notify_waiters();
        }
    }
}
