//! The parent's side of every channel. The parent brokers them all: a channel's
//! items live here, and workers reach them through their link (a [`Port`] each),
//! which also works for a worker on another host, where no descriptor or shared
//! memory can reach.
//!
//! A worker's puts need no round trip: it holds credit for `window` items per
//! channel, and gets each back once its item is inside the channel's capacity. So
//! the parent holds at most `capacity` items, plus `window` per producing worker.
//! A worker's get is a request, answered with one or more items (what is there, up
//! to what it asked) or with the news that the channel is closed and empty.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use futures::task::AtomicWaker;

use crate::wire::protocol::{self, Ended, Request, Role, ToWorker};

/// How many bytes of items one answer to a worker's get carries at most (at least
/// one item, whatever its size).
const BATCH_BYTES: usize = 256 * 1024;
/// What each item adds to a frame of items besides itself: its record's length,
/// delivery number and attempts.
const RECORD_OVERHEAD: usize = protocol::RECORD_PREFIX + 12;
/// Items from this size on share the frame they came in rather than being copied.
const SHARE_ABOVE: usize = 4096;
/// Items from this size on go to a worker from their own buffer, not copied into
/// the frame of their batch.
const SEND_UNCOPIED: usize = 16 * 1024;
/// Smaller items share frames up to this size (a worker's batches of puts).
const SHARE_FRAMES_UP_TO: usize = 1 << 20;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; should it, the state is still whole.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What kind of channel a broker serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A [`Queue`](crate::Queue): open until closed.
    Queue,
    /// A [`JoinableQueue`](crate::JoinableQueue): items handed out stay owned
    /// until acknowledged, and go back if their holder dies.
    Acked,
    /// A [`channel`](crate::Executor::channel): ends when every sender or the
    /// receiver is gone.
    Ends,
}

/// Every channel of one executor, by id.
pub(crate) struct Hub {
    pub(crate) executor: u64,
    pub(crate) max_item: usize,
    next_channel: AtomicU64,
    next_port: AtomicU64,
    channels: Mutex<HubState>,
}

#[derive(Default)]
struct HubState {
    channels: HashMap<u64, Weak<Broker>>,
    /// Set at shutdown: every channel, old or new, is closed for this reason.
    ended: Option<Ended>,
}

/// The hubs of this process's executors, so a handle decoded in the parent (a task
/// gave one back) finds its channel.
static HUBS: Mutex<Vec<Weak<Hub>>> = Mutex::new(Vec::new());

impl Hub {
    pub(crate) fn new(executor: u64, max_frame_len: usize) -> Arc<Hub> {
        let hub = Arc::new(Hub {
            executor,
            max_item: max_frame_len.saturating_sub(protocol::ITEM_OVERHEAD),
            next_channel: AtomicU64::new(1),
            next_port: AtomicU64::new(1),
            channels: Mutex::new(HubState::default()),
        });
        let mut hubs = lock(&HUBS);
        hubs.retain(|hub| hub.strong_count() > 0);
        hubs.push(Arc::downgrade(&hub));
        hub
    }

    /// The hub of `executor`, if it is alive in this process.
    pub(crate) fn of_executor(executor: u64) -> Option<Arc<Hub>> {
        lock(&HUBS).iter().filter_map(Weak::upgrade).find(|hub| hub.executor == executor)
    }

    /// A new channel.
    pub(crate) fn open(self: &Arc<Self>, kind: Kind, capacity: usize) -> Arc<Broker> {
        let capacity = capacity.max(1);
        let id = self.next_channel.fetch_add(1, Ordering::Relaxed);
        let broker = Arc::new(Broker {
            id,
            kind,
            capacity,
            window: capacity.min(MAX_WINDOW) as u32,
            max_item: self.max_item,
            executor: self.executor,
            state: Mutex::new(State::default()),
        });
        let mut hub = lock(&self.channels);
        hub.channels.retain(|_, broker| broker.strong_count() > 0);
        hub.channels.insert(id, Arc::downgrade(&broker));
        if let Some(why) = hub.ended {
            broker.close(why);
        }
        broker
    }

    pub(crate) fn find(&self, channel: u64) -> Option<Arc<Broker>> {
        lock(&self.channels).channels.get(&channel).and_then(Weak::upgrade)
    }

    /// Closes every channel, now and to come: the executor shuts down.
    pub(crate) fn shut(&self) {
        let brokers: Vec<_> = {
            let mut hub = lock(&self.channels);
            hub.ended = Some(Ended::Shutdown);
            hub.channels.values().filter_map(Weak::upgrade).collect()
        };
        for broker in brokers {
            broker.close(Ended::Shutdown);
        }
    }

    /// A port for a new worker connection.
    pub(crate) fn port(&self, max_frame_len: usize) -> Arc<Port> {
        Arc::new(Port {
            id: self.next_port.fetch_add(1, Ordering::Relaxed),
            max_frame_len,
            out: Mutex::new(Outbox::default()),
            ready: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        })
    }
}

/// How many puts a worker may have in flight per channel.
const MAX_WINDOW: usize = 256;

/// A worker connection as channels see it: where their messages to it go.
pub(crate) struct Port {
    id: u64,
    max_frame_len: usize,
    out: Mutex<Outbox>,
    /// Set when `out` has something to write; the link's session is woken.
    ready: AtomicBool,
    waker: AtomicWaker,
}

#[derive(Default)]
struct Outbox {
    frames: VecDeque<Bytes>,
    /// Credit to return, per channel, sent together when the link next writes.
    credits: Vec<(u64, u32)>,
    /// The connection is gone: nothing more is sent.
    closed: bool,
}

impl Port {
    fn push(&self, frame: Bytes) {
        self.push_parts([frame]);
    }

    /// Queues one frame given in consecutive parts (they stay together: the
    /// writer takes every part queued before it writes any call frame).
    fn push_parts(&self, parts: impl IntoIterator<Item = Bytes>) {
        let mut out = lock(&self.out);
        if out.closed {
            return;
        }
        out.frames.extend(parts);
        drop(out);
        self.wake();
    }

    /// Tells the link something waits to be written.
    fn wake(&self) {
        self.ready.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn send(&self, message: ToWorker) {
        let mut frame = BytesMut::new();
        // Channel messages are small and always encode.
        if protocol::write_message(&mut frame, &Request::Channel(message), usize::MAX).is_ok() {
            self.push(frame.freeze());
        }
    }

    fn credit(&self, channel: u64, items: u32) {
        let mut out = lock(&self.out);
        if out.closed {
            return;
        }
        match out.credits.iter_mut().find(|(id, _)| *id == channel) {
            Some((_, owed)) => *owed += items,
            None => out.credits.push((channel, items)),
        }
        drop(out);
        self.wake();
    }

    /// Moves every frame waiting for this worker to `to`, credits first, and
    /// registers `cx` to be woken when more come.
    pub(crate) fn drain_into(&self, cx: &mut Context<'_>, to: &mut VecDeque<Bytes>) {
        // Every poll of the worker's session comes here: without channel traffic it
        // costs an atomic load, not a lock.
        self.waker.register(cx.waker());
        if !self.ready.swap(false, Ordering::Acquire) {
            return;
        }
        let mut out = lock(&self.out);
        for (channel, items) in std::mem::take(&mut out.credits) {
            let mut frame = BytesMut::new();
            let credit = Request::Channel(ToWorker::Credit { channel, items });
            if protocol::write_message(&mut frame, &credit, usize::MAX).is_ok() {
                to.push_back(frame.freeze());
            }
        }
        to.extend(out.frames.drain(..));
    }

    /// The connection is gone: frames for it are dropped from now on.
    pub(crate) fn close(&self) {
        let mut out = lock(&self.out);
        out.closed = true;
        out.frames.clear();
        out.credits.clear();
    }
}

/// One channel: its items and who waits on it.
pub(crate) struct Broker {
    pub(crate) id: u64,
    pub(crate) kind: Kind,
    pub(crate) capacity: usize,
    /// Credit a worker starts with, in items.
    pub(crate) window: u32,
    pub(crate) max_item: usize,
    pub(crate) executor: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    items: VecDeque<Item>,
    closed: Option<Ended>,
    /// Workers' gets waiting for an item, in order: an item put is handed to the
    /// first. They wait only while the channel is empty.
    getters: VecDeque<(Arc<Port>, u64)>,
    /// Parent gets waiting: woken when an item comes, they take it if it is
    /// still there (workers' gets go first, since a worker cannot look again).
    readers: Vec<Waker>,
    /// Parent puts waiting for room.
    putters: Vec<Waker>,
    next_delivery: u64,
    /// Acknowledged channels: items handed out and not yet acknowledged.
    unacked: HashMap<u64, Unacked>,
    /// Acknowledged channels: items put and not yet acknowledged.
    unfinished: u64,
    joiners: Vec<Waker>,
    /// Handles alive (in the parent, in calls on their way, in workers), by role.
    senders: usize,
    receivers: usize,
    /// Workers holding a handle, to be told when the channel closes.
    attached: Vec<(Weak<Port>, u64)>,
}

struct Item {
    bytes: Bytes,
    /// The worker that put it, while its credit is not yet returned: it is beyond
    /// the capacity.
    owed: Option<Arc<Port>>,
    /// Deliveries before this one that were not acknowledged.
    attempts: u32,
}

struct Unacked {
    item: Item,
    /// The port holding it; `None` for the parent.
    holder: Option<u64>,
}

/// An item taken from a channel.
#[derive(Debug)]
pub(crate) struct Taken {
    pub(crate) bytes: Bytes,
    /// Its delivery number, to acknowledge it by.
    pub(crate) delivery: u64,
    pub(crate) attempts: u32,
}

impl Broker {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Adds `item`, handing it to the first waiting getter if there is one.
    /// Returns whether the worker that put it (`from`) gets its credit back now:
    /// the item is not beyond the capacity.
    fn push(&self, state: &mut State, bytes: Bytes, from: Option<&Arc<Port>>) -> bool {
        let item = Item { bytes, owed: None, attempts: 0 };
        if self.kind == Kind::Acked {
            state.unfinished += 1;
        }
        let inside = state.items.len() < self.capacity;
        let Some(mut item) = self.hand_over(state, item) else {
            return true;
        };
        if !inside {
            item.owed = from.cloned();
        }
        state.items.push_back(item);
        inside
    }

    /// Gives `item` to the first worker waiting for one; gives it back if none is.
    fn hand_over(&self, state: &mut State, mut item: Item) -> Option<Item> {
        if let Some((port, request)) = state.getters.pop_front() {
            let taken = self.taken(state, item, Some(port.id));
            self.send_items(&port, request, &[taken]);
            return None;
        }
        item.owed = None;
        for waker in state.readers.drain(..) {
            waker.wake();
        }
        Some(item)
    }

    /// Records that `item` is handed to `holder` (a port, or the parent).
    fn taken(&self, state: &mut State, item: Item, holder: Option<u64>) -> Taken {
        state.next_delivery += 1;
        let delivery = state.next_delivery;
        let taken = Taken { bytes: item.bytes.clone(), delivery, attempts: item.attempts };
        if self.kind == Kind::Acked {
            state.unacked.insert(delivery, Unacked { item: Item { owed: None, ..item }, holder });
        }
        taken
    }

    /// Takes the item at the front.
    fn take_one(&self, state: &mut State, holder: Option<u64>) -> Option<Taken> {
        let item = state.items.pop_front()?;
        if let Some(port) = &item.owed {
            port.credit(self.id, 1);
        }
        let taken = self.taken(state, item, holder);
        self.repay(state, 1);
        for waker in state.putters.drain(..) {
            waker.wake();
        }
        Some(taken)
    }

    /// Takes up to `max` items from the front for `port`, as many as one frame to
    /// it carries: at least one (every item fits a frame alone), at most
    /// [`BATCH_BYTES`].
    fn take(&self, state: &mut State, max: u32, port: &Port) -> Vec<Taken> {
        let budget = BATCH_BYTES.min(port.max_frame_len.saturating_sub(protocol::ITEM_OVERHEAD));
        let mut taken = Vec::new();
        let mut bytes = 0;
        while taken.len() < max.max(1) as usize {
            let Some(next) = state.items.front() else { break };
            // Each record adds its length, delivery number and attempts.
            let size = next.bytes.len() + RECORD_OVERHEAD;
            if !taken.is_empty() && bytes + size > budget {
                break;
            }
            bytes += size;
            let Some(item) = state.items.pop_front() else { break };
            if let Some(port) = &item.owed {
                // Was beyond the capacity: its credit is due now.
                port.credit(self.id, 1);
            }
            taken.push(self.taken(state, item, Some(port.id)));
        }
        if !taken.is_empty() {
            self.repay(state, taken.len());
            for waker in state.putters.drain(..) {
                waker.wake();
            }
        }
        taken
    }

    /// `removed` items left the front: those now inside the capacity get their
    /// producers' credit back.
    fn repay(&self, state: &mut State, removed: usize) {
        let end = self.capacity.min(state.items.len());
        for item in state.items.range_mut(self.capacity.saturating_sub(removed).min(end)..end) {
            if let Some(port) = item.owed.take() {
                port.credit(self.id, 1);
            }
        }
    }

    /// Sends `items` to `port` as the answer to `request`: one frame, whose large
    /// items are not copied into it but follow as parts of their own.
    fn send_items(&self, port: &Port, request: u64, items: &[Taken]) {
        let mut head = BytesMut::new();
        let header = ToWorker::Items { channel: self.id, request, count: items.len() as u32 };
        head.extend_from_slice(&[0; protocol::LENGTH_PREFIX]);
        if protocol::encode_into(&mut head, &Request::Channel(header)).is_err() {
            return;
        }
        let records: usize = items.iter().map(|item| RECORD_OVERHEAD + item.bytes.len()).sum();
        // Items are checked against the limit when put, and batches are cut to it.
        let Ok(len) = u32::try_from(head.len() - protocol::LENGTH_PREFIX + records) else { return };
        head[..protocol::LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
        let mut parts = Vec::new();
        for item in items {
            let record_len = (item.bytes.len() + 12) as u32;
            head.extend_from_slice(&record_len.to_le_bytes());
            head.extend_from_slice(&item.delivery.to_le_bytes());
            head.extend_from_slice(&item.attempts.to_le_bytes());
            if item.bytes.len() >= SEND_UNCOPIED {
                parts.push(head.split().freeze());
                parts.push(item.bytes.clone());
            } else {
                head.extend_from_slice(&item.bytes);
            }
        }
        if !head.is_empty() {
            parts.push(head.freeze());
        }
        port.push_parts(parts);
    }

    /// Puts back items handed out and not used, in front, in their order.
    fn put_back(&self, state: &mut State, items: Vec<Item>) {
        for mut item in items.into_iter().rev() {
            if state.closed.is_some() && self.kind == Kind::Ends && state.receivers == 0 {
                return;
            }
            item.owed = None;
            // A getter may be waiting (the items were out of the channel).
            if let Some(item) = self.hand_over(state, item) {
                state.items.push_front(item);
            }
        }
    }

    // --- The parent's operations. ---

    /// Puts `bytes` (taken from `item`) once there is room.
    pub(crate) fn poll_put(&self, cx: &mut Context<'_>, item: &mut Option<Bytes>) -> Poll<Result<(), Ended>> {
        let mut state = self.state();
        if let Some(why) = state.closed {
            return Poll::Ready(Err(why));
        }
        if state.items.len() >= self.capacity {
            if !state.putters.iter().any(|waker| waker.will_wake(cx.waker())) {
                state.putters.push(cx.waker().clone());
            }
            return Poll::Pending;
        }
        if let Some(bytes) = item.take() {
            let _ = self.push(&mut state, bytes, None);
        }
        Poll::Ready(Ok(()))
    }

    /// Puts `bytes` if there is room now; gives them back otherwise.
    pub(crate) fn try_put(&self, bytes: Bytes) -> Result<(), (Bytes, Option<Ended>)> {
        let mut state = self.state();
        if let Some(why) = state.closed {
            return Err((bytes, Some(why)));
        }
        if state.items.len() >= self.capacity {
            return Err((bytes, None));
        }
        let _ = self.push(&mut state, bytes, None);
        Ok(())
    }

    /// Takes an item, or registers to be woken when one comes. `Ok(None)` once
    /// the channel is closed and empty.
    pub(crate) fn poll_get(&self, cx: &mut Context<'_>) -> Poll<Result<Option<Taken>, Ended>> {
        let mut state = self.state();
        if let Some(taken) = self.take_one(&mut state, None) {
            return Poll::Ready(Ok(Some(taken)));
        }
        if let Some(why) = state.closed {
            return Poll::Ready(match why {
                Ended::Closed => Ok(None),
                why => Err(why),
            });
        }
        if !state.readers.iter().any(|waker| waker.will_wake(cx.waker())) {
            state.readers.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Takes an item if one is there now.
    pub(crate) fn try_get(&self) -> Result<Option<Taken>, Ended> {
        let mut state = self.state();
        if let Some(taken) = self.take_one(&mut state, None) {
            return Ok(Some(taken));
        }
        match state.closed {
            Some(why) => Err(why),
            None => Ok(None),
        }
    }

    /// The item of `delivery`, which the parent holds, is done with.
    pub(crate) fn ack(&self, delivery: u64) {
        self.ack_from(None, delivery)
    }

    /// The item of `delivery` is done with, says its holder (a port, or the parent);
    /// anyone else is ignored.
    fn ack_from(&self, holder: Option<u64>, delivery: u64) {
        let mut state = self.state();
        if Self::take_unacked(&mut state, holder, delivery).is_some() {
            state.unfinished = state.unfinished.saturating_sub(1);
            if state.unfinished == 0 {
                for waker in state.joiners.drain(..) {
                    waker.wake();
                }
            }
        }
    }

    /// The item of `delivery`, which the parent holds, was not done with: it goes
    /// back in front, for another get.
    pub(crate) fn requeue(&self, delivery: u64) {
        self.requeue_from(None, delivery)
    }

    fn requeue_from(&self, holder: Option<u64>, delivery: u64) {
        let mut state = self.state();
        if let Some(mut item) = Self::take_unacked(&mut state, holder, delivery) {
            item.attempts += 1;
            self.put_back(&mut state, vec![item]);
        }
    }

    /// The unacknowledged item of `delivery`, if `holder` holds it: only its
    /// holder acknowledges it or gives it back.
    fn take_unacked(state: &mut State, holder: Option<u64>, delivery: u64) -> Option<Item> {
        if state.unacked.get(&delivery)?.holder != holder {
            return None;
        }
        state.unacked.remove(&delivery).map(|unacked| unacked.item)
    }

    /// Ready once every item put was acknowledged.
    pub(crate) fn poll_join(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.state();
        if state.unfinished == 0 {
            return Poll::Ready(());
        }
        if !state.joiners.iter().any(|waker| waker.will_wake(cx.waker())) {
            state.joiners.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Closes the channel: puts fail from now on, gets drain what is left.
    pub(crate) fn close(&self, why: Ended) {
        let mut state = self.state();
        self.close_locked(&mut state, why);
    }

    fn close_locked(&self, state: &mut State, why: Ended) {
        if state.closed.is_some() {
            return;
        }
        state.closed = Some(why);
        if self.kind == Kind::Ends && state.receivers == 0 {
            // Nobody will ever read them.
            state.items.clear();
        }
        // Workers' gets wait only while the channel is empty.
        for (port, request) in state.getters.drain(..) {
            port.send(ToWorker::NoItems { channel: self.id, request, why });
        }
        for waker in state.putters.drain(..).chain(state.joiners.drain(..)).chain(state.readers.drain(..)) {
            waker.wake();
        }
        for (port, _) in &state.attached {
            if let Some(port) = port.upgrade() {
                port.send(ToWorker::Closed { channel: self.id, why });
            }
        }
    }

    /// One more handle in `role` exists (cloned, on its way in a call, or decoded
    /// by a worker).
    pub(crate) fn hold(&self, role: Role) {
        let mut state = self.state();
        match role {
            Role::Sender => state.senders += 1,
            Role::Receiver => state.receivers += 1,
            Role::Queue => {}
        }
    }

    /// A handle in `role` is gone. The last sender or the receiver of a channel's
    /// ends closes it.
    pub(crate) fn release(&self, role: Role) {
        let mut state = self.state();
        let left = match role {
            Role::Sender => {
                state.senders = state.senders.saturating_sub(1);
                state.senders
            }
            Role::Receiver => {
                state.receivers = state.receivers.saturating_sub(1);
                state.receivers
            }
            Role::Queue => return,
        };
        if left == 0 && self.kind == Kind::Ends {
            self.close_locked(&mut state, Ended::Closed);
        }
    }

    // --- A worker's operations, through its port. ---

    fn attach(&self, port: &Arc<Port>, role: Role) {
        self.hold(role);
        let mut state = self.state();
        match state.attached.iter_mut().find(|(p, _)| std::ptr::eq(p.as_ptr(), Arc::as_ptr(port))) {
            Some((_, refs)) => *refs += 1,
            None => state.attached.push((Arc::downgrade(port), 1)),
        }
        if let Some(why) = state.closed {
            port.send(ToWorker::Closed { channel: self.id, why });
        }
    }

    fn detach(&self, port: &Arc<Port>, role: Role) {
        {
            let mut state = self.state();
            if let Some(at) =
                state.attached.iter().position(|(p, _)| std::ptr::eq(p.as_ptr(), Arc::as_ptr(port)))
            {
                state.attached[at].1 -= 1;
                if state.attached[at].1 == 0 {
                    state.attached.swap_remove(at);
                }
            }
        }
        self.release(role);
    }

    fn worker_put(&self, port: &Arc<Port>, frame: &Bytes, count: u32) -> Result<(), String> {
        let mut records = &frame[..];
        let mut state = self.state();
        let mut credit = 0;
        for _ in 0..count {
            let record = protocol::take_record(&mut records).ok_or("a put holds fewer items than it says")?;
            if state.closed.is_some() {
                // It raced with the close; the worker is told, and its puts fail from then on.
                continue;
            }
            // Items share the frame, unless a small one would keep a large frame alive.
            let bytes = if record.len() >= SHARE_ABOVE || frame.len() <= SHARE_FRAMES_UP_TO {
                frame.slice_ref(record)
            } else {
                Bytes::copy_from_slice(record)
            };
            credit += u32::from(self.push(&mut state, bytes, Some(port)));
        }
        if credit > 0 {
            port.credit(self.id, credit);
        }
        Ok(())
    }

    fn worker_get(&self, port: &Arc<Port>, request: u64, max: u32, wait: bool) {
        let mut state = self.state();
        let taken = self.take(&mut state, max, port);
        if !taken.is_empty() || (!wait && state.closed.is_none()) {
            self.send_items(port, request, &taken);
        } else if let Some(why) = state.closed {
            port.send(ToWorker::NoItems { channel: self.id, request, why });
        } else {
            state.getters.push_back((port.clone(), request));
        }
    }

    fn worker_cancel(&self, port: &Port, request: u64) {
        self.state().getters.retain(|(p, r)| !(p.id == port.id && *r == request));
    }

    fn worker_unget(&self, port: &Port, frame: &Bytes, count: u32) -> Result<(), String> {
        let mut records = &frame[..];
        let mut state = self.state();
        // The count is the worker's word: no more room than the body can fill.
        let mut items = Vec::with_capacity((count as usize).min(frame.len() / protocol::RECORD_PREFIX));
        for _ in 0..count {
            let record =
                protocol::take_record(&mut records).ok_or("an unget holds fewer items than it says")?;
            let (delivery, bytes) =
                record.split_first_chunk::<8>().ok_or("an unget record without a delivery")?;
            let delivery = u64::from_le_bytes(*delivery);
            match self.kind {
                // Only what this worker holds.
                Kind::Acked => items.extend(Self::take_unacked(&mut state, Some(port.id), delivery)),
                _ => items.push(Item { bytes: Bytes::copy_from_slice(bytes), owed: None, attempts: 0 }),
            }
        }
        self.put_back(&mut state, items);
        Ok(())
    }

    /// A worker connection ended: it waits for nothing more, and what it held
    /// unacknowledged goes back.
    fn port_lost(&self, port: &Port) {
        let mut state = self.state();
        state.getters.retain(|(p, _)| p.id != port.id);
        let mut held: Vec<(u64, Item)> = Vec::new();
        state.unacked.retain(|&delivery, unacked| {
            if unacked.holder == Some(port.id) {
                let item = std::mem::replace(
                    &mut unacked.item,
                    Item { bytes: Bytes::new(), owed: None, attempts: 0 },
                );
                held.push((delivery, item));
                false
            } else {
                true
            }
        });
        held.sort_by_key(|(delivery, _)| *delivery);
        let items = held
            .into_iter()
            .map(|(_, mut item)| {
                item.attempts += 1;
                item
            })
            .collect();
        self.put_back(&mut state, items);
        state.attached.retain(|(p, _)| !std::ptr::eq(p.as_ptr(), port as *const Port));
    }
}

/// The channels one worker connection holds: routes what the worker says about
/// them, and lets go of them when the connection ends.
pub(crate) struct Attachments {
    hub: Arc<Hub>,
    pub(crate) port: Arc<Port>,
    /// Every channel the worker attached to, kept after it detached: late
    /// answers and items given back still come, and all of them are swept when
    /// the connection ends.
    held: HashMap<u64, Held>,
}

struct Held {
    broker: Arc<Broker>,
    /// Handles per role the worker holds.
    roles: Vec<Role>,
}

impl Attachments {
    pub(crate) fn new(hub: &Arc<Hub>, max_frame_len: usize) -> Self {
        Attachments { hub: hub.clone(), port: hub.port(max_frame_len), held: HashMap::new() }
    }

    /// Handles one channel message of the worker; an error is a protocol violation.
    /// `body` is what follows the header in the frame.
    pub(crate) fn route(&mut self, message: protocol::ToParent, body: &Bytes) -> Result<(), String> {
        use protocol::ToParent::*;
        let channel = match message {
            Attach { channel, role } => {
                let Some(broker) = self.hub.find(channel) else {
                    self.port.send(ToWorker::Closed { channel, why: Ended::Unknown });
                    return Ok(());
                };
                broker.attach(&self.port, role);
                let held = self.held.entry(channel).or_insert_with(|| Held { broker, roles: Vec::new() });
                held.roles.push(role);
                return Ok(());
            }
            Detach { channel, role } => {
                if let Some(held) = self.held.get_mut(&channel)
                    && let Some(at) = held.roles.iter().position(|r| *r == role)
                {
                    held.roles.swap_remove(at);
                    held.broker.detach(&self.port, role);
                    if held.roles.is_empty() {
                        // Nothing of it waits or is held here any more.
                        held.broker.port_lost(&self.port);
                    }
                }
                return Ok(());
            }
            Put { channel, .. }
            | Get { channel, .. }
            | Cancel { channel, .. }
            | Unget { channel, .. }
            | Ack { channel, .. }
            | Nack { channel, .. }
            | Close { channel } => channel,
        };
        let Some(held) = self.held.get(&channel) else {
            return Err(format!("{message:?} for channel {channel}, which it never held"));
        };
        let broker = &held.broker;
        let holding = !held.roles.is_empty();
        match message {
            // Only with a handle: what comes after the last one was dropped is
            // what the worker received meanwhile, or its acknowledgements.
            Put { .. } | Get { .. } | Close { .. } if !holding => {
                return Err(format!("{message:?} for channel {channel}, which it let go of"));
            }
            Put { count, .. } => broker.worker_put(&self.port, body, count.get())?,
            Get { request, max, wait, .. } => broker.worker_get(&self.port, request, max, wait),
            Cancel { request, .. } => broker.worker_cancel(&self.port, request),
            Unget { count, .. } => broker.worker_unget(&self.port, body, count)?,
            Ack { delivery, .. } => broker.ack_from(Some(self.port.id), delivery),
            Nack { delivery, .. } => broker.requeue_from(Some(self.port.id), delivery),
            Close { .. } => broker.close(Ended::Closed),
            Attach { .. } | Detach { .. } => {}
        }
        Ok(())
    }

    /// The connection ended: what the worker held is let go of. Its waiting gets
    /// leave the line before anything can be handed to them, then the port closes.
    pub(crate) fn lost(&mut self) {
        for (_, held) in self.held.drain() {
            held.broker.port_lost(&self.port);
            for role in held.roles {
                held.broker.release(role);
            }
        }
        self.port.close();
    }
}

impl Drop for Attachments {
    fn drop(&mut self) {
        self.lost();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::protocol::ToParent;

    fn records(items: &[&[u8]]) -> Bytes {
        let mut frame = BytesMut::new();
        for item in items {
            let record = protocol::begin_record(&mut frame);
            frame.extend_from_slice(item);
            protocol::end_record(&mut frame, record);
        }
        frame.freeze()
    }

    #[test]
    fn an_unget_for_a_channel_the_worker_never_held_is_a_protocol_violation() {
        let hub = Hub::new(1, 1 << 20);
        let broker = hub.open(Kind::Queue, 4);
        let mut worker = Attachments::new(&hub, 1 << 20);
        let mut record = 99u64.to_le_bytes().to_vec();
        record.extend_from_slice(b"forged");
        let body = records(&[&record]);
        assert!(worker.route(ToParent::Unget { channel: broker.id, count: 1 }, &body).is_err());
        assert!(broker.try_get().unwrap().is_none(), "a forged item entered the queue");
    }

    #[test]
    fn a_worker_gives_back_only_deliveries_it_holds() {
        let hub = Hub::new(1, 1 << 20);
        let broker = hub.open(Kind::Acked, 4);
        broker.try_put(Bytes::from_static(b"x")).unwrap();
        // The parent holds it.
        let taken = broker.try_get().unwrap().unwrap();
        let mut worker = Attachments::new(&hub, 1 << 20);
        worker.route(ToParent::Attach { channel: broker.id, role: Role::Queue }, &Bytes::new()).unwrap();
        let body = records(&[&taken.delivery.to_le_bytes()]);
        worker.route(ToParent::Unget { channel: broker.id, count: 1 }, &body).unwrap();
        worker.route(ToParent::Nack { channel: broker.id, delivery: taken.delivery }, &Bytes::new()).unwrap();
        worker.route(ToParent::Ack { channel: broker.id, delivery: taken.delivery }, &Bytes::new()).unwrap();
        assert!(broker.try_get().unwrap().is_none(), "an item the parent holds was delivered again");
        broker.ack(taken.delivery);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(broker.poll_join(&mut cx).is_ready(), "the parent's own ack counts");
    }

    #[test]
    fn a_count_that_lies_is_an_error_not_an_allocation() {
        let hub = Hub::new(1, 1 << 20);
        let broker = hub.open(Kind::Queue, 4);
        let mut worker = Attachments::new(&hub, 1 << 20);
        worker.route(ToParent::Attach { channel: broker.id, role: Role::Queue }, &Bytes::new()).unwrap();
        let unget = ToParent::Unget { channel: broker.id, count: u32::MAX };
        assert!(worker.route(unget, &Bytes::new()).is_err());
        let put = ToParent::Put { channel: broker.id, count: protocol::Count::new(u32::MAX) };
        assert!(worker.route(put, &records(&[b"one"])).is_err());
    }

    proptest::proptest! {
        // Whatever a broken worker says about channels, the parent answers with an
        // error or ignores it, and never panics.
        #[test]
        fn arbitrary_channel_messages_never_panic_the_parent(
            messages in proptest::collection::vec(
                (proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24),
                 proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)),
                0..40,
            ),
        ) {
            let hub = Hub::new(1, 1 << 16);
            let brokers: Vec<_> =
                [Kind::Queue, Kind::Acked, Kind::Ends].into_iter().map(|kind| hub.open(kind, 2)).collect();
            let mut worker = Attachments::new(&hub, 1 << 16);
            for broker in &brokers {
                for role in [Role::Queue, Role::Sender, Role::Receiver] {
                    let attach = ToParent::Attach { channel: broker.id, role };
                    worker.route(attach, &Bytes::new()).unwrap();
                }
                let _ = broker.try_put(Bytes::from_static(b"item"));
            }
            for (header, body) in messages {
                if let Ok(message) = postcard::from_bytes::<ToParent>(&header) {
                    let _ = worker.route(message, &Bytes::from(body));
                }
                for broker in &brokers {
                    let _ = broker.try_get();
                }
            }
            worker.lost();
        }
    }

    #[test]
    fn items_beyond_the_capacity_get_their_credit_back_as_room_frees() {
        let hub = Hub::new(1, 1 << 20);
        let broker = hub.open(Kind::Queue, 2);
        let mut worker = Attachments::new(&hub, 1 << 20);
        worker.route(ToParent::Attach { channel: broker.id, role: Role::Queue }, &Bytes::new()).unwrap();
        let put = ToParent::Put { channel: broker.id, count: protocol::Count::new(4) };
        worker.route(put, &records(&[b"a", b"b", b"c", b"d"])).unwrap();
        let credit = |port: &Port| {
            let mut frames = VecDeque::new();
            port.drain_into(&mut Context::from_waker(Waker::noop()), &mut frames);
            frames
                .iter()
                .filter_map(|frame| {
                    match protocol::split_header::<Request>(&frame[protocol::LENGTH_PREFIX..]) {
                        Ok((Request::Channel(ToWorker::Credit { items, .. }), _)) => Some(items),
                        _ => None,
                    }
                })
                .sum::<u32>()
        };
        assert_eq!(credit(&worker.port), 2, "two fit the capacity");
        assert_eq!(broker.try_get().unwrap().unwrap().bytes, Bytes::from_static(b"a"));
        assert_eq!(credit(&worker.port), 1, "one more fits now");
        broker.try_get().unwrap();
        broker.try_get().unwrap();
        broker.try_get().unwrap();
        assert_eq!(credit(&worker.port), 1, "the last one");
        assert!(broker.try_get().unwrap().is_none());
    }
}
