//! Configuring and starting an executor.

use std::ffi::OsString;
use std::fmt::{self, Display};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::parent::dispatch::decode_record;
use crate::parent::dispatch::{CallOptions, CancelPolicy};
use crate::parent::error::{Error, Result, WorkerStartError};
use crate::parent::launch::{GroupRuntime, Groups, Launcher, WorkerGroup};
use crate::parent::output::WorkerStderr;
use crate::parent::pool::{Limits, Shared, TaskTable};
use crate::parent::process::{Initializer, STARTS_AT_ONCE, TEST_WORKER_NAME, WorkerConfig, WorkerProcess};
use crate::task::{IntoTask, Registry};
use crate::wire::codec;
use crate::wire::protocol;

/// Descriptors the parent holds for each running worker: its request, reply and
/// stderr pipes and its progress record. Its exit is waited for through `SIGCHLD`,
/// which costs none.
const FDS_PER_WORKER: u64 = 4;
/// Descriptors an in-process worker holds in this process: both ends of its two
/// pipes, its progress record, and the parent's copy of the record.
const FDS_PER_THREAD: u64 = 6;
/// Descriptors a starting worker holds on top: the child's ends of its pipes, from
/// their creation until it is spawned (its progress record is not open yet then).
/// At most [`STARTS_AT_ONCE`] starts hold them at once, whatever starts them.
const FDS_PER_START: u64 = 3;
/// Descriptors left for the rest of the program.
const FD_MARGIN: u64 = 64;
/// Workers started at once by `build`.
const START_BATCH: usize = STARTS_AT_ONCE;

/// Checks that `processes` workers fit the descriptor limit, raising the soft limit
/// toward the hard one when allowed.
fn ensure_descriptors(processes: usize, per_worker: u64, raise: bool) -> Result<()> {
    let Ok((soft, hard)) = crate::sys::fd_limits() else {
        return Ok(());
    };
    let open = crate::sys::open_fds().unwrap_or(0);
    let starting = processes.min(STARTS_AT_ONCE) as u64;
    let need = open + processes as u64 * per_worker + starting * FDS_PER_START + FD_MARGIN;
    if need <= soft {
        return Ok(());
    }
    if raise && need <= hard && crate::sys::set_fd_soft_limit(hard).is_ok() {
        tracing::debug!(from = soft, to = hard, "raised the soft limit on open descriptors for the workers");
        return Ok(());
    }
    Err(Error::Config(format!(
        "{processes} workers need about {need} open descriptors ({open} open now, {per_worker} per worker, \
         {FDS_PER_START} more for each of {starting} starting at once, {FD_MARGIN} to spare), but the limit (RLIMIT_NOFILE) is {soft} (hard limit {hard}){}: raise it \
         (`ulimit -n`), or use fewer processes",
        if raise { "" } else { ", and raise_fd_limit(false) keeps it" }
    )))
}

/// Largest accepted `processes`.
const MAX_PROCESSES: usize = 4096;

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

/// Configures and starts an [`Executor`](crate::Executor).
///
/// Every setter documents its default; [`build`](Builder::build) checks the whole
/// configuration (sizes in range, the program exists and is executable) before it
/// starts any process, then starts the workers and completes each handshake.
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
///     .timeout(Duration::from_secs(30))
///     .retries(2)
///     .max_tasks_per_worker(10_000)
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
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
    options: CallOptions,
    limits: Limits,
    min_processes: Option<usize>,
    initializer: Option<std::result::Result<Arc<Initializer>, String>>,
    max_queued_bytes: usize,
    raise_fd_limit: bool,
    groups: Vec<WorkerGroup>,
    wrapper: Vec<OsString>,
    in_process: Option<&'static Registry>,
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
            options: CallOptions::default(),
            limits: Limits::default(),
            min_processes: None,
            initializer: None,
            max_queued_bytes: 64 << 20,
            raise_fd_limit: true,
            groups: Vec::new(),
            wrapper: Vec::new(),
            in_process: None,
        }
    }
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("processes", &self.processes)
            .field("program", &self.program)
            .field("options", &self.options)
            .field("limits", &self.limits)
            .field("groups", &self.groups)
            .field("in_process", &self.in_process.is_some())
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// The number of worker processes (the most, when
    /// [`min_processes`](Builder::min_processes) is lower). Default: [`cpu_count()`],
    /// or the sum of the [`group`](Builder::group)s' workers. Must be 1 to 4096.
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
    ///
    /// Workers on other hosts or in containers (ssh, Slurm, a command
    /// [`Launcher`](crate::Launcher)) inherit nothing from this process: they get
    /// exactly these variables (and procexec's `PROCEXEC_WORKER` and
    /// [`PROCEXEC_HOST`](crate::HOST_ENV)).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Adds a group of workers and how they are started: on this machine, over
    /// ssh, in a Slurm allocation, through a command. With groups, the executor's
    /// [`processes`](Builder::processes) is their sum (setting another number is an
    /// error). Default: one local group of `processes` workers.
    ///
    /// ```no_run
    /// use procexec::{Ssh, WorkerGroup};
    /// # async fn demo() -> procexec::Result<()> {
    /// let exec = procexec::Executor::builder()
    ///     .group(WorkerGroup::local(2))
    ///     .group(WorkerGroup::ssh(4, Ssh::new("node1")))
    ///     .group(WorkerGroup::ssh(4, Ssh::new("node2")))
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn group(mut self, group: WorkerGroup) -> Self {
        self.groups.push(group);
        self
    }

    /// Adds several groups (see [`group`](Builder::group)), say those of a
    /// [`Hosts`](crate::Hosts) file.
    pub fn groups(mut self, groups: impl IntoIterator<Item = WorkerGroup>) -> Self {
        self.groups.extend(groups);
        self
    }

    /// Runs every worker under this command, where it runs: `["valgrind",
    /// "--error-exitcode=9"]`, `["strace", "-f", "-o", "trace.txt"]`, `["env",
    /// "FOO=1"]`, `["gdb", "-batch", "-ex", "run", "-ex", "bt", "--args"]`. A group
    /// with its own [`wrapper`](WorkerGroup::wrapper) keeps it. Default: none.
    ///
    /// ```no_run
    /// # async fn demo() -> procexec::Result<()> {
    /// let exec = procexec::Executor::builder()
    ///     .worker_wrapper(["valgrind", "--error-exitcode=9", "--quiet"])
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn worker_wrapper<I, S>(mut self, wrapper: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.wrapper = wrapper.into_iter().map(Into::into).collect();
        self
    }

    /// Runs the current *test binary* as the worker, through the test that
    /// [`test_worker!`](crate::test_worker) defines. For a crate's own integration
    /// tests that define their tasks with [`tasks!`](crate::tasks). Default: off.
    pub fn test_harness(mut self) -> Self {
        self.test_harness = true;
        self
    }

    /// Runs the workers as threads of this process, serving `tasks`, instead of as
    /// processes: in-process mode, for stepping through a task in a debugger, and
    /// for unit tests that should not start processes. Default: off.
    ///
    /// Everything else stays as it is: each of the [`processes`](Builder::processes)
    /// slots gets a thread that runs the same loop a worker process runs, over a
    /// pair of pipes, so every call is encoded, framed and decoded as it would be
    /// (a serde bug still surfaces), and spawn, map, streams, typed errors, retries,
    /// timeouts, channels, shared memory, [`is_cancelled`](crate::is_cancelled) and
    /// [`report_progress`](crate::report_progress) behave as with processes
    /// (called from the worker's own thread). A task's `tracing` events go straight
    /// to this process's subscriber, inside a `procexec::worker` span (fields
    /// `worker`, `task`, `call`) under the span current where the call was made, and
    /// what it prints goes to this process's stdout and stderr as it is, unlabelled
    /// ([`Executor::spawn_captured`](crate::Executor::spawn_captured) captures
    /// nothing).
    ///
    /// What a thread does not isolate:
    ///
    /// - A task that aborts, segfaults or exits takes this process down with it.
    /// - A thread cannot be killed. A call that times out, or whose caller left
    ///   (under [`CancelPolicy::Kill`](crate::CancelPolicy::Kill)), ends for its
    ///   caller at once, and a new thread takes the slot; the old one runs on
    ///   until its task returns, then finds its pipes closed and ends (a task
    ///   that never returns keeps its thread, and what it holds, for good).
    /// - Memory is the process's: [`max_worker_memory`](Builder::max_worker_memory)
    ///   is refused, and [`WorkerState`](crate::WorkerState)s and other statics are
    ///   shared by every worker thread and the caller (an initializer that sets
    ///   one fails on the second thread).
    ///
    /// Worker [`program`](Builder::program)s, [`group`](Builder::group)s,
    /// [`worker_wrapper`](Builder::worker_wrapper) and
    /// [`test_harness`](Builder::test_harness) start processes, so `build` refuses
    /// them with [`Error::Config`](crate::Error::Config) here.
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
    /// // No `init_worker`: nothing runs this binary again.
    /// let exec = procexec::Executor::builder().in_process(&TASKS).processes(2).build().await?;
    /// assert_eq!(exec.spawn(square, 7).await?, 49);
    /// assert_eq!(exec.map(square, 0..4).await?, [0, 1, 4, 9]);
    /// # Ok(()) }
    /// ```
    pub fn in_process(mut self, tasks: &'static Registry) -> Self {
        self.in_process = Some(tasks);
        self
    }

    /// The largest frame, in bytes, either side may send: it bounds one task's
    /// encoded input, or a map chunk's, and its output. Default: 64 MiB. Must be
    /// 1 KiB to 4 GiB - 1.
    pub fn max_frame_len(mut self, bytes: usize) -> Self {
        self.max_frame_len = bytes;
        self
    }

    /// How long a new worker may take to start, complete its handshake and run
    /// the [`initializer`](Builder::initializer). Default: 30 s. Must not be zero.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// What to do with what workers print (stdout and stderr), unless a call
    /// captures it ([`Executor::spawn_captured`](crate::Executor::spawn_captured)).
    /// Default: [`WorkerStderr::Forward`], each line labelled with the worker and
    /// the call that printed it. The tail is kept for crash reports either way.
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

    /// The default time limit of a call, counted from when it starts running in a
    /// worker (not while it waits in the queue). A call past its limit has its worker
    /// killed and replaced and fails with [`Error::TimedOut`]. Override per call
    /// with [`Executor::with_timeout`](crate::Executor::with_timeout). Default: none
    /// (`Duration::ZERO` also means none).
    ///
    /// A map with a timeout sends one input per call, so that the limit applies to
    /// each input.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.options.timeout = Some(timeout).filter(|t| !t.is_zero());
        self
    }

    /// How many times a call is sent again after its worker crashed or it timed
    /// out: for idempotent tasks. A map chunk is retried one input per call, so an
    /// input that kills every worker it touches ("poison") fails alone once its
    /// retries are spent. Override per call with
    /// [`Executor::with_retries`](crate::Executor::with_retries). Default: 0.
    pub fn retries(mut self, retries: u32) -> Self {
        self.options.retries = retries;
        self
    }

    /// What happens to a running call whose caller goes away. Override per call
    /// with [`Executor::with_cancel_policy`](crate::Executor::with_cancel_policy).
    /// Default: [`CancelPolicy::Kill`].
    pub fn cancel_policy(mut self, policy: CancelPolicy) -> Self {
        self.options.cancel = policy;
        self
    }

    /// Runs `task` on `input` once in every new worker, before it takes any call:
    /// Python's `Pool(initializer=..., initargs=...)`. Use it to build per-worker
    /// state (load a model, open a connection) into a
    /// [`WorkerState`](crate::WorkerState) that tasks then read.
    ///
    /// The task must return `()` or a `Result<(), E>`. If it fails (an `Err`, a
    /// panic, a crash) the worker does not start: `build` fails with
    /// [`Error::WorkerStart`] naming the initializer and its error, and a failing
    /// replacement later is retried with back-off, then reported the same way.
    /// Default: none.
    pub fn initializer<T>(mut self, task: T, input: T::Input) -> Self
    where
        T: IntoTask,
        T::Input: Serialize,
        T::Output: InitOutput,
    {
        let task = task.into_task();
        let mut buf = BytesMut::new();
        let record = protocol::begin_record(&mut buf);
        let encoded = protocol::encode_into(&mut buf, &input);
        protocol::end_record(&mut buf, record);
        self.initializer = Some(match encoded {
            Ok(()) => Ok(Arc::new(Initializer {
                task: task.name(),
                signature: task.signature(),
                input: buf.freeze(),
                check: check_init::<T::Output>,
            })),
            Err(err) => {
                Err(format!("initializer `{}`: {}", task.name(), codec::encode_error_message(&input, &err)))
            }
        });
        self
    }

    /// Recycles a worker after it has served this many inputs: Python's
    /// `maxtasksperchild`, for tasks that leak. The worker finishes the calls it
    /// holds, exits, and a fresh one takes its place. Default: never.
    pub fn max_tasks_per_worker(mut self, tasks: u64) -> Self {
        self.limits.max_tasks_per_worker = Some(tasks);
        self
    }

    /// Recycles a worker once its peak resident memory passes `bytes` (measured
    /// after every call). The call that pushed it over still succeeds;
    /// [`Executor::stats`](crate::Executor::stats) names it. Default: no ceiling.
    pub fn max_worker_memory(mut self, bytes: u64) -> Self {
        self.limits.max_worker_memory = Some(bytes);
        self
    }

    /// The fewest worker processes kept alive. Below [`processes`](Builder::processes),
    /// the executor starts this many, starts more when calls wait and no worker is
    /// idle, and stops workers idle for [`idle_timeout`](Builder::idle_timeout).
    /// Default: `processes` (a fixed pool). Must be 0 to `processes`.
    ///
    /// 0 scales the pool to zero when idle: `build` still starts one worker (its
    /// handshake checks the program and tells the task table), which stops after
    /// `idle_timeout` like any other, and the next call starts one again. Without an
    /// `idle_timeout` no worker ever stops, whatever the minimum.
    pub fn min_processes(mut self, processes: usize) -> Self {
        self.min_processes = Some(processes);
        self
    }

    /// How much [`spawn`](crate::Executor::spawn)ed work may wait in the queue for a
    /// worker, in bytes of encoded input. Past it, a new call waits in its
    /// [`TaskHandle`](crate::TaskHandle) (queued when the handle is polled and room
    /// frees up), and [`Executor::try_spawn`](crate::Executor::try_spawn) refuses it,
    /// so a burst of large calls cannot pile up memory. A call larger than the whole
    /// bound is queued alone.
    /// Maps are not counted: each bounds its own read-ahead. Default: 64 MiB. Must
    /// be 1 KiB to 1 TiB.
    pub fn max_queued_bytes(mut self, bytes: usize) -> Self {
        self.max_queued_bytes = bytes;
        self
    }

    /// Whether `build` may raise this process's soft limit on open descriptors
    /// (`RLIMIT_NOFILE`) to its hard limit when the pool needs more than it allows,
    /// as long-running servers commonly do: each running worker costs the parent four
    /// descriptors, and each starting one three more (at most 32 start at once), so
    /// 256 workers do not fit the usual soft limit of 1,024. The limit is only ever
    /// raised, never lowered, and processes started afterwards (workers included)
    /// inherit it. When the pool still cannot fit, `build` fails with
    /// [`Error::Config`] naming the limit and the need. Default: true.
    pub fn raise_fd_limit(mut self, raise: bool) -> Self {
        self.raise_fd_limit = raise;
        self
    }

    /// How long a worker may sit without work before it is stopped, while more than
    /// [`min_processes`](Builder::min_processes) are alive. Default: never. Must not
    /// be zero.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.limits.idle_timeout = Some(timeout);
        self
    }

    /// Starts the pool [`build`](Builder::build) wraps in an `Executor`, with the
    /// call options its handles start from.
    pub(crate) async fn start(self) -> Result<(Arc<Shared>, CallOptions)> {
        let (mut config, limits, processes) = self.validate()?;
        let per_worker = if self.in_process.is_some() { FDS_PER_THREAD } else { FDS_PER_WORKER };
        ensure_descriptors(processes, per_worker, self.raise_fd_limit)?;
        config.groups = Arc::new(self.prepare_groups(&config.program, processes).await?);
        // At least one, even for a pool that may scale to zero: the task table and
        // the check that the program is a worker come from a handshake. In bounded
        // batches: a worker being started holds more descriptors than one running.
        let starts = (0..limits.min_processes.max(1)).map(|slot| WorkerProcess::start(&config, slot));
        let mut workers = Vec::with_capacity(processes);
        {
            let mut started = futures::StreamExt::buffered(futures::stream::iter(starts), START_BATCH);
            while let Some(worker) = futures::StreamExt::next(&mut started).await {
                // Dropping the workers already started kills them.
                workers.push(worker.map_err(|err| Error::WorkerStart(Arc::new(err)))?);
            }
        }
        let tasks = TaskTable::new(workers[0].tasks.clone());
        if let Some(odd) = workers.iter().find(|worker| worker.tasks != tasks.infos()) {
            let (first, group) = (config.groups.of(0), config.groups.of(odd.index));
            let message = format!(
                "{} (unlike worker 0 on {}, which serves worker {} on {})",
                crate::parent::process::task_difference(tasks.infos(), &odd.tasks),
                first.label,
                odd.index,
                group.label,
            );
            let mut failure = WorkerStartError::new(group.program(), message);
            failure.host = (!group.same_host).then(|| group.label.clone());
            return Err(Error::WorkerStart(Arc::new(failure)));
        }
        let shared = Arc::new(Shared::new(config, limits, tasks, processes, self.max_queued_bytes));
        shared.counters.workers.store(workers.len(), std::sync::atomic::Ordering::Release);
        let mut workers = workers.into_iter();
        for slot in 0..processes {
            // Counted before the task runs, so an early shutdown waits for it.
            shared.supervisor_spawned();
            tokio::spawn(crate::parent::supervisor::run_slot(shared.clone(), slot, workers.next()));
        }
        Ok((shared, self.options))
    }

    /// The groups, each prepared (allocations requested, binaries shipped) in
    /// parallel, off the runtime's threads: that runs `salloc` and `ssh`.
    async fn prepare_groups(&self, program: &std::path::Path, processes: usize) -> Result<Groups> {
        let groups = match self.groups.is_empty() {
            true => vec![WorkerGroup::local(processes)],
            false => self.groups.clone(),
        };
        let mut prepared = Vec::with_capacity(groups.len());
        for group in groups {
            let group =
                if group.wrapper_is_empty() { group.wrapper(self.wrapper.iter().cloned()) } else { group };
            let program = program.to_path_buf();
            prepared.push(tokio::task::spawn_blocking(move || {
                let runtime = GroupRuntime::prepare(&group, &program);
                runtime.map(|runtime| (runtime, group.processes()))
            }));
        }
        let mut list = Vec::with_capacity(prepared.len());
        let mut failure = None;
        for handle in prepared {
            // Every one awaited, so allocations already granted are dropped (and
            // cancelled) on failure rather than left behind.
            match handle.await {
                Ok(Ok(group)) => list.push(group),
                Ok(Err(err)) => failure = failure.or(Some(err)),
                Err(err) => {
                    failure = failure.or(Some(Error::Config(format!("preparing a group panicked: {err}"))))
                }
            }
        }
        match failure {
            Some(err) => Err(err),
            None => Ok(Groups::new(list)),
        }
    }

    fn validate(&self) -> Result<(WorkerConfig, Limits, usize)> {
        let sum: usize = self.groups.iter().map(WorkerGroup::processes).sum();
        if let Some(empty) = self.groups.iter().find(|group| group.processes() == 0) {
            return Err(Error::Config(format!("group {} has no workers", empty.label())));
        }
        let processes = match (self.processes, self.groups.is_empty()) {
            (Some(processes), false) if processes != sum => {
                return Err(Error::Config(format!(
                    "processes ({processes}) differs from the sum of the groups' workers ({sum}): set one of them"
                )));
            }
            (_, false) => sum,
            (processes, true) => processes.unwrap_or_else(cpu_count),
        };
        if processes == 0 || processes > MAX_PROCESSES {
            return Err(Error::Config(format!("processes must be 1 to {MAX_PROCESSES}, not {processes}")));
        }
        let min_processes = self.min_processes.unwrap_or(processes);
        if min_processes > processes {
            return Err(Error::Config(format!(
                "min_processes must be 0 to processes ({processes}), not {min_processes}"
            )));
        }
        if !(1024..=u32::MAX as usize).contains(&self.max_frame_len) {
            return Err(Error::Config(format!(
                "max_frame_len must be 1 KiB to 4 GiB - 1, not {}",
                self.max_frame_len
            )));
        }
        if !(1024..=1 << 40).contains(&self.max_queued_bytes) {
            return Err(Error::Config(format!(
                "max_queued_bytes must be 1 KiB to 1 TiB, not {}",
                self.max_queued_bytes
            )));
        }
        if !(4096..=1 << 30).contains(&self.pipe_capacity) {
            return Err(Error::Config(format!(
                "pipe_capacity must be 4 KiB to 1 GiB, not {}",
                self.pipe_capacity
            )));
        }
        let zero = |what: &str| Err(Error::Config(format!("{what} must not be zero")));
        if self.handshake_timeout.is_zero() {
            return zero("handshake_timeout");
        }
        if self.limits.idle_timeout.is_some_and(|t| t.is_zero()) {
            return zero("idle_timeout");
        }
        if self.limits.max_tasks_per_worker == Some(0) {
            return zero("max_tasks_per_worker");
        }
        if self.limits.max_worker_memory == Some(0) {
            return zero("max_worker_memory");
        }
        let initializer = match &self.initializer {
            None => None,
            Some(Ok(initializer)) => Some(initializer.clone()),
            Some(Err(message)) => return Err(Error::Config(message.clone())),
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config("build() must be called within a Tokio runtime".into()));
        }
        crate::parent::drivers::check().map_err(Error::Config)?;
        if self.in_process.is_some() {
            self.check_in_process()?;
        }
        let program = match &self.program {
            // Named in start errors.
            None if self.in_process.is_some() => PathBuf::from("<in-process worker>"),
            Some(program) => program.clone(),
            None => std::env::current_exe().map_err(|err| {
                let mut start =
                    WorkerStartError::new(std::path::Path::new("<current executable>"), "cannot locate it");
                start.source = Some(err);
                Error::WorkerStart(Arc::new(start))
            })?,
        };
        // A program only run elsewhere need not exist here.
        let used_here = self.groups.is_empty()
            || self.groups.iter().any(|group| match group.launcher() {
                Launcher::Local => true,
                Launcher::Ssh(ssh) => ssh.ships(),
                _ => false,
            });
        if let Err(message) = crate::sys::check_executable(&program) {
            if used_here && self.in_process.is_none() {
                return Err(Error::WorkerStart(Arc::new(WorkerStartError::new(&program, message))));
            }
        }
        let mut args = Vec::new();
        if self.test_harness {
            // Run only the `test_worker!` test, quietly, with output uncaptured so a
            // task's prints reach stderr.
            args.extend([TEST_WORKER_NAME, "--nocapture", "--test-threads=1", "-q"].map(OsString::from));
        }
        args.extend(self.args.iter().cloned());
        let config = WorkerConfig {
            program,
            args,
            env: self.env.clone(),
            max_frame_len: self.max_frame_len,
            handshake_timeout: self.handshake_timeout,
            stderr: self.stderr,
            pipe_capacity: self.pipe_capacity,
            measure_memory: self.limits.max_worker_memory.is_some(),
            initializer,
            in_process: self.in_process,
            executor: next_executor_id(),
            // Replaced by the prepared groups in `start`.
            groups: Arc::new(Groups::local(std::path::Path::new(""))),
        };
        Ok((config, Limits { min_processes, ..self.limits }, processes))
    }
}

impl Builder {
    /// What in-process mode cannot do: start processes, or limit a worker's memory.
    fn check_in_process(&self) -> Result<()> {
        let refused = [
            (self.program.is_some(), "a worker program"),
            (!self.groups.is_empty(), "worker groups"),
            (!self.wrapper.is_empty(), "a worker wrapper"),
            (self.test_harness, "test_harness"),
            (self.limits.max_worker_memory.is_some(), "max_worker_memory (memory is the whole process's)"),
        ];
        match refused.iter().find(|(set, _)| *set) {
            Some((_, what)) => {
                Err(Error::Config(format!("in_process workers are threads: {what} cannot apply")))
            }
            None => Ok(()),
        }
    }
}

fn check_init<O: InitOutput>(task: &str, mut body: &[u8]) -> std::result::Result<(), String> {
    decode_record::<O>(task, &mut body).map_err(|err| err.to_string())?.into_result()
}

/// What an [initializer](Builder::initializer) may return: `()`, or a `Result`
/// whose `Err` fails the worker's start with that message.
pub trait InitOutput: DeserializeOwned {
    /// `Ok` if the initializer succeeded.
    fn into_result(self) -> std::result::Result<(), String>;
}

impl InitOutput for () {
    fn into_result(self) -> std::result::Result<(), String> {
        Ok(())
    }
}

impl<E: Display + DeserializeOwned> InitOutput for std::result::Result<(), E> {
    fn into_result(self) -> std::result::Result<(), String> {
        self.map_err(|err| err.to_string())
    }
}

/// An id for a new executor, unique among this process's executors and unlikely
/// to be another process's: channel handles carry it, so one of another executor
/// is refused.
fn next_executor_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let count = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (u64::from(std::process::id()) << 32) | (count & 0xffff_ffff)
}
