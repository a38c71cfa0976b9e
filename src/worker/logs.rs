//! A worker's `tracing` events, forwarded to the parent, which re-emits them in its
//! own subscriber under the span where the call was made.
//!
//! The worker's subscriber enables exactly the levels the parent's filter wants
//! (sent at the handshake, and again when it changes), through the callsite
//! interest cache: a filtered-out event costs what a disabled `tracing` callsite
//! costs, nothing is formatted or sent. Enabled events are formatted into a bounded
//! buffer, sent in batches: when the buffer fills (if the link is free; otherwise
//! later, so a task never waits on the link to log), and at the end of every call,
//! before its reply. What does not fit is dropped and counted, and the parent says
//! so. Only in a worker process: an in-process worker's events go straight to the
//! parent's own subscriber.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use bytes::BytesMut;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

use crate::channel::link::{Link, LinkRef};
use crate::wire::protocol::{self, LogRecord, Reply};

/// Records sent in one batch once this many wait.
const BATCH: usize = 64;
/// Records kept while the link is busy; more are dropped (and counted).
const CAPACITY: usize = 4096;

/// The most verbose level forwarded (0: none).
static LEVEL: AtomicU8 = AtomicU8::new(0);
/// The call running now, plus one (0: none).
static CALL: AtomicU64 = AtomicU64::new(0);
static BUFFER: Mutex<Buffer> = Mutex::new(Buffer { records: Vec::new(), dropped: 0 });
/// Whether `BUFFER` may hold something: a call that logged nothing ends without
/// taking its lock.
static PENDING: AtomicBool = AtomicBool::new(false);

struct Buffer {
    records: Vec<LogRecord>,
    dropped: u32,
}

pub(crate) fn level_number(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

/// Installs the forwarding subscriber, unless this process has one already or the
/// parent wants nothing (then events go wherever the worker's own code sends them,
/// its stderr say, which the parent forwards line by line).
pub(crate) fn install(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
    if level > 0 {
        let _ = tracing::subscriber::set_global_default(Forwarder { next_span: AtomicU64::new(1) });
    }
}

/// Follows a change of the parent's filter.
pub(crate) fn set_level(level: u8) {
    if LEVEL.swap(level, Ordering::Relaxed) != level {
        tracing::callsite::rebuild_interest_cache();
    }
}

/// Marks the call running now (`None` between calls), for the records emitted in it.
pub(crate) fn set_call(call: Option<u64>) {
    CALL.store(call.map_or(0, |id| id.wrapping_add(1)), Ordering::Relaxed);
}

/// What is buffered, as a frame for the caller to write (at the end of a call,
/// in the same write as the reply); `None` when nothing is.
pub(crate) fn take_frame() -> Option<BytesMut> {
    take().map(|(frame, _)| frame)
}

/// What is buffered as a frame, and how many records it accounts for.
fn take() -> Option<(BytesMut, u32)> {
    if !PENDING.swap(false, Ordering::Acquire) {
        return None;
    }
    let (records, dropped) = {
        let mut buffer = lock();
        if buffer.records.is_empty() && buffer.dropped == 0 {
            return None;
        }
        (std::mem::take(&mut buffer.records), std::mem::take(&mut buffer.dropped))
    };
    let lost = dropped + records.len() as u32;
    let mut frame = BytesMut::new();
    match protocol::write_message(&mut frame, &Reply::Log { records, dropped }, usize::MAX) {
        Ok(()) => Some((frame, lost)),
        Err(_) => {
            count_lost(lost);
            None
        }
    }
}

/// Sends what is buffered; `wait`: even if the link is busy (at the end of a call).
pub(crate) fn flush(wait: bool) {
    let Some((frame, records)) = take() else {
        return;
    };
    // A batch the link cannot take now (busy, or broken) is dropped and counted.
    if !matches!(Link::write_frame(&LinkRef::Process, &frame, wait), Ok(true)) {
        count_lost(records);
    }
}

/// Records that will never be sent, said in the next batch's `dropped`.
fn count_lost(records: u32) {
    lock().dropped += records;
    PENDING.store(true, Ordering::Release);
}

fn lock() -> std::sync::MutexGuard<'static, Buffer> {
    BUFFER.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Forwarder {
    next_span: AtomicU64,
}

impl Forwarder {
    fn wants(metadata: &Metadata<'_>) -> bool {
        level_number(metadata.level()) <= LEVEL.load(Ordering::Relaxed)
    }
}

impl Subscriber for Forwarder {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if Self::wants(metadata) { Interest::always() } else { Interest::never() }
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        Self::wants(metadata)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(match LEVEL.load(Ordering::Relaxed) {
            0 => tracing::level_filters::LevelFilter::OFF,
            1 => tracing::level_filters::LevelFilter::ERROR,
            2 => tracing::level_filters::LevelFilter::WARN,
            3 => tracing::level_filters::LevelFilter::INFO,
            4 => tracing::level_filters::LevelFilter::DEBUG,
            _ => tracing::level_filters::LevelFilter::TRACE,
        })
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        // Spans inside a worker are not forwarded; their events are.
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let metadata = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let record = LogRecord {
            call: CALL.load(Ordering::Relaxed).wrapping_sub(1),
            level: level_number(metadata.level()),
            target: metadata.target().to_owned(),
            message: fields.message,
            fields: fields.rest,
        };
        let full = {
            let mut buffer = lock();
            if buffer.records.len() >= CAPACITY {
                buffer.dropped += 1;
                return;
            }
            buffer.records.push(record);
            buffer.records.len() >= BATCH
        };
        PENDING.store(true, Ordering::Release);
        if full {
            flush(false);
        }
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// An event's fields: its message, and the others as `name=value`.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.separate();
            let _ = write!(self.rest, "{}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.separate();
            let _ = write!(self.rest, "{}={value:?}", field.name());
        }
    }
}

impl Fields {
    fn separate(&mut self) {
        if !self.rest.is_empty() {
            self.rest.push(' ');
        }
    }
}
