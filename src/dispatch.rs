//! Jobs and the queue that hands them to worker supervisors.
//!
//! Callers encode their request frame up front and push a [`Job`]; each supervisor
//! pulls as many jobs as its worker's prefetch window has room for. Pull-based
//! dispatch balances load by itself: a fast or idle worker simply pulls more.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::task::AtomicWaker;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;

/// A reply's body, as it came from the worker.
#[derive(Debug)]
pub(crate) struct Delivery {
    /// `items` outcomes (see `protocol::Outcome`).
    pub(crate) body: Bytes,
    /// Time the worker spent on the call.
    pub(crate) busy_ns: u64,
}

/// How a job ends.
pub(crate) type Completion = Result<Delivery, Error>;

/// Where a job's completion goes.
pub(crate) enum ReplyTo {
    /// A single `spawn`.
    Once(oneshot::Sender<Completion>),
    /// One chunk of a map: `(chunk sequence number, items, completion)`.
    Chunk { seq: u64, sink: mpsc::UnboundedSender<ChunkDone> },
}

/// A finished chunk of a map.
pub(crate) struct ChunkDone {
    pub(crate) seq: u64,
    pub(crate) items: u32,
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
    pub(crate) reply: ReplyTo,
}

impl Job {
    /// Whether nobody waits for the result any more (the future or stream was dropped).
    pub(crate) fn is_cancelled(&self) -> bool {
        match &self.reply {
            ReplyTo::Once(sender) => sender.is_closed(),
            ReplyTo::Chunk { sink, .. } => sink.is_closed(),
        }
    }

    /// Delivers the job's completion, if anyone still wants it.
    pub(crate) fn complete(self, completion: Completion) {
        match self.reply {
            ReplyTo::Once(sender) => {
                let _ = sender.send(completion);
            }
            ReplyTo::Chunk { seq, sink } => {
                let _ = sink.send(ChunkDone { seq, items: self.items, completion });
            }
        }
    }
}

/// The executor's queue of jobs not yet sent to a worker.
pub(crate) struct Queue {
    state: Mutex<QueueState>,
    /// One waker per supervisor slot: woken for new work, and for shutdown.
    slots: Box<[AtomicWaker]>,
}

struct QueueState {
    jobs: VecDeque<Job>,
    /// Slots that found the queue empty and wait for a push.
    idle: Vec<usize>,
    closed: bool,
}

impl Queue {
    pub(crate) fn new(slots: usize) -> Self {
        Queue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                idle: Vec::with_capacity(slots),
                closed: false,
            }),
            slots: (0..slots).map(|_| AtomicWaker::new()).collect(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A panic while holding the lock leaves the queue itself consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `job`, or hands it back if the queue is closed.
    pub(crate) fn push(&self, job: Job) -> Result<(), Job> {
        let mut state = self.lock();
        if state.closed {
            return Err(job);
        }
        state.jobs.push_back(job);
        let idle = state.idle.pop();
        drop(state);
        if let Some(slot) = idle {
            self.slots[slot].wake();
        }
        Ok(())
    }

    /// Puts jobs back at the front, in order, even when closed: they were accepted
    /// before, and their worker died before starting them.
    pub(crate) fn requeue(&self, jobs: impl DoubleEndedIterator<Item = Job>) {
        let mut state = self.lock();
        for job in jobs.rev() {
            state.jobs.push_front(job);
        }
        let idle = std::mem::take(&mut state.idle);
        drop(state);
        for slot in idle {
            self.slots[slot].wake();
        }
    }

    /// Takes up to `max` live jobs for `slot`, passing each to `take`; returns how many.
    ///
    /// When none is left, `slot` is registered to be woken by the next push.
    pub(crate) fn poll_take(
        &self,
        cx: &mut Context<'_>,
        slot: usize,
        max: usize,
        mut take: impl FnMut(Job),
    ) -> Poll<usize> {
        self.slots[slot].register(cx.waker());
        let mut state = self.lock();
        let mut taken = 0;
        while taken < max {
            let Some(job) = state.jobs.pop_front() else {
                break;
            };
            if job.is_cancelled() {
                continue;
            }
            take(job);
            taken += 1;
        }
        if taken == 0 {
            if !state.idle.contains(&slot) {
                state.idle.push(slot);
            }
            return Poll::Pending;
        }
        Poll::Ready(taken)
    }

    /// Registers `slot`'s waker without taking work (its window is full).
    pub(crate) fn register(&self, cx: &mut Context<'_>, slot: usize) {
        self.slots[slot].register(cx.waker());
    }

    /// Whether any job waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.lock().jobs.is_empty()
    }

    /// Refuses further pushes and wakes every slot.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.wake_all();
    }

    /// Refuses further pushes, empties the queue and returns what it held.
    pub(crate) fn close_and_drain(&self) -> Vec<Job> {
        let mut state = self.lock();
        state.closed = true;
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker;

    fn job(id: u64) -> (Job, oneshot::Receiver<Completion>) {
        let (sender, receiver) = oneshot::channel();
        let job = Job { id, task: "t", items: 1, frame: Bytes::new(), reply: ReplyTo::Once(sender) };
        (job, receiver)
    }

    fn take_ids(queue: &Queue, max: usize) -> Vec<u64> {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut ids = Vec::new();
        let _ = queue.poll_take(&mut cx, 0, max, |job| ids.push(job.id));
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
        let _ = queue.poll_take(&mut Context::from_waker(&waker), 0, 2, |job| first.push(job));
        queue.requeue(first.into_iter());
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
