//! What an executor has been doing: counters for metrics, and why workers stopped.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::parent::error::ExitReason;

/// A snapshot of an executor's health, from [`Executor::stats`](crate::Executor::stats):
/// export it as metrics.
///
/// Counts are of task inputs (a `map` chunk of 100 inputs counts 100), except
/// `queued` and `running`, which count calls (a chunk is one call).
///
/// ```
/// procexec::tasks! {
///     pub fn square(x: u64) -> u64 { x * x }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// let exec = procexec::Executor::builder().processes(2).build().await?;
/// exec.map(square, 0..1000).await?;
/// let stats = exec.stats();
/// assert_eq!(stats.workers, 2);
/// assert_eq!(stats.completed, 1000);
/// assert_eq!((stats.queued, stats.running, stats.failed), (0, 0, 0));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Worker processes alive and serving.
    pub workers: usize,
    /// Calls waiting in the parent for a worker.
    pub queued: usize,
    /// Calls sent to a worker and not yet answered.
    pub running: usize,
    /// Inputs whose task returned an output.
    pub completed: u64,
    /// Inputs that ended in an error: the task panicked, the worker could not
    /// decode the input or encode the output, the worker crashed, the call timed
    /// out, the protocol broke, or the executor shut down. (An output the caller
    /// cannot decode was completed by the worker: it counts there.)
    pub failed: u64,
    /// Inputs sent again after a crash or a timeout (see `Builder::retries`).
    pub retried: u64,
    /// Inputs whose caller went away first: withdrawn before they were sent, or
    /// abandoned (killed or discarded) while running.
    pub cancelled: u64,
    /// How many worker processes stopped, by cause.
    pub exits: ExitCounts,
    /// The most recent worker exits (up to 32), oldest first.
    pub recent_exits: Vec<WorkerExit>,
    /// Every live worker process, by slot.
    pub live: Vec<LiveWorker>,
    /// `tracing` events of tasks forwarded by the workers (only those the parent's
    /// filter wants are sent).
    pub log_records: u64,
    /// Of those, records the workers dropped because their tasks logged faster
    /// than they could send.
    pub log_records_dropped: u64,
}

impl Stats {
    /// These statistics in the Prometheus text format, to serve at `/metrics` (or
    /// feed to any metrics library): gauges for workers, queue and running calls,
    /// counters for inputs by outcome, worker exits by cause and forwarded log
    /// records, and per worker its calls, inputs, whether it is busy and how long
    /// its running call has run.
    ///
    /// ```
    /// procexec::tasks! {
    ///     pub fn pid() -> u32 { std::process::id() }
    /// }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// let exec = procexec::Executor::builder().processes(1).build().await?;
    /// exec.spawn(pid, ()).await?;
    /// let text = exec.stats().prometheus();
    /// assert!(text.contains("procexec_workers 1\n"));
    /// assert!(text.contains("procexec_inputs_total{outcome=\"completed\"} 1\n"));
    /// assert!(text.contains("procexec_worker_calls_total{slot=\"0\""));
    /// # Ok(()) }
    /// ```
    pub fn prometheus(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP procexec_{name} {help}\n# TYPE procexec_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "procexec_{name}{labels} {value}");
            }
        };
        let one = |value: f64| vec![(String::new(), value)];
        metric("workers", "gauge", "Worker processes alive and serving.", &one(self.workers as f64));
        metric("queued", "gauge", "Calls waiting in the parent for a worker.", &one(self.queued as f64));
        metric("running", "gauge", "Calls sent to a worker and not yet answered.", &one(self.running as f64));
        let outcomes = [
            ("completed", self.completed),
            ("failed", self.failed),
            ("retried", self.retried),
            ("cancelled", self.cancelled),
        ];
        let labelled = |label: &str, pairs: &[(&str, u64)]| -> Vec<(String, f64)> {
            pairs.iter().map(|(value, n)| (format!("{{{label}=\"{value}\"}}"), *n as f64)).collect()
        };
        metric("inputs_total", "counter", "Inputs by outcome.", &labelled("outcome", &outcomes));
        let e = &self.exits;
        let causes = [
            ("crashed", e.crashed),
            ("timed_out", e.timed_out),
            ("cancelled", e.cancelled),
            ("protocol", e.protocol),
            ("max_tasks", e.max_tasks),
            ("memory", e.memory),
            ("idle", e.idle),
        ];
        metric(
            "worker_exits_total",
            "counter",
            "Worker processes stopped, by cause.",
            &labelled("cause", &causes),
        );
        let logs = [("forwarded", self.log_records), ("dropped", self.log_records_dropped)];
        metric("log_records_total", "counter", "Workers' tracing events.", &labelled("fate", &logs));
        let per_worker = |value: &dyn Fn(&LiveWorker) -> f64| -> Vec<(String, f64)> {
            self.live
                .iter()
                .map(|w| (format!("{{slot=\"{}\",pid=\"{}\"}}", w.slot, w.pid), value(w)))
                .collect()
        };
        metric("worker_calls_total", "counter", "Calls a worker answered.", &per_worker(&|w| w.calls as f64));
        metric(
            "worker_inputs_total",
            "counter",
            "Inputs a worker served.",
            &per_worker(&|w| w.inputs as f64),
        );
        metric(
            "worker_busy",
            "gauge",
            "Whether a worker holds a call.",
            &per_worker(&|w| f64::from(u8::from(w.busy))),
        );
        let running: Vec<(String, f64)> = self
            .live
            .iter()
            .filter_map(|w| {
                let call = w.running.as_ref()?;
                let labels = format!("{{slot=\"{}\",pid=\"{}\",task=\"{}\"}}", w.slot, w.pid, call.task);
                Some((labels, call.elapsed.as_secs_f64()))
            })
            .collect();
        metric("worker_running_seconds", "gauge", "How long a worker's running call has run.", &running);
        out
    }
}

/// One live worker process, as [`Stats::live`] lists it.
///
/// ```
/// procexec::tasks! {
///     pub fn pid() -> u32 { std::process::id() }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// let exec = procexec::Executor::builder().processes(1).build().await?;
/// let pid = exec.spawn(pid, ()).await?;
/// let live = &exec.stats().live;
/// assert_eq!((live[0].slot, live[0].pid, live[0].calls), (0, pid, 1));
/// assert!(!live[0].busy);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LiveWorker {
    /// Its slot in the executor (`0..processes`).
    pub slot: usize,
    /// Its process id.
    pub pid: u32,
    /// Whether it holds a call.
    pub busy: bool,
    /// Calls it answered (a map chunk is one call).
    pub calls: u64,
    /// Inputs it served.
    pub inputs: u64,
    /// Its peak resident memory in bytes, as of its last reply, when measured (with
    /// `Builder::max_worker_memory`).
    pub peak_rss: Option<u64>,
    /// The call it is running, if any.
    pub running: Option<RunningCall>,
}

/// The call a worker is running, as [`LiveWorker::running`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunningCall {
    /// Its task.
    pub task: &'static str,
    /// How long it has run (since its request reached the worker).
    pub elapsed: std::time::Duration,
    /// The task's own account, `(done, total)`, as it last reported it with
    /// [`report_progress`](crate::report_progress).
    pub reported: Option<(u64, u64)>,
}

/// How many worker processes stopped, by cause. The first four are failures; the
/// rest are planned recycling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExitCounts {
    /// The worker died on its own (abort, exit, signal, segfault).
    pub crashed: u64,
    /// It was killed because a call ran past its timeout.
    pub timed_out: u64,
    /// It was killed because the caller of its running call went away.
    pub cancelled: u64,
    /// It was killed for breaking the protocol.
    pub protocol: u64,
    /// It was recycled after `max_tasks_per_worker` inputs.
    pub max_tasks: u64,
    /// It was recycled because its peak memory passed `max_worker_memory`.
    pub memory: u64,
    /// It was stopped after `idle_timeout` without work.
    pub idle: u64,
    /// It was stopped because its Slurm allocation was about to end
    /// ([`Slurm::stop_before_end`](crate::Slurm::stop_before_end)).
    pub allocation_ending: u64,
}

/// One worker process that stopped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerExit {
    /// The worker's slot.
    pub worker: usize,
    /// Its process id.
    pub pid: u32,
    /// Why it stopped.
    pub cause: ExitCause,
}

/// Why a worker process stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitCause {
    /// It died on its own, while running `task` (or idle, when `None`).
    Crashed {
        /// The task it was running.
        task: Option<String>,
        /// How it ended.
        exit: ExitReason,
    },
    /// A call to `task` ran past its timeout; the worker was killed.
    TimedOut {
        /// The task that ran too long.
        task: String,
    },
    /// The caller of a running call to `task` went away; the worker was killed.
    Cancelled {
        /// The task whose caller left.
        task: String,
    },
    /// It broke the protocol and was killed.
    Protocol {
        /// What was wrong.
        message: String,
    },
    /// It served `max_tasks_per_worker` inputs and was recycled.
    MaxTasks,
    /// Its peak memory passed the ceiling after a call to `task`; it was recycled.
    Memory {
        /// The task whose call pushed it over.
        task: String,
        /// Its peak resident memory, in bytes.
        peak_rss: u64,
    },
    /// It had no work for `idle_timeout` and was stopped.
    Idle,
    /// Its Slurm allocation was about to end: it took no more work and stopped.
    AllocationEnding,
}

/// What a slot's current worker has done, readable without a lock.
#[derive(Default)]
pub(crate) struct SlotCounters {
    /// 0 while the slot has no worker.
    pid: AtomicU32,
    busy: AtomicBool,
    calls: AtomicU64,
    inputs: AtomicU64,
    /// KiB; 0 when not measured.
    peak_rss_kib: AtomicU64,
    /// When its running call started, in nanoseconds since [`epoch`] plus one; 0
    /// when it runs none.
    running_since: AtomicU64,
    /// The task of its running call (or of the last one).
    running_task: Mutex<&'static str>,
    /// The running call's report: done, and total plus one (0: none came).
    reported_done: AtomicU64,
    reported_total: AtomicU64,
}

/// The instant the running times of calls count from.
fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

impl SlotCounters {
    pub(crate) fn started(&self, pid: u32) {
        self.calls.store(0, Ordering::Relaxed);
        self.inputs.store(0, Ordering::Relaxed);
        self.peak_rss_kib.store(0, Ordering::Relaxed);
        self.busy.store(false, Ordering::Relaxed);
        self.pid.store(pid, Ordering::Release);
    }

    pub(crate) fn stopped(&self) {
        self.running_since.store(0, Ordering::Release);
        self.pid.store(0, Ordering::Release);
    }

    pub(crate) fn answered(&self, inputs: u32, peak_rss_kib: u64) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inputs.fetch_add(u64::from(inputs), Ordering::Relaxed);
        if peak_rss_kib > 0 {
            self.peak_rss_kib.store(peak_rss_kib, Ordering::Relaxed);
        }
    }

    pub(crate) fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Relaxed);
    }

    /// The running call reported its progress.
    pub(crate) fn reported(&self, done: u64, total: u64) {
        self.reported_done.store(done, Ordering::Relaxed);
        self.reported_total.store(total.saturating_add(1), Ordering::Release);
    }

    /// Its worker started running a call of `task` now (`None`: it runs none).
    /// `same_task`: the task is the one set last, so the name needs no update.
    pub(crate) fn set_running(&self, task: Option<&'static str>, same_task: bool) {
        let since = match task {
            Some(task) => {
                if !same_task {
                    *self.running_task.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = task;
                }
                u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
            }
            None => 0,
        };
        self.reported_total.store(0, Ordering::Release);
        self.running_since.store(since, Ordering::Release);
    }

    fn snapshot(&self, slot: usize) -> Option<LiveWorker> {
        let pid = self.pid.load(Ordering::Acquire);
        (pid != 0).then(|| LiveWorker {
            slot,
            pid,
            busy: self.busy.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            inputs: self.inputs.load(Ordering::Relaxed),
            peak_rss: Some(self.peak_rss_kib.load(Ordering::Relaxed))
                .filter(|&kib| kib > 0)
                .map(|kib| kib * 1024),
            running: match self.running_since.load(Ordering::Acquire) {
                0 => None,
                since => Some(RunningCall {
                    task: *self.running_task.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
                    elapsed: epoch().elapsed().saturating_sub(std::time::Duration::from_nanos(since - 1)),
                    reported: match self.reported_total.load(Ordering::Acquire) {
                        0 => None,
                        total => Some((self.reported_done.load(Ordering::Relaxed), total - 1)),
                    },
                }),
            },
        })
    }
}

/// The live counters behind [`Stats`].
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) slots: Box<[SlotCounters]>,
    pub(crate) workers: AtomicUsize,
    pub(crate) running: AtomicUsize,
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    /// Per slot, the time its calls spend on the link beyond their run, when it
    /// is measured (workers elsewhere); what map chunks are sized against.
    pub(crate) link_ns: Box<[AtomicU64]>,
    pub(crate) log_records: AtomicU64,
    pub(crate) log_records_dropped: AtomicU64,
    exits: Mutex<ExitLog>,
}

#[derive(Default)]
struct ExitLog {
    counts: ExitCounts,
    recent: VecDeque<WorkerExit>,
}

const RECENT_EXITS: usize = 32;

impl Counters {
    pub(crate) fn new(slots: usize) -> Self {
        Counters {
            slots: (0..slots).map(|_| SlotCounters::default()).collect(),
            link_ns: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            ..Counters::default()
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A call of `items` inputs was answered, `errors` of them with an error; a
    /// withdrawn one was skipped, its inputs cancelled.
    pub(crate) fn answered(&self, items: u32, errors: u32, withdrawn: bool) {
        if withdrawn {
            Counters::add(&self.cancelled, u64::from(items));
            return;
        }
        let errors = errors.min(items);
        Counters::add(&self.completed, u64::from(items - errors));
        Counters::add(&self.failed, u64::from(errors));
    }

    pub(crate) fn record_exit(&self, exit: WorkerExit) {
        let mut log = self.exits.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let counts = &mut log.counts;
        *match exit.cause {
            ExitCause::Crashed { .. } => &mut counts.crashed,
            ExitCause::TimedOut { .. } => &mut counts.timed_out,
            ExitCause::Cancelled { .. } => &mut counts.cancelled,
            ExitCause::Protocol { .. } => &mut counts.protocol,
            ExitCause::MaxTasks => &mut counts.max_tasks,
            ExitCause::Memory { .. } => &mut counts.memory,
            ExitCause::Idle => &mut counts.idle,
            ExitCause::AllocationEnding => &mut counts.allocation_ending,
        } += 1;
        if log.recent.len() == RECENT_EXITS {
            log.recent.pop_front();
        }
        log.recent.push_back(exit);
    }

    pub(crate) fn snapshot(&self, queued: usize) -> Stats {
        let log = self.exits.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Stats {
            workers: self.workers.load(Ordering::Relaxed),
            queued,
            running: self.running.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            log_records: self.log_records.load(Ordering::Relaxed),
            log_records_dropped: self.log_records_dropped.load(Ordering::Relaxed),
            exits: log.counts,
            recent_exits: log.recent.iter().cloned().collect(),
            live: self
                .slots
                .iter()
                .enumerate()
                .filter_map(|(slot, counters)| counters.snapshot(slot))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_counted_by_cause_and_the_recent_ones_kept() {
        let counters = Counters::default();
        for pid in 0..40 {
            counters.record_exit(WorkerExit { worker: 0, pid, cause: ExitCause::MaxTasks });
        }
        counters.record_exit(WorkerExit { worker: 1, pid: 99, cause: ExitCause::Idle });
        let stats = counters.snapshot(3);
        assert_eq!(stats.exits.max_tasks, 40);
        assert_eq!(stats.exits.idle, 1);
        assert_eq!(stats.recent_exits.len(), RECENT_EXITS);
        assert_eq!(stats.recent_exits.last().unwrap().pid, 99);
        assert_eq!(stats.queued, 3);
    }
}
