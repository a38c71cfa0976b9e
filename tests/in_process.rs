//! In-process mode: the same tests run against worker threads (`Builder::in_process`)
//! and against worker processes, so "the same API, the same round trip" is checked
//! literally. The thread runs also check that no process was started.
mod common;

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use procexec::{Builder, Error, Executor, ExitReason, Queue, SharedValue, WorkerStderr};
use serde::{Serialize, Serializer};

procexec::tasks! {
    pub fn square(x: u64) -> u64 { x * x }

    pub fn pid() -> u32 { std::process::id() }

    pub fn panic_with(message: String) -> u64 { panic!("{message}") }

    pub fn make_bytes(len: u64) -> procexec::Blob { procexec::Blob::from(vec![7u8; len as usize]) }

    /// An output whose `Serialize` fails: only the round trip finds that.
    pub fn unserializable() -> Refuses { Refuses }

    pub fn sleep_ms(ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }

    /// Waits (up to 30 s) until a file exists at `path`; whether it came.
    pub fn wait_for_file(path: String) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if std::path::Path::new(&path).exists() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Counts itself in, then waits (up to 30 s) until `all` calls are in: true only
    /// if they all ran at once.
    pub fn arrive_and_wait(arrived: SharedValue<u32>, all: u32) -> bool {
        arrived.fetch_add(1);
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if arrived.load() >= all {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Puts `from..to` into the queue.
    pub fn produce(q: Queue<u64>, from: u64, to: u64) {
        for i in from..to {
            q.blocking_put(i).unwrap();
        }
    }

    /// Takes `n` items and sums them.
    pub fn consume(q: Queue<u64>, n: u64) -> u64 {
        (0..n).map(|_| q.blocking_get().unwrap().unwrap_or(0)).sum()
    }

    pub fn add_locked(counter: SharedValue<u64>, times: u32) {
        for _ in 0..times {
            let mut value = counter.blocking_lock().unwrap();
            *value += 1;
        }
    }

    /// Reports half its work, then waits (up to 30 s) until its caller leaves.
    pub fn report_then_wait_for_cancel(deadline_ms: u64) -> bool {
        procexec::report_progress(5, 10);
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(deadline_ms) {
            if procexec::is_cancelled() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    pub fn is_cancelled_now() -> bool { procexec::is_cancelled() }

    /// Sends `0..n` on a channel (whose sends linger a moment to share writes).
    pub fn send_numbers(tx: procexec::Sender<u64>, n: u64) {
        for i in 0..n {
            tx.blocking_send(i).unwrap();
        }
    }

    pub fn say(x: u64) -> u64 {
        tracing::info!(x, "hello");
        x
    }
}

procexec::test_worker!(TASKS);

/// Serializes as an error, as a broken serde impl does.
#[derive(Debug, serde::Deserialize)]
pub struct Refuses;

impl Serialize for Refuses {
    fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("Refuses refuses"))
    }
}

/// Thread runs take it exclusively, so the processes a process run starts at the
/// same time are not taken for theirs.
static CHILDREN: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn children() -> HashSet<u32> {
    common::children_of(std::process::id()).into_iter().collect()
}

/// Both modes, quiet and small.
fn threads(processes: usize) -> Builder {
    Executor::builder().in_process(&TASKS).processes(processes)
}

fn processes(processes: usize) -> Builder {
    Executor::builder().test_harness().processes(processes).stderr(WorkerStderr::Discard)
}

/// Runs each test body, given `$builder` (a function of the worker count), once
/// with worker threads and once with worker processes.
macro_rules! in_both_modes {
    ($(async fn $name:ident($builder:ident, $threads:ident) $body:block)*) => {
        mod with_threads {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let _alone = CHILDREN.write().await;
                    let before = children();
                    let $builder = threads;
                    let $threads = true;
                    common::hang_guard(async move { $body }).await;
                    let new: Vec<u32> = children().difference(&before).copied().collect();
                    assert!(new.is_empty(), "in-process mode started processes {new:?}");
                }
            )*
        }
        mod with_processes {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let _shared = CHILDREN.read().await;
                    let $builder = processes;
                    let $threads = false;
                    common::hang_guard(async move { $body }).await;
                }
            )*
        }
    };
}

in_both_modes! {
    async fn spawn_returns_the_output_from_the_expected_process(builder, threads) {
        let exec = builder(2).build().await.unwrap();
        assert_eq!(exec.spawn(square, 7).await.unwrap(), 49);
        let worker = exec.spawn(pid, ()).await.unwrap();
        assert_eq!(worker == std::process::id(), threads);
        assert!(exec.stats().live.iter().all(|w| (w.pid == std::process::id()) == threads));
        exec.shutdown().await;
    }

    async fn map_keeps_input_order_including_empty_and_chunked(builder, _threads) {
        let exec = builder(2).build().await.unwrap();
        assert_eq!(exec.map(square, 0..5).await.unwrap(), [0, 1, 4, 9, 16]);
        assert!(exec.map(square, Vec::<u64>::new()).await.unwrap().is_empty());
        let many: Vec<u64> = exec.map(square, 0..20_000).await.unwrap();
        assert!(many.iter().enumerate().all(|(i, &y)| y == (i as u64) * (i as u64)));
        exec.shutdown().await;
    }

    async fn map_stream_and_map_unordered_yield_every_output(builder, _threads) {
        let exec = builder(3).build().await.unwrap();
        let ordered: Vec<u64> =
            exec.map_stream(square, futures::stream::iter(0..50)).map(Result::unwrap).collect().await;
        assert_eq!(ordered, (0..50).map(|x| x * x).collect::<Vec<_>>());
        let mut unordered: Vec<u64> =
            exec.map_unordered(square, futures::stream::iter(0..50)).map(Result::unwrap).collect().await;
        unordered.sort_unstable();
        assert_eq!(unordered, ordered);
        exec.shutdown().await;
    }

    async fn failures_are_typed_errors_and_the_executor_serves_on(builder, _threads) {
        let exec = builder(1).max_frame_len(256 << 10).build().await.unwrap();
        match exec.spawn(panic_with, "boom".into()).await.unwrap_err() {
            Error::TaskPanicked(panic) => assert!(panic.message().contains("boom"), "{panic:?}"),
            other => panic!("{other:?}"),
        }
        let err = exec.spawn(make_bytes, 1 << 20).await.unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { .. }), "{err:?}");
        let err = exec.spawn(unserializable, ()).await.unwrap_err();
        assert!(
            matches!(&err, Error::Codec { message, .. } if message.contains("Refuses refuses")),
            "{err:?}"
        );
        mod other {
            procexec::tasks! {
                pub fn not_served(x: u64) -> u64 { x }
            }
        }
        let err = exec.spawn(other::not_served, 1).await.unwrap_err();
        assert!(matches!(err, Error::UnknownTask { .. }), "{err:?}");
        assert_eq!(exec.spawn(square, 3).await.unwrap(), 9);
        exec.shutdown().await;
    }

    async fn a_timeout_fails_at_once_and_a_new_worker_serves_on(builder, threads) {
        let exec = builder(1).timeout(Duration::from_millis(100)).build().await.unwrap();
        // The call runs until the file exists, made only once its caller heard:
        // a caller that waited for the task would wait for good (the hang guard).
        let release = common::marker(&format!("timeout-release-{threads}"));
        let err = exec.spawn(wait_for_file, release.display().to_string()).await.unwrap_err();
        assert!(matches!(err, Error::TimedOut { .. }), "{err:?}");
        std::fs::write(&release, b"").unwrap();
        assert_eq!(exec.spawn(square, 4).await.unwrap(), 16);
        assert_eq!(exec.stats().exits.timed_out, 1);
        if threads {
            let exit = exec.stats().recent_exits.last().map(|exit| exit.cause.clone());
            assert!(format!("{exit:?}").contains("TimedOut"), "{exit:?}");
        }
        exec.shutdown().await;
    }

    async fn a_call_that_times_out_is_retried_on_a_fresh_worker(builder, _threads) {
        let exec = builder(1).timeout(Duration::from_millis(100)).retries(1).build().await.unwrap();
        let err = exec.spawn(sleep_ms, 2_000).await.unwrap_err();
        assert!(matches!(err, Error::TimedOut { .. }), "{err:?}");
        assert_eq!(exec.stats().retried, 1);
        // The second exit is recorded just after its caller hears of it.
        common::eventually("both runs are counted", || exec.stats().exits.timed_out == 2).await;
        assert_eq!(exec.spawn(square, 6).await.unwrap(), 36);
        exec.shutdown().await;
    }

    async fn a_dropped_call_is_cancelled_and_its_task_can_tell(builder, _threads) {
        let exec = builder(1).cancel_policy(procexec::CancelPolicy::Finish).build().await.unwrap();
        assert!(!exec.spawn(is_cancelled_now, ()).await.unwrap());
        let handle = exec.spawn(report_then_wait_for_cancel, 20_000);
        common::eventually("the task reports its progress", || {
            exec.stats().live.iter().any(|w| w.running.as_ref().is_some_and(|c| c.reported == Some((5, 10))))
        })
        .await;
        drop(handle);
        // The task notices, returns, and the worker takes the next call.
        assert_eq!(exec.spawn(square, 5).await.unwrap(), 25);
        assert_eq!(exec.stats().exits.cancelled, 0);
        exec.shutdown().await;
    }

    async fn queues_carry_items_between_the_parent_and_tasks(builder, _threads) {
        let exec = builder(2).build().await.unwrap();
        let q = exec.queue::<u64>(8);
        let sum = exec.spawn(consume, (q.clone(), 100));
        exec.spawn(produce, (q.clone(), 0, 100)).await.unwrap();
        assert_eq!(sum.await.unwrap(), 4950);
        q.put(7).await.unwrap();
        assert_eq!(exec.spawn(consume, (q.clone(), 1)).await.unwrap(), 7);
        exec.shutdown().await;
    }

    async fn a_channel_streams_from_a_task_to_the_parent(builder, _threads) {
        let exec = builder(1).build().await.unwrap();
        let (tx, rx) = exec.channel::<u64>(8);
        let sent = exec.spawn(send_numbers, (tx, 1_000));
        let mut sum = 0;
        while let Some(x) = rx.recv().await.unwrap() {
            sum += x;
        }
        sent.await.unwrap();
        assert_eq!(sum, 499_500);
        exec.shutdown().await;
    }

    async fn shared_memory_reaches_the_tasks(builder, _threads) {
        let exec = builder(3).build().await.unwrap();
        let counter = exec.shared_value(0u64).unwrap();
        let adds = (0..6).map(|_| exec.spawn(add_locked, (counter.clone(), 500)));
        for add in adds {
            add.await.unwrap();
        }
        assert_eq!(counter.get(), 3_000);
        exec.shutdown().await;
    }

    async fn several_workers_run_calls_at_once(builder, _threads) {
        let exec = builder(4).build().await.unwrap();
        // Each call waits until all four are in: one after another, none would be.
        let arrived = exec.shared_value(0u32).unwrap();
        let all_in: Vec<bool> = exec.map(arrive_and_wait, (0..4).map(|_| (arrived.clone(), 4))).await.unwrap();
        assert_eq!(all_in, [true; 4]);
        exec.shutdown().await;
    }
}

#[tokio::test]
async fn what_starts_processes_is_refused_in_process() {
    let refused = [
        threads(1).program("/bin/true"),
        threads(1).test_harness(),
        threads(1).worker_wrapper(["strace"]),
        threads(1).max_worker_memory(1 << 30),
        threads(1).group(procexec::WorkerGroup::local(1)),
    ];
    for builder in refused {
        let err = builder.build().await.unwrap_err();
        assert!(matches!(&err, Error::Config(message) if message.contains("in_process")), "{err:?}");
    }
}

#[tokio::test]
async fn a_killed_worker_thread_is_abandoned_not_waited_for() {
    let exec = threads(1).timeout(Duration::from_millis(50)).build().await.unwrap();
    let err = exec.spawn(sleep_ms, 1_000).await.unwrap_err();
    assert!(matches!(err, Error::TimedOut { .. }), "{err:?}");
    assert_eq!(ExitReason::Abandoned.to_string(), "its thread abandoned, running on");
    assert_eq!(exec.spawn(square, 2).await.unwrap(), 4);
    exec.shutdown().await;
}

/// An event's target, and the spans it was in, innermost first.
type Seen = (String, Vec<String>);

/// The events the test's subscriber saw.
#[derive(Clone, Default)]
struct Collect(std::sync::Arc<std::sync::Mutex<Vec<Seen>>>);

impl<S> tracing_subscriber::Layer<S> for Collect
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let spans = ctx
            .event_scope(event)
            .map(|scope| scope.map(|span| span.name().to_string()).collect())
            .unwrap_or_default();
        self.0.lock().unwrap().push((event.metadata().target().to_string(), spans));
    }
}

#[test]
fn a_tasks_events_reach_the_callers_subscriber_under_a_call_span_in_the_callers_span() {
    use tracing_subscriber::layer::SubscriberExt;
    let collect = Collect::default();
    // A thread's own subscriber, not the global one: the worker thread uses the
    // caller's span's.
    let _default = tracing::subscriber::set_default(tracing_subscriber::registry().with(collect.clone()));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(common::hang_guard(async {
        let exec = threads(1).build().await.unwrap();
        let call = {
            let span = tracing::info_span!("request");
            let _entered = span.enter();
            exec.spawn(say, 3)
        };
        assert_eq!(call.await.unwrap(), 3);
        exec.shutdown().await;
    }));
    let seen = collect.0.lock().unwrap().clone();
    let said: Vec<_> = seen.iter().filter(|(target, _)| target.starts_with("in_process")).collect();
    assert_eq!(said.len(), 1, "{seen:?}");
    assert_eq!(said[0].1, ["procexec::worker", "request"], "{seen:?}");
}

/// Threads of this process whose name starts with `prefix` (at most 15 bytes).
fn threads_named(prefix: &str) -> usize {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|name| name.starts_with(prefix))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_and_their_flushers_end_with_the_executor() {
    let _alone = CHILDREN.write().await;
    // Threads given up by earlier tests only end meanwhile.
    let before = threads_named("procexec-worker") + threads_named("procexec-flush");
    common::hang_guard(async {
        let exec = threads(3).build().await.unwrap();
        assert!(threads_named("procexec-worker") >= 3);
        let (tx, rx) = exec.channel::<u64>(8);
        let sent = exec.spawn(send_numbers, (tx, 100));
        while rx.recv().await.unwrap().is_some() {}
        sent.await.unwrap();
        exec.shutdown().await;
        common::eventually("the worker threads and flushers end", || {
            threads_named("procexec-worker") + threads_named("procexec-flush") <= before
        })
        .await;
    })
    .await;
}

// A program that restores the default SIGPIPE disposition (as CLI tools do, to
// die quietly under `| head`) survives an abandoned worker thread whose task
// returns and writes its reply into the pipe the parent closed.
#[test]
fn sigpipe_helper() {
    if !common::is_helper("sigpipe_helper") {
        return;
    }
    // SAFETY: no other thread runs yet; restores the default disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let exec = threads(1).timeout(Duration::from_millis(50)).build().await.unwrap();
        let release = common::marker("sigpipe-release");
        let err = exec.spawn(wait_for_file, release.display().to_string()).await.unwrap_err();
        assert!(matches!(err, Error::TimedOut { .. }), "{err:?}");
        // Its replacement serves; then the abandoned thread's task returns, its
        // reply meets the closed pipe, and the thread ends.
        assert_eq!(exec.spawn(square, 2).await.unwrap(), 4);
        let running = threads_named("procexec-worker");
        std::fs::write(&release, b"").unwrap();
        common::eventually("the abandoned thread ends", || threads_named("procexec-worker") < running).await;
        let _ = std::fs::remove_file(release);
        println!("SURVIVED");
        exec.shutdown().await;
    });
}

#[test]
fn an_abandoned_worker_thread_does_not_kill_the_process_with_sigpipe() {
    let _shared = CHILDREN.blocking_read();
    let output = common::helper_command("sigpipe_helper").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("SURVIVED"), "status {:?}, stdout {stdout:?}", output.status);
}
