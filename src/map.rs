//! `map` and friends: many inputs through one task, in chunks, with a bounded window.
//!
//! A map pulls inputs lazily from its source and encodes them straight into chunk
//! frames. A chunk's size comes from measured task time (aiming at about a
//! millisecond of work per chunk, like joblib's auto batching), so tiny tasks cost a
//! fraction of a frame each while long tasks still spread one per worker. At most
//! `window` chunks are in flight, so memory stays flat however long the input is.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::dispatch::{ChunkDone, Job, ReplyTo};
use crate::error::{Direction, Error, Result};
use crate::executor::{Shared, decode_outcome};
use crate::protocol::{self, Count};
use crate::task::Task;

/// Work per chunk the sizing aims at.
const TARGET_CHUNK_NS: u64 = 1_000_000;
/// Most items in one chunk.
const MAX_CHUNK_ITEMS: u64 = 1 << 16;
/// A chunk stops growing once its inputs take this many bytes.
const MAX_CHUNK_BYTES: usize = 256 * 1024;

/// The future of [`Executor::map`](crate::Executor::map): all outputs, in input order.
///
/// Resolves to the first error if any item fails, and then stops.
///
/// # Cancel safety
///
/// Dropping it withdraws the chunks no worker has received yet; chunks already sent
/// run to completion and their outputs are discarded.
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
}

// The outputs are never pinned: they sit in a `Vec` until handed out by value.
impl<O> Unpin for Map<'_, O> {}

impl<O: DeserializeOwned> Future for Map<'_, O> {
    type Output = Result<Vec<O>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Vec<O>>> {
        let this = self.get_mut();
        loop {
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
/// Dropping it withdraws the chunks no worker has received yet; chunks already sent
/// run to completion and their outputs are discarded.
#[must_use = "streams do nothing unless polled"]
pub struct MapStream<'a, O> {
    core: MapCore<'a, O>,
}

impl<'a, O: DeserializeOwned> MapStream<'a, O> {
    pub(crate) fn new<I, S>(shared: Arc<Shared>, task: Task<I, O>, items: S) -> Self
    where
        I: Serialize + 'a,
        S: Stream<Item = I> + Send + 'a,
    {
        MapStream { core: MapCore::new(shared, task, items, true) }
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
/// Dropping it withdraws the chunks no worker has received yet; chunks already sent
/// run to completion and their outputs are discarded.
#[must_use = "streams do nothing unless polled"]
pub struct MapUnordered<'a, O> {
    core: MapCore<'a, O>,
}

impl<'a, O: DeserializeOwned> MapUnordered<'a, O> {
    pub(crate) fn new<I, S>(shared: Arc<Shared>, task: Task<I, O>, items: S) -> Self
    where
        I: Serialize + 'a,
        S: Stream<Item = I> + Send + 'a,
    {
        MapUnordered { core: MapCore::new(shared, task, items, false) }
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
    /// Appends the next input's encoding to `buf`.
    fn poll_encode(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut)
    -> Poll<Option<postcard::Result<()>>>;
    /// Inputs known to remain (a lower bound).
    fn remaining(&self) -> usize;
}

struct StreamSource<S>(Pin<Box<S>>);

impl<S> Source for StreamSource<S>
where
    S: Stream + Send,
    S::Item: Serialize,
{
    fn poll_encode(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<Option<postcard::Result<()>>> {
        self.0.as_mut().poll_next(cx).map(|item| item.map(|item| protocol::encode_into(buf, &item)))
    }

    fn remaining(&self) -> usize {
        self.0.size_hint().0
    }
}

/// The outputs of one chunk, decoded one by one as they are yielded.
struct Chunk {
    remaining: u32,
    body: Bytes,
    offset: usize,
    /// The whole chunk failed: every item yields this.
    error: Option<Error>,
}

impl Chunk {
    fn failed(items: u32, error: Error) -> Self {
        Chunk { remaining: items, body: Bytes::new(), offset: 0, error: Some(error) }
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
        let result = decode_outcome(task, &mut rest);
        self.offset = self.body.len() - rest.len();
        if let Err(err @ Error::Codec { direction: Direction::Output, .. }) = &result {
            // Outputs are not self-delimiting: past an undecodable one, none can be found.
            self.error = Some(err.clone());
        }
        Some(result)
    }
}

/// The engine behind both map streams.
struct MapCore<'a, O> {
    shared: Arc<Shared>,
    task: &'static str,
    /// The task's number, or why the map cannot run at all.
    task_index: Result<u32>,
    ordered: bool,
    source: Option<Box<dyn Source + 'a>>,
    /// An encoded input that did not fit the previous chunk.
    carry: Option<BytesMut>,
    sink: mpsc::UnboundedSender<ChunkDone>,
    done: mpsc::UnboundedReceiver<ChunkDone>,
    next_seq: u64,
    /// Chunks sent and not yet answered.
    outstanding: usize,
    window: usize,
    /// Ordered mode: chunks from `base_seq` on, `None` until answered.
    reorder: VecDeque<Option<Chunk>>,
    base_seq: u64,
    /// Chunks ready to yield, in yield order.
    ready: VecDeque<Chunk>,
    /// Moving average of the worker's time per item.
    item_ns: Option<u64>,
    _output: PhantomData<fn() -> O>,
}

impl<'a, O: DeserializeOwned> MapCore<'a, O> {
    fn new<I, S>(shared: Arc<Shared>, task: Task<I, O>, items: S, ordered: bool) -> Self
    where
        I: Serialize + 'a,
        S: Stream<Item = I> + Send + 'a,
    {
        let (sink, done) = mpsc::unbounded_channel();
        let window = (3 * shared.processes).max(4);
        MapCore {
            task_index: shared.tasks.resolve(&task),
            shared,
            task: task.name(),
            ordered,
            source: Some(Box::new(StreamSource(Box::pin(items)))),
            carry: None,
            sink,
            done,
            next_seq: 0,
            outstanding: 0,
            window,
            reorder: VecDeque::new(),
            base_seq: 0,
            ready: VecDeque::new(),
            item_ns: None,
            _output: PhantomData,
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<O>>> {
        if let Err(err) = &self.task_index {
            // The map cannot run: say why once, then end.
            let err = err.clone();
            self.task_index = Err(Error::Shutdown);
            self.source = None;
            return match err {
                Error::Shutdown => Poll::Ready(None),
                err => Poll::Ready(Some(Err(err))),
            };
        }
        loop {
            while let Some(chunk) = self.ready.front_mut() {
                match chunk.next(self.task) {
                    Some(item) => return Poll::Ready(Some(item)),
                    None => {
                        self.ready.pop_front();
                    }
                }
            }
            while let Poll::Ready(Some(done)) = self.done.poll_recv(cx) {
                self.accept(done);
            }
            if !self.ready.is_empty() {
                continue;
            }
            self.fill(cx);
            if !self.ready.is_empty() {
                continue;
            }
            if self.source.is_none()
                && self.carry.is_none()
                && self.outstanding == 0
                && self.reorder.is_empty()
            {
                return Poll::Ready(None);
            }
            return Poll::Pending;
        }
    }

    fn accept(&mut self, done: ChunkDone) {
        self.outstanding -= 1;
        let chunk = match done.completion {
            Ok(delivery) => {
                let per_item = delivery.busy_ns / u64::from(done.items.max(1));
                self.item_ns = Some(match self.item_ns {
                    None => per_item,
                    Some(average) => (average * 3 + per_item) / 4,
                });
                Chunk { remaining: done.items, body: delivery.body, offset: 0, error: None }
            }
            Err(err) => Chunk::failed(done.items, err),
        };
        self.finish(done.seq, chunk);
    }

    /// Files a finished chunk under its sequence number.
    fn finish(&mut self, seq: u64, chunk: Chunk) {
        if !self.ordered {
            self.ready.push_back(chunk);
            return;
        }
        if let Some(slot) = self.reorder.get_mut((seq - self.base_seq) as usize) {
            *slot = Some(chunk);
        }
        while let Some(Some(_)) = self.reorder.front() {
            if let Some(Some(chunk)) = self.reorder.pop_front() {
                self.ready.push_back(chunk);
            }
            self.base_seq += 1;
        }
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.ordered {
            self.reorder.push_back(None);
        }
        seq
    }

    /// Whether another chunk may be sent.
    fn has_room(&self) -> bool {
        // In order, completed chunks wait behind a slow head; bound them too.
        self.outstanding < self.window && (!self.ordered || self.reorder.len() < 4 * self.window)
    }

    /// How many items the next chunk should hold.
    fn chunk_target(&self) -> u64 {
        let by_time = match self.item_ns {
            None => 1,
            Some(ns) => (TARGET_CHUNK_NS / ns.max(1)).clamp(1, MAX_CHUNK_ITEMS),
        };
        // Leave enough chunks for every worker until the end.
        let remaining = self.source.as_ref().map_or(0, |source| source.remaining()) as u64;
        if remaining == 0 {
            return by_time;
        }
        by_time.min((remaining / (2 * self.shared.processes as u64)).max(1))
    }

    /// Builds and sends chunks while there is room and input.
    fn fill(&mut self, cx: &mut Context<'_>) {
        let Ok(task_index) = self.task_index else {
            return;
        };
        let limit = self.shared.max_frame_len();
        while self.has_room() && (self.source.is_some() || self.carry.is_some()) {
            let target = self.chunk_target();
            let mut buf = BytesMut::with_capacity(256);
            let (id, start, count_at) = self.shared.call_frame(task_index, 0, &mut buf);
            let body_start = buf.len();
            let mut items: u64 = 0;
            let mut source_pending = false;
            if let Some(carried) = self.carry.take() {
                buf.extend_from_slice(&carried);
                items = 1;
            }
            while items < target && buf.len() - body_start < MAX_CHUNK_BYTES {
                let Some(source) = self.source.as_mut() else {
                    break;
                };
                let item_start = buf.len();
                match source.poll_encode(cx, &mut buf) {
                    Poll::Ready(Some(Ok(()))) => {
                        if buf.len() - start - protocol::LENGTH_PREFIX > limit {
                            if items > 0 {
                                // Send what fits; this input opens the next chunk.
                                self.carry = Some(buf.split_off(item_start));
                            } else {
                                // Alone and still too large: it fails on its own.
                                items = 1;
                            }
                            break;
                        }
                        items += 1;
                    }
                    Poll::Ready(Some(Err(err))) => {
                        buf.truncate(item_start);
                        self.send(id, items, buf, start, count_at);
                        let error = Error::codec(self.task, Direction::Input, "encode", err);
                        let seq = self.next_seq();
                        self.finish(seq, Chunk::failed(1, error));
                        items = 0;
                        buf = BytesMut::new();
                        break;
                    }
                    Poll::Ready(None) => self.source = None,
                    Poll::Pending => {
                        source_pending = true;
                        break;
                    }
                }
            }
            self.send(id, items, buf, start, count_at);
            if source_pending {
                return;
            }
        }
    }

    /// Sends a chunk of `items` inputs (a no-op for none).
    fn send(&mut self, id: u64, items: u64, mut buf: BytesMut, start: usize, count_at: usize) {
        if items == 0 {
            return;
        }
        let items = items as u32;
        buf[count_at..count_at + Count::WIDTH].copy_from_slice(&Count::new(items).0);
        let seq = self.next_seq();
        let limit = self.shared.max_frame_len();
        if let Err(size) = protocol::end_frame(&mut buf, start, limit) {
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
        let job = Job {
            id,
            task: self.task,
            items,
            frame: buf.freeze(),
            reply: ReplyTo::Chunk { seq, sink: self.sink.clone() },
        };
        match self.shared.submit(job) {
            Ok(()) => self.outstanding += 1,
            Err(_) => {
                // The executor is shutting down: fail this chunk, read no further.
                self.source = None;
                self.carry = None;
                let error = self.shared.refused();
                self.finish(seq, Chunk::failed(items, error));
            }
        }
    }
}
