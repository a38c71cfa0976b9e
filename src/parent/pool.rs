//! The state an executor's handles, supervisors and maps share.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use std::sync::Arc;

use tokio::sync::{Notify, Semaphore, oneshot};

use crate::channel::broker::Hub;
use crate::channel::transit;
use crate::parent::dispatch::{CallOptions, Closed, Completion, Job, Queue, ReplyTo};
use crate::parent::error::{Direction, Error, Result};
use crate::parent::process::{WorkerConfig, check_types};
use crate::parent::stats::{Counters, Stats};
use crate::task::Task;
use crate::wire::codec;
use crate::wire::protocol::{self, Count, Request, TaskInfo};

/// The executor's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum RunState {
    Running = 0,
    /// `shutdown()`: finish what was accepted, accept nothing new.
    Draining = 1,
    /// Dropped or `shutdown_now()`: stop now.
    Terminated = 2,
}

/// When supervisors recycle or stop their workers.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Limits {
    pub(crate) max_tasks_per_worker: Option<u64>,
    pub(crate) max_worker_memory: Option<u64>,
    pub(crate) min_processes: usize,
    pub(crate) idle_timeout: Option<Duration>,
}

/// The tasks the workers serve, by name.
pub(crate) struct TaskTable {
    infos: Vec<TaskInfo>,
    by_name: HashMap<String, u32>,
    /// Per task, the types (in this process) that passed the check: tracing them
    /// again on every call would cost more than the call's bookkeeping.
    checked: Vec<OnceLock<[TypeId; 2]>>,
    /// Per task, what maps learned of it (0 while unknown), so that the next map
    /// sizes its first chunks from it instead of starting at one input a chunk.
    item_ns: Vec<AtomicU64>,
    output_bytes: Vec<AtomicU64>,
}

/// What earlier maps measured of a task.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Learned {
    /// The worker's time per input.
    pub(crate) item_ns: Option<u64>,
    /// The encoded output per input, in bytes.
    pub(crate) output_bytes: u64,
}

impl TaskTable {
    pub(crate) fn new(infos: Vec<TaskInfo>) -> Self {
        let mut by_name = HashMap::with_capacity(infos.len());
        for (index, info) in infos.iter().enumerate() {
            by_name.entry(info.name.clone()).or_insert(index as u32);
        }
        let checked = infos.iter().map(|_| OnceLock::new()).collect();
        let item_ns = infos.iter().map(|_| AtomicU64::new(0)).collect();
        let output_bytes = infos.iter().map(|_| AtomicU64::new(0)).collect();
        TaskTable { infos, by_name, checked, item_ns, output_bytes }
    }

    /// What maps have learned of task `index` so far.
    pub(crate) fn learned(&self, index: u32) -> Learned {
        let index = index as usize;
        let load = |values: &[AtomicU64]| values.get(index).map_or(0, |v| v.load(Ordering::Relaxed));
        Learned {
            item_ns: Some(load(&self.item_ns)).filter(|&ns| ns > 0),
            output_bytes: load(&self.output_bytes),
        }
    }

    /// Records a call of task `index` that kept its worker busy `busy_ns` for
    /// `items` inputs.
    pub(crate) fn learn_call(&self, index: u32, busy_ns: u64, items: u32) {
        let Some(slot) = self.item_ns.get(index as usize) else {
            return;
        };
        let per_item = (busy_ns / u64::from(items.max(1))).max(1);
        let average = match slot.load(Ordering::Relaxed) {
            0 => per_item,
            average => average.saturating_mul(3).saturating_add(per_item) / 4,
        };
        slot.store(average.max(1), Ordering::Relaxed);
    }

    /// Records what a map learned of task `index`, for the maps after it.
    pub(crate) fn learn(&self, index: u32, learned: Learned) {
        let index = index as usize;
        if let (Some(slot), Some(ns)) = (self.item_ns.get(index), learned.item_ns) {
            slot.store(ns.max(1), Ordering::Relaxed);
        }
        if let Some(slot) = self.output_bytes.get(index) {
            slot.store(learned.output_bytes, Ordering::Relaxed);
        }
    }

    pub(crate) fn infos(&self) -> &[TaskInfo] {
        &self.infos
    }

    /// The worker's number for `task`, after checking both sides agree on its types.
    pub(crate) fn resolve<I, O>(&self, task: &Task<I, O>) -> Result<u32> {
        let Some(&index) = self.by_name.get(task.name()) else {
            return Err(Error::UnknownTask { task: task.name().into() });
        };
        let type_ids = task.type_ids();
        let checked = &self.checked[index as usize];
        if checked.get() != Some(&type_ids) {
            check_types(task.name(), &task.signature(), &self.infos[index as usize])?;
            let _ = checked.set(type_ids);
        }
        Ok(index)
    }
}

/// The bound on spawned calls waiting in the queue.
pub(crate) struct QueueRoom {
    pub(crate) semaphore: Arc<Semaphore>,
    /// All the room there is, in bytes.
    pub(crate) max: usize,
}

/// State shared by the executor's handles, its supervisors and its maps.
pub(crate) struct Shared {
    pub(crate) config: WorkerConfig,
    pub(crate) limits: Limits,
    pub(crate) queue: Queue,
    pub(crate) tasks: TaskTable,
    pub(crate) processes: usize,
    pub(crate) counters: Counters,
    /// Every channel of the executor.
    pub(crate) hub: Arc<Hub>,
    /// Room for spawned calls waiting in the queue, in bytes of their frames.
    pub(crate) queue_room: QueueRoom,
    next_id: AtomicU64,
    state: AtomicU8,
    /// Supervisor tasks still running.
    supervisors: AtomicUsize,
    /// Why the last slot that gave up could not start a worker.
    last_failure: Mutex<Option<Error>>,
    /// Set when every supervisor has stopped while the executor was running: the
    /// reason calls fail from then on.
    broken: OnceLock<Error>,
    all_stopped: Notify,
}

impl Shared {
    pub(crate) fn new(
        config: WorkerConfig,
        limits: Limits,
        tasks: TaskTable,
        processes: usize,
        queue_bytes: usize,
    ) -> Self {
        let hub = Hub::new(config.executor, config.max_frame_len);
        Shared {
            config,
            limits,
            queue: Queue::new(processes),
            tasks,
            processes,
            counters: Counters::new(processes),
            hub,
            queue_room: QueueRoom { semaphore: Arc::new(Semaphore::new(queue_bytes)), max: queue_bytes },
            next_id: AtomicU64::new(0),
            state: AtomicU8::new(RunState::Running as u8),
            supervisors: AtomicUsize::new(0),
            last_failure: Mutex::new(None),
            broken: OnceLock::new(),
            all_stopped: Notify::new(),
        }
    }

    pub(crate) fn state(&self) -> RunState {
        match self.state.load(Ordering::Acquire) {
            0 => RunState::Running,
            1 => RunState::Draining,
            _ => RunState::Terminated,
        }
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The error for a call the queue refused.
    pub(crate) fn refused(&self) -> Error {
        self.broken.get().cloned().unwrap_or(Error::Shutdown)
    }

    pub(crate) fn max_frame_len(&self) -> usize {
        self.config.max_frame_len
    }

    /// Begins a call frame in `buf`; the caller appends the inputs, then ends the
    /// frame. Returns the call's id, where the frame starts, and where its item count
    /// sits (to patch when the count was not known up front).
    pub(crate) fn call_frame(
        &self,
        task: u32,
        items: u32,
        capture: bool,
        buf: &mut BytesMut,
    ) -> (u64, usize, usize) {
        let id = self.next_id();
        let start = protocol::begin_frame(buf);
        let _ = protocol::encode_into(buf, &Request::Call { id, task, capture, items: Count::new(items) });
        (id, start, buf.len() - Count::WIDTH)
    }

    /// Encodes one call as a job, with the receiver of its completion.
    pub(crate) fn encode_one<I: Serialize, O>(
        &self,
        task: &Task<I, O>,
        input: &I,
        options: CallOptions,
    ) -> Result<(Job, oneshot::Receiver<Completion>)> {
        let index = self.tasks.resolve(task)?;
        let mut buf = BytesMut::with_capacity(64);
        let (id, start, _) = self.call_frame(index, 1, options.capture, &mut buf);
        let record = protocol::begin_record(&mut buf);
        // Large blobs stay in their own buffers: the frame refers to them, and the
        // writer sends them from there (no copy, no second payload in memory).
        let ((encoded, holds), spliced) =
            protocol::splicing(|| transit::collect(|| protocol::encode_into(&mut buf, input)));
        encoded.map_err(|err| {
            Error::codec(task.name(), Direction::Input, "encode", codec::encode_error_message(input, &err))
        })?;
        let extra: usize = spliced.iter().map(|(_, part)| part.len()).sum();
        protocol::end_record_with(&mut buf, record, extra);
        let limit = self.config.max_frame_len;
        protocol::end_frame_with(&mut buf, start, limit, extra).map_err(|size| Error::FrameTooLarge {
            task: task.name().into(),
            direction: Direction::Input,
            size: size as u64,
            limit: limit as u64,
        })?;
        let (head, rest) = pieces(buf.freeze(), spliced);
        let (sender, receiver) = oneshot::channel();
        let mut job = Job::new(id, task.name(), 1, head, ReplyTo::Once(sender), options);
        job.rest = rest;
        job.holds = holds;
        job.task_index = Some(index);
        job.expected_ns = self.tasks.learned(index).item_ns;
        Ok((job, receiver))
    }

    /// The share of the spawn queue's room a job needs: its frame's size, but no
    /// more than all of it, so a call larger than the queue still goes alone.
    pub(crate) fn room_for(&self, job: &Job) -> u32 {
        job.frame_len().clamp(1, self.queue_room.max) as u32
    }

    /// Takes room in the spawn queue for `job` at once, if there is enough.
    pub(crate) fn try_admit(&self, job: &mut Job) -> bool {
        match self.queue_room.semaphore.clone().try_acquire_many_owned(self.room_for(job)) {
            Ok(permit) => {
                job.admission = Some(permit);
                true
            }
            Err(_) => false,
        }
    }

    /// Queues a job, or drops it when the executor no longer accepts work.
    pub(crate) fn submit(&self, job: Job) -> Result<(), Closed> {
        self.queue.push(job)
    }

    pub(crate) fn stats(&self) -> Stats {
        self.counters.snapshot(self.queue.live_len())
    }

    /// Puts jobs a worker never started back in the queue, or fails them if the
    /// executor has stopped meanwhile.
    pub(crate) fn requeue(&self, jobs: impl DoubleEndedIterator<Item = Job>) {
        self.fail(self.queue.requeue(jobs), &Error::Shutdown);
    }

    /// Fails every job with `error`.
    pub(crate) fn fail(&self, jobs: impl IntoIterator<Item = Job>, error: &Error) {
        for job in jobs {
            Counters::add(&self.counters.failed, u64::from(job.items));
            job.complete(Completion::Failed(error.clone()));
        }
    }

    /// `shutdown()`: stop accepting, let the supervisors finish the queue.
    pub(crate) fn drain(&self) {
        let _ = self.state.compare_exchange(
            RunState::Running as u8,
            RunState::Draining as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.queue.close();
        self.hub.shut();
    }

    /// Drop of the last handle, or `shutdown_now()`: stop now, fail whatever waits.
    pub(crate) fn terminate(&self) {
        self.state.store(RunState::Terminated as u8, Ordering::Release);
        self.hub.shut();
        self.fail(self.queue.close_and_drain(), &Error::Shutdown);
    }

    /// Called by a slot that cannot start a worker any more (its supervisor then
    /// stops). The reason is what calls get if every slot ends up stopped.
    pub(crate) fn slot_gave_up(&self, reason: Error) {
        *self.last_failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(reason);
    }

    /// The last supervisor stopped: nothing will ever run what is still queued.
    fn last_supervisor_stopped(&self) {
        let reason = match self.state() {
            RunState::Running => {
                let failure =
                    self.last_failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
                let reason = failure.unwrap_or(Error::Shutdown);
                let _ = self.broken.set(reason.clone());
                reason
            }
            RunState::Draining | RunState::Terminated => Error::Shutdown,
        };
        self.hub.shut();
        self.fail(self.queue.close_and_drain(), &reason);
    }

    /// Claims the right to stop an idle worker: true while more than
    /// `min_processes` workers are alive, in which case the worker count is
    /// already lowered.
    pub(crate) fn claim_idle_exit(&self) -> bool {
        let workers = &self.counters.workers;
        let mut alive = workers.load(Ordering::Acquire);
        while alive > self.limits.min_processes {
            match workers.compare_exchange(alive, alive - 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(now) => alive = now,
            }
        }
        false
    }

    /// Counts a supervisor about to be spawned, so shutdown waits for it.
    pub(crate) fn supervisor_spawned(&self) {
        self.supervisors.fetch_add(1, Ordering::SeqCst);
    }

    /// Marks a supervisor as running until the guard drops.
    pub(crate) fn supervisor_guard(&self) -> SupervisorGuard<'_> {
        SupervisorGuard { shared: self }
    }

    /// Resolves once every supervisor has stopped (and reaped its worker).
    pub(crate) async fn stopped(&self) {
        loop {
            let notified = self.all_stopped.notified();
            if self.supervisors.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A frame's pieces in order: its buffer cut where the spliced blobs belong, with
/// the blobs between the cuts.
fn pieces(frame: Bytes, spliced: Vec<(usize, Bytes)>) -> (Bytes, Vec<Bytes>) {
    if spliced.is_empty() {
        return (frame, Vec::new());
    }
    let mut rest = Vec::with_capacity(2 * spliced.len());
    let mut cut = spliced[0].0;
    let head = frame.slice(..cut);
    let mut parts = spliced.into_iter().peekable();
    while let Some((_, part)) = parts.next() {
        rest.push(part);
        let next = parts.peek().map_or(frame.len(), |(at, _)| *at);
        if next > cut {
            rest.push(frame.slice(cut..next));
        }
        cut = next;
    }
    (head, rest)
}

/// Counts a running supervisor; see [`Shared::supervisor_guard`].
pub(crate) struct SupervisorGuard<'a> {
    shared: &'a Shared,
}

impl Drop for SupervisorGuard<'_> {
    fn drop(&mut self) {
        if self.shared.supervisors.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.last_supervisor_stopped();
            self.shared.all_stopped.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spliced_frame_is_cut_where_its_blobs_belong() {
        let frame = Bytes::from_static(b"abcdef");
        let (x, y) = (Bytes::from_static(b"XX"), Bytes::from_static(b"YY"));
        let (head, rest) = pieces(frame.clone(), vec![(2, x.clone()), (2, y.clone()), (5, x.clone())]);
        let mut whole = head.to_vec();
        rest.iter().for_each(|piece| whole.extend_from_slice(piece));
        assert_eq!(whole, b"abXXYYcdeXXf");
        assert_eq!(pieces(frame.clone(), Vec::new()), (frame, Vec::new()));
    }
}
