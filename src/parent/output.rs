//! What workers print, and where it goes.
//!
//! A worker reads its own stdout and stderr (one pipe) and sends what each call
//! printed ahead of the call's reply (see `worker::output`), so each line is
//! labelled with its task and call, or kept for the caller of `spawn_captured`.
//! When that pipe is the one the parent gave it (a worker on this machine), the
//! parent reads it only after the worker died: what a crash cut short is still in
//! it. Otherwise (a launcher's own output, a worker that cannot read its stderr)
//! the parent reads its pipe line by line, labelled with the worker only.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::sys;

/// What to do with the lines a worker prints (to stdout or stderr), unless they
/// are captured ([`Executor::spawn_captured`](crate::Executor::spawn_captured)).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::tasks! {}
/// # procexec::init_worker(&TASKS);
/// // Route worker output into the application's tracing subscriber.
/// let exec = procexec::Executor::builder()
///     .stderr(procexec::WorkerStderr::Tracing)
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WorkerStderr {
    /// Write each line to this process's stderr, prefixed with
    /// `[procexec worker <slot> pid <pid> task <task> call <n>]`, or
    /// `[procexec worker <slot> pid <pid>]` for a line printed between calls
    /// (`[procexec worker <slot> on <host>]` for a worker elsewhere, see
    /// [`WorkerGroup`](crate::WorkerGroup), whose lines name no call). The default.
    #[default]
    Forward,
    /// Emit each line as a `tracing` event (target `procexec::worker`, level INFO)
    /// with fields `worker`, `pid`, `task` and `call` (the last two for a line
    /// printed in a call), or `worker` and `host` for a worker elsewhere.
    Tracing,
    /// Keep only the tail that crash reports quote. Workers then look at what
    /// they printed at the end of captured calls only, which saves each other
    /// call a read of the pipe.
    Discard,
}

/// The worker a line comes from.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub(crate) slot: usize,
    pub(crate) pid: u32,
    /// The worker's host, if it is not this one.
    pub(crate) host: Option<Arc<str>>,
    pub(crate) mode: WorkerStderr,
}

/// The call a line was printed in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallLabel {
    pub(crate) task: &'static str,
    pub(crate) call: u64,
}

/// What one call printed, kept for its caller.
#[derive(Debug, Default)]
pub(crate) struct CallOutput {
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
}

/// Where a call's output goes: to its caller, or forwarded.
pub(crate) type Capture = Arc<Mutex<CallOutput>>;

impl Source {
    /// Passes on `line` (no newline) as `mode` says.
    fn emit(&self, call: Option<CallLabel>, line: &str, batch: &mut String) {
        let Source { slot, pid, host, mode } = self;
        match (mode, host, call) {
            (WorkerStderr::Forward, None, None) => {
                batch.push_str(&format!("[procexec worker {slot} pid {pid}] {line}\n"));
            }
            (WorkerStderr::Forward, None, Some(CallLabel { task, call })) => {
                batch.push_str(&format!(
                    "[procexec worker {slot} pid {pid} task {task} call {call}] {line}\n"
                ));
            }
            (WorkerStderr::Forward, Some(host), _) => {
                batch.push_str(&format!("[procexec worker {slot} on {host}] {line}\n"));
            }
            (WorkerStderr::Tracing, None, None) => {
                tracing::info!(target: "procexec::worker", worker = slot, pid, "{line}")
            }
            (WorkerStderr::Tracing, None, Some(CallLabel { task, call })) => {
                tracing::info!(target: "procexec::worker", worker = slot, pid, task, call, "{line}")
            }
            (WorkerStderr::Tracing, Some(host), _) => {
                tracing::info!(target: "procexec::worker", worker = slot, host = &**host, "{line}")
            }
            (WorkerStderr::Discard, ..) => {}
        }
    }
}

/// What a worker printed, as the parent sees it: the lines it sent in `Output`
/// frames, and its stderr pipe, read here while the worker does not read it.
pub(crate) struct WorkerOutput {
    source: Source,
    /// The last lines, for crash reports (shared with the pipe's forwarder).
    tail: Arc<Mutex<Tail>>,
    /// The stderr pipe, while nobody reads it: before the handshake, and while the
    /// worker reads it itself. Read when the worker is dead.
    held: Option<OwnedFd>,
    /// Reads the stderr pipe line by line, when the worker does not.
    forwarder: Option<StderrLog>,
}

/// The most of a dead worker's unread output that is read.
const REST_LIMIT: usize = 1 << 20;

impl WorkerOutput {
    /// A worker process's, whose stderr is the pipe whose read end is `pipe`.
    pub(crate) fn new(pipe: OwnedFd, source: Source) -> Self {
        // Read only when nothing more can come (or nothing waits for it): never wait.
        let _ = sys::set_nonblocking(pipe.as_fd());
        WorkerOutput { source, tail: Arc::default(), held: Some(pipe), forwarder: None }
    }

    /// A worker thread's (in-process), which prints to this process's stdout and
    /// stderr itself.
    pub(crate) fn thread(source: Source) -> Self {
        WorkerOutput { source, tail: Arc::default(), held: None, forwarder: None }
    }

    /// The pipe's device and inode numbers, for `Init::output`.
    pub(crate) fn pipe_identity(&self) -> Option<(u64, u64)> {
        self.held.as_ref().and_then(|pipe| sys::pipe_identity(pipe.as_fd()))
    }

    /// After the handshake: unless the worker reads its stderr pipe itself
    /// (`Ready::reads_stderr`), it is read here from now on.
    pub(crate) fn handshake_done(&mut self, worker_reads_it: bool) -> io::Result<()> {
        if worker_reads_it {
            return Ok(());
        }
        if let Some(held) = self.held.take() {
            let pipe = pipe::Receiver::from_owned_fd(held)?;
            self.forwarder = Some(StderrLog::start(pipe, self.source.clone(), self.tail.clone()));
        }
        Ok(())
    }

    /// What the worker sent in an `Output` frame.
    pub(crate) fn received(
        &mut self,
        call: Option<CallLabel>,
        capture: Option<&Capture>,
        stderr: &[u8],
        stdout: &[u8],
    ) {
        let mut batch = String::new();
        // What a call captures is its caller's: crash reports of other calls do not
        // quote it.
        if let Some(capture) = capture {
            let mut captured = capture.lock().unwrap_or_else(|p| p.into_inner());
            captured.stderr.extend_from_slice(stderr);
            captured.stdout.extend_from_slice(stdout);
        } else {
            let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
            for bytes in [stderr, stdout] {
                for line in lines(bytes) {
                    // Kept first, so a slow stderr does not delay what crash reports quote.
                    tail.push(&line);
                    self.source.emit(call, &line, &mut batch);
                }
            }
        }
        write_batch(batch);
    }

    /// Reads what the worker printed and never read itself (it died, or printed on
    /// its way out), as printed in `call`, and returns the tail crash reports quote.
    pub(crate) fn finish(&mut self, call: Option<CallLabel>, capture: Option<&Capture>) -> String {
        if let Some(held) = &self.held {
            let rest = sys::read_available(held.as_fd(), REST_LIMIT);
            self.received(call, capture, &rest, &[]);
        }
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // Its own output ends the report of a captured call.
        if let Some(capture) = capture {
            let captured = capture.lock().unwrap_or_else(|p| p.into_inner());
            for line in lines(&captured.stdout).chain(lines(&captured.stderr)) {
                tail.push(&line);
            }
        }
        tail.text()
    }

    /// The last lines the dead worker printed, once all of them are in: what it
    /// never read itself is passed on as printed in `running`. The pipe is read
    /// until it closes, within `patience` (a grandchild may hold it).
    pub(crate) async fn tail(
        &mut self,
        running: Option<(CallLabel, Option<&Capture>)>,
        patience: Duration,
    ) -> String {
        let (call, capture) = running.map_or((None, None), |(call, capture)| (Some(call), capture));
        if let Some(forwarder) = &mut self.forwarder {
            forwarder.wait_closed(patience).await;
        }
        if let Some(pipe) = self.held.as_ref().and_then(|held| held.try_clone().ok()) {
            let rest = read_until_closed(pipe, patience).await;
            self.received(call, capture, &rest, &[]);
        }
        let tail = self.finish(call, capture);
        // Not forever: this process's stderr may not be read at all.
        let _ = tokio::time::timeout(patience, flush_writer()).await;
        tail
    }
}

/// What the pipe `pipe` holds until it closes (at most [`REST_LIMIT`] bytes), or
/// what came within `patience`.
async fn read_until_closed(pipe: OwnedFd, patience: Duration) -> Vec<u8> {
    let mut rest = Vec::new();
    let Ok(mut pipe) = pipe::Receiver::from_owned_fd(pipe) else {
        return rest;
    };
    let read = async {
        let mut buf = [0; 8192];
        while rest.len() < REST_LIMIT {
            match pipe.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(patience, read).await;
    rest
}

/// The lines of `bytes`, without their newlines; a last line need not end in one.
fn lines(bytes: &[u8]) -> impl Iterator<Item = String> + '_ {
    let any = !bytes.is_empty();
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes
        .split(|&b| b == b'\n')
        .filter(move |_| any)
        .map(|line| String::from_utf8_lossy(line).trim_end_matches('\r').to_string())
}

/// Hands lines to the `procexec-stderr` thread without waiting: when it is
/// [`BACKLOG_BYTES`] behind (this process's stderr is not read), they are dropped,
/// and counted.
fn write_batch(batch: String) {
    if batch.is_empty() {
        return;
    }
    let Some(writer) = stderr_writer() else {
        return;
    };
    let len = batch.len();
    let queued = QUEUED_BYTES.fetch_add(len, Ordering::AcqRel);
    let refused = if queued + len > BACKLOG_BYTES {
        Some(batch)
    } else {
        match writer.try_send(ToStderr::Lines(batch)) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(ToStderr::Lines(batch))) => Some(batch),
            Err(_) => Some(String::new()),
        }
    };
    if let Some(batch) = refused {
        QUEUED_BYTES.fetch_sub(len, Ordering::AcqRel);
        DROPPED_LINES.fetch_add(batch.lines().count() as u64, Ordering::Relaxed);
    }
}

/// Lines of worker output dropped because this process's stderr fell behind.
static DROPPED_LINES: AtomicU64 = AtomicU64::new(0);

/// Bytes of lines handed to the `procexec-stderr` thread and not written yet.
static QUEUED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The most bytes of lines that wait for the `procexec-stderr` thread.
const BACKLOG_BYTES: usize = 16 << 20;

/// Waits until the `procexec-stderr` thread wrote every line handed to it so far.
async fn flush_writer() {
    if let Some(writer) = stderr_writer() {
        let (ack, written) = oneshot::channel();
        if writer.send(ToStderr::Flush(ack)).await.is_ok() {
            let _ = written.await;
        }
    }
}
/// A worker's stderr pipe read here: forwarded line by line, its tail kept for
/// crash reports.
struct StderrLog {
    forwarder: JoinHandle<()>,
    closed: Option<oneshot::Receiver<()>>,
}

impl StderrLog {
    fn start(pipe: pipe::Receiver, source: Source, tail: Arc<Mutex<Tail>>) -> Self {
        let (done, closed) = oneshot::channel();
        let forwarder = tokio::spawn(forward_stderr(pipe, source, tail, done));
        StderrLog { forwarder, closed: Some(closed) }
    }

    /// Waits until the pipe closed and its last lines were passed on, within `patience`.
    async fn wait_closed(&mut self, patience: Duration) {
        if let Some(closed) = self.closed.take() {
            let _ = tokio::time::timeout(patience, closed).await;
        }
    }
}

impl Drop for StderrLog {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

async fn forward_stderr(
    pipe: pipe::Receiver,
    source: Source,
    tail: Arc<Mutex<Tail>>,
    done: oneshot::Sender<()>,
) {
    let mut reader = BufReader::with_capacity(8 * 1024, pipe);
    let mut line = Vec::with_capacity(256);
    let mut forwarded = false;
    loop {
        line.clear();
        // A "line" without a newline ends at MAX_LINE bytes, so output without
        // newlines cannot grow the parent's memory.
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        // Kept before forwarding, so a slow stderr does not delay what crash reports quote.
        tail.lock().unwrap_or_else(|p| p.into_inner()).push(text);
        let mut line = String::new();
        source.emit(None, text, &mut line);
        if !line.is_empty() {
            if let Some(writer) = stderr_writer() {
                // Waits while the writer is behind: the worker's stderr pipe then
                // fills and slows the worker, never the runtime.
                QUEUED_BYTES.fetch_add(line.len(), Ordering::AcqRel);
                forwarded |= writer.send(ToStderr::Lines(line)).await.is_ok();
            }
        }
    }
    // A worker stopped at shutdown has its last lines written before `closed`
    // fires, so they are not lost when the program exits right after.
    if forwarded {
        flush_writer().await;
    }
    let _ = done.send(());
}

/// What forwarders send the `procexec-stderr` thread.
enum ToStderr {
    /// Lines to write, newlines included.
    Lines(String),
    /// Answered once every line sent before it is written.
    Flush(oneshot::Sender<()>),
}

/// The lines the `procexec-stderr` thread writes to this process's stderr, or
/// `None` if it cannot be started.
///
/// Writing to stderr blocks when it is a pipe nobody drains; on a runtime thread
/// that would stall every task (all of them, on a current-thread runtime). One
/// thread for the whole process does the writing instead.
fn stderr_writer() -> Option<&'static mpsc::Sender<ToStderr>> {
    static WRITER: OnceLock<Option<mpsc::Sender<ToStderr>>> = OnceLock::new();
    WRITER
        .get_or_init(|| {
            let (sender, mut messages) = mpsc::channel(STDERR_BACKLOG);
            let started = std::thread::Builder::new().name("procexec-stderr".into()).spawn(move || {
                while let Some(message) = messages.blocking_recv() {
                    match message {
                        ToStderr::Lines(lines) => {
                            let mut stderr = io::stderr().lock();
                            QUEUED_BYTES.fetch_sub(lines.len(), Ordering::AcqRel);
                            let dropped = DROPPED_LINES.swap(0, Ordering::Relaxed);
                            if dropped > 0 {
                                let _ = writeln!(
                                    stderr,
                                    "[procexec] {dropped} lines workers printed were dropped: this process's stderr fell behind"
                                );
                            }
                            let _ = stderr.write_all(lines.as_bytes());
                        }
                        ToStderr::Flush(ack) => {
                            let _ = ack.send(());
                        }
                    }
                }
            });
            match started {
                Ok(_) => Some(sender),
                Err(err) => {
                    tracing::error!(
                        "cannot start the procexec-stderr thread, worker stderr is not forwarded: {err}"
                    );
                    None
                }
            }
        })
        .as_ref()
}

/// Batches of lines waiting for the `procexec-stderr` thread, across all workers:
/// enough to ride out a burst, few enough to bound memory (a pipe's batch is a line
/// of at most `MAX_LINE`, a file's what one frame carries).
const STDERR_BACKLOG: usize = 64;

/// Longest stderr line forwarded as one.
const MAX_LINE: u64 = 64 * 1024;

/// The last lines of a stream, bounded in lines and bytes.
#[derive(Clone, Default)]
struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Tail {
    const MAX_LINES: usize = 20;
    const MAX_BYTES: usize = 4096;

    fn push(&mut self, line: &str) {
        let mut end = line.len().min(Self::MAX_BYTES);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        let line = line[..end].to_string();
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > Self::MAX_LINES || self.bytes > Self::MAX_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.len(),
                None => break,
            }
        }
    }

    fn text(&self) -> String {
        let mut text = String::with_capacity(self.bytes + self.lines.len());
        for line in &self.lines {
            text.push_str(line);
            text.push('\n');
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines_within_bounds() {
        let mut tail = Tail::default();
        for i in 0..100 {
            tail.push(&format!("line {i}"));
        }
        let text = tail.text();
        assert!(text.ends_with("line 99\n"));
        assert_eq!(text.lines().count(), Tail::MAX_LINES);
        tail.push(&"x".repeat(10_000));
        assert!(tail.text().len() <= Tail::MAX_BYTES + Tail::MAX_LINES);
        // A long line of multi-byte characters keeps its first 4 KiB, cut cleanly.
        tail.push(&"é".repeat(10_000));
        assert!(tail.text().starts_with('é') && tail.text().len() > Tail::MAX_BYTES / 2);
    }

    #[test]
    fn a_dead_workers_unread_output_is_read_once_and_goes_to_its_call() {
        let (read, write) = sys::pipe().unwrap();
        let source = Source { slot: 0, pid: 1, host: None, mode: WorkerStderr::Discard };
        let mut output = WorkerOutput::new(read, source);
        std::fs::File::from(write).write_all(b"last words\n").unwrap();
        let printed = Capture::default();
        let tail = output.finish(None, Some(&printed));
        assert_eq!(printed.lock().unwrap().stderr, b"last words\n");
        assert_eq!(tail, "last words\n");
        // Read once: a second look finds nothing more.
        output.finish(None, Some(&printed));
        assert_eq!(printed.lock().unwrap().stderr, b"last words\n");
    }

    #[test]
    fn output_splits_into_lines_with_or_without_a_last_newline() {
        assert_eq!(lines(b"").count(), 0);
        assert_eq!(lines(b"\n").collect::<Vec<_>>(), [""]);
        assert_eq!(lines(b"a\r\nb\n").collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(lines(b"a\n\nb").collect::<Vec<_>>(), ["a", "", "b"]);
    }
}
