//! What workers print, and where it goes.
//!
//! A worker on this machine prints into a memory file the parent made (stderr from
//! offset 0, stdout from `protocol::STDOUT_AT`). The worker sends what each call
//! printed ahead of the call's reply (see `worker::output`), so each line is
//! labelled with its task and call, or kept for the caller of `spawn_captured`;
//! what a crash cut short is read from the file afterwards. A worker elsewhere
//! prints into a pipe, read line by line here and labelled with its worker.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::sys;
use crate::wire::protocol;

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
    /// with fields `worker`, `pid`, `task`, `call` and `stream` (`stdout` or
    /// `stderr`), or `worker` and `host` for a worker elsewhere.
    Tracing,
    /// Keep only the tail that crash reports quote.
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
pub(crate) struct Printed {
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
}

/// Where a call's output goes: to its caller, or forwarded.
pub(crate) type Capture = Arc<Mutex<Printed>>;

impl Source {
    /// Passes on `line` (no newline) as `mode` says.
    fn emit(&self, call: Option<CallLabel>, stream: &'static str, line: &str, batch: &mut String) {
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
                tracing::info!(target: "procexec::worker", worker = slot, pid, stream, "{line}")
            }
            (WorkerStderr::Tracing, None, Some(CallLabel { task, call })) => {
                tracing::info!(target: "procexec::worker", worker = slot, pid, task, call, stream, "{line}")
            }
            (WorkerStderr::Tracing, Some(host), _) => {
                tracing::info!(target: "procexec::worker", worker = slot, host = &**host, "{line}")
            }
            (WorkerStderr::Discard, ..) => {}
        }
    }
}

/// A local worker's output file, as far as the worker has sent it.
pub(crate) struct OutputFile {
    file: OwnedFd,
    /// Where the bytes not yet received start: stderr, stdout.
    received: [u64; 2],
    tail: Tail,
    source: Source,
}

/// The most of a dead worker's unsent output that is read.
const REST_LIMIT: u64 = 1 << 20;

impl OutputFile {
    /// A new output file, and the descriptor the worker gets as its stderr.
    pub(crate) fn create() -> io::Result<(OwnedFd, OwnedFd)> {
        let file = sys::output_file()?;
        let for_worker = file.try_clone()?;
        Ok((file, for_worker))
    }

    pub(crate) fn new(file: OwnedFd, source: Source) -> Self {
        OutputFile { file, received: [0, protocol::STDOUT_AT], tail: Tail::default(), source }
    }

    /// What the worker must find as its stderr (`Init::output`).
    pub(crate) fn identity(&self) -> Option<(u64, u64)> {
        sys::file_identity(self.file.as_fd()).ok()
    }

    /// What the worker sent in an `Output` frame.
    pub(crate) fn received(
        &mut self,
        call: Option<CallLabel>,
        capture: Option<&Capture>,
        stderr: &[u8],
        stdout: &[u8],
    ) {
        self.received[0] += stderr.len() as u64;
        self.received[1] += stdout.len() as u64;
        self.pass_on(call, capture, stderr, stdout);
    }

    fn pass_on(&mut self, call: Option<CallLabel>, capture: Option<&Capture>, stderr: &[u8], stdout: &[u8]) {
        let mut batch = String::new();
        for (stream, bytes) in [("stderr", stderr), ("stdout", stdout)] {
            for line in lines(bytes) {
                // Kept first, so a slow stderr does not delay what crash reports quote.
                self.tail.push(&line);
                if capture.is_none() {
                    self.source.emit(call, stream, &line, &mut batch);
                }
            }
        }
        if let Some(capture) = capture {
            let mut captured = capture.lock().unwrap_or_else(|p| p.into_inner());
            captured.stderr.extend_from_slice(stderr);
            captured.stdout.extend_from_slice(stdout);
        }
        write_batch(batch);
    }

    /// Reads what the worker printed and never sent (it died, or printed on its way
    /// out), as printed in `call`, and returns the tail crash reports quote.
    pub(crate) fn finish(&mut self, call: Option<CallLabel>, capture: Option<&Capture>) -> String {
        let [stderr, stdout] = [0, 1].map(|stream| {
            let from = self.received[stream];
            // What the worker sent and then freed but never arrived (left in the
            // pipe) reads as a hole: what it printed after that is read all the same.
            let limit = if stream == 0 { protocol::STDOUT_AT } else { u64::MAX };
            let from = match sys::data_start(self.file.as_fd(), from) {
                Ok(Some(start)) if start < limit => start,
                _ => from,
            };
            let end = sys::data_end(self.file.as_fd(), from).unwrap_or(from);
            // The last of it, if it is very much.
            let from = from.max(end.saturating_sub(REST_LIMIT));
            let mut data = sys::read_at(self.file.as_fd(), from, (end - from) as usize).unwrap_or_default();
            self.received[stream] = end;
            // The file reads as zeros after the last byte written, to the page's end.
            data.truncate(data.iter().rposition(|&b| b != 0).map_or(0, |at| at + 1));
            data
        });
        self.pass_on(call, capture, &stderr, &stdout);
        self.tail.text()
    }
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

/// Hands lines to the `procexec-stderr` thread without waiting: when it is this far
/// behind (this process's stderr is not read), they are dropped, and counted.
fn write_batch(batch: String) {
    if batch.is_empty() {
        return;
    }
    let Some(writer) = stderr_writer() else {
        return;
    };
    if let Err(mpsc::error::TrySendError::Full(ToStderr::Lines(batch))) =
        writer.try_send(ToStderr::Lines(batch))
    {
        DROPPED_LINES.fetch_add(batch.lines().count() as u64, Ordering::Relaxed);
    }
}

/// Lines of worker output dropped because this process's stderr fell behind.
static DROPPED_LINES: AtomicU64 = AtomicU64::new(0);

/// What a worker prints goes through its output file, or (a worker elsewhere) a pipe.
pub(crate) enum WorkerOutput {
    File(OutputFile),
    Pipe(StderrLog),
    /// A worker thread (in-process) prints to this process's stdout and stderr.
    Parent,
}

impl WorkerOutput {
    /// The output file, where the worker sends what it printed.
    pub(crate) fn file(&mut self) -> Option<&mut OutputFile> {
        match self {
            WorkerOutput::File(file) => Some(file),
            WorkerOutput::Pipe(_) | WorkerOutput::Parent => None,
        }
    }

    /// The last lines the worker printed, once all of them are in: what it never
    /// sent is passed on as printed in `running`.
    pub(crate) async fn tail(
        &mut self,
        running: Option<(CallLabel, Option<&Capture>)>,
        patience: Duration,
    ) -> String {
        match self {
            WorkerOutput::File(file) => {
                let (call, capture) = running.map_or((None, None), |(call, capture)| (Some(call), capture));
                let tail = file.finish(call, capture);
                flush_writer().await;
                tail
            }
            WorkerOutput::Pipe(log) => log.tail_after_close(patience).await,
            WorkerOutput::Parent => String::new(),
        }
    }
}

/// Waits until the `procexec-stderr` thread wrote every line handed to it so far.
async fn flush_writer() {
    if let Some(writer) = stderr_writer() {
        let (ack, written) = oneshot::channel();
        if writer.send(ToStderr::Flush(ack)).await.is_ok() {
            let _ = written.await;
        }
    }
}
/// The worker's stderr: forwarded line by line, and its tail kept for crash reports.
pub(crate) struct StderrLog {
    tail: Arc<Mutex<Tail>>,
    forwarder: JoinHandle<()>,
    closed: Option<oneshot::Receiver<()>>,
}

impl StderrLog {
    pub(crate) fn start(pipe: pipe::Receiver, source: Source) -> Self {
        let tail = Arc::new(Mutex::new(Tail::default()));
        let (done, closed) = oneshot::channel();
        let forwarder = tokio::spawn(forward_stderr(pipe, source, tail.clone(), done));
        StderrLog { tail, forwarder, closed: Some(closed) }
    }

    async fn tail_after_close(&mut self, patience: Duration) -> String {
        if let Some(closed) = self.closed.take() {
            let _ = tokio::time::timeout(patience, closed).await;
        }
        self.tail.lock().unwrap_or_else(|p| p.into_inner()).text()
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
        source.emit(None, "stderr", text, &mut line);
        if !line.is_empty() {
            if let Some(writer) = stderr_writer() {
                // Waits while the writer is behind: the worker's stderr pipe then
                // fills and slows the worker, never the runtime.
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
#[derive(Default)]
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
    fn a_dead_workers_rest_is_read_past_what_it_freed_and_the_parent_never_received() {
        use std::os::unix::fs::FileExt;
        let (file, for_worker) = OutputFile::create().unwrap();
        let source = Source { slot: 0, pid: 1, host: None, mode: WorkerStderr::Discard };
        let mut output = OutputFile::new(file, source);
        let worker = std::fs::File::from(for_worker);
        // Sent up to 2 MiB and freed below it; the parent received 1 MiB of it.
        worker.write_all_at(&vec![b'x'; 2 << 20], 0).unwrap();
        worker.write_all_at(b"last words\n", 2 << 20).unwrap();
        sys::punch_hole(worker.as_fd(), 0, 2 << 20).unwrap();
        output.received(None, None, &vec![b'x'; 1 << 20], &[]);
        let printed = Capture::default();
        output.finish(None, Some(&printed));
        assert_eq!(printed.lock().unwrap().stderr, b"last words\n");
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
