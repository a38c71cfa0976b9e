//! The wire protocol between the parent and its workers: the one module both sides share.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes
//! ([`LengthDelimitedCodec`]'s default layout). The bytes are a postcard-encoded
//! header ([`Request`] or [`Reply`]) immediately followed by a body whose meaning the
//! header gives: for a [`Request::Call`], `items` inputs; for a [`Reply::Done`],
//! `items` outcome records. Each input and each record is preceded by its length (a
//! 4-byte little-endian [record](begin_record)), so one that cannot be decoded costs
//! only itself: the next one is found all the same. An outcome record is
//! [`OUTCOME_OK`] followed by the postcard-encoded output, or a postcard-encoded
//! [`Outcome`] that says why there is none. Bodies are written straight into the frame
//! buffer, so a payload is encoded once and never copied into a second message.
//!
//! The conversation:
//!
//! 1. The parent sends [`Request::Init`]; the worker answers [`PREAMBLE`] and
//!    [`Reply::Ready`] (its pid and its task table) in one write. The preamble lets
//!    the parent skip whatever a harness (say, libtest's "running 1 test") printed on
//!    stdout before the worker took it over.
//! 2. The parent sends any number of [`Request::Call`]s without waiting (prefetch).
//!    The worker runs them one at a time, in order, and answers each with one
//!    [`Reply::Done`], flushed before it starts the next call. So when a worker dies,
//!    every call whose reply did not arrive is either the one it was running or one it
//!    never started. Inside a call, the worker records its progress (the call, how
//!    many items are done, and their records) in memory the parent can read after the
//!    worker died ([`Progress`]), so a crash costs only the input that caused it.

use std::cell::RefCell;
use std::io;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
#[cfg(feature = "executor")]
use tokio_util::codec::LengthDelimitedCodec;

/// Bumped whenever a message changes shape.
pub(crate) const PROTOCOL_VERSION: u32 = 5;

/// Written by a worker before its first frame.
/// It never changes between protocol versions: it is how a parent finds a worker of
/// any version, whose `Ready` then says which version it speaks.
pub(crate) const PREAMBLE: &[u8; 8] = b"\0PRCXC1\n";

/// How much non-protocol output the parent skips while looking for the preamble.
pub(crate) const PREAMBLE_SEARCH_LIMIT: usize = 1 << 20;

/// Set in every worker's environment (to the parent's pid, for diagnostics).
/// `init_worker` serves when it sees it.
pub(crate) const WORKER_ENV: &str = "PROCEXEC_WORKER";

/// The size of the length prefix of every frame.
pub(crate) const LENGTH_PREFIX: usize = 4;

/// Frame limit a worker uses until [`Request::Init`] tells it the real one.
pub(crate) const INIT_FRAME_LIMIT: usize = 64 * 1024;

/// Frame limit of [`Reply::Ready`], whatever `max_frame_len` says: a registry of
/// many tasks must not make a small frame limit unusable.
pub(crate) const READY_FRAME_LIMIT: usize = 16 << 20;

/// A message from the parent to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Request {
    /// First frame on every connection.
    Init {
        /// The parent's [`PROTOCOL_VERSION`].
        version: u32,
        /// Largest frame either side may send.
        max_frame_len: u32,
        /// The worker's slot in the executor, for its log lines.
        index: u32,
        /// Report the worker's peak memory in every reply (a memory ceiling is set).
        measure_memory: bool,
        /// The executor's id: channel handles of another executor are refused.
        executor: u64,
        /// The most verbose level of `tracing` events the parent wants forwarded
        /// ([`LogRecord::level`] numbering; 0: none).
        log_level: u8,
        /// The device and inode numbers of the pipe the parent gave the worker as
        /// its stderr, if it did: a worker that finds its stderr is that pipe reads
        /// it itself (see [`Reply::Ready`]).
        output: Option<(u64, u64)>,
        /// Send what each call printed before its reply. Without, output is sent
        /// as it comes (every 100 ms), labelled with the call then running, and
        /// exactly only for calls that capture it: a call's end then costs no read
        /// of the pipe (the parent discards what is not captured).
        output_each_call: bool,
    },
    /// Run task number `task` on each of `items` inputs in the body. `capture`:
    /// what it prints goes to its caller, stdout and stderr apart (see
    /// [`Reply::Output`]).
    Call { id: u64, task: u32, capture: bool, items: Count },
    /// Exit now, as a program does: run exit handlers and flush buffered output.
    Exit,
    /// A channel message (see [`ToWorker`]), at any time, also while a call runs.
    Channel(ToWorker),
    /// The parent's level filter changed: forward events up to `level` from now on
    /// (taken between calls).
    LogLevel { level: u8 },
}

/// A message from a worker to the parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Reply {
    /// Answer to [`Request::Init`]. `progress` is the descriptor number, in the
    /// worker, of the memory file where it records its [`Progress`], if it has one.
    /// `reads_stderr`: the worker reads its stderr pipe, the parent's (`Init::output`),
    /// and sends what was printed as [`Reply::Output`]; the parent reads that pipe
    /// only after the worker died.
    Ready { version: u32, pid: u32, tasks: Vec<TaskInfo>, progress: Option<u32>, reads_stderr: bool },
    /// Answer to the [`Request::Call`] with the same id. `errors` counts its items
    /// whose outcome is not an output (a panic, a codec error); `busy_ns` is how long
    /// the worker spent on it (decode, run, encode), which sizes prefetch and map
    /// chunks; `peak_rss_kib` is the worker's peak resident memory, when asked for
    /// (else 0). All three have fixed widths and end the header, so a worker patches
    /// them in once the call is done.
    Done { id: u64, errors: Count, busy_ns: Fixed64, peak_rss_kib: Fixed64 },
    /// A channel message (see [`ToParent`]), written by a running task.
    Channel(ToParent),
    /// `tracing` events the worker's tasks emitted, oldest first; `dropped` more
    /// were dropped because the worker's buffer was full.
    Log { records: Vec<LogRecord>, dropped: u32 },
    /// The running call's own account of its progress (`report_progress`).
    Progress { call: u64, done: u64, total: u64 },
    /// What was printed since the last `Output`, during call `call` if it is set:
    /// the body's first `stderr` bytes to stderr, the rest to stdout. Except in a
    /// call that does not capture its output: stdout and stderr then share one
    /// file position, so that their lines keep their order, and all of it comes
    /// as `stderr`. A call's last `Output` comes before its [`Reply::Done`].
    Output { call: Option<u64>, stderr: u32 },
}

/// The stderr and stdout parts of a [`Reply::Output`]'s body, whose first
/// `stderr` bytes are stderr's; `None` if it is shorter.
pub(crate) fn split_output(body: &[u8], stderr: u32) -> Option<(&[u8], &[u8])> {
    body.split_at_checked(usize::try_from(stderr).ok()?)
}

/// One `tracing` event of a worker, as the parent re-emits it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LogRecord {
    /// The call it was emitted in (0: between calls).
    pub(crate) call: u64,
    /// 1 error, 2 warn, 3 info, 4 debug, 5 trace.
    pub(crate) level: u8,
    /// The event's target (its module path, unless set).
    pub(crate) target: String,
    /// Its `message` field.
    pub(crate) message: String,
    /// Its other fields, as `name=value` separated by spaces.
    pub(crate) fields: String,
}

/// What a task says about a channel (a queue or a channel end) to the parent, which
/// brokers every channel. Frames of one worker arrive in the order it wrote them, so
/// everything a call said comes before its [`Reply::Done`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ToParent {
    /// The worker now holds a handle to `channel` in `role` (it decoded one).
    Attach { channel: u64, role: Role },
    /// The worker dropped its last handle to `channel` in `role`.
    Detach { channel: u64, role: Role },
    /// `count` items follow as records, one credit each. The count has a fixed
    /// width and ends the header, so a worker adds items to a frame it is building.
    Put { channel: u64, count: Count },
    /// Asks for at least one and at most `max` items; the parent answers
    /// [`ToWorker::Items`] or [`ToWorker::NoItems`] with the same `request`.
    /// With `wait` false, an empty channel answers at once with no items.
    Get { channel: u64, request: u64, max: u32, wait: bool },
    /// The worker gave up waiting for `request`: answer it no more.
    Cancel { channel: u64, request: u64 },
    /// Items given to this worker and not used, back to the front of the channel:
    /// `count` records, each the 8-byte delivery number then the item.
    Unget { channel: u64, count: u32 },
    /// The item of `delivery` is done with (an acknowledged channel).
    Ack { channel: u64, delivery: u64 },
    /// The item of `delivery` was not done with: deliver it again (an acknowledged
    /// channel).
    Nack { channel: u64, delivery: u64 },
    /// Close `channel`: later puts fail, gets drain what is left.
    Close { channel: u64 },
}

/// What the parent tells a worker about a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ToWorker {
    /// The worker may put `items` more items into `channel`.
    Credit { channel: u64, items: u32 },
    /// The answer to `request`: `count` records follow, each an 8-byte little-endian
    /// delivery number, a 4-byte count of earlier deliveries not acknowledged, then
    /// the item.
    Items { channel: u64, request: u64, count: u32 },
    /// The answer to `request`: nothing, because `channel` is closed and empty.
    NoItems { channel: u64, request: u64, why: Ended },
    /// `channel` accepts no more items.
    Closed { channel: u64, why: Ended },
}

/// The largest frame overhead around one channel item: frame and record lengths,
/// the header, a delivery number. An item may be `max_frame_len` minus this.
pub(crate) const ITEM_OVERHEAD: usize = 64;

/// What a handle may do with its channel. A channel's ends close it when all
/// handles of one role are gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) enum Role {
    /// A queue handle: puts and gets.
    Queue,
    /// A channel's sending end.
    Sender,
    /// A channel's receiving end.
    Receiver,
}

/// Why a channel accepts or yields no more items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Ended {
    /// It was closed, or the other side's every handle is gone.
    Closed,
    /// Its executor shut down.
    Shutdown,
    /// The parent knows no such channel.
    Unknown,
}

/// A `u64` in a fixed 8-byte encoding (postcard writes arrays byte by byte), so a
/// worker can write a reply header first and patch measurements in after the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Fixed64(pub(crate) [u8; 8]);

/// An item count in a fixed 4-byte encoding, so a map can write a chunk's header
/// before it knows how many inputs the chunk will hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Count(pub(crate) [u8; 4]);

impl Count {
    pub(crate) const WIDTH: usize = 4;

    pub(crate) fn new(count: u32) -> Self {
        Count(count.to_le_bytes())
    }

    pub(crate) fn get(self) -> u32 {
        u32::from_le_bytes(self.0)
    }
}

impl Fixed64 {
    pub(crate) const WIDTH: usize = 8;

    pub(crate) fn new(value: u64) -> Self {
        Fixed64(value.to_le_bytes())
    }

    pub(crate) fn get(self) -> u64 {
        u64::from_le_bytes(self.0)
    }
}

/// A task as a worker's registry describes it. The type names are for messages;
/// the shapes are what is compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TaskInfo {
    pub(crate) name: String,
    pub(crate) input: String,
    pub(crate) output: String,
    pub(crate) input_shape: Shape,
    pub(crate) output_shape: Shape,
}

/// What a type looks like on the wire (see `shape.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Shape {
    /// A hash of its serde data model, names left out.
    Fingerprint(u64),
    /// It needs this serde feature, which postcard cannot carry.
    Unsupported(String),
    /// It could not be traced, for this reason: only its name can be compared.
    Untraced(String),
}

/// How postcard encodes [`Outcome::Ok`] (variant 0): checked and written as a raw
/// byte on the hot path of every output.
pub(crate) const OUTCOME_OK: u8 = 0;

/// What became of one input of a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Outcome {
    /// The task returned; its encoded output follows.
    Ok,
    /// The task panicked.
    Panicked { message: String, location: Option<String>, backtrace: Option<String> },
    /// The worker could not decode the input: the two sides disagree on its type.
    BadInput { message: String },
    /// The worker could not encode the task's output.
    BadOutput { message: String },
    /// The worker has no task with that number.
    UnknownTask,
    /// The reply would have exceeded the frame limit.
    TooLarge { size: u64, limit: u64 },
    /// The parent withdrew the call before it started: it did not run.
    Skipped,
    /// The input held a shared-memory handle the worker could not map.
    Shared { error: crate::shared::SharedError },
}

/// How many of the outcome records in `body` are errors (not [`OUTCOME_OK`]).
pub(crate) fn error_records(mut body: &[u8]) -> u32 {
    let mut errors = 0;
    while let Some(record) = take_record(&mut body) {
        errors += u32::from(record.first() != Some(&OUTCOME_OK));
    }
    errors
}

/// The size of the length that precedes every input and outcome record.
pub(crate) const RECORD_PREFIX: usize = 4;

/// Starts a record at the end of `buf`; returns where it starts.
#[inline]
pub(crate) fn begin_record<B: Buf>(buf: &mut B) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0; RECORD_PREFIX]);
    start
}

/// Finishes the record begun at `start` by writing its length.
#[inline]
pub(crate) fn end_record<B: Buf>(buf: &mut B, start: usize) {
    end_record_with(buf, start, 0)
}

/// [`end_record`] for a record of which `spliced` bytes are not in `buf` (they
/// are written from their own buffers: see `blob::splicing`).
#[inline]
pub(crate) fn end_record_with<B: Buf>(buf: &mut B, start: usize, spliced: usize) {
    let len = buf.len() - start - RECORD_PREFIX + spliced;
    // A record longer than 4 GiB cannot fit a frame, whose length has 4 bytes too.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    buf.patch(start, &len.to_le_bytes());
}

/// Splits the next record off the front of `body`; `None` when `body` does not
/// start with a whole record.
#[inline]
pub(crate) fn take_record<'a>(body: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = body.split_first_chunk::<RECORD_PREFIX>()?;
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() < len {
        return None;
    }
    let (record, rest) = rest.split_at(len);
    *body = rest;
    Some(record)
}

/// Where a worker records its progress through the current call, at the start of
/// its reply buffer: a memory file the parent reads after the worker died. Each
/// field is a little-endian `u64`; offsets count from the start of the file.
///
/// The worker sets `call` when it starts a call (before it decodes any input), and
/// after each item `bytes` (where its outcome record ends) and then `items`. So
/// after a death the parent knows, for the call it was running, which items were
/// done (with their records, from `body` to `bytes`), which one was running, and
/// that the rest never started. Nothing is flushed or sent for this: a crash, even
/// `SIGKILL`, cannot lose what is already in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    /// The call being run ([`Progress::NO_CALL`] before the first).
    pub(crate) call: u64,
    /// Items of it done.
    pub(crate) items: u64,
    /// Where the records of the items done start.
    pub(crate) body: u64,
    /// Where they end.
    pub(crate) bytes: u64,
}

impl Progress {
    /// The file starts with this, so the parent knows it reads the right thing.
    pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"PRCXPRG2");
    pub(crate) const NO_CALL: u64 = u64::MAX;
    pub(crate) const MAGIC_AT: usize = 0;
    pub(crate) const CALL_AT: usize = 8;
    pub(crate) const ITEMS_AT: usize = 16;
    pub(crate) const BODY_AT: usize = 24;
    pub(crate) const BYTES_AT: usize = 32;
    /// Written by the parent: ids of calls sent ahead whose callers left, plus one,
    /// which the worker skips instead of starting ([`Progress::CANCEL_SLOTS`] of
    /// them, reused in turn; zero is empty).
    pub(crate) const CANCEL_AT: usize = 64;
    pub(crate) const CANCEL_SLOTS: usize = 8;
    /// Bytes the record takes at the start of the file; the reply frame follows.
    pub(crate) const SIZE: usize = 128;

    /// Reads the record from the start of a progress file; `None` if it is not one.
    pub(crate) fn parse(header: &[u8; Progress::SIZE]) -> Option<Progress> {
        let field = |at: usize| {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(bytes)
        };
        (field(Self::MAGIC_AT) == Self::MAGIC).then(|| Progress {
            call: field(Self::CALL_AT),
            items: field(Self::ITEMS_AT),
            body: field(Self::BODY_AT),
            bytes: field(Self::BYTES_AT),
        })
    }
}

/// A buffer frames are written into: a `BytesMut` in the parent, the shared reply
/// buffer in a worker.
pub(crate) trait Buf {
    fn len(&self) -> usize;
    fn extend_from_slice(&mut self, data: &[u8]);
    fn push(&mut self, byte: u8);
    fn truncate(&mut self, len: usize);
    /// Overwrites bytes already written, from `at`.
    fn patch(&mut self, at: usize, data: &[u8]);
}

impl Buf for BytesMut {
    #[inline]
    fn len(&self) -> usize {
        BytesMut::len(self)
    }

    #[inline]
    fn extend_from_slice(&mut self, data: &[u8]) {
        BytesMut::extend_from_slice(self, data)
    }

    #[inline]
    fn push(&mut self, byte: u8) {
        self.put_u8(byte)
    }

    #[inline]
    fn truncate(&mut self, len: usize) {
        BytesMut::truncate(self, len)
    }

    #[inline]
    fn patch(&mut self, at: usize, data: &[u8]) {
        self[at..at + data.len()].copy_from_slice(data)
    }
}

/// A worker's reply buffer: the [`Progress`] record, then the reply frame being
/// built, in memory the parent can read after the worker died
/// ([`SharedBuf`](crate::sys::SharedBuf)). Positions count from the start of the
/// buffer, record included.
pub(crate) struct ReplyBuf {
    buf: crate::sys::SharedBuf,
    /// Items of the current call whose outcome is an error.
    pub(crate) errors: u32,
}

impl ReplyBuf {
    pub(crate) fn new() -> std::io::Result<Self> {
        let mut buf = crate::sys::SharedBuf::new(1 << 20)?;
        buf.extend_from_slice(&[0; Progress::SIZE]);
        buf.publish(Progress::CALL_AT, Progress::NO_CALL);
        buf.publish(Progress::MAGIC_AT, Progress::MAGIC);
        Ok(ReplyBuf { buf, errors: 0 })
    }

    /// The descriptor of the memory file, when the parent can read it.
    pub(crate) fn file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.buf.file()
    }

    /// Drops the frame, keeping the progress record.
    pub(crate) fn clear(&mut self) {
        self.buf.truncate(Progress::SIZE);
    }

    /// The frame built so far.
    pub(crate) fn frame(&self) -> &[u8] {
        &self.buf.as_slice()[Progress::SIZE..]
    }

    /// Records that call `id` started, its item records beginning here.
    #[inline]
    pub(crate) fn begin_call(&mut self, id: u64) {
        self.errors = 0;
        let here = self.buf.len() as u64;
        self.buf.publish(Progress::ITEMS_AT, 0);
        self.buf.publish(Progress::BODY_AT, here);
        self.buf.publish(Progress::BYTES_AT, here);
        self.buf.publish(Progress::CALL_AT, id);
    }

    /// Whether the parent withdrew call `id` (see [`Progress::CANCEL_AT`]).
    pub(crate) fn is_withdrawn(&self, id: u64) -> bool {
        // Slots hold `id + 1`: a zeroed slot withdraws nothing. (Only the
        // initializer's call has the id `u64::MAX`, and it is never withdrawn.)
        let Some(marked) = id.checked_add(1) else {
            return false;
        };
        (0..Progress::CANCEL_SLOTS).any(|slot| self.buf.load(Progress::CANCEL_AT + 8 * slot) == marked)
    }

    /// The progress record as another process would read it.
    #[cfg(test)]
    pub(crate) fn progress(&self) -> Progress {
        let mut header = [0; Progress::SIZE];
        header.copy_from_slice(&self.buf.as_slice()[..Progress::SIZE]);
        Progress::parse(&header).expect("a progress record")
    }

    /// Records that `items` items of the call are done, their records ending here.
    #[inline]
    pub(crate) fn items_done(&mut self, items: u32) {
        self.buf.publish(Progress::BYTES_AT, self.buf.len() as u64);
        self.buf.publish(Progress::ITEMS_AT, u64::from(items));
    }
}

impl Buf for ReplyBuf {
    #[inline]
    fn len(&self) -> usize {
        self.buf.len()
    }

    #[inline]
    fn extend_from_slice(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data)
    }

    #[inline]
    fn push(&mut self, byte: u8) {
        self.buf.push(byte)
    }

    #[inline]
    fn truncate(&mut self, len: usize) {
        // Never into the progress record.
        self.buf.truncate(len.max(Progress::SIZE))
    }

    #[inline]
    fn patch(&mut self, at: usize, data: &[u8]) {
        self.buf.patch(at, data)
    }
}

/// The codec the parent frames with; the worker reads the same frames with
/// [`take_frame`].
#[cfg(feature = "executor")]
pub(crate) fn codec(max_frame_len: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(LENGTH_PREFIX)
        .max_frame_length(max_frame_len)
        .new_codec()
}

/// Takes the next whole frame (without its length prefix) off the front of `buf`,
/// or `None` until one has arrived: what [`codec`] decodes, written out so that a
/// worker reads frames without tokio-util.
pub(crate) fn take_frame(buf: &mut BytesMut, max_frame_len: usize) -> io::Result<Option<BytesMut>> {
    let Some(prefix) = buf.first_chunk::<LENGTH_PREFIX>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*prefix) as usize;
    if len > max_frame_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes, over the limit of {max_frame_len}"),
        ));
    }
    let Some(missing) = (LENGTH_PREFIX + len).checked_sub(buf.len()).filter(|&n| n > 0) else {
        bytes::Buf::advance(buf, LENGTH_PREFIX);
        return Ok(Some(buf.split_to(len)));
    };
    // Room for the rest of the frame at once, as the codec makes.
    buf.reserve(missing);
    Ok(None)
}

/// Blobs (`crate::Blob`) from this size on are not copied into a frame being spliced: the frame
/// refers to them and they are written from their own buffers. Below it, a copy
/// costs less than one more piece to write.
pub(crate) const SPLICE_FROM: usize = 64 * 1024;

/// The blobs an encoding left out of its buffer, each with the buffer offset it
/// belongs at.
#[derive(Default)]
pub(crate) struct Splice {
    /// The blob being serialized, whose bytes the flavor may take by reference.
    offered: Option<Bytes>,
    pub(crate) parts: Vec<(usize, Bytes)>,
}

thread_local! {
    static SPLICE: RefCell<Option<Splice>> = const { RefCell::new(None) };
}

/// Runs `encode` with large blobs spliced rather than copied: what it returns, and
/// the blobs left out of the buffer with their offsets (see `take_spliced`).
pub(crate) fn splicing<R>(encode: impl FnOnce() -> R) -> (R, Vec<(usize, Bytes)>) {
    struct Restore(Option<Splice>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            let _ = SPLICE.try_with(|splice| splice.replace(previous));
        }
    }
    let previous = SPLICE.try_with(|splice| splice.replace(Some(Splice::default()))).ok().flatten();
    let restore = Restore(previous);
    let result = encode();
    let parts = SPLICE
        .try_with(|splice| splice.borrow_mut().take().map(|splice| splice.parts).unwrap_or_default())
        .unwrap_or_default();
    drop(restore);
    (result, parts)
}

/// Offers a blob's bytes to the frame being spliced on this thread, if any (true
/// then: withdraw the offer once they are serialized).
pub(crate) fn offer_splice(bytes: &Bytes) -> bool {
    if bytes.len() < SPLICE_FROM {
        return false;
    }
    SPLICE
        .try_with(|splice| match splice.borrow_mut().as_mut() {
            Some(splice) => {
                splice.offered = Some(bytes.clone());
                true
            }
            None => false,
        })
        .unwrap_or(false)
}

/// Withdraws what [`offer_splice`] offered, taken or not.
pub(crate) fn withdraw_splice() {
    let _ = SPLICE.try_with(|splice| splice.borrow_mut().as_mut().map(|splice| splice.offered = None));
}

/// Called by the encoding flavor with bytes about to be copied into a buffer of
/// `len` bytes: true if they are the offered blob's, now recorded at `len` instead.
#[inline]
fn take_spliced(data: &[u8], len: usize) -> bool {
    if data.len() < SPLICE_FROM {
        return false;
    }
    SPLICE
        .try_with(|splice| {
            let mut splice = splice.borrow_mut();
            let Some(splice) = splice.as_mut() else {
                return false;
            };
            match splice.offered.take() {
                Some(blob) if blob.as_ptr() == data.as_ptr() && blob.len() == data.len() => {
                    splice.parts.push((len, blob));
                    true
                }
                other => {
                    splice.offered = other;
                    false
                }
            }
        })
        .unwrap_or(false)
}

/// A postcard flavor that appends to a [`Buf`], copying byte strings in one go.
pub(crate) struct Append<'a, B>(pub(crate) &'a mut B);

impl<B: Buf> postcard::ser_flavors::Flavor for Append<'_, B> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        // A large blob of a frame being spliced stays where it is.
        if !take_spliced(data, self.0.len()) {
            self.0.extend_from_slice(data);
        }
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Appends the postcard encoding of `value` to `buf`.
#[inline]
pub(crate) fn encode_into<B: Buf, T: Serialize + ?Sized>(buf: &mut B, value: &T) -> postcard::Result<()> {
    postcard::serialize_with_flavor(value, Append(buf))
}

/// Starts a frame at the end of `buf`; returns where it starts.
#[inline]
pub(crate) fn begin_frame<B: Buf>(buf: &mut B) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0; LENGTH_PREFIX]);
    start
}

/// Finishes the frame begun at `start` by writing its length.
///
/// Fails with the body's size when it exceeds `max_frame_len`; the caller then drops
/// the frame (`buf.truncate(start)`).
#[inline]
pub(crate) fn end_frame<B: Buf>(buf: &mut B, start: usize, max_frame_len: usize) -> Result<(), usize> {
    end_frame_with(buf, start, max_frame_len, 0)
}

/// [`end_frame`] for a frame of which `spliced` bytes are not in `buf`.
#[inline]
pub(crate) fn end_frame_with<B: Buf>(
    buf: &mut B,
    start: usize,
    max_frame_len: usize,
    spliced: usize,
) -> Result<(), usize> {
    let len = buf.len() - start - LENGTH_PREFIX + spliced;
    if len > max_frame_len || len > u32::MAX as usize {
        return Err(len);
    }
    buf.patch(start, &(len as u32).to_be_bytes());
    Ok(())
}

/// Appends one whole frame holding `header` and no body.
pub(crate) fn write_message<B: Buf, T: Serialize>(
    buf: &mut B,
    header: &T,
    max_frame_len: usize,
) -> Result<(), FrameError> {
    let start = begin_frame(buf);
    let result = encode_into(buf, header)
        .map_err(FrameError::Encode)
        .and_then(|()| end_frame(buf, start, max_frame_len).map_err(FrameError::TooLarge));
    if result.is_err() {
        buf.truncate(start);
    }
    result
}

/// Why a frame could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("cannot encode it: {0}")]
    Encode(postcard::Error),
    #[error("it is {0} bytes, above the frame limit")]
    TooLarge(usize),
}

/// Splits a frame into its header and body.
pub(crate) fn split_header<'a, T: Deserialize<'a>>(frame: &'a [u8]) -> postcard::Result<(T, &'a [u8])> {
    postcard::take_from_bytes(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio_util::codec::Decoder;

    fn round_trip_frame(header: &Request, body: &[u8]) -> (Request, Vec<u8>) {
        let mut buf = BytesMut::new();
        let start = begin_frame(&mut buf);
        encode_into(&mut buf, header).unwrap();
        buf.extend_from_slice(body);
        end_frame(&mut buf, start, 1 << 20).unwrap();
        let frame = codec(1 << 20).decode(&mut buf).unwrap().expect("one whole frame");
        assert!(buf.is_empty(), "the codec consumed exactly one frame");
        let (header, body) = split_header::<Request>(&frame).unwrap();
        (header, body.to_vec())
    }

    #[test]
    fn frames_written_by_hand_are_what_the_codec_reads() {
        let call = Request::Call { id: 7, task: 2, capture: false, items: Count::new(3) };
        assert_eq!(round_trip_frame(&call, b"body"), (call, b"body".to_vec()));
    }

    #[test]
    fn an_oversized_frame_is_refused_and_leaves_the_buffer_as_it_was() {
        let mut buf = BytesMut::from(&b"earlier"[..]);
        let start = begin_frame(&mut buf);
        buf.extend_from_slice(&[0; 100]);
        assert_eq!(end_frame(&mut buf, start, 99), Err(100));
        buf.truncate(start);
        assert_eq!(&buf[..], b"earlier");
    }

    #[test]
    fn the_measurements_are_the_last_sixteen_bytes_of_a_done_header() {
        let mut buf = BytesMut::new();
        let zero = Fixed64::new(0);
        encode_into(
            &mut buf,
            &Reply::Done { id: 300, errors: Count::new(0), busy_ns: zero, peak_rss_kib: zero },
        )
        .unwrap();
        let at = buf.len() - 2 * Fixed64::WIDTH;
        buf[at..at + Fixed64::WIDTH].copy_from_slice(&Fixed64::new(123_456_789).0);
        buf[at + Fixed64::WIDTH..].copy_from_slice(&Fixed64::new(4096).0);
        assert_eq!(
            split_header::<Reply>(&buf).unwrap().0,
            Reply::Done {
                id: 300,
                errors: Count::new(0),
                busy_ns: Fixed64::new(123_456_789),
                peak_rss_kib: Fixed64::new(4096)
            }
        );
    }

    #[test]
    fn outcome_ok_is_the_single_byte_the_fast_paths_use() {
        assert_eq!(postcard::to_allocvec(&Outcome::Ok).unwrap(), [OUTCOME_OK]);
        assert_eq!(postcard::from_bytes::<Outcome>(&[OUTCOME_OK]).unwrap(), Outcome::Ok);
    }

    #[test]
    fn the_messages_of_version_two_round_trip() {
        let mut buf = BytesMut::new();
        write_message(&mut buf, &Request::Exit, 1 << 10).unwrap();
        let frame = codec(1 << 10).decode(&mut buf).unwrap().unwrap();
        assert_eq!(split_header::<Request>(&frame).unwrap().0, Request::Exit);
        let skipped = postcard::to_allocvec(&Outcome::Skipped).unwrap();
        assert_eq!(postcard::from_bytes::<Outcome>(&skipped).unwrap(), Outcome::Skipped);
        let bad = Outcome::BadOutput { message: "injected".into() };
        assert_eq!(postcard::from_bytes::<Outcome>(&postcard::to_allocvec(&bad).unwrap()).unwrap(), bad);
    }

    #[test]
    fn error_records_are_those_not_starting_with_ok() {
        let mut body = BytesMut::new();
        for record in [&[OUTCOME_OK, 1][..], &[1, 2, 3], &[OUTCOME_OK], &[]] {
            let start = begin_record(&mut body);
            body.extend_from_slice(record);
            end_record(&mut body, start);
        }
        assert_eq!(error_records(&body), 2);
    }

    #[test]
    fn records_are_found_by_their_length_whatever_they_hold() {
        let mut buf = BytesMut::new();
        for record in [&b"first"[..], b"", b"\xff\xff not postcard"] {
            let start = begin_record(&mut buf);
            buf.extend_from_slice(record);
            end_record(&mut buf, start);
        }
        let mut body = &buf[..];
        assert_eq!(take_record(&mut body), Some(&b"first"[..]));
        assert_eq!(take_record(&mut body), Some(&b""[..]));
        assert_eq!(take_record(&mut body), Some(&b"\xff\xff not postcard"[..]));
        assert_eq!(take_record(&mut body), None);
        // A length running past the body is no record.
        assert_eq!(take_record(&mut &[9, 0, 0, 0, 1][..]), None);
    }

    #[test]
    fn a_progress_record_is_read_only_behind_its_magic() {
        let mut header = [0u8; Progress::SIZE];
        assert_eq!(Progress::parse(&header), None);
        for (at, value) in [
            (Progress::MAGIC_AT, Progress::MAGIC),
            (Progress::CALL_AT, 7),
            (Progress::ITEMS_AT, 3),
            (Progress::BODY_AT, 100),
            (Progress::BYTES_AT, 130),
        ] {
            header[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        assert_eq!(Progress::parse(&header), Some(Progress { call: 7, items: 3, body: 100, bytes: 130 }));
    }

    #[test]
    fn the_codec_rejects_frames_above_its_limit() {
        let mut buf = BytesMut::new();
        buf.put_u32(1000);
        buf.extend_from_slice(&[0; 1000]);
        assert!(codec(999).decode(&mut buf).is_err());
    }

    proptest! {
        // The worker's reader and the parent's codec must cut a stream into the same
        // frames, however the bytes arrive, and refuse the same oversized ones.
        #[test]
        fn the_worker_reads_frames_as_the_codec_does(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..6),
            split in 0usize..2000,
            max in 0usize..400,
        ) {
            let mut stream = BytesMut::new();
            for frame in &frames {
                stream.extend_from_slice(&(frame.len() as u32).to_be_bytes());
                stream.extend_from_slice(frame);
            }
            let split = split.min(stream.len());
            let (mut ours, mut theirs) = (BytesMut::from(&stream[..split]), BytesMut::from(&stream[..split]));
            let mut codec = codec(max);
            let mut rest = &stream[split..];
            loop {
                let (a, b) = (take_frame(&mut ours, max), codec.decode(&mut theirs));
                match (a, b) {
                    (Ok(Some(a)), Ok(Some(b))) => prop_assert_eq!(a, b),
                    (Ok(None), Ok(None)) if rest.is_empty() => break,
                    (Ok(None), Ok(None)) => {
                        ours.extend_from_slice(rest);
                        theirs.extend_from_slice(rest);
                        rest = &[];
                    }
                    (Err(_), Err(_)) => break,
                    (a, b) => prop_assert!(false, "the worker read {a:?}, the codec {b:?}"),
                }
            }
        }
    }

    proptest! {
        #[test]
        fn requests_round_trip(id: u64, task: u32, items: u32, body: Vec<u8>) {
            let call = Request::Call { id, task, capture: false, items: Count::new(items) };
            prop_assert_eq!(round_trip_frame(&call, &body), (call, body));
        }

        #[test]
        fn replies_round_trip(id: u64, busy_ns: u64, name: String, pid: u32) {
            for reply in [
                Reply::Done {
                    id,
                    errors: Count::new(pid),
                    busy_ns: Fixed64::new(busy_ns),
                    peak_rss_kib: Fixed64::new(busy_ns / 3),
                },
                Reply::Ready {
                    version: PROTOCOL_VERSION,
                    pid,
                    tasks: vec![TaskInfo {
                        name: name.clone(),
                        input: "u64".into(),
                        output: "()".into(),
                        input_shape: Shape::Fingerprint(1),
                        output_shape: Shape::Untraced("no reason".into()),
                    }],
                    progress: Some(pid / 2),
                    reads_stderr: pid % 2 == 0,
                },
            ] {
                let mut buf = BytesMut::new();
                write_message(&mut buf, &reply, 1 << 20).unwrap();
                let frame = codec(1 << 20).decode(&mut buf).unwrap().unwrap();
                prop_assert_eq!(split_header::<Reply>(&frame).unwrap().0, reply);
            }
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes: Vec<u8>) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut codec = codec(1 << 16);
            while let Ok(Some(frame)) = codec.decode(&mut buf) {
                let _ = split_header::<Reply>(&frame);
                let _ = split_header::<Request>(&frame);
                let _ = split_header::<Outcome>(&frame);
            }
        }
    }
}
