//! What tasks print, attributed to the call that printed it.
//!
//! A worker's stdout and stderr are one pipe, so their lines keep their order. The
//! worker reads that pipe itself, through a read end it opens on its own stderr,
//! and sends what each call printed in [`Reply::Output`] frames ahead of the call's
//! reply; meanwhile the hang-up watcher sends what was printed [`LIVE_EVERY`]
//! after it came (at once when much is waiting). Printing stays a plain pipe
//! write: a program a task runs may reopen `/dev/stderr` by name.
//!
//! When the pipe is the parent's own (a worker on its machine), the parent reads it
//! only while the worker cannot: before its handshake and after it died, when what
//! the worker never read (a crash's last words) is still in the pipe. A call that
//! captures its output has stdout apart, in a pipe of the worker's own.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::BytesMut;

use crate::channel::link::{Link, LinkRef};
use crate::sys;
use crate::wire::protocol::{self, Reply};

/// How often the output of a running call is forwarded.
pub(crate) const LIVE_EVERY: Duration = Duration::from_millis(100);

/// The most printed bytes one frame carries (less under a smaller frame limit).
const FRAME_DATA: usize = 256 * 1024;

/// Output waiting this much (or half the pipe) is read at once, before a printing
/// task blocks on a full pipe.
const READ_AT_ONCE: usize = 256 * 1024;

/// The most a call's end takes: what is printed meanwhile by what outlives calls
/// (a thread a task left running, a grandchild) must not hold its reply back.
const MOST_AT_END: usize = 16 << 20;

/// One stream's pipe, as the worker reads it.
struct Stream {
    /// The read end (non-blocking).
    read: OwnedFd,
    /// Read, not sent yet.
    unsent: Vec<u8>,
}

impl Stream {
    /// Reads what the pipe holds now, up to `max` bytes in all waiting.
    fn fill(&mut self, max: usize) {
        while self.unsent.len() < max {
            let room = max - self.unsent.len();
            match sys::read_some(self.read.as_fd(), &mut self.unsent, room) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Takes at most `max` bytes of what was read, cut after a newline if the frame
    /// may have more behind it, or if its call still runs (`live`): the parent takes
    /// a frame's last piece for a whole line. The rest of a running call's line
    /// waits for the next look (which finds its newline, mostly), no longer: read,
    /// it would be lost here in a crash. A line longer than `max`, or without a
    /// newline for a look, goes in pieces.
    fn take(&mut self, max: usize, live: bool) -> Vec<u8> {
        let len = self.unsent.len().min(max);
        let mut end = len;
        // A full frame may have more behind it, read or not.
        if live || len == max {
            if let Some(at) = self.unsent[..len].iter().rposition(|&b| b == b'\n') {
                end = at + 1;
            }
        }
        self.unsent.drain(..end).collect()
    }
}

/// What this worker prints: stderr (and stdout, unless apart), then stdout apart.
struct Printed {
    streams: [Stream; 2],
    /// The write end of the stdout-apart pipe.
    stdout_apart: OwnedFd,
    /// The running call has stdout apart: its end reads that pipe too (a call's
    /// end otherwise costs one read, of the stderr pipe).
    apart_in_use: bool,
    /// The most printed bytes per frame.
    frame_data: usize,
    /// Output waiting this much is read at once, before a printing task blocks on
    /// a full pipe.
    at_once: usize,
}

static PRINTED: Mutex<Option<Printed>> = Mutex::new(None);

/// Starts attributing output if the worker's stderr (which stdout shares:
/// `take_protocol_stdio`) is the pipe the parent named (`parent_pipe`, its device
/// and inode numbers): the parent then leaves it to the worker while it lives.
/// Another pipe (a launcher's, a wrapper's) has a reader of its own, which would
/// take lines from under the worker. Returns whether it did.
pub(crate) fn install(parent_pipe: Option<(u64, u64)>, max_frame_len: usize) -> bool {
    install_on(parent_pipe, max_frame_len).is_some()
}

fn install_on(parent_pipe: Option<(u64, u64)>, max_frame_len: usize) -> Option<()> {
    let stderr = sys::stderr_fd();
    if parent_pipe.is_none() || sys::pipe_identity(stderr) != parent_pipe {
        return None;
    }
    let read = sys::reopen_for_reading(stderr).ok()?;
    let (apart_read, stdout_apart) = sys::pipe().ok()?;
    sys::set_nonblocking(apart_read.as_fd()).ok()?;
    // Room for what a task prints between two looks of the watcher.
    sys::grow_pipe(read.as_fd(), 1 << 20);
    sys::grow_pipe(apart_read.as_fd(), 1 << 20);
    let stream = |read| Stream { read, unsent: Vec::new() };
    let streams = [stream(read), stream(apart_read)];
    // Room for the header within the frame limit (at least 1 KiB).
    let frame_data = FRAME_DATA.min(max_frame_len - 64);
    // Half the pipe (which the kernel may have kept small).
    let at_once = READ_AT_ONCE.min(sys::pipe_size(streams[0].read.as_fd()) / 2).max(1);
    *lock() = Some(Printed { streams, stdout_apart, apart_in_use: false, frame_data, at_once });
    Some(())
}

fn lock() -> std::sync::MutexGuard<'static, Option<Printed>> {
    PRINTED.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Points stdout at a pipe of its own (`apart`: a call that captures its output),
/// or back at stderr's. What Rust's and C's stdio buffer must be flushed first.
pub(crate) fn stdout_apart(apart: bool) {
    if let Some(printed) = lock().as_mut() {
        let fd = if apart { printed.stdout_apart.as_fd() } else { sys::stderr_fd() };
        // Failing, stdout stays where it is: its output then comes as the other stream's.
        let _ = sys::point_stdout_at(fd);
        if apart {
            printed.apart_in_use = true;
        }
    }
}

/// Appends to `out` frames carrying everything printed since the last look, as
/// printed during `call`; whenever they hold `budget` bytes, hands them to `write`
/// first. Runs `then` before the streams are let go, so the hang-up watcher cannot
/// send output of `call` after it (see [`forward_live`]).
pub(crate) fn take_all(
    call: Option<u64>,
    out: &mut BytesMut,
    budget: usize,
    mut write: impl FnMut(&[u8]) -> io::Result<()>,
    then: impl FnOnce(),
) -> io::Result<()> {
    let mut guard = lock();
    if let Some(printed) = guard.as_mut() {
        let mut taken = 0;
        while taken < MOST_AT_END && printed.take(call, out, budget, false) {
            taken += out.len();
            write(out)?;
            out.clear();
        }
        printed.apart_in_use = false;
    }
    then();
    Ok(())
}

impl Printed {
    /// Appends to `out` frames of what was printed, as printed during `call`: all
    /// of it, or `budget` bytes (`live`: the call still runs). Returns whether more
    /// is left.
    fn take(&mut self, call: Option<u64>, out: &mut BytesMut, budget: usize, live: bool) -> bool {
        let [stderr_stream, stdout_stream] = &mut self.streams;
        let mut taken = 0;
        loop {
            stderr_stream.fill(self.frame_data);
            if live || self.apart_in_use {
                stdout_stream.fill(self.frame_data);
            }
            let stderr = stderr_stream.take(self.frame_data, live);
            let stdout = stdout_stream.take(self.frame_data - stderr.len(), live);
            if stderr.is_empty() && stdout.is_empty() {
                return false;
            }
            let start = protocol::begin_frame(out);
            // An `Output` header holds only integers, which postcard always encodes.
            let _ = protocol::encode_into(out, &Reply::Output { call, stderr: stderr.len() as u32 });
            out.extend_from_slice(&stderr);
            out.extend_from_slice(&stdout);
            let _ = protocol::end_frame(out, start, usize::MAX);
            let frame = stderr.len() + stdout.len();
            taken += frame;
            if taken >= budget {
                return true;
            }
            // A running call's last line, cut off, waits for the next look.
            if live && frame < self.frame_data {
                return false;
            }
        }
    }

    /// Bytes waiting in the pipes, read or not.
    fn waiting(&self) -> usize {
        self.streams.iter().map(|stream| stream.unsent.len() + sys::bytes_readable(stream.read.as_fd())).sum()
    }
}

/// Marks a call as running, or as ended (`change`), under the streams' lock, so
/// that the hang-up watcher's look falls wholly before or after (see
/// [`forward_live`]).
pub(crate) fn calls_change(change: impl FnOnce()) {
    let _guard = lock();
    change();
}

/// Sends what was printed so far, as printed by the call running now
/// (`running`), from the hang-up watcher. Skipped while the main thread takes
/// output itself.
pub(crate) fn forward_live(running: impl Fn() -> Option<u64>) {
    let mut guard = match PRINTED.try_lock() {
        Ok(guard) => guard,
        Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    let Some(printed) = guard.as_mut() else {
        return;
    };
    // Looked at under the lock: a call starts (`calls_change`) and ends (it takes
    // its output and stops counting as running, see `take_all`) only under it, so
    // what is taken is the call's (or no call's), and is written before its last
    // output.
    let call = running();
    let mut frames = BytesMut::new();
    loop {
        let more = printed.take(call, &mut frames, FRAME_DATA, true);
        if frames.is_empty() {
            return;
        }
        if Link::write_frame(&LinkRef::Process, &frames, true).is_err() || !more {
            return;
        }
        frames.clear();
    }
}

/// The read ends the hang-up watcher waits on: unset until the worker decided
/// whether it reads its output ([`decided`]), then its pipes' (none if it does not).
static WATCHED: OnceLock<Vec<OwnedFd>> = OnceLock::new();

/// See [`WATCHED`]; after [`install`], if at all.
pub(crate) fn decided() {
    let watched = lock().as_ref().map_or_else(Vec::new, |printed| {
        printed.streams.iter().filter_map(|stream| stream.read.try_clone().ok()).collect()
    });
    let _ = WATCHED.set(watched);
}

/// What to wait on for output, once decided (see [`WATCHED`]).
pub(crate) fn watched() -> Option<Vec<BorrowedFd<'static>>> {
    WATCHED.get().map(|fds| fds.iter().map(AsFd::as_fd).collect())
}

/// Whether so much output waits that it should be read now.
pub(crate) fn much_waiting() -> bool {
    lock().as_ref().is_some_and(|printed| printed.waiting() >= printed.at_once)
}
