//! A worker's side of its link to the parent: the one reader of the request pipe
//! and the one writer of the reply pipe, shared by the serve loop and by the
//! channel handles of the task it runs.
//!
//! No thread of its own: between calls the serve loop reads; while a task waits on
//! a channel (for credit, for an item) the task's thread reads, applying channel
//! messages and keeping calls sent ahead for the serve loop. A task that never
//! touches a channel costs nothing more than before. Every put is written to the
//! pipe before it returns, so an item put survives the worker dying right after.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::{Condvar, Mutex, MutexGuard};
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

/// The link of this worker process, once it serves.
static LINK: Mutex<Option<Link>> = Mutex::new(None);
/// Signals the flusher that items are pending.
static FLUSH: Condvar = Condvar::new();

/// How long items sent on a channel's end may wait to share a write.
const LINGER: Duration = Duration::from_micros(200);
/// Pending bytes that are written at once.
const FLUSH_AT: usize = 64 * 1024;
/// Items from this size on are written from where they are, not copied first.
const WRITE_DIRECTLY: usize = 16 * 1024;

/// The flusher: writes pending items [`LINGER`] after they became pending.
fn flush_soon() {
    let mut guard = lock();
    loop {
        guard = FLUSH
            .wait_while(guard, |link| link.as_ref().is_none_or(|link| link.pending.is_empty()))
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        drop(guard);
        std::thread::sleep(LINGER);
        guard = lock();
        if let Some(link) = guard.as_mut() {
            // A broken link ends the worker anyway.
            let _ = link.flush();
        }
    }
}

fn lock() -> MutexGuard<'static, Option<Link>> {
    // A panic in a task never happens while this is held (nothing user-written
    // runs under it), and the state stays whole anyway.
    LINK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

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
    reader: FrameReader,
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
    /// Installs the link of this worker process: from now on channel handles
    /// decoded here bind to it.
    pub(crate) fn install(reader: FrameReader, output: File, executor: u64, max_frame_len: usize) {
        *lock() = Some(Link {
            reader,
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
    fn put(&mut self, channel: u64, item: &[u8], linger: bool) -> Result<(), ChannelError> {
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
            self.wake_flusher();
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
    fn wake_flusher(&mut self) {
        if !self.flusher {
            self.flusher =
                std::thread::Builder::new().name("procexec-flush".into()).spawn(flush_soon).is_ok();
        }
        FLUSH.notify_one();
    }

    fn chan(&mut self, channel: u64) -> &mut Chan {
        self.channels.entry(channel).or_default()
    }

    /// Reads and applies one frame; `false` if none came in time. Writes what is
    /// pending first: the parent may need it to answer.
    fn pump(&mut self, wait: Wait) -> Result<bool, ChannelError> {
        self.flush()?;
        let frame = loop {
            if let Some(frame) = self.reader.buffered().map_err(|_| ChannelError::Disconnected)? {
                break frame;
            }
            let ready = match wait {
                Wait::No => sys::wait_readable(self.reader.file.as_fd(), Duration::ZERO),
                Wait::Forever => true,
                Wait::Until(deadline) => sys::wait_readable(
                    self.reader.file.as_fd(),
                    deadline.saturating_duration_since(Instant::now()),
                ),
            };
            if !ready {
                return Ok(false);
            }
            if !self.reader.fill().map_err(|_| ChannelError::Disconnected)? {
                return Err(ChannelError::Disconnected);
            }
        };
        self.dispatch(frame.freeze())?;
        Ok(true)
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
                    self.unget(channel)?;
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
    pub(crate) fn next_request() -> io::Result<Option<(Bytes, bool)>> {
        let mut guard = lock();
        let link = guard.as_mut().ok_or_else(|| io::Error::other("no link installed"))?;
        loop {
            if let Some(frame) = link.stash.pop_front() {
                return Ok(Some((frame, std::mem::take(&mut link.reader.waited))));
            }
            match link.reader.next_frame()? {
                Some(frame) => {
                    if link.dispatch(frame.freeze()).is_err() {
                        return Err(io::ErrorKind::BrokenPipe.into());
                    }
                }
                None => return Ok(None),
            }
        }
    }

    /// Ends a call: items it got ahead and did not take go back, then its reply
    /// is written.
    pub(crate) fn finish_call(reply: &[u8]) -> io::Result<()> {
        let mut guard = lock();
        let link = guard.as_mut().ok_or_else(|| io::Error::other("no link installed"))?;
        let pending: Vec<u64> =
            link.channels.iter().filter(|(_, chan)| !chan.local.is_empty()).map(|(&id, _)| id).collect();
        for channel in pending {
            link.unget(channel).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        }
        link.flush().map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        link.output.write_all(reply)
    }
}

/// Binds a decoded handle to this worker's link. `None` outside a worker; else
/// the largest item the link carries, or why the handle cannot be used here.
pub(crate) fn attach(executor: u64, channel: u64, role: Role, window: u32) -> Option<Result<usize, String>> {
    let mut guard = lock();
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
    Some(Ok(max_item))
}

/// One more handle (a clone) in `role`.
pub(crate) fn hold(channel: u64, role: Role) {
    if let Some(link) = lock().as_mut() {
        link.chan(channel).refs[role_index(role)] += 1;
    }
}

/// A handle in `role` was dropped.
pub(crate) fn release(channel: u64, role: Role) {
    let mut guard = lock();
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
        let _ = link.unget(channel);
    }
}

fn with_link<R>(run: impl FnOnce(&mut Link) -> Result<R, ChannelError>) -> Result<R, ChannelError> {
    match lock().as_mut() {
        Some(link) => run(link),
        None => Err(ChannelError::Disconnected),
    }
}

/// Puts `item`, waiting for credit if the worker has none. With `linger`, it may
/// share a write with the items put right after it (a channel's ends); else it is
/// in the pipe when this returns, so it survives the worker dying (queues).
pub(crate) fn put(channel: u64, item: Bytes, linger: bool) -> Result<(), ChannelError> {
    with_link(|link| {
        loop {
            let chan = link.chan(channel);
            if let Some(why) = chan.closed {
                return Err(ChannelError::ended(why));
            }
            if chan.credit > 0 {
                chan.credit -= 1;
                break;
            }
            link.pump(Wait::Forever)?;
        }
        link.put(channel, &item, linger)
    })
}

/// Puts `item` if the worker has credit (after reading what already arrived).
pub(crate) fn try_put(channel: u64, item: Bytes, linger: bool) -> Result<(), (Bytes, Option<ChannelError>)> {
    let mut guard = lock();
    let Some(link) = guard.as_mut() else {
        return Err((item, Some(ChannelError::Disconnected)));
    };
    loop {
        let chan = link.chan(channel);
        if let Some(why) = chan.closed {
            return Err((item, Some(ChannelError::ended(why))));
        }
        if chan.credit > 0 {
            chan.credit -= 1;
            break;
        }
        match link.pump(Wait::No) {
            Ok(true) => {}
            Ok(false) => return Err((item, None)),
            Err(err) => return Err((item, Some(err))),
        }
    }
    link.put(channel, &item, linger).map_err(|err| (item, Some(err)))
}

/// Takes an item, waiting as `wait` says. `None` when none came in time, or the
/// channel is closed and empty (`Wait::Forever` ends only so).
pub(crate) fn get(channel: u64, wait: Wait) -> Result<Option<Item>, ChannelError> {
    with_link(|link| {
        let mut asked = false;
        loop {
            let chan = link.chan(channel);
            if let Some(item) = chan.local.pop_front() {
                return Ok(Some(item));
            }
            if let Some(why) = chan.drained {
                return match why {
                    Ended::Closed => Ok(None),
                    why => Err(ChannelError::ended(why)),
                };
            }
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
            if !link.pump(pump_wait)? {
                // Timed out: withdraw the request. An answer already on its way is
                // kept for the next get (or handed back when the call ends).
                let chan = link.chan(channel);
                if let Some(request) = chan.asking.take() {
                    link.write_message(ToParent::Cancel { channel, request }, &[])?;
                }
                return Ok(None);
            }
        }
    })
}

pub(crate) fn ack(channel: u64, delivery: u64) {
    let _ = with_link(|link| link.write_message(ToParent::Ack { channel, delivery }, &[]));
}

pub(crate) fn requeue(channel: u64, delivery: u64) {
    let _ = with_link(|link| link.write_message(ToParent::Nack { channel, delivery }, &[]));
}

pub(crate) fn close(channel: u64) {
    let _ = with_link(|link| {
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
