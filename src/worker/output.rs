//! What tasks print, attributed to the call that printed it.
//!
//! A worker on the parent's machine gets a memory file as its stderr, not a pipe;
//! its stdout is the same file from [`protocol::STDOUT_AT`]. Printing never
//! blocks, and the worker knows exactly how much each call printed: when a call
//! ends it sends what was printed since the last look in [`Reply::Output`] frames,
//! ahead of the call's reply. While a call runs, the hang-up watcher sends its
//! finished lines every [`LIVE_EVERY`]. What a crash cut short stays in the file,
//! where the parent reads it. Anything else (a worker whose stderr is not the
//! parent's file, as behind ssh) prints to its pipe as before.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use bytes::BytesMut;

use crate::channel::link::LinkRef;
use crate::sys;
use crate::wire::protocol::{self, Reply};

/// How often the output of a running call is forwarded.
pub(crate) const LIVE_EVERY: Duration = Duration::from_millis(100);

/// The most printed bytes one frame carries (less under a smaller frame limit).
const FRAME_DATA: usize = 256 * 1024;

/// Forwarded bytes are freed from the file in steps of this.
const FREE_STEP: u64 = 1 << 20;

struct Stream {
    /// The stream's open file description, through a descriptor of our own: a task
    /// that points fd 1 or 2 elsewhere for a while (and back) moves nothing here.
    fd: OwnedFd,
    /// Where the bytes not yet sent start.
    sent: u64,
    /// Below this, the file's memory is freed.
    freed: u64,
}

impl Stream {
    /// What was printed and not yet sent, at most `max` bytes; only up to the last
    /// newline if `whole_lines`. Cut at a newline too when more is left than `max`
    /// (the parent takes a frame's last piece for a whole line): after the last one
    /// in it, or, if it holds none, nowhere (a line longer than a frame, when `max`
    /// is a whole frame's room, `full`) or before it all (the next frame has room).
    fn unsent(&mut self, max: usize, whole_lines: bool, full: bool) -> Vec<u8> {
        let Ok(end) = sys::position(self.fd.as_fd()) else {
            return Vec::new();
        };
        // Someone moved the position back (a task seeking its stdout): start over there.
        if end < self.sent {
            self.sent = end;
            self.freed = self.freed.min(end);
        }
        let len = (end - self.sent).min(max as u64) as usize;
        if len == 0 {
            return Vec::new();
        }
        let more = end - self.sent > len as u64;
        let mut data = sys::read_at(self.fd.as_fd(), self.sent, len).unwrap_or_default();
        if whole_lines || more {
            match data.iter().rposition(|&b| b == b'\n') {
                Some(at) => data.truncate(at + 1),
                None if whole_lines || !full => data.clear(),
                None => {}
            }
        }
        data
    }

    fn advance(&mut self, by: usize) {
        self.sent += by as u64;
        let page = self.sent & !4095;
        if page >= self.freed + FREE_STEP
            && sys::punch_hole(self.fd.as_fd(), self.freed, page - self.freed).is_ok()
        {
            self.freed = page;
        }
    }
}

/// What this worker prints: stderr, then stdout.
struct Printed {
    streams: [Stream; 2],
    /// The most printed bytes per frame.
    frame_data: usize,
}

static PRINTED: Mutex<Option<Printed>> = Mutex::new(None);

/// Starts attributing output if the worker's stderr is the parent's file
/// `identity`: points stdout into it too. Returns whether it did.
pub(crate) fn install(identity: Option<(u64, u64)>, max_frame_len: usize) -> bool {
    let stderr = sys::std_fd(2);
    if identity.is_none() || sys::file_identity(stderr).ok() != identity {
        return false;
    }
    // Under a file size limit (the parent checked only its own), a write at
    // `STDOUT_AT` would kill the worker (`SIGXFSZ`): stdout stays where it is.
    if !sys::file_size_unlimited() {
        return false;
    }
    if sys::stdout_into_stderr_file(protocol::STDOUT_AT).is_err() {
        return false;
    }
    let (Ok(stderr), Ok(stdout)) = (stderr.try_clone_to_owned(), sys::std_fd(1).try_clone_to_owned()) else {
        return false;
    };
    // What was printed before (the program's own start-up) goes out as no call's.
    let streams = [
        Stream { fd: stderr, sent: 0, freed: 0 },
        Stream { fd: stdout, sent: protocol::STDOUT_AT, freed: protocol::STDOUT_AT },
    ];
    // Room for the header within the frame limit (at least 1 KiB).
    let frame_data = FRAME_DATA.min(max_frame_len - 64);
    *lock() = Some(Printed { streams, frame_data });
    true
}

fn lock() -> std::sync::MutexGuard<'static, Option<Printed>> {
    PRINTED.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Appends to `out` frames carrying what was printed since the last look, as
/// printed during `call`; beyond `budget` bytes, the oldest are handed to `write`
/// first. Then runs `then` (the call stops counting as running). All of it under
/// the streams' lock, so frames the hang-up watcher sends for `call` (see
/// [`forward_live`]) come before all of these, never between or after them.
pub(crate) fn take_all(
    call: Option<u64>,
    out: &mut BytesMut,
    budget: usize,
    mut write: impl FnMut(&[u8]) -> io::Result<()>,
    then: impl FnOnce(),
) -> io::Result<()> {
    let mut guard = lock();
    if let Some(printed) = guard.as_mut() {
        while printed.take(call, out, budget, false) {
            write(out)?;
            out.clear();
        }
    }
    then();
    Ok(())
}

impl Printed {
    /// Appends to `out` frames carrying what was printed since the last look, as
    /// printed during `call`: at least all of it, or `budget` bytes. Returns whether
    /// more is left. Only whole lines if `whole_lines` (a call still running).
    fn take(&mut self, call: Option<u64>, out: &mut BytesMut, budget: usize, whole_lines: bool) -> bool {
        let [stderr_stream, stdout_stream] = &mut self.streams;
        let mut taken = 0;
        while taken < budget {
            let stderr = stderr_stream.unsent(self.frame_data, whole_lines, true);
            let stdout = stdout_stream.unsent(self.frame_data - stderr.len(), whole_lines, stderr.is_empty());
            if stderr.is_empty() && stdout.is_empty() {
                return false;
            }
            let start = protocol::begin_frame(out);
            // An `Output` header holds only integers, which postcard always encodes.
            let _ = protocol::encode_into(out, &Reply::Output { call, stderr: stderr.len() as u32 });
            out.extend_from_slice(&stderr);
            out.extend_from_slice(&stdout);
            let _ = protocol::end_frame(out, start, usize::MAX);
            stderr_stream.advance(stderr.len());
            stdout_stream.advance(stdout.len());
            taken += stderr.len() + stdout.len();
        }
        true
    }
}

/// Sends the finished lines the call running now (`running`) printed so far, from
/// the hang-up watcher. Skipped while the main thread is taking output itself, and
/// between calls.
pub(crate) fn forward_live(running: impl Fn() -> Option<u64>) {
    let Ok(mut guard) = PRINTED.try_lock() else {
        return;
    };
    let Some(printed) = guard.as_mut() else {
        return;
    };
    // Looked at under the lock: the running call cannot end before it is released
    // (it takes its output and stops counting as running under it, see
    // `take_all`), so what is taken is its, and is written before its last output.
    // Between calls one may start any time: output then waits for the next call's end.
    let Some(call) = running() else {
        return;
    };
    let mut frames = BytesMut::new();
    loop {
        let more = printed.take(Some(call), &mut frames, FRAME_DATA, true);
        if frames.is_empty() {
            return;
        }
        // Written while the streams are locked: the call's last output, taken
        // after this, is written after it.
        if crate::channel::link::Link::write_frame(&LinkRef::Process, &frames, true).is_err() || !more {
            return;
        }
        frames.clear();
    }
}
