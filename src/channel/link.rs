//! A worker's side of its link to the parent: the one reader of the request pipe
//! and the one writer of the reply pipe, shared by the serve loop and by the
//! channel handles of the task it runs.
//!
//! No thread of its own: between calls the serve loop reads; while a task waits on
//! a channel (for credit, for an item) the task's thread reads, applying channel
//! messages and keeping calls sent ahead for the serve loop. A task that never
//! touches a channel costs nothing more than before. Every put is written to the
//! pipe before it returns, so an item put survives the worker dying right after.

use std::cell::OnceCell;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::ChannelError;
use crate::sys;
use crate::wire::protocol::{self, Ended, Reply, Request, Role, ToParent, ToWorker};

/// The most items one get asks for ahead.
const MAX_BATCH: u32 = 64;
/// A batch used up faster than this makes the next one twice as large.
const FAST_BATCH: Duration = Duration::from_millis(1);
/// A batch that took longer than this makes the next one a single item again.
const SLOW_BATCH: Duration = Duration::from_millis(10);

/// One worker's link and the conditions its threads wait on: the process's own in
/// a worker process, or, in-process (see `Builder::in_process`), each worker
/// thread's.
pub(crate) struct WorkerLink {
    link: Mutex<Option<Link>>,
    /// Signals the flusher that items are pending.
    flush: Condvar,
    /// Signals threads waiting on the link that a frame was read (see [`pump`]).
    read: Condvar,
}

/// The link of this worker process, once it serves.
static PROCESS: WorkerLink = WorkerLink::new();

thread_local! {
    /// The link of the in-process worker this thread runs, if it runs one: consulted
    /// before [`PROCESS`], so handles a task decodes bind to its own worker's link.
    static THREAD: OnceCell<Arc<WorkerLink>> = const { OnceCell::new() };
}

/// A handle on a worker's link: what a channel handle decoded in a worker keeps,
/// so it reaches that worker's link from any thread.
#[derive(Clone)]
pub(crate) enum LinkRef {
    /// This process's (a worker process).
    Process,
    /// An in-process worker thread's.
    Thread(Arc<WorkerLink>),
}

impl std::ops::Deref for LinkRef {
    type Target = WorkerLink;

    fn deref(&self) -> &WorkerLink {
        match self {
            LinkRef::Process => &PROCESS,
            LinkRef::Thread(link) => link,
        }
    }
}

impl LinkRef {
    /// The link of the worker running on this thread: its thread's, in-process; else
    /// the process's (installed only in a worker process).
    pub(crate) fn current() -> LinkRef {
        match THREAD.try_with(|link| link.get().cloned()) {
            Ok(Some(link)) => LinkRef::Thread(link),
            _ => LinkRef::Process,
        }
    }

    /// Makes this thread an in-process worker with a link of its own (not installed
    /// yet); `None` if it already is one.
    pub(crate) fn new_thread() -> Option<LinkRef> {
        let link = Arc::new(WorkerLink::new());
        THREAD.try_with(|cell| cell.set(link.clone()).ok()).ok().flatten()?;
        Some(LinkRef::Thread(link))
    }
}

/// The flusher of `owner`: writes pending items [`LINGER`] after they became
/// pending, until the link is uninstalled.
fn flush_soon(owner: LinkRef) {
    let mut guard = owner.lock();
    loop {
        guard = owner
            .flush
            .wait_while(guard, |link| link.as_ref().is_some_and(|link| link.pending.is_empty()))
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.is_none() {
            return;
        }
        drop(guard);
        std::thread::sleep(LINGER);
        guard = owner.lock();
        if let Some(link) = guard.as_mut() {
            // A broken link ends the worker anyway.
            let _ = link.flush();
        }
    }
}

impl WorkerLink {
    const fn new() -> Self {
        WorkerLink { link: Mutex::new(None), flush: Condvar::new(), read: Condvar::new() }
    }

    /// Ends an in-process worker's link: its pipes close, its flusher ends, and the
    /// handles its task kept fail with `Disconnected` from now on.
    pub(crate) fn uninstall(&self) {
        let link = self.lock().take();
        self.flush.notify_all();
        self.read.notify_all();
        drop(link);
    }

    fn lock(&self) -> MutexGuard<'_, Option<Link>> {
        // A panic in a task never happens while this is held (nothing user-written
        // runs under it), and the state stays whole anyway.
        self.link.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How long items sent on a channel's end may wait to share a write.
const LINGER: Duration = Duration::from_micros(200);
/// Pending bytes that are written at once.
const FLUSH_AT: usize = 64 * 1024;
/// Items from this size on are written from where they are, not copied first.
const WRITE_DIRECTLY: usize = 16 * 1024;

/// How long a get may wait.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wait {
    /// Not at all: only what is there now.
    No,
    Forever,
    Until(Instant),
}

/// An item taken from a channel, with its delivery number (to acknowledge it by).
#[derive(Debug)]
pub(crate) struct Item {
    pub(crate) bytes: Bytes,
    pub(crate) delivery: u64,
    pub(crate) attempts: u32,
}

#[cfg(feature = "executor")]
impl From<super::broker::Taken> for Item {
    fn from(taken: super::broker::Taken) -> Self {
        Item { bytes: taken.bytes, delivery: taken.delivery, attempts: taken.attempts }
    }
}

/// The link: pipes, requests read ahead, and what the worker knows of each channel.
pub(crate) struct Link {
    /// `None` while a thread reads the pipe without holding the lock (see [`pump`]).
    reader: Option<FrameReader>,
    /// The request pipe ended.
    eof: bool,
    /// Threads waiting for another to read a frame (see [`pump`]): only they are
    /// woken, which costs a system call.
    waiting: usize,
    output: File,
    executor: u64,
    max_frame_len: usize,
    /// Requests for the serve loop (calls, exit) read while a task waited.
    stash: VecDeque<Bytes>,
    channels: HashMap<u64, Chan>,
    next_request: u64,
    /// Frames not yet written: written before anything else is, before the task
    /// waits, at the end of the call, or by the flusher shortly after.
    pending: BytesMut,
    /// The last frame in `pending` is a put to this channel, still open for more
    /// items: where it starts, where its header ends, and how many items it holds.
    open_put: Option<(u64, usize, usize, u32)>,
    /// The flusher thread runs.
    flusher: bool,
}

#[derive(Default)]
struct Chan {
    /// Handles this worker holds, per role.
    refs: [u32; 3],
    /// Items it may still put.
    credit: u32,
    /// Items received and not yet taken.
    local: VecDeque<Item>,
    /// The get request waiting for its answer.
    asking: Option<u64>,
    /// Set when puts fail from now on.
    closed: Option<Ended>,
    /// Set when the channel is closed and empty.
    drained: Option<Ended>,
    /// How many items the next get asks for, and how the last batch went.
    batch: u32,
    batch_arrived: Option<(Instant, u32)>,
}

impl Chan {
    fn holds(&self) -> bool {
        self.refs.iter().any(|&refs| refs > 0)
    }

    fn next_batch(&mut self) -> u32 {
        self.batch = self.batch.max(1);
        if let Some((arrived, count)) = self.batch_arrived.take() {
            let used_in = arrived.elapsed();
            if count >= self.batch && used_in < FAST_BATCH {
                self.batch = (self.batch * 2).min(MAX_BATCH);
            } else if used_in > SLOW_BATCH {
                self.batch = 1;
            }
        }
        self.batch
    }
}

fn role_index(role: Role) -> usize {
    match role {
        Role::Queue => 0,
        Role::Sender => 1,
        Role::Receiver => 2,
    }
}

impl Link {
    /// Installs the link of this worker: from now on channel handles decoded in it
    /// bind to it.
    pub(crate) fn install(
        owner: &WorkerLink,
        reader: FrameReader,
        output: File,
        executor: u64,
        max_frame_len: usize,
    ) {
        *owner.lock() = Some(Link {
            reader: Some(reader),
            eof: false,
            waiting: 0,
            output,
            executor,
            max_frame_len,
            stash: VecDeque::new(),
            channels: HashMap::new(),
            next_request: 0,
            pending: BytesMut::new(),
            open_put: None,
            flusher: false,
        });
    }

    /// Writes `message` and its records, after whatever is pending.
    fn write_message(&mut self, message: ToParent, records: &[&[u8]]) -> Result<(), ChannelError> {
        self.open_put = None;
        let start = protocol::begin_frame(&mut self.pending);
        let _ = protocol::encode_into(&mut self.pending, &Reply::Channel(message));
        for data in records {
            let record = protocol::begin_record(&mut self.pending);
            self.pending.extend_from_slice(data);
            protocol::end_record(&mut self.pending, record);
        }
        // Items were checked against the limit; the rest is small.
        let _ = protocol::end_frame(&mut self.pending, start, usize::MAX);
        self.flush()
    }

    /// Adds `item` to a put frame of `channel`. With `linger`, it may stay pending
    /// for [`LINGER`], so that items put in a row share frames and writes.
    fn put(&mut self, owner: &LinkRef, channel: u64, item: &[u8], linger: bool) -> Result<(), ChannelError> {
        if item.len() >= WRITE_DIRECTLY {
            return self.put_large(channel, item);
        }
        let was_empty = self.pending.is_empty();
        let record_len = protocol::RECORD_PREFIX + item.len();
        match self.open_put {
            Some((open, start, header_end, count))
                if open == channel && self.pending.len() - start + record_len <= self.max_frame_len =>
            {
                let record = protocol::begin_record(&mut self.pending);
                self.pending.extend_from_slice(item);
                protocol::end_record(&mut self.pending, record);
                // The count ends the header, and the frame's length starts it.
                let count_at = header_end - protocol::Count::WIDTH;
                self.pending[count_at..header_end].copy_from_slice(&protocol::Count::new(count + 1).0);
                let len = (self.pending.len() - start - protocol::LENGTH_PREFIX) as u32;
                self.pending[start..start + protocol::LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
                self.open_put = Some((channel, start, header_end, count + 1));
            }
            _ => {
                let start = self.pending.len();
                let frame = protocol::begin_frame(&mut self.pending);
                let put = ToParent::Put { channel, count: protocol::Count::new(1) };
                let _ = protocol::encode_into(&mut self.pending, &Reply::Channel(put));
                let header_end = self.pending.len();
                let record = protocol::begin_record(&mut self.pending);
                self.pending.extend_from_slice(item);
                protocol::end_record(&mut self.pending, record);
                let _ = protocol::end_frame(&mut self.pending, frame, usize::MAX);
                self.open_put = Some((channel, start, header_end, 1));
            }
        }
        if !linger || self.pending.len() >= FLUSH_AT {
            return self.flush();
        }
        if was_empty {
            self.wake_flusher(owner);
        }
        Ok(())
    }

    /// Writes a put of one large item straight from where it is, after what is
    /// pending: the frame's head, then the item. (Should the worker die between the
    /// two writes, the parent drops the cut frame: the item is not put at all.)
    fn put_large(&mut self, channel: u64, item: &[u8]) -> Result<(), ChannelError> {
        self.open_put = None;
        let start = self.pending.len();
        let frame = protocol::begin_frame(&mut self.pending);
        let put = ToParent::Put { channel, count: protocol::Count::new(1) };
        let _ = protocol::encode_into(&mut self.pending, &Reply::Channel(put));
        let len = u32::try_from(item.len()).map_err(|_| ChannelError::TooLarge {
            size: item.len() as u64,
            limit: self.max_frame_len as u64,
        })?;
        self.pending.extend_from_slice(&len.to_le_bytes());
        let frame_len = (self.pending.len() - start - protocol::LENGTH_PREFIX + item.len()) as u32;
        self.pending[frame..frame + protocol::LENGTH_PREFIX].copy_from_slice(&frame_len.to_be_bytes());
        let written = self.output.write_all(&self.pending).and_then(|()| self.output.write_all(item));
        self.pending.clear();
        written.map_err(|_| ChannelError::Disconnected)
    }

    /// Writes what is pending.
    fn flush(&mut self) -> Result<(), ChannelError> {
        self.open_put = None;
        if self.pending.is_empty() {
            return Ok(());
        }
        let written = self.output.write_all(&self.pending);
        self.pending.clear();
        written.map_err(|_| ChannelError::Disconnected)
    }

    /// Makes sure pending items are written within [`LINGER`] even if the task
    /// puts nothing more: a thread of the worker's, started at the first such put.
    fn wake_flusher(&mut self, owner: &LinkRef) {
        if !self.flusher {
            let owner = owner.clone();
            self.flusher = std::thread::Builder::new()
                .name("procexec-flush".into())
                .spawn(move || flush_soon(owner))
                .is_ok();
        }
        owner.flush.notify_one();
    }

    fn chan(&mut self, channel: u64) -> &mut Chan {
        self.channels.entry(channel).or_default()
    }

    /// Wakes the threads waiting for a frame, if any.
    fn wake_waiting(&self, owner: &WorkerLink) {
        if self.waiting > 0 {
            owner.read.notify_all();
        }
    }

    /// Applies a channel message; keeps anything else for the serve loop.
    fn dispatch(&mut self, frame: Bytes) -> Result<(), ChannelError> {
        let Ok((Request::Channel(message), body)) = protocol::split_header::<Request>(&frame) else {
            self.stash.push_back(frame);
            return Ok(());
        };
        let body = frame.slice_ref(body);
        match message {
            ToWorker::Credit { channel, items } => self.chan(channel).credit += items,
            ToWorker::Items { channel, request, count } => {
                let mut records = &body[..];
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let Some(record) = protocol::take_record(&mut records) else { break };
                    let Some((delivery, rest)) = record.split_first_chunk::<8>() else { break };
                    let Some((attempts, bytes)) = rest.split_first_chunk::<4>() else { break };
                    let (delivery, attempts) = (u64::from_le_bytes(*delivery), u32::from_le_bytes(*attempts));
                    items.push(Item { bytes: body.slice_ref(bytes), delivery, attempts });
                }
                let chan = self.chan(channel);
                if chan.asking == Some(request) {
                    chan.asking = None;
                    chan.batch_arrived = Some((Instant::now(), count));
                }
                chan.local.extend(items);
                if !chan.holds() {
                    self.let_go(channel)?;
                }
            }
            ToWorker::NoItems { channel, request, why } => {
                let chan = self.chan(channel);
                if chan.asking == Some(request) {
                    chan.asking = None;
                }
                chan.drained = Some(why);
            }
            ToWorker::Closed { channel, why } => {
                let chan = self.chan(channel);
                chan.closed = Some(why);
                if why == Ended::Unknown {
                    chan.drained = Some(why);
                }
            }
        }
        Ok(())
    }

    /// Withdraws the get waiting on `channel`, if any, and gives the items received
    /// and not taken back to the parent: nothing waits or is held here for a task
    /// that no longer asks.
    fn let_go(&mut self, channel: u64) -> Result<(), ChannelError> {
        self.cancel_ask(channel)?;
        self.unget(channel)
    }

    /// Withdraws the get waiting on `channel`. An answer already on its way is
    /// kept as received (for the next get, or given back).
    fn cancel_ask(&mut self, channel: u64) -> Result<(), ChannelError> {
        match self.chan(channel).asking.take() {
            Some(request) => self.write_message(ToParent::Cancel { channel, request }, &[]),
            None => Ok(()),
        }
    }

    /// Gives the items received on `channel` and not taken back to the parent.
    fn unget(&mut self, channel: u64) -> Result<(), ChannelError> {
        let items: Vec<Item> = self.chan(channel).local.drain(..).collect();
        if items.is_empty() {
            return Ok(());
        }
        let records: Vec<Vec<u8>> = items
            .iter()
            .map(|item| {
                let mut record = item.delivery.to_le_bytes().to_vec();
                record.extend_from_slice(&item.bytes);
                record
            })
            .collect();
        let records: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        self.write_message(ToParent::Unget { channel, count: records.len() as u32 }, &records)
    }

    /// The serve loop's next request (a call, or exit), and whether it had to wait
    /// for it (read the pipe) since the last; `None` at a clean end of the stream.
    pub(crate) fn next_request(owner: &WorkerLink) -> io::Result<Option<(Bytes, bool)>> {
        let mut guard = owner.lock();
        loop {
            let link = guard.as_mut().ok_or_else(|| io::Error::other("no link installed"))?;
            if let Some(frame) = link.stash.pop_front() {
                let waited = link.reader.as_mut().is_some_and(|reader| std::mem::take(&mut reader.waited));
                return Ok(Some((frame, waited)));
            }
            if link.eof {
                return Ok(None);
            }
            let (again, pumped) = pump(owner, guard, Wait::Forever);
            guard = again;
            if let Err(err) = pumped {
                let eof = guard.as_ref().is_some_and(|link| link.eof && link.stash.is_empty());
                return if eof { Ok(None) } else { Err(io::Error::new(io::ErrorKind::BrokenPipe, err)) };
            }
        }
    }

    /// Writes a whole frame of the worker's own (its log records), after what
    /// channels left pending. `wait`: even if another thread is writing; else
    /// `Ok(false)` then. `Ok(false)` too outside a worker.
    pub(crate) fn write_frame(owner: &WorkerLink, frame: &[u8], wait: bool) -> io::Result<bool> {
        let mut guard = if wait {
            owner.lock()
        } else {
            match owner.link.try_lock() {
                Ok(guard) => guard,
                Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
            }
        };
        let Some(link) = guard.as_mut() else {
            return Ok(false);
        };
        link.flush().map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        link.output.write_all(frame)?;
        Ok(true)
    }

    /// Ends a call: items it got ahead and did not take go back, then `before`
    /// (its log records) and its reply are written.
    ///
    /// In one `write` with whatever is pending, unless the reply is large: through a
    /// launcher that forwards stdout over TCP (srun), a second small write waits
    /// for the ACK of the first (Nagle against delayed ACKs, ~40 ms).
    pub(crate) fn finish_call(owner: &WorkerLink, before: &[u8], reply: &[u8]) -> io::Result<()> {
        let mut guard = owner.lock();
        let link = guard.as_mut().ok_or_else(|| io::Error::other("no link installed"))?;
        let pending: Vec<u64> = link
            .channels
            .iter()
            .filter(|(_, chan)| !chan.local.is_empty() || chan.asking.is_some())
            .map(|(&id, _)| id)
            .collect();
        for channel in pending {
            link.let_go(channel).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        }
        link.open_put = None;
        if link.pending.is_empty() && before.is_empty() {
            return link.output.write_all(reply);
        }
        link.pending.extend_from_slice(before);
        let written = if reply.len() <= COALESCE_REPLY {
            link.pending.extend_from_slice(reply);
            link.output.write_all(&link.pending)
        } else {
            link.output.write_all(&link.pending).and_then(|()| link.output.write_all(reply))
        };
        link.pending.clear();
        written
    }
}

/// Replies up to this size are copied behind what precedes them, to go out in one
/// write; larger ones are written from where they are (a copy would cost more).
const COALESCE_REPLY: usize = 64 * 1024;

/// Binds a decoded handle to the link of the worker running on this thread. `None`
/// outside a worker; else the link and the largest item it carries, or why the
/// handle cannot be used here.
pub(crate) fn attach(
    executor: u64,
    channel: u64,
    role: Role,
    window: u32,
) -> Option<Result<(usize, LinkRef), String>> {
    let owner = LinkRef::current();
    let mut guard = owner.lock();
    let link = guard.as_mut()?;
    if executor != link.executor {
        return Some(Err(format!(
            "a channel handle of another executor (executor {executor:#x}, this worker serves {:#x})",
            link.executor
        )));
    }
    let max_item = link.max_frame_len.saturating_sub(protocol::ITEM_OVERHEAD);
    let chan = link.channels.entry(channel).or_insert_with(|| Chan { credit: window, ..Chan::default() });
    let refs = &mut chan.refs[role_index(role)];
    *refs += 1;
    if *refs == 1 && link.write_message(ToParent::Attach { channel, role }, &[]).is_err() {
        return Some(Err("the worker's link to its parent broke".into()));
    }
    drop(guard);
    Some(Ok((max_item, owner)))
}

/// One more handle (a clone) in `role`.
pub(crate) fn hold(owner: &WorkerLink, channel: u64, role: Role) {
    if let Some(link) = owner.lock().as_mut() {
        link.chan(channel).refs[role_index(role)] += 1;
    }
}

/// A handle in `role` was dropped.
pub(crate) fn release(owner: &WorkerLink, channel: u64, role: Role) {
    let mut guard = owner.lock();
    let Some(link) = guard.as_mut() else { return };
    let chan = link.chan(channel);
    let refs = &mut chan.refs[role_index(role)];
    *refs = refs.saturating_sub(1);
    if *refs > 0 {
        return;
    }
    let holds = chan.holds();
    // A broken link ends the worker anyway.
    let _ = link.write_message(ToParent::Detach { channel, role }, &[]);
    if !holds {
        let _ = link.let_go(channel);
    }
}

type Guard<'a> = MutexGuard<'a, Option<Link>>;

/// Reads and applies one frame, or waits while another thread of the task does:
/// the lock is not held while blocked in a read, so a task's threads can each wait
/// on their own channel. Writes what is pending first (the parent may need it to
/// answer). Returns `Ok(false)` if nothing came in time; `Ok(true)` when something
/// may have changed, for the caller to look again.
fn pump<'a>(
    owner: &'a WorkerLink,
    mut guard: Guard<'a>,
    wait: Wait,
) -> (Guard<'a>, Result<bool, ChannelError>) {
    let Some(link) = guard.as_mut() else {
        return (guard, Err(ChannelError::Disconnected));
    };
    if let Err(err) = link.flush() {
        return (guard, Err(err));
    }
    let Some(mut reader) = link.reader.take() else {
        // Another thread reads: it wakes us after each frame.
        if matches!(wait, Wait::No) {
            return (guard, Ok(false));
        }
        link.waiting += 1;
        let woke = match wait {
            Wait::Until(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let (again, timeout) =
                    owner.read.wait_timeout(guard, left).unwrap_or_else(std::sync::PoisonError::into_inner);
                guard = again;
                !timeout.timed_out()
            }
            _ => {
                guard = owner.read.wait(guard).unwrap_or_else(std::sync::PoisonError::into_inner);
                true
            }
        };
        if let Some(link) = guard.as_mut() {
            link.waiting -= 1;
        }
        return (guard, Ok(woke));
    };
    let frame = match reader.buffered() {
        Ok(Some(frame)) => Some(frame),
        Ok(None) => None,
        Err(_) => {
            link.reader = Some(reader);
            return (guard, Err(ChannelError::Disconnected));
        }
    };
    if let Some(frame) = frame {
        link.reader = Some(reader);
        let dispatched = link.dispatch(frame.freeze());
        link.wake_waiting(owner);
        return (guard, dispatched.map(|()| true));
    }
    // Nothing buffered: read without the lock.
    drop(guard);
    let ready = match wait {
        Wait::No => sys::wait_readable(reader.file.as_fd(), Duration::ZERO),
        Wait::Forever => true,
        Wait::Until(deadline) => {
            sys::wait_readable(reader.file.as_fd(), deadline.saturating_duration_since(Instant::now()))
        }
    };
    let filled = if ready { reader.fill() } else { Ok(true) };
    guard = owner.lock();
    let Some(link) = guard.as_mut() else {
        return (guard, Err(ChannelError::Disconnected));
    };
    link.reader = Some(reader);
    link.wake_waiting(owner);
    match filled {
        Ok(true) => (guard, Ok(ready)),
        Ok(false) => {
            link.eof = true;
            (guard, Err(ChannelError::Disconnected))
        }
        Err(_) => (guard, Err(ChannelError::Disconnected)),
    }
}

/// Puts `item`, waiting for credit if the worker has none. With `linger`, it may
/// share a write with the items put right after it (a channel's ends); else it is
/// in the pipe when this returns, so it survives the worker dying (queues).
pub(crate) fn put(owner: &LinkRef, channel: u64, item: Bytes, linger: bool) -> Result<(), ChannelError> {
    match put_waiting(owner, channel, item, linger, Wait::Forever) {
        Ok(()) => Ok(()),
        Err((_, err)) => Err(err.unwrap_or(ChannelError::Disconnected)),
    }
}

/// Puts `item` if the worker has credit (after reading what already arrived).
pub(crate) fn try_put(
    owner: &LinkRef,
    channel: u64,
    item: Bytes,
    linger: bool,
) -> Result<(), (Bytes, Option<ChannelError>)> {
    put_waiting(owner, channel, item, linger, Wait::No)
}

fn put_waiting(
    owner: &LinkRef,
    channel: u64,
    item: Bytes,
    linger: bool,
    wait: Wait,
) -> Result<(), (Bytes, Option<ChannelError>)> {
    let mut guard = owner.lock();
    loop {
        let Some(link) = guard.as_mut() else {
            return Err((item, Some(ChannelError::Disconnected)));
        };
        let chan = link.chan(channel);
        if let Some(why) = chan.closed {
            return Err((item, Some(ChannelError::ended(why))));
        }
        if chan.credit > 0 {
            chan.credit -= 1;
            return link.put(owner, channel, &item, linger).map_err(|err| (item, Some(err)));
        }
        let (again, pumped) = pump(owner, guard, wait);
        guard = again;
        match pumped {
            Ok(true) => {}
            Ok(false) => return Err((item, None)),
            Err(err) => return Err((item, Some(err))),
        }
    }
}

/// Takes an item, waiting as `wait` says. `None` when none came in time, or the
/// channel is closed and empty (`Wait::Forever` ends only so).
pub(crate) fn get(owner: &WorkerLink, channel: u64, wait: Wait) -> Result<Option<Item>, ChannelError> {
    let mut guard = owner.lock();
    let mut asked = false;
    loop {
        let Some(link) = guard.as_mut() else {
            return Err(ChannelError::Disconnected);
        };
        let chan = link.chan(channel);
        if let Some(item) = chan.local.pop_front() {
            // Whatever else is still asked for would only wait in the parent for
            // a get that is over.
            link.cancel_ask(channel)?;
            return Ok(Some(item));
        }
        if let Some(why) = chan.drained {
            return match why {
                Ended::Closed => Ok(None),
                why => Err(ChannelError::ended(why)),
            };
        }
        if !asked {
            // An ask left over from a get that gave up is not this one's.
            link.cancel_ask(channel)?;
        }
        let chan = link.chan(channel);
        if chan.asking.is_none() {
            if asked && matches!(wait, Wait::No) {
                // Answered: nothing there now.
                return Ok(None);
            }
            let request = link.next_request;
            link.next_request += 1;
            let chan = link.chan(channel);
            let max = chan.next_batch();
            chan.asking = Some(request);
            asked = true;
            let wait_for_items = !matches!(wait, Wait::No);
            link.write_message(ToParent::Get { channel, request, max, wait: wait_for_items }, &[])?;
        }
        // A get that must not wait still waits for its answer, which comes at once.
        let pump_wait = if matches!(wait, Wait::No) { Wait::Forever } else { wait };
        let (again, pumped) = pump(owner, guard, pump_wait);
        guard = again;
        if !pumped? {
            // Timed out: withdraw the request.
            if let Some(link) = guard.as_mut() {
                link.cancel_ask(channel)?;
            }
            return Ok(None);
        }
    }
}

fn with_link<R>(
    owner: &WorkerLink,
    run: impl FnOnce(&mut Link) -> Result<R, ChannelError>,
) -> Result<R, ChannelError> {
    match owner.lock().as_mut() {
        Some(link) => run(link),
        None => Err(ChannelError::Disconnected),
    }
}

pub(crate) fn ack(owner: &WorkerLink, channel: u64, delivery: u64) {
    let _ = with_link(owner, |link| link.write_message(ToParent::Ack { channel, delivery }, &[]));
}

pub(crate) fn requeue(owner: &WorkerLink, channel: u64, delivery: u64) {
    let _ = with_link(owner, |link| link.write_message(ToParent::Nack { channel, delivery }, &[]));
}

pub(crate) fn close(owner: &WorkerLink, channel: u64) {
    let _ = with_link(owner, |link| {
        link.chan(channel).closed.get_or_insert(Ended::Closed);
        link.write_message(ToParent::Close { channel }, &[])
    });
}

/// Blocking frame reader over the request pipe.
pub(crate) struct FrameReader {
    file: File,
    buf: BytesMut,
    pub(crate) max_frame_len: usize,
    /// A read from the pipe happened (maybe blocking) since this was last cleared.
    pub(crate) waited: bool,
}

impl FrameReader {
    pub(crate) fn new(file: File) -> Self {
        FrameReader {
            file,
            buf: BytesMut::with_capacity(64 * 1024),
            max_frame_len: protocol::INIT_FRAME_LIMIT,
            waited: false,
        }
    }

    /// A whole frame already read, if there is one.
    fn buffered(&mut self) -> io::Result<Option<BytesMut>> {
        protocol::take_frame(&mut self.buf, self.max_frame_len)
    }

    /// Reads once more; `false` at the end of the stream.
    fn fill(&mut self) -> io::Result<bool> {
        self.waited = true;
        if sys::read_into(self.file.as_fd(), &mut self.buf, 64 * 1024)? > 0 {
            return Ok(true);
        }
        if self.buf.is_empty() {
            Ok(false)
        } else {
            Err(io::Error::new(io::ErrorKind::InvalidData, "the request pipe ended mid-frame"))
        }
    }

    /// The next frame, or `None` at a clean end of stream.
    pub(crate) fn next_frame(&mut self) -> io::Result<Option<BytesMut>> {
        loop {
            if let Some(frame) = self.buffered()? {
                return Ok(Some(frame));
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }
}
