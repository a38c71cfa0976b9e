//! Jobs and the queue that hands them to worker supervisors.
//!
//! Callers encode their request frame up front and push a [`Job`]; each supervisor
//! pulls as many jobs as its worker's prefetch window has room for. Pull-based
//! dispatch balances load by itself: a fast or idle worker simply pulls more.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::task::AtomicWaker;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use crate::channel::transit::Holds;
use crate::parent::error::{Direction, Error, TaskPanic};
use crate::parent::output::{CallLabel, Capture};
use crate::wire::codec::decode_exactly;
use crate::wire::protocol::{self, Outcome};

/// What happens to a call that is running when its caller goes away (its
/// `TaskHandle` or map is dropped). Calls not yet sent to a worker are always
/// withdrawn.
///
/// ```
/// use procexec::CancelPolicy;
///
/// assert_eq!(CancelPolicy::default(), CancelPolicy::Kill);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CancelPolicy {
    /// Kill the worker running it (it is replaced), so abandoned work stops using a
    /// CPU. The call gets 10 ms more to finish first, so cancelling tiny calls never
    /// costs a worker restart. The default.
    #[default]
    Kill,
    /// Let it finish and discard the result.
    Finish,
}

/// Per-call settings, from the executor's defaults or `Executor::with_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct CallOptions {
    pub(crate) timeout: Option<Duration>,
    pub(crate) retries: u32,
    pub(crate) cancel: CancelPolicy,
    /// What the call prints goes to its caller (`spawn_captured`).
    pub(crate) capture: bool,
}

/// A reply's body, as it came from the worker.
#[derive(Debug)]
pub(crate) struct Delivery {
    /// One outcome record per item (see `protocol`).
    pub(crate) body: Bytes,
    /// Time the worker spent on the call.
    pub(crate) busy_ns: u64,
}

/// How a job ends.
#[derive(Debug)]
pub(crate) enum Completion {
    /// Every item has its outcome record.
    Done(Delivery),
    /// Every item fails with this error.
    Failed(Error),
    /// A chunk's worker died in it (or it was killed): `done` holds the records of
    /// the first items, the next item failed with `error`, and the `unstarted` items
    /// after it never ran. Only chunks end this way: a single call is retried or
    /// failed by its supervisor.
    Broken { done: Delivery, error: Error, unstarted: u32 },
}

/// Where a job's completion goes.
pub(crate) enum ReplyTo {
    /// A single `spawn`.
    Once(oneshot::Sender<Completion>),
    /// A chunk of a map: `piece` says which, among the map's calls in flight.
    Chunk { piece: u64, sink: mpsc::UnboundedSender<ChunkDone>, cancelled: Arc<AtomicBool> },
}

/// A finished chunk of a map.
pub(crate) struct ChunkDone {
    pub(crate) piece: u64,
    pub(crate) completion: Completion,
}

/// One request frame on its way to a worker.
pub(crate) struct Job {
    pub(crate) id: u64,
    pub(crate) task: &'static str,
    pub(crate) items: u32,
    /// The whole frame, length prefix included; kept until the reply arrives so the
    /// job can be sent again if its worker dies before starting it.
    pub(crate) frame: Bytes,
    /// The rest of the frame after `frame`, when large blobs in it were spliced
    /// rather than copied: the blobs, and the bytes between and after them.
    pub(crate) rest: Vec<Bytes>,
    pub(crate) reply: ReplyTo,
    pub(crate) options: CallOptions,
    /// Runs that ended in a crash or a timeout so far.
    pub(crate) failures: u32,
    /// Its worker was told to skip it: its caller left before it started.
    pub(crate) withdrawn: bool,
    /// Its room in the spawn queue, given back when a worker takes it.
    pub(crate) admission: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Channel handles in its input, kept open until the call ends.
    pub(crate) holds: Holds,
    /// Its worker was told its caller left while it ran.
    pub(crate) signalled: bool,
    /// Its inputs carry channel handles (a map's chunk; a spawn's holds say so).
    pub(crate) talking: bool,
    /// The span current where the call was made: the worker's log records of it
    /// are re-emitted under it.
    pub(crate) span: tracing::Span,
    /// Its task's number, for learning how long the task runs.
    pub(crate) task_index: Option<u32>,
    /// How long its worker should take, from what earlier calls of its task took.
    pub(crate) expected_ns: Option<u64>,
    /// Where what it prints goes, if to its caller (`spawn_captured`).
    pub(crate) capture: Option<Capture>,
}

impl Job {
    pub(crate) fn new(
        id: u64,
        task: &'static str,
        items: u32,
        frame: Bytes,
        reply: ReplyTo,
        options: CallOptions,
    ) -> Self {
        Job {
            id,
            task,
            items,
            frame,
            rest: Vec::new(),
            reply,
            options,
            failures: 0,
            withdrawn: false,
            admission: None,
            holds: Holds::default(),
            signalled: false,
            talking: false,
            span: tracing::Span::current(),
            task_index: None,
            expected_ns: None,
            capture: None,
        }
    }

    /// How its output is labelled.
    pub(crate) fn label(&self) -> CallLabel {
        CallLabel { task: self.task, call: self.id }
    }

    /// Whether nobody waits for the result any more (the future or stream was dropped).
    /// The whole request frame's length, its spliced pieces included.
    pub(crate) fn frame_len(&self) -> usize {
        self.frame.len() + self.rest.iter().map(Bytes::len).sum::<usize>()
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        match &self.reply {
            ReplyTo::Once(sender) => sender.is_closed(),
            ReplyTo::Chunk { sink, cancelled, .. } => cancelled.load(Ordering::Acquire) || sink.is_closed(),
        }
    }

    /// Like [`is_cancelled`](Job::is_cancelled), registering `cx` to be woken when
    /// a single call's handle is dropped (a map wakes every supervisor itself).
    pub(crate) fn poll_cancelled(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.reply {
            ReplyTo::Once(sender) => sender.poll_closed(cx).is_ready(),
            ReplyTo::Chunk { .. } => self.is_cancelled(),
        }
    }

    /// Whether its input holds channel handles: it may wait for other calls.
    pub(crate) fn talks(&self) -> bool {
        self.talking || self.holds.talk()
    }

    /// Whether the job is a map's chunk, whose failures its map handles.
    pub(crate) fn is_chunk(&self) -> bool {
        matches!(self.reply, ReplyTo::Chunk { .. })
    }

    /// Delivers the job's completion, if anyone still wants it.
    pub(crate) fn complete(self, completion: Completion) {
        match self.reply {
            ReplyTo::Once(sender) => {
                let _ = sender.send(completion);
            }
            ReplyTo::Chunk { piece, sink, .. } => {
                let _ = sink.send(ChunkDone { piece, completion });
            }
        }
    }
}

/// Decodes the next outcome record of a reply body, advancing `body` past it.
///
/// Each record carries its length, so an output that cannot be decoded fails alone.
pub(crate) fn decode_record<O: DeserializeOwned>(task: &str, body: &mut &[u8]) -> Result<O, Error> {
    let output_error = |message: String| Error::Codec {
        task: task.into(),
        direction: Direction::Output,
        action: "decode",
        message,
    };
    let Some(record) = protocol::take_record(body) else {
        *body = &[];
        return Err(output_error("the reply holds fewer outcomes than the call had inputs".into()));
    };
    let outcome = match record.split_first() {
        // The common case, without going through serde.
        Some((&protocol::OUTCOME_OK, output)) => return decode_exactly::<O>(output).map_err(output_error),
        _ => postcard::from_bytes::<Outcome>(record).map_err(|err| output_error(err.to_string()))?,
    };
    Err(match outcome {
        Outcome::Ok => return decode_exactly::<O>(&[]).map_err(output_error),
        Outcome::Panicked { message, location, backtrace } => {
            // As a panic in a thread is printed by the panic hook; the caller gets it too.
            match &location {
                Some(location) => tracing::warn!(task, "task panicked at {location}: {message}"),
                None => tracing::warn!(task, "task panicked: {message}"),
            }
            Error::TaskPanicked(Arc::new(TaskPanic { task: task.into(), message, location, backtrace }))
        }
        Outcome::BadInput { message } => {
            Error::Codec { task: task.into(), direction: Direction::Input, action: "decode", message }
        }
        Outcome::BadOutput { message } => {
            Error::Codec { task: task.into(), direction: Direction::Output, action: "encode", message }
        }
        Outcome::UnknownTask => Error::UnknownTask { task: task.into() },
        // Only a withdrawn call is skipped, and nobody waits for it.
        Outcome::Skipped => Error::Shutdown,
        Outcome::TooLarge { size, limit } => {
            Error::FrameTooLarge { task: task.into(), direction: Direction::Output, size, limit }
        }
        Outcome::Shared { error } => Error::Shared(error),
    })
}

/// How much work a slot may take from the queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Room {
    /// Calls.
    pub(crate) jobs: usize,
    /// Inputs, over all those calls (a worker's remaining `max_tasks_per_worker`).
    pub(crate) items: u64,
    /// The slot's worker already has calls.
    pub(crate) busy: bool,
}

/// What a slot got from the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Took {
    Jobs(usize),
    /// The next call has more inputs than the slot's worker may still serve.
    OverBudget,
}

/// The queue no longer accepts jobs: the executor is shutting down.
#[derive(Debug)]
pub(crate) struct Closed;

/// Known run time that one idle worker may take in several calls while others idle:
/// a few wake-ups of a worker (each ~50 µs across CPUs), and below the 300 µs of work
/// a busy worker prefetches anyway. Measured at 256 workers, 10,000 tiny spawns:
/// 50 µs left them 1.0-1.5x the 2-worker cost, 200 µs 0.9-1.2x.
const SPREAD_NS: u64 = 200_000;

/// The executor's queue of jobs not yet sent to a worker.
pub(crate) struct Queue {
    state: Mutex<QueueState>,
    /// One waker per supervisor slot: woken for new work, and for shutdown.
    slots: Box<[AtomicWaker]>,
}

struct QueueState {
    jobs: VecDeque<Job>,
    /// Slots whose worker has no call at all: they get new work first, and while
    /// one exists, busy slots do not prefetch.
    idle: Vec<usize>,
    /// Round robin over `idle` for wake-ups.
    next_idle: usize,
    /// Slots without a worker, to start one when work arrives and no live worker is idle.
    dormant: Vec<usize>,
    /// No new jobs (shutting down).
    closed: bool,
    /// Stopped: even jobs handed back by a dying worker are refused.
    terminated: bool,
}

impl Queue {
    pub(crate) fn new(slots: usize) -> Self {
        Queue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                idle: Vec::with_capacity(slots),
                next_idle: 0,
                dormant: Vec::with_capacity(slots),
                closed: false,
                terminated: false,
            }),
            slots: (0..slots).map(|_| AtomicWaker::new()).collect(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A panic while holding the lock leaves the queue itself consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `job`, or drops it if the queue is closed.
    pub(crate) fn push(&self, job: Job) -> Result<(), Closed> {
        let mut state = self.lock();
        if state.closed {
            return Err(Closed);
        }
        state.jobs.push_back(job);
        let wake = state.wake_target();
        drop(state);
        if let Some(slot) = wake {
            self.slots[slot].wake();
        }
        Ok(())
    }

    /// Puts jobs back at the front, in order, even when closed: they were accepted
    /// before, and their worker died before starting them. Once terminated, hands
    /// them back instead, to be failed.
    pub(crate) fn requeue(&self, jobs: impl DoubleEndedIterator<Item = Job>) -> Vec<Job> {
        let mut state = self.lock();
        if state.terminated {
            return jobs.collect();
        }
        for job in jobs.rev() {
            state.jobs.push_front(job);
        }
        let mut wake: Vec<usize> = state.idle.clone();
        wake.extend(state.dormant.pop());
        drop(state);
        for slot in wake {
            self.slots[slot].wake();
        }
        Vec::new()
    }

    /// Takes live jobs for `slot` within `room`, passing each to `take`; returns how
    /// many, and counts withdrawn jobs it dropped into `withdrawn`.
    ///
    /// A slot that already has calls (`busy`) takes nothing while another slot is
    /// idle: the idle one should run it now rather than this one later. A slot that
    /// gets nothing is woken by the next push (if idle, it is first in line). When
    /// jobs are left waiting and no slot is idle, a slot without a worker is woken to
    /// start one: the pool grows while calls wait.
    pub(crate) fn poll_take(
        &self,
        cx: &mut Context<'_>,
        slot: usize,
        room: Room,
        withdrawn: &mut u64,
        mut take: impl FnMut(Job),
    ) -> Poll<Took> {
        self.slots[slot].register(cx.waker());
        let mut state = self.lock();
        if room.busy {
            state.leave_idle(slot);
            if !state.idle.is_empty() {
                return Poll::Pending;
            }
        }
        let (mut taken, mut items) = (0, 0);
        let mut over_budget = false;
        // While the pool can still grow, a worker holds one call at a time: calls
        // taken ahead would wait behind its running one while a new worker could run
        // them (their length is not known yet), and would hide the demand to grow.
        // Nor does a worker take calls ahead while another worker idles: they could
        // run there now, and must, when they wait for each other (a consumer and its
        // producer, talking over a channel).
        let others_idle = state.idle.iter().any(|&other| other != slot);
        let spread = !state.dormant.is_empty() || others_idle;
        let max_jobs = if spread && room.busy { 0 } else { room.jobs };
        // While spreading, an idle worker takes one call, and more only while their
        // known run time stays below what waking another worker costs: a burst of
        // tiny calls would otherwise go one call (one frame, one wake-up) per worker
        // across the whole pool.
        let mut spread_ns = 0u64;
        while taken < max_jobs {
            let Some(job) = state.jobs.front() else {
                break;
            };
            if spread && taken > 0 {
                match job.expected_ns {
                    Some(ns) if spread_ns.saturating_add(ns) <= SPREAD_NS => spread_ns += ns,
                    _ => break,
                }
            } else if spread {
                spread_ns = job.expected_ns.unwrap_or(SPREAD_NS);
            }
            if job.is_cancelled() {
                *withdrawn += u64::from(job.items);
                state.jobs.pop_front();
                continue;
            }
            if items + u64::from(job.items) > room.items {
                over_budget = taken == 0;
                break;
            }
            // A call that talks over channels may wait for another call: it never
            // waits behind one, nor holds one behind itself.
            if job.talks() && (room.busy || taken > 0) {
                break;
            }
            let talks = job.talks();
            let Some(mut job) = state.jobs.pop_front() else {
                break;
            };
            items += u64::from(job.items);
            // It no longer waits: its room goes to the next spawn.
            job.admission = None;
            take(job);
            taken += 1;
            if talks {
                break;
            }
        }
        if taken > 0 || over_budget {
            state.leave_idle(slot);
        }
        let grow = if !state.jobs.is_empty() && state.idle.is_empty() { state.dormant.pop() } else { None };
        if let Some(dormant) = grow {
            self.slots[dormant].wake();
        }
        if taken > 0 {
            state.leave_idle(slot);
            // The next call is for another idle worker.
            let next =
                if !state.jobs.is_empty() && !state.idle.is_empty() { state.wake_target() } else { None };
            drop(state);
            if let Some(next) = next {
                self.slots[next].wake();
            }
            return Poll::Ready(Took::Jobs(taken));
        }
        if over_budget {
            // This worker retires; another may take the call now.
            let next = state.wake_target();
            drop(state);
            if let Some(next) = next {
                self.slots[next].wake();
            }
            return Poll::Ready(Took::OverBudget);
        }
        if !room.busy && !state.idle.contains(&slot) {
            state.idle.push(slot);
        }
        Poll::Pending
    }

    /// A slot gave up starting a worker: the wake-up it got for waiting work goes to
    /// another slot without a worker, so the work is not stranded.
    pub(crate) fn pass_demand(&self) {
        let mut state = self.lock();
        let next = if state.jobs.is_empty() { None } else { state.dormant.pop() };
        drop(state);
        if let Some(slot) = next {
            self.slots[slot].wake();
        }
    }

    /// Registers `slot`'s waker without taking work (its window is full, or it is
    /// stopping): it is not idle.
    pub(crate) fn register(&self, cx: &mut Context<'_>, slot: usize) {
        self.slots[slot].register(cx.waker());
        self.lock().leave_idle(slot);
    }

    /// A slot's worker is gone: it is neither idle nor dormant until it says so again.
    /// A wake-up it may have taken for waiting work goes to another slot.
    pub(crate) fn leave(&self, slot: usize) {
        let mut state = self.lock();
        state.leave_idle(slot);
        state.dormant.retain(|&s| s != slot);
        let next = if state.jobs.is_empty() { None } else { state.wake_target() };
        drop(state);
        if let Some(next) = next {
            self.slots[next].wake();
        }
    }

    /// Queues a job that replaces work accepted before (the unstarted inputs of a
    /// call whose worker died), even while shutting down; refused once terminated.
    pub(crate) fn push_accepted(&self, job: Job) -> Result<(), Closed> {
        match self.requeue_back(job) {
            None => Ok(()),
            Some(_) => Err(Closed),
        }
    }

    fn requeue_back(&self, job: Job) -> Option<Job> {
        let mut state = self.lock();
        if state.terminated {
            return Some(job);
        }
        state.jobs.push_back(job);
        let wake = state.wake_target();
        drop(state);
        if let Some(slot) = wake {
            self.slots[slot].wake();
        }
        None
    }

    /// For a slot without a worker: ready when work is waiting; otherwise the slot is
    /// registered to be woken when work arrives and no live worker is idle.
    pub(crate) fn poll_demand(&self, cx: &mut Context<'_>, slot: usize) -> Poll<()> {
        self.slots[slot].register(cx.waker());
        let mut state = self.lock();
        if state.has_live_jobs() {
            state.dormant.retain(|&s| s != slot);
            return Poll::Ready(());
        }
        if !state.dormant.contains(&slot) {
            state.dormant.push(slot);
        }
        Poll::Pending
    }

    /// Whether any job waits that someone still wants.
    pub(crate) fn has_live_jobs(&self) -> bool {
        self.lock().has_live_jobs()
    }

    /// How many jobs wait that someone still wants.
    pub(crate) fn live_len(&self) -> usize {
        self.lock().jobs.iter().filter(|job| !job.is_cancelled()).count()
    }

    /// Refuses further pushes and wakes every slot.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.wake_all();
    }

    /// Refuses everything from now on, empties the queue and returns what it held.
    pub(crate) fn close_and_drain(&self) -> Vec<Job> {
        let mut state = self.lock();
        state.closed = true;
        state.terminated = true;
        let jobs = state.jobs.drain(..).collect();
        drop(state);
        self.wake_all();
        jobs
    }

    pub(crate) fn wake_all(&self) {
        for slot in self.slots.iter() {
            slot.wake();
        }
    }
}

impl QueueState {
    fn leave_idle(&mut self, slot: usize) {
        self.idle.retain(|&s| s != slot);
    }

    /// Who to wake for a new job: an idle worker, else a slot that can start one.
    fn wake_target(&mut self) -> Option<usize> {
        if self.idle.is_empty() {
            return self.dormant.pop();
        }
        self.next_idle = self.next_idle.wrapping_add(1);
        Some(self.idle[self.next_idle % self.idle.len()])
    }

    /// Drops withdrawn jobs; true if any other is left.
    fn has_live_jobs(&mut self) -> bool {
        self.jobs.retain(|job| !job.is_cancelled());
        !self.jobs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker;

    fn job(id: u64) -> (Job, oneshot::Receiver<Completion>) {
        let (sender, receiver) = oneshot::channel();
        let job = Job::new(id, "t", 1, Bytes::new(), ReplyTo::Once(sender), CallOptions::default());
        (job, receiver)
    }

    fn room(jobs: usize, busy: bool) -> Room {
        Room { jobs, items: u64::MAX, busy }
    }

    fn take_ids(queue: &Queue, max: usize) -> Vec<u64> {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut ids = Vec::new();
        let _ = queue.poll_take(&mut cx, 0, room(max, false), &mut 0, |job| ids.push(job.id));
        ids
    }

    #[test]
    fn jobs_leave_in_order_and_requeued_jobs_go_first() {
        let queue = Queue::new(1);
        let mut receivers = Vec::new();
        for id in 0..5 {
            let (job, receiver) = job(id);
            receivers.push(receiver);
            assert!(queue.push(job).is_ok());
        }
        let mut first = Vec::new();
        let waker = noop_waker();
        let _ = queue
            .poll_take(&mut Context::from_waker(&waker), 0, room(2, false), &mut 0, |job| first.push(job));
        assert!(queue.requeue(first.into_iter()).is_empty());
        assert_eq!(take_ids(&queue, 10), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn cancelled_jobs_are_skipped() {
        let queue = Queue::new(1);
        let (kept, _kept_receiver) = job(1);
        let (dropped, dropped_receiver) = job(2);
        assert!(queue.push(dropped).is_ok());
        assert!(queue.push(kept).is_ok());
        drop(dropped_receiver);
        assert_eq!(take_ids(&queue, 10), [1]);
    }

    #[test]
    fn a_busy_slot_leaves_work_to_an_idle_one() {
        let queue = Queue::new(2);
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        // Slot 1 finds nothing and becomes idle.
        assert!(queue.poll_take(&mut cx, 1, room(10, false), &mut 0, |_| {}).is_pending());
        let (job, _receiver) = job(1);
        assert!(queue.push(job).is_ok());
        // Slot 0, busy, would prefetch: it must not.
        assert!(queue.poll_take(&mut cx, 0, room(10, true), &mut 0, |_| {}).is_pending());
        let mut taken = Vec::new();
        let took = queue.poll_take(&mut cx, 1, room(10, false), &mut 0, |job| taken.push(job.id));
        assert_eq!(took, Poll::Ready(Took::Jobs(1)));
        assert_eq!(taken, [1]);
    }

    #[test]
    fn a_slot_takes_no_more_inputs_than_its_budget() {
        let queue = Queue::new(1);
        let mut receivers = Vec::new();
        for id in 0..4 {
            let (job, receiver) = job(id);
            receivers.push(receiver);
            assert!(queue.push(job).is_ok());
        }
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut taken = Vec::new();
        let budget = Room { jobs: 10, items: 3, busy: false };
        assert_eq!(
            queue.poll_take(&mut cx, 0, budget, &mut 0, |job| taken.push(job.id)),
            Poll::Ready(Took::Jobs(3))
        );
        let none = Room { jobs: 10, items: 0, busy: false };
        assert_eq!(queue.poll_take(&mut cx, 0, none, &mut 0, |_| {}), Poll::Ready(Took::OverBudget));
        assert_eq!(take_ids(&queue, 10), [3]);
    }

    #[test]
    fn work_left_waiting_wakes_a_slot_without_a_worker() {
        let queue = Queue::new(2);
        let noop = noop_waker();
        // Slot 0 has an idle worker; slot 1 has none and waits for demand.
        assert!(
            queue.poll_take(&mut Context::from_waker(&noop), 0, room(1, false), &mut 0, |_| {}).is_pending()
        );
        let dormant = Arc::new(WakeCounter::default());
        let waker = futures::task::waker(dormant.clone());
        assert!(queue.poll_demand(&mut Context::from_waker(&waker), 1).is_pending());
        let (first, _r1) = job(1);
        let (second, _r2) = job(2);
        assert!(queue.push(first).is_ok());
        assert!(queue.push(second).is_ok());
        assert_eq!(dormant.0.load(Ordering::SeqCst), 0, "the idle worker is woken for both");
        // Slot 0 takes one call; one is left and nobody is idle: slot 1 is woken.
        let took = queue.poll_take(&mut Context::from_waker(&noop), 0, room(1, false), &mut 0, |_| {});
        assert_eq!(took, Poll::Ready(Took::Jobs(1)));
        assert_eq!(dormant.0.load(Ordering::SeqCst), 1, "the slot without a worker is woken");
    }

    #[test]
    fn a_slot_that_gives_up_passes_its_wake_up_on() {
        let queue = Queue::new(3);
        let counters: Vec<_> = (0..3).map(|_| Arc::new(WakeCounter::default())).collect();
        for slot in [1, 2] {
            let waker = futures::task::waker(counters[slot].clone());
            assert!(queue.poll_demand(&mut Context::from_waker(&waker), slot).is_pending());
        }
        let (job, _receiver) = job(1);
        assert!(queue.push(job).is_ok());
        let woken: Vec<usize> = counters.iter().map(|c| c.0.load(Ordering::SeqCst)).collect();
        assert_eq!(woken, [0, 0, 1], "one slot without a worker is woken for the call");
        // It cannot start a worker, gives up, and passes the call on.
        queue.leave(2);
        queue.pass_demand();
        assert_eq!(counters[1].0.load(Ordering::SeqCst), 1, "the other one is woken in its place");
    }

    #[test]
    fn a_slot_over_its_budget_passes_the_call_to_another_idle_slot() {
        let queue = Queue::new(2);
        let counters: Vec<_> = (0..2).map(|_| Arc::new(WakeCounter::default())).collect();
        for slot in [0, 1] {
            let waker = futures::task::waker(counters[slot].clone());
            assert!(
                queue
                    .poll_take(&mut Context::from_waker(&waker), slot, room(1, false), &mut 0, |_| {})
                    .is_pending()
            );
        }
        let (job, _receiver) = job(1);
        assert!(queue.push(job).is_ok());
        let woken: Vec<usize> = counters.iter().map(|c| c.0.load(Ordering::SeqCst)).collect();
        let (first, other) = if woken[0] == 1 { (0, 1) } else { (1, 0) };
        assert_eq!(woken[other], 0, "one idle slot is woken for one call");
        let spent = Room { jobs: 1, items: 0, busy: false };
        let noop = noop_waker();
        let took = queue.poll_take(&mut Context::from_waker(&noop), first, spent, &mut 0, |_| {});
        assert_eq!(took, Poll::Ready(Took::OverBudget));
        assert_eq!(counters[other].0.load(Ordering::SeqCst), 1, "the other idle slot gets the call");
    }

    #[derive(Default)]
    struct WakeCounter(std::sync::atomic::AtomicUsize);

    impl futures::task::ArcWake for WakeCounter {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn withdrawn_jobs_do_not_count_as_waiting() {
        let queue = Queue::new(1);
        let (job, receiver) = job(1);
        assert!(queue.push(job).is_ok());
        assert!(queue.has_live_jobs());
        drop(receiver);
        assert!(!queue.has_live_jobs());
        assert_eq!(queue.live_len(), 0);
    }

    #[test]
    fn a_terminated_queue_hands_requeued_jobs_back() {
        let queue = Queue::new(1);
        assert!(queue.close_and_drain().is_empty());
        let (job, _receiver) = job(1);
        assert_eq!(queue.requeue(std::iter::once(job)).len(), 1);
    }

    #[test]
    fn a_closed_queue_hands_jobs_back_and_drains() {
        let queue = Queue::new(1);
        let (first, _r1) = job(1);
        assert!(queue.push(first).is_ok());
        let drained = queue.close_and_drain();
        assert_eq!(drained.len(), 1);
        let (second, _r2) = job(2);
        assert!(queue.push(second).is_err());
    }
}
