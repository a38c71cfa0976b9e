//! The worker side: the loop a worker process runs, reading calls and answering them.
//!
//! Plain blocking IO on one thread: a worker does one thing at a time, and a blocking
//! read/compute/write loop is the shortest path a request can take. A second thread
//! only watches for the parent's hang-up, so a worker deep in a CPU loop still exits
//! when its parent goes away.
//!
//! The same loop also runs on a thread of the parent, in-process (see
//! `Builder::in_process`): then without what only a process of its own may do
//! (take over stdio, watch for the hang-up, exit, install a global subscriber), and
//! with a link and a context of its own instead of the process's.

mod context;
mod logs;
mod output;
pub(crate) mod state;

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde::Serialize;
use serde::de::DeserializeOwned;

use self::context::Context;
use crate::channel::link::{FrameReader, Link, LinkRef, WorkerLink};
use crate::sys;
use crate::task::sealed::Sealed;
use crate::task::{Registry, Task};
use crate::wire::blob;
use crate::wire::codec::{self, decode_exactly};
use crate::wire::panic::catch_panic;
use crate::wire::protocol::{self, Buf, Fixed64, Outcome, Reply, ReplyBuf, Request};

/// Serves `tasks` if this process was started as a procexec worker, and returns
/// otherwise: the one-binary (self-executing) mode.
///
/// Call it first thing in `main`, before parsing arguments or starting a runtime:
/// in a plain `fn main`, not inside `#[tokio::main]`, which starts a runtime first,
/// so that each worker would carry an idle one. (It still works there.)
/// An [`Executor`](crate::Executor) built without [`Builder::program`] re-runs the
/// current executable with a marker in its environment; in that child this function
/// never returns.
///
/// The worker removes the marker from its environment before it starts serving, so
/// a task that runs the current executable again gets the program, not another
/// worker. That removal is only sound while no other thread reads or writes the
/// environment: threads the program started before this call (a runtime's idle
/// workers, say) must not use `std::env` or `getenv` at the same time.
///
/// [`Builder::program`]: crate::Builder::program
///
/// # Examples
///
/// ```
/// procexec::tasks! {
///     pub fn square(x: u64) -> u64 { x * x }
/// }
///
/// fn main() -> procexec::Result<()> {
///     // First thing: in a worker process it serves and never returns, so the
///     // runtime below is only ever started in the parent.
///     procexec::init_worker(&TASKS);
///     tokio::runtime::Runtime::new().expect("a Tokio runtime").block_on(async {
///         let exec = procexec::Executor::builder().build().await?;
///         assert_eq!(exec.spawn(square, 7).await?, 49);
///         Ok(())
///     })
/// }
/// ```
pub fn init_worker(tasks: &'static Registry) {
    if std::env::var_os(protocol::WORKER_ENV).is_some() {
        serve_worker(tasks)
    }
}

/// Serves `tasks` until the parent hangs up, then exits the process: the `main` of
/// a companion worker binary.
///
/// Run by hand (not by an executor) it explains itself and exits with code 2. It
/// removes the executor's marker from its environment before serving, so the
/// programs its tasks start (this binary among them) inherit none.
///
/// # Examples
///
/// A complete worker binary, given a library `my_tasks` that defines its tasks with
/// [`tasks!`](crate::tasks):
///
/// ```ignore
/// fn main() {
///     procexec::serve_worker(&my_tasks::TASKS)
/// }
/// ```
pub fn serve_worker(tasks: &'static Registry) -> ! {
    if std::env::var_os(protocol::WORKER_ENV).is_none() {
        eprintln!(
            "this is a procexec worker: it serves {} task(s) to a procexec::Executor, which starts it",
            tasks.len()
        );
        std::process::exit(2);
    }
    match serve(tasks) {
        Ok(()) => std::process::exit(0),
        Err(err) => {
            eprintln!("procexec worker {}: {err}", std::process::id());
            std::process::exit(3)
        }
    }
}

/// Tells the parent how far the running task is: `done` of `total` (any unit),
/// shown in [`Stats::live`](crate::Stats::live) as the worker's
/// [`RunningCall::reported`](crate::RunningCall::reported). Cheap to call often:
/// reports are coalesced (one sent per 50 ms at most, and the last one when
/// `done == total`), and a report never waits. Does nothing outside a worker, nor,
/// in-process (see [`Builder::in_process`](crate::Builder::in_process)), on a
/// thread other than the worker's own.
///
/// ```
/// procexec::tasks! {
///     pub fn long_sum(n: u64) -> u64 {
///         let mut sum = 0u64;
///         for i in 0..n {
///             sum = sum.wrapping_add(i);
///             if i % 100_000 == 0 {
///                 procexec::report_progress(i, n);
///             }
///         }
///         procexec::report_progress(n, n);
///         sum
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> procexec::Result<()> {
/// # procexec::init_worker(&TASKS);
/// let exec = procexec::Executor::builder().processes(1).build().await?;
/// assert_eq!(exec.spawn(long_sum, 1_000).await?, 499_500);
/// # Ok(()) }
/// ```
pub fn report_progress(done: u64, total: u64) {
    Context::report_progress(done, total)
}

/// Whether the caller of the task running in this worker has gone: its
/// [`TaskHandle`](crate::TaskHandle) or map was dropped, or the executor shut down
/// without waiting. A long task can check it now and then and return early. Under
/// [`CancelPolicy::Kill`](crate::CancelPolicy::Kill) (the default) the worker is
/// killed 10 ms later anyway; under `Finish` the call runs to its end unless it
/// looks. Always `false` outside a worker, where the worker keeps no progress
/// record (no `memfd`), and, in-process (see
/// [`Builder::in_process`](crate::Builder::in_process)), on a thread other than the
/// worker's own.
///
/// # Examples
///
/// ```
/// procexec::tasks! {
///     /// Sums up to `n`, giving up if nobody waits for the answer any more.
///     pub fn patient_sum(n: u64) -> Option<u64> {
///         let mut sum = 0u64;
///         for i in 0..n {
///             if i % 1_000_000 == 0 && procexec::is_cancelled() {
///                 return None;
///             }
///             sum = sum.wrapping_add(i);
///         }
///         Some(sum)
///     }
/// }
///
/// assert!(!procexec::is_cancelled(), "not in a worker");
/// assert_eq!(patient_sum().call_in_process(4), Some(6));
/// ```
pub fn is_cancelled() -> bool {
    Context::is_cancelled()
}

/// Serves `tasks` on this process's stdin and stdout: a worker process.
fn serve(tasks: &'static Registry) -> io::Result<()> {
    // Before the worker starts a thread of its own (see `remove_worker_marker`).
    sys::remove_worker_marker(protocol::WORKER_ENV);
    // Before anything that can fail: a worker must not outlive the executor's process.
    sys::die_with_parent();
    if let Some(name) = tasks.duplicate_name() {
        return Err(io::Error::other(format!("two tasks are named `{name}`")));
    }
    let fds = sys::take_protocol_stdio()?;
    let hangup = fds.input.try_clone()?;
    std::thread::Builder::new().name("procexec-hangup".into()).spawn(move || watch(hangup))?;
    serve_on(tasks, File::from(fds.input), File::from(fds.output), Context::process(), Mode::Process)
}

/// Where a worker runs.
enum Mode<'a> {
    /// In a process of its own: it forwards its `tracing` events.
    Process,
    /// On a thread of the parent: its events go to the parent's subscriber as they
    /// are, and each call runs inside this (given the call's id and task number,
    /// and the call to run).
    Thread(&'a Around<'a>),
}

/// What an in-process worker runs each call inside (see [`serve_thread`]).
pub(crate) type Around<'a> = dyn Fn(u64, u32, &mut dyn FnMut()) + 'a;

/// Serves an in-process worker on this thread (see `Builder::in_process`): the same
/// loop a worker process runs, over the request pipe `input` and the reply pipe
/// `output`, with a context and a link of its own. Returns when the parent closes
/// the request pipe or asks it to exit (or a pipe breaks); the link is uninstalled
/// then, so what the task left behind cannot reach a later worker.
pub(crate) fn serve_thread(
    tasks: &'static Registry,
    input: File,
    output: File,
    around: &Around<'_>,
) -> io::Result<()> {
    let link =
        LinkRef::new_thread().ok_or_else(|| io::Error::other("this thread serves a worker already"))?;
    let context = Context::new_thread(link.clone())
        .ok_or_else(|| io::Error::other("this thread serves a worker already"))?;
    let served = serve_on(tasks, input, output, &context, Mode::Thread(around));
    link.uninstall();
    served
}

/// The serve loop: the handshake, then calls until the request pipe ends.
fn serve_on(
    tasks: &'static Registry,
    input: File,
    output: File,
    context: &Context,
    mode: Mode<'_>,
) -> io::Result<()> {
    let mut reader = FrameReader::new(input);
    let mut output = output;
    let mut replies = ReplyBuf::new()?;
    if let Some(page) = replies
        .file()
        .and_then(|fd| fd.try_clone_to_owned().ok())
        .map(File::from)
        .and_then(|file| sys::ForeignPage::map(&file).ok())
    {
        context.set_cancels(page);
    }

    let Some(frame) = reader.next_frame()? else {
        return Ok(());
    };
    let (
        Request::Init {
            version,
            max_frame_len,
            index: _,
            measure_memory,
            executor,
            log_level,
            output: parent_pipe,
            output_each_call,
        },
        _,
    ) = protocol::split_header(&frame).map_err(invalid)?
    else {
        return Err(invalid("the first request is not Init"));
    };
    let max_frame_len = max_frame_len as usize;
    reader.max_frame_len = max_frame_len;
    // Only a process of its own forwards its events and reads its output.
    let process = matches!(mode, Mode::Process);
    let reads_output =
        process && version == protocol::PROTOCOL_VERSION && output::install(parent_pipe, max_frame_len);
    let ready = Reply::Ready {
        version: protocol::PROTOCOL_VERSION,
        pid: std::process::id(),
        tasks: tasks.infos(),
        progress: replies.file().map(|fd| std::os::fd::AsRawFd::as_raw_fd(&fd) as u32),
        reads_stderr: reads_output,
    };
    // The preamble goes out with `Ready`, in one write: through a launcher that
    // forwards stdout over TCP (srun), a frame written in two pieces can wait
    // ~40 ms for an ACK (Nagle against delayed ACKs).
    let mut out = BytesMut::from(&protocol::PREAMBLE[..]);
    protocol::write_message(&mut out, &ready, max_frame_len.max(protocol::READY_FRAME_LIMIT))
        .map_err(invalid)?;
    output.write_all(&out)?;
    drop(out);
    if version != protocol::PROTOCOL_VERSION {
        // The parent reads our version from Ready and reports the mismatch.
        return Ok(());
    }

    // From here on the link reads and writes: tasks talk on it too (channels).
    let link = context.link();
    Link::install(link, reader, output, executor, max_frame_len);
    if process {
        logs::install(log_level);
        // The hang-up watcher waits for this, and then writes on the link.
        output::decided();
    }
    if reads_output {
        // What the program printed before it became a worker.
        send_output(link, None)?;
    }

    // The end of one call is the start of the next when its frame was already
    // buffered: one clock read per call.
    let mut clock = None;
    while let Some((frame, waited)) = Link::next_request(link)? {
        let (request, body) = protocol::split_header::<Request>(&frame).map_err(invalid)?;
        let (id, task, capture, items) = match request {
            Request::Call { id, task, capture, items } => (id, task, capture, items),
            // What tasks printed without a newline is still in Rust's stdout buffer:
            // flushed now, while the reply pipe is open, because the parent takes
            // its closing as the worker's exit and then kills what is left.
            Request::Exit => {
                if process {
                    send_output(link, None)?;
                }
                logs::flush(true);
                return Ok(());
            }
            Request::LogLevel { level } => {
                if matches!(mode, Mode::Process) {
                    logs::set_level(level);
                }
                continue;
            }
            Request::Init { .. } => return Err(invalid("Init sent twice")),
            Request::Channel(_) => return Err(invalid("a channel message the link did not take")),
        };
        let started = match clock.take() {
            Some(end) if !waited => end,
            _ => Instant::now(),
        };
        let items = items.get();
        let call = Call { id, task, items, body, started };
        // Blob inputs share the request frame instead of copying out of it.
        let registered = blob::register(&frame);
        let capture = capture && reads_output;
        if capture {
            if !output_each_call {
                // What came before is no call's, not this one's.
                send_output(link, None)?;
            }
            output::stdout_apart(true);
        }
        if reads_output {
            output::calls_change(|| context.set_running(Some(id)));
        } else {
            context.set_running(Some(id));
        }
        logs::set_call(Some(id));
        clock = Some(match mode {
            Mode::Process => self::call(tasks, &mut replies, max_frame_len, measure_memory, call),
            Mode::Thread(around) => {
                let (mut call, mut ended) = (Some(call), None);
                around(id, task, &mut || {
                    if let Some(call) = call.take() {
                        ended = Some(self::call(tasks, &mut replies, max_frame_len, measure_memory, call));
                    }
                });
                ended.unwrap_or_else(Instant::now)
            }
        });
        // What the call printed arrives before its result, in the same write, and
        // so does what it logged. Taken while the call still counts as running,
        // and it stops counting under the same lock, which the hang-up watcher
        // relies on (see `output::forward_live`).
        let stopped = || context.set_running(None);
        let mut before = if reads_output && (output_each_call || capture) {
            take_output(link, Some(id), stopped)?
        } else if reads_output {
            output::calls_change(stopped);
            BytesMut::new()
        } else {
            stopped();
            BytesMut::new()
        };
        if capture {
            output::stdout_apart(false);
        }
        logs::set_call(None);
        drop(registered);
        // Shared memory the parent let go of, and this call no longer uses.
        crate::shared::segment::sweep();
        // One write per reply, before the next call starts: a reply that left the
        // worker survives the worker, and the progress record covers the call it is
        // in, so a crash can only lose the input it was running.
        if let Some(logged) = logs::take_frame() {
            before.extend_from_slice(&logged);
        }
        Link::finish_call(link, &before, replies.frame())?;
        replies.clear();
    }
    Ok(())
}

/// The hang-up watcher: exits the process as soon as the parent hangs up, and
/// meanwhile sends the lines a running call prints, `output::LIVE_EVERY` after
/// they came (at once when much waits).
fn watch(hangup: std::os::fd::OwnedFd) -> ! {
    let context = Context::process();
    let hung_up = || -> ! {
        // Right away, without exit handlers: a task may hold any lock, and nobody
        // waits for its result any more.
        sys::exit_now(0)
    };
    loop {
        // Until the worker knows whether it reads its output, it looks again now
        // and then; after, it waits for output (or a hang-up) as long as it takes.
        let (printed, wait) = match output::watched() {
            Some(printed) => (printed, Duration::MAX),
            None => (Vec::new(), Duration::from_millis(100)),
        };
        match sys::wait_for_hangup_or_input(hangup.as_fd(), &printed, wait) {
            sys::Wake::Hangup => hung_up(),
            sys::Wake::Timeout => continue,
            sys::Wake::Input => {}
        }
        // Output waits: shown LIVE_EVERY after it came, so a chatty task costs a
        // wake-up per look, not per line; at once when much waits, before the pipe
        // fills and the task blocks. Between calls it waits for the next call.
        if !output::much_waiting()
            && sys::wait_for_hangup_or_input(hangup.as_fd(), &[], output::LIVE_EVERY) == sys::Wake::Hangup
        {
            hung_up();
        }
        output::forward_live(|| context.running_call());
    }
}

/// Most printed bytes that go out with a reply; more is written ahead of it.
const OUTPUT_WITH_REPLY: usize = 1 << 20;

/// What was printed since the last look, as frames to write (as printed during
/// `call`); beyond [`OUTPUT_WITH_REPLY`], the oldest is written now.
/// Runs `then` once it is all taken.
fn take_output(link: &WorkerLink, call: Option<u64>, then: impl FnOnce()) -> io::Result<BytesMut> {
    // A `print!` without a newline is still in Rust's stdout buffer, and C's stdio
    // buffers whole blocks (stdout is a file, not a terminal).
    let _ = io::stdout().flush();
    sys::flush_c_stdio();
    let mut frames = BytesMut::new();
    let write = |frames: &[u8]| Link::write_frame(link, frames, true).map(drop);
    output::take_all(call, &mut frames, OUTPUT_WITH_REPLY, write, then)?;
    Ok(frames)
}

/// Writes what was printed since the last look.
fn send_output(link: &WorkerLink, call: Option<u64>) -> io::Result<()> {
    let frames = take_output(link, call, || {})?;
    if !frames.is_empty() {
        Link::write_frame(link, &frames, true)?;
    }
    Ok(())
}

/// One call as the worker received it.
struct Call<'a> {
    id: u64,
    task: u32,
    items: u32,
    body: &'a [u8],
    started: Instant,
}

/// Runs one call and appends its whole reply frame to `out`; returns when it ended.
fn call(
    tasks: &Registry,
    out: &mut ReplyBuf,
    max_frame_len: usize,
    measure_memory: bool,
    call: Call<'_>,
) -> Instant {
    let Call { id, task, items, body, started } = call;
    let start = protocol::begin_frame(out);
    let zero = Fixed64::new(0);
    let no_errors = protocol::Count::new(0);
    let _ =
        protocol::encode_into(out, &Reply::Done { id, errors: no_errors, busy_ns: zero, peak_rss_kib: zero });
    // The error count and both measurements have fixed widths and end the header,
    // so they are patched in place once the call is done.
    let busy_at = out.len() - 2 * Fixed64::WIDTH;
    let errors_at = busy_at - protocol::Count::WIDTH;
    let header_end = out.len();
    out.begin_call(id);
    match tasks.get(task) {
        // Sent ahead, then its caller left: cheaper to skip than to run and kill.
        // (Skipped items are no errors: nobody waits for them.)
        _ if out.is_withdrawn(id) => {
            write_outcomes(out, items, &Outcome::Skipped);
            out.errors = 0;
        }
        Some(task) => task.invoke(body, items, out),
        None => write_outcomes(out, items, &Outcome::UnknownTask),
    }
    if let Err(size) = protocol::end_frame(out, start, max_frame_len) {
        out.truncate(header_end);
        out.errors = 0;
        write_outcomes(out, items, &Outcome::TooLarge { size: size as u64, limit: max_frame_len as u64 });
        // Should even the small outcomes exceed the limit, the parent's codec refuses the
        // frame and reports a protocol error.
        let _ = protocol::end_frame(out, start, usize::MAX);
    }
    let ended = Instant::now();
    let busy_ns = u64::try_from(ended.duration_since(started).as_nanos()).unwrap_or(u64::MAX);
    out.patch(busy_at, &Fixed64::new(busy_ns).0);
    out.patch(errors_at, &protocol::Count::new(out.errors).0);
    if measure_memory {
        out.patch(busy_at + Fixed64::WIDTH, &Fixed64::new(sys::peak_rss_kib()).0);
    }
    ended
}

/// Writes the same failure as the outcome of each of `items` items.
fn write_outcomes(out: &mut ReplyBuf, items: u32, outcome: &Outcome) {
    for done in 1..=items {
        let start = protocol::begin_record(out);
        // An `Outcome` holds only strings and integers, which postcard always encodes.
        let _ = protocol::encode_into(out, outcome);
        protocol::end_record(out, start);
        out.errors += 1;
        out.items_done(done);
    }
}

fn invalid(err: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err.to_string())
}

// The worker-side half of a task, here rather than in `task` so that `Task` and
// `Registry`, which the parent also uses, stay free of worker internals.
#[allow(private_interfaces)]
impl<I, O> Sealed for Task<I, O>
where
    I: DeserializeOwned + 'static,
    O: Serialize + 'static,
{
    fn invoke(&self, body: &[u8], items: u32, out: &mut ReplyBuf) {
        let mut rest = body;
        let mut done = 0;
        while done < items {
            // Where the current input's record starts.
            let mut start = out.len();
            // Decoding, the call, encoding and dropping the output all run under
            // `catch_panic`, once for a whole run of inputs rather than per input: a
            // panicking task or serde impl or destructor fails its input only.
            let step = catch_panic(|| {
                while done < items {
                    start = protocol::begin_record(out);
                    if let Err(failure) = self.run_one(&mut rest, out) {
                        out.truncate(start + protocol::RECORD_PREFIX);
                        encode_outcome(out, &failure);
                    }
                    protocol::end_record(out, start);
                    done += 1;
                    out.items_done(done);
                }
            });
            if let Err(panic) = step {
                out.truncate(start);
                let start = protocol::begin_record(out);
                encode_outcome(out, &panic);
                protocol::end_record(out, start);
                done += 1;
                out.items_done(done);
            }
        }
    }
}

impl<I, O> Task<I, O>
where
    I: DeserializeOwned + 'static,
    O: Serialize + 'static,
{
    /// Runs the task on the next input of `inputs`, appending its output to `out`.
    /// Each input is a record of its own, so one that cannot be decoded fails alone.
    fn run_one(&self, inputs: &mut &[u8], out: &mut ReplyBuf) -> Result<(), Outcome> {
        let Some(input) = protocol::take_record(inputs) else {
            *inputs = &[];
            return Err(Outcome::BadInput { message: "the call holds fewer inputs than it says".into() });
        };
        let input =
            decode_exactly::<I>(input).map_err(|message| match crate::shared::decode_error(&message) {
                Some(error) => Outcome::Shared { error },
                None => Outcome::BadInput { message },
            })?;
        let output = (self.function)(input);
        out.push(protocol::OUTCOME_OK);
        protocol::encode_into(out, &output)
            .map_err(|err| Outcome::BadOutput { message: codec::encode_error_message(&output, &err) })?;
        drop(output);
        Ok(())
    }
}

fn encode_outcome(out: &mut ReplyBuf, outcome: &Outcome) {
    // An `Outcome` holds only strings and integers, which postcard always encodes.
    let _ = protocol::encode_into(out, outcome);
    out.errors += 1;
}
