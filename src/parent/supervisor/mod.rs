//! One supervisor per worker slot: it owns the worker process, writes the jobs it
//! pulls from the queue, matches replies to them, enforces time limits and
//! cancellation, and when the worker dies fails exactly the call it was running
//! (or retries it), re-queues the calls it never started, and starts a replacement.
//!
//! This module runs slots and handles how each session ends. The session itself
//! ([`session`]) is a loop over parts that each stand alone, so they can be tested
//! without a process: [`writer`] (request frames out), [`replies`] (a reply matched
//! to its call), [`timers`] (the head call's limits, the idle worker's timeout) and
//! [`pull`] (how much to take from the queue).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use crate::channel::broker::Attachments;
use crate::parent::dispatch::{Completion, Delivery, Job};
use crate::parent::error::{Error, ExitReason, ProtocolViolation, WorkerCrash, WorkerStartError};
use crate::parent::pool::{RunState, Shared};
use crate::parent::process::{CallProgress, WorkerProcess};
use crate::parent::stats::{Counters, ExitCause, WorkerExit};
use crate::wire::protocol;

pub(crate) mod logs;
mod pull;
pub(crate) mod replies;
mod session;
mod timers;
mod writer;

use replies::{Answer, Matched};
use session::{End, Session};

/// Consecutive failed starts after which a slot gives up.
const MAX_START_FAILURES: u32 = 5;
/// How long a worker told to exit may take before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// How long an idle worker asked to stop may take to exit by itself.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// Runs one slot until the executor shuts down or the slot gives up, containing
/// a panic of the supervisor itself (a bug) to this slot.
pub(crate) async fn run_slot(shared: Arc<Shared>, slot: usize, first: Option<WorkerProcess>) {
    let _running = shared.supervisor_guard();
    let supervised = std::panic::AssertUnwindSafe(supervise(&shared, slot, first));
    if let Err(panic) = futures::FutureExt::catch_unwind(supervised).await {
        let message = crate::parent::error::panic_message(&*panic);
        tracing::error!(worker = slot, "procexec supervisor panicked (a bug): {message}");
        let failure =
            WorkerStartError::new(&shared.config.program, format!("its supervisor panicked: {message}"));
        shared.slot_gave_up(Error::WorkerStart(Arc::new(failure)));
    }
    shared.queue.leave(slot);
}

/// A slot starts with a worker (already counted as alive), or without one (it then
/// starts one when work waits).
async fn supervise(shared: &Shared, slot: usize, first: Option<WorkerProcess>) {
    let mut next = first;
    let mut service_ns = None;
    loop {
        let mut worker = match next.take() {
            Some(worker) => worker,
            None => match start_on_demand(shared, slot).await {
                Some(worker) => worker,
                None => return,
            },
        };
        let counters = &shared.counters.slots[slot];
        counters.started(worker.pid);
        // Dropped with this worker: the channels it held let go of it.
        let mut channels = Attachments::new(&shared.hub, shared.config.max_frame_len);
        let mut session = Session::new(shared, &mut worker, &mut channels, service_ns);
        let end = poll_fn(|cx| session.poll(cx)).await;
        let (mut in_flight, head_started) = session.finish();
        service_ns = session.service_ns;
        if shared.config.in_process.is_some() {
            // Whatever becomes of them, no thread of this worker starts them now: the
            // spans left for them go (a call sent again leaves its span anew).
            let ids = in_flight.iter().map(|job| job.id);
            crate::parent::in_process::forget(shared.config.executor, ids);
        }
        if !matches!(end, End::Kill { .. }) {
            // Before any call is failed: what the worker held goes back first, so
            // whoever hears of the failure finds it there.
            channels.lost();
        }
        counters.stopped();
        shared.queue.leave(slot);
        if !matches!(end, End::Retire(ExitCause::Idle)) {
            // An idle exit was counted when it was claimed.
            shared.counters.workers.fetch_sub(1, Ordering::AcqRel);
        }
        let pid = worker.pid;
        let record = |cause: ExitCause| shared.counters.record_exit(WorkerExit { worker: slot, pid, cause });
        match end {
            End::Drained => {
                stop_idle_worker(&mut worker).await;
                return;
            }
            End::Terminated => {
                worker.process.kill();
                shared.fail(in_flight, &Error::Shutdown);
                let _ = worker.process.wait_exit(EXIT_GRACE).await;
                return;
            }
            End::Died => died(shared, &mut worker, in_flight, head_started).await,
            End::Protocol(message) => {
                tracing::warn!(worker = slot, pid, "protocol violation: {message}");
                worker.process.kill();
                let _ = worker.process.wait_exit(EXIT_GRACE).await;
                record(ExitCause::Protocol { message: message.clone() });
                let violation = Error::Protocol(Arc::new(ProtocolViolation { worker: slot, pid, message }));
                // The stream cannot be trusted: the call it answered, and the one the
                // worker may have started after it, fail. The others never started.
                let mut jobs = in_flight.into_iter();
                shared.fail(jobs.by_ref().take(2), &violation);
                shared.requeue(jobs);
            }
            End::Kill { cause, id } => {
                worker.process.kill();
                let exit = worker.process.wait_exit(EXIT_GRACE).await;
                // Replies written before the kill are still in the pipe: deliver them,
                // so only calls that really had no answer are judged below.
                drain_replies(shared, &mut worker, &mut channels, &mut in_flight).await;
                channels.lost();
                let mut jobs = in_flight.into_iter();
                let head = jobs.next();
                // What it printed and never sent, as the killed call's.
                let killed = head.as_ref().filter(|job| job.id == id);
                worker
                    .process
                    .output
                    .finish(killed.map(Job::label), killed.and_then(|job| job.capture.as_ref()));
                // The calls behind it never started: back to the queue first, so that
                // the head, if it goes back too, goes in front of them.
                shared.requeue(jobs);
                match (head, &cause) {
                    (Some(job), ExitCause::TimedOut { task }) if job.id == id => {
                        tracing::warn!(worker = slot, pid, task, "call timed out; worker killed");
                        let timeout = job.options.timeout.unwrap_or_default();
                        let error = Error::TimedOut { task: task.clone(), timeout };
                        judge_running(shared, &worker, job, |_| error);
                    }
                    (Some(job), ExitCause::Cancelled { .. }) if job.id == id => {
                        Counters::add(&shared.counters.cancelled, u64::from(job.items));
                    }
                    (Some(job), _) => {
                        // The call at the limit answered just in time; this one had
                        // started after it when the kill came (or not: the worker's
                        // progress record tells).
                        judge_running(shared, &worker, job, |job| {
                            Error::WorkerCrashed(Arc::new(crash_report(&worker, job, exit, String::new())))
                        });
                    }
                    (None, _) => {}
                }
                record(cause);
            }
            End::Retire(cause) => {
                stop_idle_worker(&mut worker).await;
                tracing::debug!(worker = slot, pid, ?cause, "worker retired");
                let idle = cause == ExitCause::Idle;
                record(cause);
                shared.requeue(in_flight.into_iter());
                if idle {
                    continue;
                }
            }
        }
        // Its descriptors are closed before the replacement opens its own, so a
        // slot never holds two workers' worth.
        drop(channels);
        drop(worker);
        next = restart(shared, slot).await;
        if next.is_none() {
            return;
        }
    }
}

/// Stops a worker that holds no call: asks it to exit, so it flushes what its tasks
/// left buffered (and `Drop`s and exit handlers run), gives it [`STOP_GRACE`], then
/// kills its process group, so nothing a task started outlives it, and reaps it.
async fn stop_idle_worker(worker: &mut WorkerProcess) {
    let asked = async {
        worker.ask_to_exit().await;
        // The reply pipe ends when the worker has exited (it is not inherited). On
        // its way out it sends what it printed since its last call.
        while let Some(Ok(frame)) = futures::StreamExt::next(&mut worker.replies).await {
            if let Ok(Matched::Output { stderr, stdout, .. }) = replies::match_reply(frame, None, false) {
                logs::printed(&mut worker.process.output, std::iter::empty(), None, &stderr, &stdout);
            }
        }
    };
    let _ = tokio::time::timeout(STOP_GRACE, asked).await;
    worker.close_requests();
    worker.process.kill();
    let exit = worker.process.wait_exit(EXIT_GRACE).await;
    // Lets the forwarder pass on the worker's last lines, so a program that exits
    // right after `shutdown` still prints them.
    worker.process.stderr_forwarded(EXIT_GRACE).await;
    tracing::debug!(worker = worker.index, pid = worker.pid, %exit, "worker stopped");
}

/// Reads the replies a dead worker left in its pipe and delivers those that match,
/// in order.
async fn drain_replies(
    shared: &Shared,
    worker: &mut WorkerProcess,
    channels: &mut Attachments,
    in_flight: &mut VecDeque<Job>,
) {
    let patience = worker.process.drain_patience(EXIT_GRACE);
    let drained = async {
        while let Some(Ok(frame)) = futures::StreamExt::next(&mut worker.replies).await {
            // The worker is dead: a request it replied to was written whole.
            let head = in_flight.front().map(|job| job.id);
            let Answer { body, busy_ns, errors, .. } = match replies::match_reply(frame, head, true) {
                Ok(Matched::Call(answer)) => answer,
                Ok(Matched::Channel(message, body)) => {
                    if channels.route(message, &body).is_err() {
                        return;
                    }
                    continue;
                }
                Ok(Matched::Progress { .. }) => continue,
                Ok(Matched::Output { call, stderr, stdout }) => {
                    logs::printed(&mut worker.process.output, in_flight.iter(), call, &stderr, &stdout);
                    continue;
                }
                Ok(Matched::Log { records, dropped }) => {
                    logs::emit(
                        &shared.counters,
                        (worker.index, worker.pid),
                        records,
                        dropped,
                        in_flight.iter(),
                    );
                    continue;
                }
                Err(_) => return,
            };
            if let Some(job) = in_flight.pop_front() {
                shared.counters.answered(job.items, errors, job.withdrawn || job.signalled);
                job.complete(Completion::Done(Delivery { body, busy_ns }));
            }
        }
    };
    // The pipe ends with the worker (it is not inherited); this only guards a hang.
    let _ = tokio::time::timeout(patience, drained).await;
}

/// The call at the head of a worker that died (or was killed) may have been
/// running: the worker's progress record says how far it got. Items done are
/// delivered, the one running fails with `error` (or, for a single call, is retried
/// if allowed), and items never started go back to the queue (a chunk's to its map):
/// they never ran, so that is no retry.
fn judge_running(shared: &Shared, worker: &WorkerProcess, mut job: Job, error: impl FnOnce(&Job) -> Error) {
    let (done, body) = match worker.progress_of(job.id, job.items, shared.max_frame_len()) {
        CallProgress::NotStarted => {
            shared.requeue(std::iter::once(job));
            return;
        }
        CallProgress::Done { items, body } if items == job.items => {
            // It finished, but died before its reply got out: nothing is lost.
            shared.counters.answered(job.items, protocol::error_records(&body), false);
            job.complete(Completion::Done(Delivery { body, busy_ns: 0 }));
            return;
        }
        CallProgress::Done { items, body } => (items, Some(body)),
        // A chunk of a worker without a progress record (on another host, say),
        // whose retries allow running its inputs again: as if its first input
        // were the one that failed, so the map retries it and sends the rest anew.
        CallProgress::Unknown if job.is_chunk() && job.failures < job.options.retries => {
            (0, Some(bytes::Bytes::new()))
        }
        CallProgress::Unknown => (0, None),
    };
    job.failures += 1;
    let error = error(&job);
    // The items done, as their records say.
    let errors = body.as_ref().map_or(0, |body| protocol::error_records(body));
    if job.is_cancelled() {
        shared.counters.answered(done, errors, false);
        Counters::add(&shared.counters.cancelled, u64::from(job.items - done));
        return;
    }
    match body {
        Some(body) if job.is_chunk() => {
            // The map decides about the failed item (retry or report) and sends the
            // unstarted ones again.
            shared.counters.answered(done, errors, false);
            let unstarted = job.items - done - 1;
            job.complete(Completion::Broken { done: Delivery { body, busy_ns: 0 }, error, unstarted });
        }
        // A single call; or a chunk of a worker without a progress record, whose
        // items may each have run: they all fail, none runs twice.
        _ if job.items == 1 && job.failures <= job.options.retries && !job.is_chunk() => {
            Counters::add(&shared.counters.retried, 1);
            shared.requeue(std::iter::once(job));
        }
        _ => shared.fail(std::iter::once(job), &error),
    }
}

fn crash_report(worker: &WorkerProcess, job: &Job, exit: ExitReason, stderr_tail: String) -> WorkerCrash {
    WorkerCrash {
        task: job.task.into(),
        worker: worker.index,
        pid: worker.pid,
        exit,
        stderr_tail,
        // The run that crashed is counted by the time the report is made.
        attempts: job.failures,
    }
}

/// The worker's reply stream ended: it died. The oldest call without a reply is the
/// one it was running (if its request had been fully written); the others were never
/// started (a worker flushes each reply before starting the next call) and go back
/// to the queue.
async fn died(shared: &Shared, worker: &mut WorkerProcess, in_flight: VecDeque<Job>, head_started: bool) {
    // Also takes down a worker that merely closed stdout, and its grandchildren.
    worker.process.kill();
    let exit = worker.process.wait_exit(EXIT_GRACE).await;
    let mut jobs = in_flight.into_iter();
    let running = if head_started { jobs.next() } else { None };
    let printing = running.as_ref().map(|job| (job.label(), job.capture.as_ref()));
    let stderr_tail = worker.process.stderr_tail(printing).await;
    let task = running.as_ref().map(|job| job.task.to_string());
    tracing::warn!(worker = worker.index, pid = worker.pid, %exit, task, "worker died");
    let cause = ExitCause::Crashed { task, exit };
    shared.counters.record_exit(WorkerExit { worker: worker.index, pid: worker.pid, cause });
    shared.requeue(jobs);
    if let Some(job) = running {
        judge_running(shared, worker, job, |job| {
            Error::WorkerCrashed(Arc::new(crash_report(worker, job, exit, stderr_tail)))
        });
    }
}

/// Starts a replacement worker, backing off on failure. `None` when the executor is
/// shutting down, when the slot gave up after repeated failures, or when its group
/// stopped (its host benched, its Slurm allocation ending).
async fn restart(shared: &Shared, slot: usize) -> Option<WorkerProcess> {
    let group = shared.config.groups.of(slot);
    // Another host may be down for a while: it is retried more patiently.
    let max_delay = if group.same_host { Duration::from_secs(1) } else { Duration::from_secs(10) };
    let mut delay = Duration::from_millis(10);
    let mut failures = 0;
    loop {
        match shared.state() {
            RunState::Terminated => return None,
            RunState::Draining if !shared.queue.has_live_jobs() => return None,
            _ => {}
        }
        if let Some(why) = group.stopped() {
            tracing::info!(worker = slot, host = %group.label, "{why}: the slot starts no worker");
            let failure = WorkerStartError::new(group.program(), why);
            shared.slot_gave_up(Error::WorkerStart(Arc::new(failure)));
            shared.queue.leave(slot);
            shared.queue.pass_demand();
            return None;
        }
        let failure = match WorkerProcess::start(&shared.config, slot).await {
            Ok(worker) if worker.tasks == shared.tasks.infos() => {
                group.started();
                shared.counters.workers.fetch_add(1, Ordering::AcqRel);
                return Some(worker);
            }
            Ok(worker) => {
                let mut failure = WorkerStartError::new(
                    group.program(),
                    format!(
                        "{} (unlike the other workers: was the binary rebuilt while running?)",
                        crate::parent::process::task_difference(shared.tasks.infos(), &worker.tasks)
                    ),
                );
                failure.host = (!group.same_host).then(|| group.label.clone());
                failure
            }
            Err(err) => err,
        };
        failures += 1;
        // The IO cause is the error's source, no longer part of its message.
        match std::error::Error::source(&failure) {
            Some(cause) => tracing::error!(worker = slot, failures, "{failure}: {cause}"),
            None => tracing::error!(worker = slot, failures, "{failure}"),
        }
        let benched = !group.same_host && group.start_failed(MAX_START_FAILURES, &failure);
        if failures >= MAX_START_FAILURES || benched {
            shared.slot_gave_up(Error::WorkerStart(Arc::new(failure)));
            // This slot may have been woken for waiting work: another one tries.
            shared.queue.leave(slot);
            shared.queue.pass_demand();
            return None;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(max_delay);
    }
}

/// For a slot without a worker: waits until calls wait and no live worker took
/// them, then starts one. `None` when the executor stops first.
async fn start_on_demand(shared: &Shared, slot: usize) -> Option<WorkerProcess> {
    let demand = poll_fn(|cx| match shared.state() {
        RunState::Terminated => Poll::Ready(false),
        RunState::Draining if !shared.queue.has_live_jobs() => Poll::Ready(false),
        _ => shared.queue.poll_demand(cx, slot).map(|()| true),
    });
    if !demand.await {
        return None;
    }
    restart(shared, slot).await
}
