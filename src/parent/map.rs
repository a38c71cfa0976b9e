//! `map` and friends: many inputs through one task, in chunks, with a bounded window.
//!
//! A map pulls inputs lazily from its source and encodes them straight into chunk
//! frames. A chunk's size comes from measured task time (aiming at about a
//! millisecond of work per chunk, like joblib's auto batching), so tiny tasks cost a
//! fraction of a frame each while long tasks still spread one per worker. At most
//! `window` chunks are in flight or waiting to be yielded, so memory stays flat
//! however long the input is and however slow the consumer.
//!
//! A worker that dies in a chunk costs only the input it was running: the supervisor
//! reports the chunk's fate (the outputs of the inputs done, the error of the one
//! running, how many never started), and the map sends the unstarted inputs again
//! as a new call, and the failed one too if it may be retried. Each input travels as
//! a record of its own, so the map cuts them out of the chunk's frame as they are.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::time::Sleep;

use crate::channel::transit;
use crate::parent::dispatch::{CallOptions, ChunkDone, Completion, Delivery, Job, ReplyTo, decode_record};
use crate::parent::error::{Direction, Error, Result};
use crate::parent::pool::{Learned, Shared};
use crate::parent::progress::{Progress, Tracker};
use crate::parent::stats::Counters;
use crate::task::Task;
use crate::wire::codec;
use crate::wire::protocol::{self, Count, Request};

/// Work per chunk the sizing aims at.
const TARGET_CHUNK_NS: u64 = 1_000_000;
/// The most work per chunk sized against a slow link.
const MAX_TARGET_CHUNK_NS: u64 = 100_000_000;
/// Most items in one chunk.
const MAX_CHUNK_ITEMS: u64 = 1 << 16;
/// A chunk stops growing once its inputs take this many bytes, and is sized so its
/// outputs take about as many (never more than a quarter of the frame limit).
const MAX_CHUNK_BYTES: usize = 256 * 1024;
/// Least work per chunk when the input is split to keep every worker busy: below
/// it, a chunk's frame and wake-up cost more than the parallelism gains, and a large
/// pool would get hundreds of chunks of a few microseconds each.
const MIN_CHUNK_NS: u64 = 250_000;
/// Results handed out between two looks at finished chunks, when no chunk ran out.
const REFILL_EVERY: u32 = 64;

/// The future of [`Executor::map`](crate::Executor::map): all outputs, in input order.
///
/// Resolves to the first error if any item fails, and then stops.
///
/// # Cancel safety
///
/// Dropping it withdraws the inputs no worker has received yet; running calls are
/// handled by the executor's [`CancelPolicy`](crate::CancelPolicy).
#[must_use = "a Map does nothing unless awaited"]
pub struct Map<'a, O> {
    stream: MapStream<'a, O>,
    outputs: Vec<O>,
}

impl<'a, O: DeserializeOwned> Map<'a, O> {
    pub(crate) fn new(stream: MapStream<'a, O>) -> Self {
        let capacity = stream.core.source.as_ref().map_or(0, |source| source.remaining()).min(1 << 20);
        Map { stream, outputs: Vec::with_capacity(capacity) }
    }

    /// Gives the whole map a deadline, `timeout` from now: when it passes, the map
    /// resolves to [`Error::TimedOut`] and its remaining calls are cancelled.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// procexec::tasks! {
    ///     pub fn nap(ms: u64) -> u64 { std::thread::sleep(Duration::from_millis(ms)); ms }
    /// }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> procexec::Result<()> {
    /// # procexec::init_worker(&TASKS);
    /// let exec = procexec::Executor::builder().processes(2).build().await?;
    /// let err = exec.map(nap, [10, 60_000, 10]).timeout(Duration::from_millis(300)).await.unwrap_err();
    /// assert!(err.is_timeout());
    /// # Ok(()) }
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.stream.core.set_deadline(timeout);
        self
    }

    /// Watches the map's progress: inputs done, failed and retried, the total when
    /// the input stream knows it, and the time since it started. The receiver
    /// holds the latest snapshot and wakes on each change (`changed().await`), so
    /// a progress bar follows without polling; the last snapshot is the final count.
    ///
    /// Counting starts when this is first called: call it before awaiting.
    pub fn progress(&mut self) -> tokio::sync::watch::Receiver<Progress> {
        self.stream.core.progress.watch()
    }
}

// The outputs are never pinned: they sit in a `Vec` until handed out by value.
impl<O> Unpin for Map<'_, O> {}

impl<O: DeserializeOwned> Future for Map<'_, O> {
    type Output = Result<Vec<O>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Vec<O>>> {
        let this = self.get_mut();
        loop {
            // Everything already here, in one tight loop rather than a poll each.
            if let Err(err) = this.stream.core.drain_ready(&mut this.outputs) {
                return Poll::Ready(Err(err));
            }
            match ready!(this.stream.poll_next_unpin(cx)) {
                Some(Ok(output)) => this.outputs.push(output),
                Some(Err(err)) => return Poll::Ready(Err(err)),
                None => return Poll::Ready(Ok(std::mem::take(&mut this.outputs))),
            }
        }
    }
}

impl<O> fmt::Debug for Map<'_, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Map")
            .field("task", &self.stream.core.task)
            .field("done", &self.outputs.len())
            .finish()
    }
}

/// The stream of [`Executor::map_stream`](crate::Executor::map_stream): one result
/// per input, in input order.
///
/// # Cancel safety
///
/// Dropping it withdraws the inputs no worker has received yet; running calls are
/// handled by the executor's [`CancelPolicy`](crate::CancelPolicy).
#[must_use = "streams do nothing unless polled"]
pub struct MapStream<'a, O> {
    core: MapCore<'a, O>,
}

impl<'a, O: DeserializeOwned> MapStream<'a, O> {
    /// Watches the map's progress: inputs done, failed and retried, the total when
    /// the input stream knows it, and the time since it started. The receiver
    /// holds the latest snapshot and wakes on each change (`changed().await`), so
    /// a progress bar follows without polling; the last snapshot is the final count.
    ///
    /// Counting starts when this is first called: call it before awaiting.
    pub fn progress(&mut self) -> tokio::sync::watch::Receiver<Progress> {
        self.core.progress.watch()
    }

    pub(crate) fn new<I, S>(shared: Arc<Shared>, task: Task<I, O>, items: S, options: CallOptions) -> Self
    where
        I: Serialize + 'a,
        S: Stream<Item = I> + Send + 'a,
    {
        MapStream { core: MapCore::new(shared, task, items, options, true) }
    }

    /// Gives the whole stream a deadline, `timeout` from now: when it passes, the
    /// stream yields [`Error::TimedOut`] once, then ends, and its remaining calls
    /// are cancelled.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.core.set_deadline(timeout);
        self
    }
}

impl<O: DeserializeOwned> Stream for MapStream<'_, O> {
    type Item = Result<O>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<O>>> {
        self.get_mut().core.poll_next(cx)
    }
}

impl<O> fmt::Debug for MapStream<'_, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapStream").field("task", &self.core.task).finish_non_exhaustive()
    }
}

/// The stream of [`Executor::map_unordered`](crate::Executor::map_unordered): one
/// result per input, as each completes.
///
/// # Cancel safety
///
/// Dropping it withdraws the inputs no worker has received yet; running calls are
/// handled by the executor's [`CancelPolicy`](crate::CancelPolicy).
#[must_use = "streams do nothing unless polled"]
pub struct MapUnordered<'a, O> {
    core: MapCore<'a, O>,
}

impl<'a, O: DeserializeOwned> MapUnordered<'a, O> {
    /// Watches the map's progress: inputs done, failed and retried, the total when
    /// the input stream knows it, and the time since it started. The receiver
    /// holds the latest snapshot and wakes on each change (`changed().await`), so
    /// a progress bar follows without polling; the last snapshot is the final count.
    ///
    /// Counting starts when this is first called: call it before awaiting.
    pub fn progress(&mut self) -> tokio::sync::watch::Receiver<Progress> {
        self.core.progress.watch()
    }

    pub(crate) fn new<I, S>(shared: Arc<Shared>, task: Task<I, O>, items: S, options: CallOptions) -> Self
    where
        I: Serialize + 'a,
        S: Stream<Item = I> + Send + 'a,
    {
        MapUnordered { core: MapCore::new(shared, task, items, options, false) }
    }

    /// Gives the whole stream a deadline, `timeout` from now: when it passes, the
    /// stream yields [`Error::TimedOut`] once, then ends, and its remaining calls
    /// are cancelled.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.core.set_deadline(timeout);
        self
    }
}

impl<O: DeserializeOwned> Stream for MapUnordered<'_, O> {
    type Item = Result<O>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<O>>> {
        self.get_mut().core.poll_next(cx)
    }
}

impl<O> fmt::Debug for MapUnordered<'_, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapUnordered").field("task", &self.core.task).finish_non_exhaustive()
    }
}

/// Pulls inputs and encodes them, with the input type erased.
trait Source: Send {
    /// Appends the next input's encoding to `buf`; an input that cannot be encoded
    /// gives why.
    fn poll_encode(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<Option<Result<(), String>>>;
    /// Inputs known to remain (a lower bound).
    fn remaining(&self) -> usize;
}

struct StreamSource<S>(Pin<Box<S>>);

impl<S> Source for StreamSource<S>
where
    S: Stream + Send,
    S::Item: Serialize,
{
    fn poll_encode(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<Option<Result<(), String>>> {
        self.0.as_mut().poll_next(cx).map(|item| {
            item.map(|item| {
                protocol::encode_into(buf, &item).map_err(|err| codec::encode_error_message(&item, &err))
            })
        })
    }

    fn remaining(&self) -> usize {
        self.0.size_hint().0
    }
}

/// The outputs of one chunk (or piece of one), decoded one by one as they are yielded.
struct Chunk {
    remaining: u32,
    body: Bytes,
    offset: usize,
    /// Every item yields this (the call failed as a whole).
    error: Option<Error>,
}

impl Chunk {
    fn failed(items: u32, error: Error) -> Self {
        Chunk { remaining: items, body: Bytes::new(), offset: 0, error: Some(error) }
    }

    fn of(items: u32, delivery: Delivery) -> Self {
        Chunk { remaining: items, body: delivery.body, offset: 0, error: None }
    }

    fn next<O: DeserializeOwned>(&mut self, task: &str) -> Option<Result<O>> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        if let Some(error) = &self.error {
            return Some(Err(error.clone()));
        }
        let mut rest = &self.body[self.offset..];
        let result = decode_record(task, &mut rest);
        self.offset = self.body.len() - rest.len();
        Some(result)
    }
}

/// One part of a chunk's place in an ordered map: the chunk itself, or, after its
/// worker died in it, the pieces it was cut into.
enum Part {
    /// Waits for the call `piece`.
    Pending(u64),
    Done(Chunk),
}

/// A call of this map in flight: what it takes to send its inputs again.
struct Piece {
    /// The chunk it belongs to, in input order.
    seq: u64,
    frame: Bytes,
    items: u32,
    /// Crashes or timeouts its (single) input has had.
    failures: u32,
}

/// The engine behind both map streams.
struct MapCore<'a, O> {
    shared: Arc<Shared>,
    task: &'static str,
    /// The task's number, or why the map cannot run at all.
    task_index: Result<u32>,
    options: CallOptions,
    ordered: bool,
    source: Option<Box<dyn Source + 'a>>,
    /// An encoded input that did not fit the previous chunk.
    carry: Option<BytesMut>,
    sink: mpsc::UnboundedSender<ChunkDone>,
    done: mpsc::UnboundedReceiver<ChunkDone>,
    /// Set when the map is dropped or passes its deadline: its queued calls are
    /// skipped, its running ones handled by the cancel policy.
    cancelled: Arc<AtomicBool>,
    next_seq: u64,
    /// Calls sent and not yet answered, by piece number.
    pieces: HashMap<u64, Piece>,
    next_piece: u64,
    window: usize,
    /// Some workers run elsewhere: chunks are sized against their links.
    remote: bool,
    /// Ordered mode: the parts of each chunk from `base_seq` on.
    reorder: VecDeque<Vec<Part>>,
    base_seq: u64,
    /// Chunks ready to yield, in yield order.
    ready: VecDeque<Chunk>,
    /// Outputs decoded ahead from the front chunk, in yield order: a stream decodes
    /// them in batches, under one registration of their frame, not one per poll.
    decoded: VecDeque<Result<O>>,
    /// Moving average of the worker's time per item.
    item_ns: Option<u64>,
    /// Recent largest encoded output per item, in bytes.
    output_bytes: u64,
    /// Size of the last chunk frame, to allocate the next one at once.
    last_frame_len: usize,
    /// Results yielded since finished chunks were last looked at.
    yielded: u32,
    deadline: Option<(Pin<Box<Sleep>>, Duration)>,
    /// The stream has ended (after a deadline, or an error that stops the map).
    finished: bool,
    holds: transit::Holds,
    /// Its inputs carry handles that may make a call wait for others (see `Job::talks`).
    talks: bool,
    /// Published to whoever asked for `progress()`.
    progress: Tracker,
    _output: PhantomData<fn() -> O>,
}

// Decoded outputs wait in a `VecDeque` until handed out by value: never pinned.
impl<O> Unpin for MapCore<'_, O> {}

impl<'a, O: DeserializeOwned> MapCore<'a, O> {
    fn new<I, S>(shared: Arc<Shared>, task: Task<I, O>, items: S, options: CallOptions, ordered: bool) -> Self
    where
        I: Serialize + 'a,
        S: Stream<Item = I> + Send + 'a,
    {
        let (sink, done) = mpsc::unbounded_channel();
        let window = (3 * shared.processes).max(4);
        let remote = !shared.config.groups.all_local();
        let total = match items.size_hint() {
            (lower, Some(upper)) if lower == upper => Some(lower as u64),
            _ => None,
        };
        let task_index = shared.tasks.resolve(&task);
        // Start from what earlier maps of this task measured.
        let learned = task_index.as_ref().map(|&index| shared.tasks.learned(index)).unwrap_or_default();
        MapCore {
            task_index,
            shared,
            task: task.name(),
            options,
            ordered,
            source: Some(Box::new(StreamSource(Box::pin(items)))),
            carry: None,
            sink,
            done,
            cancelled: Arc::new(AtomicBool::new(false)),
            next_seq: 0,
            pieces: HashMap::new(),
            next_piece: 0,
            window,
            remote,
            reorder: VecDeque::new(),
            base_seq: 0,
            ready: VecDeque::new(),
            decoded: VecDeque::new(),
            item_ns: learned.item_ns,
            output_bytes: learned.output_bytes,
            last_frame_len: 256,
            yielded: 0,
            deadline: None,
            finished: false,
            holds: transit::Holds::default(),
            talks: false,
            progress: Tracker::new(total),
            _output: PhantomData,
        }
    }

    fn set_deadline(&mut self, timeout: Duration) {
        self.deadline = Some((Box::pin(tokio::time::sleep(timeout)), timeout));
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<O>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if let Err(err) = &self.task_index {
            // The map cannot run: say why once, then end.
            let err = err.clone();
            self.finish_early();
            return Poll::Ready(Some(Err(err)));
        }
        if let Some((sleep, timeout)) = &mut self.deadline {
            if sleep.as_mut().poll(cx).is_ready() {
                let err = Error::TimedOut { task: self.task.into(), timeout: *timeout };
                self.finish_early();
                return Poll::Ready(Some(Err(err)));
            }
        }
        loop {
            if let Some(item) = self.decoded.pop_front() {
                self.yielded += 1;
                return Poll::Ready(Some(item));
            }
            if self.ready.is_empty() || self.yielded >= REFILL_EVERY {
                self.yielded = 0;
                self.refill(cx);
                if self.ready.is_empty() {
                    if self.source.is_none()
                        && self.carry.is_none()
                        && self.pieces.is_empty()
                        && self.reorder.is_empty()
                    {
                        self.finished = true;
                        // Every call ended: the channel ends among the inputs may close.
                        self.holds = transit::Holds::default();
                        return Poll::Ready(None);
                    }
                    return Poll::Pending;
                }
            }
            let Some(chunk) = self.ready.front_mut() else {
                continue;
            };
            let registered = crate::wire::blob::register(&chunk.body);
            let batch = chunk.remaining.min(REFILL_EVERY);
            self.decoded.extend((0..batch).map_while(|_| chunk.next(self.task)));
            drop(registered);
            if chunk.remaining == 0 {
                // Its room in the window is free: fill it now, so the workers are
                // busy while the consumer works through what is ready.
                self.ready.pop_front();
                self.yielded = 0;
                self.refill(cx);
            }
        }
    }

    /// Takes in finished chunks and sends new ones while the window has room.
    fn refill(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(Some(done)) = self.done.poll_recv(cx) {
            self.accept(done);
        }
        // Channel handles among the inputs stay open while the map lives.
        let ((), holds) = transit::collect(|| self.fill(cx));
        self.holds.extend(holds);
    }

    /// Moves every output of the chunks ready, in order, to `outputs`; stops at the
    /// first error (which is consumed and returned).
    fn drain_ready(&mut self, outputs: &mut Vec<O>) -> Result<()> {
        while let Some(result) = self.decoded.pop_front() {
            outputs.push(result?);
        }
        while let Some(chunk) = self.ready.front_mut() {
            let _registered = crate::wire::blob::register(&chunk.body);
            while let Some(result) = chunk.next(self.task) {
                outputs.push(result?);
            }
            self.ready.pop_front();
        }
        Ok(())
    }

    /// Stops the map: nothing more is read, sent or yielded.
    fn finish_early(&mut self) {
        self.finished = true;
        self.source = None;
        self.carry = None;
        self.ready.clear();
        self.decoded.clear();
        self.reorder.clear();
        self.cancel();
    }

    /// Withdraws queued chunks and hands running ones to the cancel policy.
    fn cancel(&mut self) {
        if !self.cancelled.swap(true, Ordering::AcqRel) && !self.pieces.is_empty() {
            self.shared.queue.wake_all();
        }
    }

    fn accept(&mut self, done: ChunkDone) {
        let Some(piece) = self.pieces.remove(&done.piece) else {
            return;
        };
        let seq = piece.seq;
        let parts = match done.completion {
            Completion::Done(delivery) => {
                self.learn(piece.items, &delivery);
                vec![Part::Done(Chunk::of(piece.items, delivery))]
            }
            Completion::Failed(error) => vec![Part::Done(Chunk::failed(piece.items, error))],
            Completion::Broken { done, error, unstarted } => self.mend(piece, done, error, unstarted),
        };
        if self.progress.watched() {
            let (mut done, mut failed) = (0, 0);
            for part in &parts {
                if let Part::Done(chunk) = part {
                    done += u64::from(chunk.remaining);
                    failed += match chunk.error {
                        Some(_) => u64::from(chunk.remaining),
                        None => u64::from(crate::wire::protocol::error_records(&chunk.body[chunk.offset..])),
                    };
                }
            }
            self.progress.add(done, failed, 0);
        }
        if !self.ordered {
            for part in parts {
                if let Part::Done(chunk) = part {
                    self.ready.push_back(chunk);
                }
            }
            return;
        }
        let Some(slot) = self.slot(seq) else {
            return;
        };
        if let Some(at) = slot.iter().position(|part| matches!(part, Part::Pending(p) if *p == done.piece)) {
            slot.splice(at..=at, parts);
        }
        self.advance();
    }

    /// A worker died in `piece`: its first items are `done`, the next one failed
    /// with `error`, and `unstarted` more never ran. Sends what must run again and
    /// returns the parts that now stand for the piece, in input order.
    fn mend(&mut self, piece: Piece, done: Delivery, error: Error, unstarted: u32) -> Vec<Part> {
        let ran = piece.items - unstarted - 1;
        let mut parts = Vec::with_capacity(3);
        if ran > 0 {
            parts.push(Part::Done(Chunk::of(ran, done)));
        }
        let failures = piece.failures + 1;
        let retry = failures <= self.options.retries && !matches!(error, Error::Protocol(_));
        let resend = |this: &mut Self, from: u32, items: u32, failures: u32| {
            let Some(inputs) = inputs_of(&piece.frame, from, items) else {
                return Part::Done(Chunk::failed(items, error.clone()));
            };
            match this.send_inputs(piece.seq, inputs, items, failures) {
                Ok(id) => Part::Pending(id),
                Err(refused) => Part::Done(Chunk::failed(items, refused)),
            }
        };
        if retry {
            Counters::add(&self.shared.counters.retried, 1);
            self.progress.add(0, 0, 1);
            parts.push(resend(self, ran, 1, failures));
        } else {
            Counters::add(&self.shared.counters.failed, 1);
            parts.push(Part::Done(Chunk::failed(1, error.clone())));
        }
        if unstarted > 0 {
            // They never ran: sent again as they were, not as a retry.
            parts.push(resend(self, ran + 1, unstarted, 0));
        }
        parts
    }

    /// Learns the task's time and output size per item from a finished chunk.
    fn learn(&mut self, items: u32, delivery: &Delivery) {
        let items = u64::from(items.max(1));
        let per_item = delivery.busy_ns / items;
        self.item_ns = Some(match self.item_ns {
            None => per_item,
            Some(average) => average.saturating_mul(3).saturating_add(per_item) / 4,
        });
        // Outputs can grow suddenly: follow increases at once, decreases slowly.
        let output = delivery.body.len() as u64 / items;
        self.output_bytes = output.max(self.output_bytes - self.output_bytes / 8);
        if let Ok(index) = self.task_index {
            let learned = Learned { item_ns: self.item_ns, output_bytes: self.output_bytes };
            self.shared.tasks.learn(index, learned);
        }
    }

    /// Files a chunk that finished before it was sent.
    fn finish(&mut self, seq: u64, chunk: Chunk) {
        if !self.ordered {
            self.ready.push_back(chunk);
            return;
        }
        if let Some(slot) = self.slot(seq) {
            *slot = vec![Part::Done(chunk)];
        }
        self.advance();
    }

    /// The parts of chunk `seq` in an ordered map, while it is not yet yielded.
    fn slot(&mut self, seq: u64) -> Option<&mut Vec<Part>> {
        let at = usize::try_from(seq.checked_sub(self.base_seq)?).ok()?;
        self.reorder.get_mut(at)
    }

    /// Moves finished chunks at the head of the order to `ready`.
    fn advance(&mut self) {
        while let Some(slot) = self.reorder.front() {
            // An empty slot is a chunk being sent right now.
            if slot.is_empty() || slot.iter().any(|part| matches!(part, Part::Pending(_))) {
                return;
            }
            if let Some(slot) = self.reorder.pop_front() {
                self.ready.extend(slot.into_iter().filter_map(|part| match part {
                    Part::Done(chunk) => Some(chunk),
                    Part::Pending(_) => None,
                }));
            }
            self.base_seq += 1;
        }
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.ordered {
            self.reorder.push_back(Vec::new());
        }
        seq
    }

    /// Whether another chunk may be sent: chunks in flight and chunks finished but
    /// not yet yielded share one window, so a slow consumer holds memory flat.
    fn has_room(&self) -> bool {
        // Until a chunk has told the task's time, one single-input chunk per worker:
        // enough to start them all when tasks are long, and no more one-input frames
        // than that when they are tiny (the next chunks are sized from the first).
        let window =
            if self.item_ns.is_none() { self.window.min(self.shared.processes) } else { self.window };
        let waiting = if self.ordered { self.reorder.len() } else { self.pieces.len() };
        self.pieces.len() < window && waiting + self.ready.len() < 2 * self.window
    }

    /// How many items the next chunk should hold.
    fn chunk_target(&self) -> u64 {
        if self.options.timeout.is_some() {
            // A time limit applies to each input, so each input is its own call.
            return 1;
        }
        let Some(item_ns) = self.item_ns else {
            return 1;
        };
        let item_ns = item_ns.max(1);
        // Behind a slow link (workers elsewhere), a chunk carries at least as much
        // work as the slowest link's latency, which it otherwise spends idle.
        let target = match self.remote {
            true => self.shared.counters.link_ns.iter().map(|ns| ns.load(Ordering::Relaxed)).max(),
            false => None,
        };
        let target = target.unwrap_or(0).clamp(TARGET_CHUNK_NS, MAX_TARGET_CHUNK_NS);
        let by_time = (target / item_ns).clamp(1, MAX_CHUNK_ITEMS);
        // Keep the reply well inside the frame limit.
        let output_budget = MAX_CHUNK_BYTES.min(self.shared.max_frame_len() / 4) as u64;
        let by_time = by_time.min((output_budget / self.output_bytes.max(1)).max(1));
        // A worker's budget of inputs holds at least one chunk.
        let by_time = by_time.min(self.shared.limits.max_tasks_per_worker.unwrap_or(u64::MAX));
        // Leave enough chunks for every worker until the end, but not chunks so small
        // that their frames cost more than their work.
        let remaining = self.source.as_ref().map_or(0, |source| source.remaining()) as u64;
        if remaining == 0 {
            return by_time;
        }
        let spread = remaining / (2 * self.shared.processes as u64);
        by_time.min(spread.max(MIN_CHUNK_NS / item_ns).max(1))
    }

    /// Builds and sends chunks while there is room and input.
    fn fill(&mut self, cx: &mut Context<'_>) {
        let Ok(task_index) = self.task_index else {
            return;
        };
        let limit = self.shared.max_frame_len();
        while self.has_room() && (self.source.is_some() || self.carry.is_some()) {
            let target = self.chunk_target();
            let mut chunk = ChunkBuilder::new(&self.shared, task_index, self.last_frame_len);
            let mut source_pending = false;
            if let Some(carried) = self.carry.take() {
                chunk.buf.extend_from_slice(&carried);
                chunk.items += 1;
            }
            while chunk.items < target && chunk.body_len() < MAX_CHUNK_BYTES {
                let Some(source) = self.source.as_mut() else {
                    break;
                };
                let item_start = chunk.buf.len();
                let record = protocol::begin_record(&mut chunk.buf);
                match source.poll_encode(cx, &mut chunk.buf) {
                    Poll::Ready(Some(Ok(()))) => {
                        protocol::end_record(&mut chunk.buf, record);
                        if chunk.frame_len() > limit && chunk.items > 0 {
                            // Send what fits; this input opens the next chunk. (Alone and
                            // still too large, it fails on its own when sent.)
                            self.carry = Some(chunk.buf.split_off(item_start));
                            break;
                        }
                        chunk.items += 1;
                        if chunk.frame_len() > limit {
                            break;
                        }
                    }
                    Poll::Ready(Some(Err(err))) => {
                        chunk.buf.truncate(item_start);
                        self.send(chunk);
                        let error = Error::codec(self.task, Direction::Input, "encode", err);
                        let seq = self.next_seq();
                        self.finish(seq, Chunk::failed(1, error));
                        chunk = ChunkBuilder::new(&self.shared, task_index, 256);
                        break;
                    }
                    Poll::Ready(None) => {
                        chunk.buf.truncate(item_start);
                        self.source = None;
                    }
                    Poll::Pending => {
                        chunk.buf.truncate(item_start);
                        source_pending = true;
                        break;
                    }
                }
            }
            self.send(chunk);
            if source_pending {
                return;
            }
        }
    }

    /// Sends a chunk (a no-op for an empty one).
    fn send(&mut self, mut chunk: ChunkBuilder) {
        let items = chunk.items as u32;
        if items == 0 {
            return;
        }
        self.last_frame_len = chunk.buf.len();
        chunk.buf[chunk.count_at..chunk.count_at + Count::WIDTH].copy_from_slice(&Count::new(items).0);
        let seq = self.next_seq();
        let limit = self.shared.max_frame_len();
        if let Err(size) = protocol::end_frame(&mut chunk.buf, chunk.start, limit) {
            // Only a lone input can be too large: bigger chunks were split.
            let error = Error::FrameTooLarge {
                task: self.task.into(),
                direction: Direction::Input,
                size: size as u64,
                limit: limit as u64,
            };
            self.finish(seq, Chunk::failed(items, error));
            return;
        }
        match self.submit(seq, chunk.id, chunk.buf.freeze(), items, 0, false) {
            Ok(piece) => {
                if let Some(slot) = self.slot(seq) {
                    slot.push(Part::Pending(piece));
                }
            }
            Err(error) => {
                // The executor is shutting down: fail this chunk, read no further.
                self.source = None;
                self.carry = None;
                self.finish(seq, Chunk::failed(items, error));
            }
        }
    }

    /// Sends `items` encoded inputs (records) again, as a new call belonging to chunk
    /// `seq`; returns its piece number.
    fn send_inputs(&mut self, seq: u64, inputs: &[u8], items: u32, failures: u32) -> Result<u64> {
        let task_index = self.task_index.clone()?;
        let mut buf = BytesMut::with_capacity(inputs.len() + 32);
        let (id, start, _) = self.shared.call_frame(task_index, items, false, &mut buf);
        buf.extend_from_slice(inputs);
        // The inputs fitted a frame before, with no larger header.
        let _ = protocol::end_frame(&mut buf, start, usize::MAX);
        self.submit(seq, id, buf.freeze(), items, failures, true)
    }

    fn submit(
        &mut self,
        seq: u64,
        id: u64,
        frame: Bytes,
        items: u32,
        failures: u32,
        resent: bool,
    ) -> Result<u64> {
        let piece = self.next_piece;
        self.next_piece += 1;
        let reply = ReplyTo::Chunk { piece, sink: self.sink.clone(), cancelled: self.cancelled.clone() };
        let mut job = Job::new(id, self.task, items, frame.clone(), reply, self.options);
        job.failures = failures;
        job.task_index = self.task_index.as_ref().ok().copied();
        job.expected_ns = self.item_ns.map(|ns| ns.saturating_mul(u64::from(items)));
        // Once an input carried channel handles, every chunk of the map may talk.
        self.talks |= transit::collecting_any();
        job.talking = self.talks;
        // Inputs sent again replace work accepted before: they go in even while the
        // executor drains for `shutdown`.
        let queued = if resent { self.shared.queue.push_accepted(job) } else { self.shared.submit(job) };
        queued.map_err(|_| self.shared.refused())?;
        self.pieces.insert(piece, Piece { seq, frame, items, failures });
        Ok(piece)
    }
}

/// The records of inputs `from .. from + items` of a call frame, as one slice.
fn inputs_of(frame: &[u8], from: u32, items: u32) -> Option<&[u8]> {
    let (_, mut body) = protocol::split_header::<Request>(frame.get(protocol::LENGTH_PREFIX..)?).ok()?;
    for _ in 0..from {
        protocol::take_record(&mut body)?;
    }
    let start = body;
    for _ in 0..items {
        protocol::take_record(&mut body)?;
    }
    Some(&start[..start.len() - body.len()])
}

impl<O> Drop for MapCore<'_, O> {
    fn drop(&mut self) {
        if !self.cancelled.swap(true, Ordering::AcqRel) && !self.pieces.is_empty() {
            self.shared.queue.wake_all();
        }
    }
}

/// A chunk frame being filled.
struct ChunkBuilder {
    id: u64,
    buf: BytesMut,
    start: usize,
    count_at: usize,
    body_start: usize,
    items: u64,
}

impl ChunkBuilder {
    fn new(shared: &Shared, task_index: u32, capacity: usize) -> Self {
        // Sized like the last chunk: growing a large frame by doubling copies it
        // over and over.
        let mut buf = BytesMut::with_capacity(capacity.clamp(256, 2 * MAX_CHUNK_BYTES + 4096));
        let (id, start, count_at) = shared.call_frame(task_index, 0, false, &mut buf);
        let body_start = buf.len();
        ChunkBuilder { id, buf, start, count_at, body_start, items: 0 }
    }

    fn body_len(&self) -> usize {
        self.buf.len() - self.body_start
    }

    fn frame_len(&self) -> usize {
        self.buf.len() - self.start - protocol::LENGTH_PREFIX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_cut_out_of_a_call_frame_by_their_records() {
        let mut buf = BytesMut::new();
        let start = protocol::begin_frame(&mut buf);
        protocol::encode_into(
            &mut buf,
            &Request::Call { id: 1, task: 0, capture: false, items: Count::new(3) },
        )
        .unwrap();
        for input in ["a", "bb", "ccc"] {
            let record = protocol::begin_record(&mut buf);
            protocol::encode_into(&mut buf, input).unwrap();
            protocol::end_record(&mut buf, record);
        }
        protocol::end_frame(&mut buf, start, usize::MAX).unwrap();
        let mut rest = inputs_of(&buf, 1, 2).unwrap();
        let decoded: Vec<String> = std::iter::from_fn(|| protocol::take_record(&mut rest))
            .map(|record| postcard::from_bytes(record).unwrap())
            .collect();
        assert_eq!(decoded, ["bb", "ccc"]);
        assert!(inputs_of(&buf, 2, 2).is_none(), "there are only three");
    }
}
