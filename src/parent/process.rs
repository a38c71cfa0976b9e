//! One worker process as the parent sees it: spawning it, the handshake, its stderr,
//! and how it ended.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio_util::codec::{Decoder, FramedRead, LengthDelimitedCodec};

use crate::parent::error::{Direction, Error, ExitReason, Result, WorkerStartError};
use crate::parent::in_process::WorkerThread;
use crate::parent::launch::Groups;
use crate::parent::output::{CallLabel, Capture, Source, WorkerOutput, WorkerStderr};
use crate::sys;
use crate::task::Signature;
use crate::wire::protocol::{self, Count, Reply, Request, Shape, TaskInfo};

/// How to start a worker, shared by every slot of an executor.
#[derive(Debug, Clone)]
pub(crate) struct WorkerConfig {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) max_frame_len: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) stderr: WorkerStderr,
    pub(crate) pipe_capacity: usize,
    /// Ask workers for their peak memory with every reply.
    pub(crate) measure_memory: bool,
    pub(crate) initializer: Option<Arc<Initializer>>,
    /// Serve these tasks on threads of this process instead (see
    /// [`Builder::in_process`](crate::Builder::in_process)).
    pub(crate) in_process: Option<&'static crate::task::Registry>,
    /// The executor's id, which its channel handles carry.
    pub(crate) executor: u64,
    /// Where each slot's worker runs, and how it is started.
    pub(crate) groups: Arc<Groups>,
}

/// Most worker starts, in this process, between creating their pipes and spawning.
pub(crate) const STARTS_AT_ONCE: usize = 32;

static STARTING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(STARTS_AT_ONCE);

/// A running worker process after a successful handshake.
pub(crate) struct WorkerProcess {
    pub(crate) index: usize,
    pub(crate) pid: u32,
    /// The request pipe; `None` once closed, which tells the worker to exit.
    pub(crate) requests: Option<pipe::Sender>,
    pub(crate) replies: Replies,
    pub(crate) tasks: Vec<TaskInfo>,
    pub(crate) process: ChildProcess,
    /// The worker's progress record (see `protocol::Progress`), opened while it
    /// lives so it can be read after it died; `None` where it keeps none.
    progress: Option<std::fs::File>,
    /// Its first page, mapped, to withdraw calls sent ahead.
    withdrawals: Option<sys::ForeignPage>,
    next_withdrawal: usize,
}

/// How far a worker got with a call, by its progress record.
#[derive(Debug)]
pub(crate) enum CallProgress {
    /// No record, or one that makes no sense.
    Unknown,
    /// It never started the call.
    NotStarted,
    /// It started it and finished `items` items, whose outcome records are `body`.
    Done { items: u32, body: bytes::Bytes },
}

impl WorkerProcess {
    /// Spawns a worker for `slot` and completes the handshake. A failure on another
    /// host names it, and the program as it is called there.
    pub(crate) async fn start(config: &WorkerConfig, slot: usize) -> Result<WorkerProcess, WorkerStartError> {
        let group = config.groups.of(slot);
        let _turn = group.start_permit().await;
        Self::start_here(config, slot).await.map_err(|mut err| {
            if !group.same_host {
                err.host = Some(group.label.clone());
                err.program = group.program().to_path_buf();
            }
            err
        })
    }

    async fn start_here(config: &WorkerConfig, slot: usize) -> Result<WorkerProcess, WorkerStartError> {
        let group = config.groups.of(slot);
        let fail = |message: &str, source: io::Error| {
            let mut err = WorkerStartError::new(&config.program, message);
            err.source = Some(source);
            err
        };
        // Until it is spawned, a start also holds the child's ends of its pipes: so
        // few starts at once that a pool's need for descriptors stays bounded.
        let starting = STARTING.acquire().await;
        let (request_read, request_write) = sys::pipe().map_err(|e| fail("cannot create a pipe", e))?;
        let (reply_read, reply_write) = sys::pipe().map_err(|e| fail("cannot create a pipe", e))?;
        sys::grow_pipe(request_write.as_fd(), config.pipe_capacity);
        sys::grow_pipe(reply_write.as_fd(), config.pipe_capacity);
        // Registered before the process exists: what can fail after it does must
        // kill and reap it, so as little as possible comes after.
        let register = |e| fail("cannot register a pipe", e);
        let mut requests = pipe::Sender::from_owned_fd(request_write).map_err(register)?;
        let replies = pipe::Receiver::from_owned_fd(reply_read).map_err(register)?;

        let (pid, mut process) = match config.in_process {
            // A thread of this process: it prints to this process's stdout and
            // stderr itself.
            Some(tasks) => {
                let thread = WorkerThread::start(tasks, config.executor, slot, request_read, reply_write)
                    .map_err(|e| fail("cannot start its thread", e))?;
                drop(starting);
                let source = Source { slot, pid: std::process::id(), host: None, mode: config.stderr };
                let output = WorkerOutput::thread(source);
                (std::process::id(), ChildProcess { child: Handle::Thread(thread), output })
            }
            None => {
                let (stderr_read, stderr_write) = sys::pipe().map_err(|e| fail("cannot create a pipe", e))?;
                // The marker goes with the explicit environment: a launcher passes on only that.
                let mut env = config.env.clone();
                env.push((protocol::WORKER_ENV.into(), std::process::id().to_string().into()));
                let mut command = group.command(&config.args, &env).map_err(|message| {
                    WorkerStartError::new(group.program(), format!("cannot form its command line: {message}"))
                })?;
                sys::prepare_worker_command(&mut command);
                let stdio = [request_read, reply_write, stderr_write].map(Stdio::from);
                let child = spawn(command, stdio).await.map_err(|e| fail("cannot spawn it", e))?;
                drop(starting);
                let pid = child.pid;
                // A worker elsewhere is named by its host: the pid here is its launcher's.
                let host = (!group.same_host).then(|| Arc::<str>::from(group.label.as_str()));
                let source = Source { slot, pid, host, mode: config.stderr };
                let output = WorkerOutput::new(stderr_read, source);
                (pid, ChildProcess { child: Handle::Process(child), output })
            }
        };
        // Inode numbers of pipes mean something on this machine only.
        let identity = process.output.pipe_identity().filter(|_| group.same_host);

        let output = &mut process.output;
        let handshake = async {
            let (mut replies, ready) = handshake(config, slot, identity, &mut requests, replies).await?;
            if let Some(initializer) = &config.initializer {
                initialize(config, initializer, &ready.tasks, &mut requests, &mut replies, output).await?;
            }
            Ok((replies, ready))
        };
        match tokio::time::timeout(config.handshake_timeout, handshake).await {
            Ok(Ok((replies, ready))) => {
                if let Err(err) = process.output.handshake_done(ready.reads_stderr) {
                    let mut failure = process.start_failed(config, "cannot register a pipe".into()).await;
                    failure.source = Some(err);
                    return Err(failure);
                }
                let mut progress = None;
                // A worker elsewhere (another host, a container) has a pid that means
                // nothing here, or worse, another process's.
                if let Some(fd) = ready.progress.filter(|_| group.same_host) {
                    match sys::open_foreign_fd(ready.pid, fd) {
                        Ok(file) => progress = Some(file),
                        // Our own child, which just said it has this descriptor: it
                        // is dying (killed right after its handshake). Serving it
                        // would fail its first call whole, for want of the record.
                        Err(err) if ready.pid == pid && err.kind() == io::ErrorKind::NotFound => {
                            let message = format!("it died right after its handshake ({err})");
                            return Err(process.start_failed(config, message).await);
                        }
                        // Out of descriptors: so is the next start, or the next call
                        // that needs one. Said now, rather than serving without the
                        // record that limits a crash to one input.
                        Err(err) if sys::out_of_descriptors(&err) => {
                            let mut failure =
                                process.start_failed(config, "cannot open its progress record".into()).await;
                            failure.source = Some(err);
                            return Err(failure);
                        }
                        Err(err) => {
                            // Another process (a wrapper, another PID namespace): crashes
                            // then cost a whole chunk instead of one input.
                            tracing::debug!(
                                worker = slot,
                                pid,
                                "cannot open the worker's progress record: {err}"
                            );
                        }
                    }
                }
                let withdrawals = progress.as_ref().and_then(|file| sys::ForeignPage::map(file).ok());
                Ok(WorkerProcess {
                    index: slot,
                    pid,
                    requests: Some(requests),
                    replies,
                    tasks: ready.tasks,
                    process,
                    progress,
                    withdrawals,
                    next_withdrawal: 0,
                })
            }
            Ok(Err(message)) => Err(process.start_failed(config, message).await),
            Err(_) => {
                let message = format!("no handshake within {:?}", config.handshake_timeout);
                Err(process.start_failed(config, message).await)
            }
        }
    }

    /// Closes the request pipe: the worker exits as soon as it notices.
    pub(crate) fn close_requests(&mut self) {
        self.requests = None;
    }

    /// Asks the worker to exit normally ([`Request::Exit`]).
    pub(crate) async fn ask_to_exit(&mut self) {
        let mut frame = BytesMut::new();
        if protocol::write_message(&mut frame, &Request::Exit, usize::MAX).is_err() {
            return;
        }
        if let Some(requests) = &mut self.requests {
            // A worker gone already is what we want anyway.
            let _ = requests.write_all(&frame).await;
        }
    }

    /// Tells the worker to skip call `id`, sent ahead, if it has not started it yet
    /// (it then answers `Outcome::Skipped`). Returns false where it cannot be told.
    pub(crate) fn withdraw(&mut self, id: u64) -> bool {
        let Some(page) = &self.withdrawals else {
            return false;
        };
        let slot = self.next_withdrawal % protocol::Progress::CANCEL_SLOTS;
        self.next_withdrawal += 1;
        page.store(protocol::Progress::CANCEL_AT + 8 * slot, id.wrapping_add(1));
        true
    }

    /// What the worker's progress record says about call `id` of `items` items. Read
    /// after the worker died, so nothing changes under it; checked throughout, since
    /// a worker that broke may have written anything.
    pub(crate) fn progress_of(&self, id: u64, items: u32, max_frame_len: usize) -> CallProgress {
        use std::os::unix::fs::FileExt;
        let Some(file) = &self.progress else {
            return CallProgress::Unknown;
        };
        let mut header = [0; protocol::Progress::SIZE];
        let Some(progress) =
            file.read_exact_at(&mut header, 0).ok().and_then(|()| protocol::Progress::parse(&header))
        else {
            return CallProgress::Unknown;
        };
        if progress.call != id {
            return CallProgress::NotStarted;
        }
        let len = progress.bytes.saturating_sub(progress.body);
        if progress.items > u64::from(items) || progress.bytes < progress.body || len > max_frame_len as u64 {
            return CallProgress::Unknown;
        }
        let mut body = vec![0; len as usize];
        if file.read_exact_at(&mut body, progress.body).is_err() {
            return CallProgress::Unknown;
        }
        // The worker publishes where an item's record ends, then the item count: a
        // death between the two leaves one more whole record than counted.
        let mut records = &body[..];
        let mut done = 0u64;
        while !records.is_empty() && done < u64::from(items) {
            if protocol::take_record(&mut records).is_none() {
                return CallProgress::Unknown;
            }
            done += 1;
        }
        if !records.is_empty() || done < progress.items || done > progress.items + 1 {
            return CallProgress::Unknown;
        }
        CallProgress::Done { items: done as u32, body: body.into() }
    }
}

/// The reply stream: frames after the worker's preamble.
pub(crate) type Replies = FramedRead<pipe::Receiver, ReplyCodec>;

/// Sends `Init` and reads `Ready`.
/// What a worker said in its `Ready`.
struct Ready {
    pid: u32,
    tasks: Vec<TaskInfo>,
    progress: Option<u32>,
    /// It reads its stderr pipe itself.
    reads_stderr: bool,
}

async fn handshake(
    config: &WorkerConfig,
    slot: usize,
    output: Option<(u64, u64)>,
    requests: &mut pipe::Sender,
    replies: pipe::Receiver,
) -> Result<(Replies, Ready), String> {
    let mut init = BytesMut::new();
    let request = Request::Init {
        version: protocol::PROTOCOL_VERSION,
        max_frame_len: config.max_frame_len as u32,
        index: slot as u32,
        measure_memory: config.measure_memory,
        executor: config.executor,
        log_level: wanted_log_level(),
        output,
        // Discarded output needs labels for no call, except a captured call's.
        output_each_call: config.stderr != WorkerStderr::Discard,
    };
    protocol::write_message(&mut init, &request, config.max_frame_len).map_err(|e| e.to_string())?;
    // A worker that dies first closes the pipe; its exit status then tells more.
    let _ = requests.write_all(&init).await;

    let ready_limit = config.max_frame_len.max(protocol::READY_FRAME_LIMIT);
    let mut replies = FramedRead::new(replies, ReplyCodec::new(slot, ready_limit));
    let frame = match replies.next().await {
        Some(Ok(frame)) => frame,
        Some(Err(err)) if err.kind() == io::ErrorKind::InvalidData => {
            return Err(format!("corrupt handshake: {err}"));
        }
        Some(Err(_)) | None => return Err(exited_early_hint(config)),
    };
    replies.decoder_mut().frames.set_max_frame_length(config.max_frame_len);
    match protocol::split_header::<Reply>(&frame) {
        Ok((Reply::Ready { version, pid, tasks, progress, reads_stderr }, _))
            if version == protocol::PROTOCOL_VERSION =>
        {
            Ok((replies, Ready { pid, tasks, progress, reads_stderr }))
        }
        Ok((Reply::Ready { version, .. }, _)) => Err(version_mismatch(version)),
        Ok((other, _)) => Err(format!("unexpected first message {other:?}")),
        // A worker of another version may shape its `Ready` differently; every
        // version starts it with the variant and the version number.
        Err(err) => match postcard::take_from_bytes::<(u32, u32)>(&frame) {
            Ok(((READY_VARIANT, version), _)) if version != protocol::PROTOCOL_VERSION => {
                Err(version_mismatch(version))
            }
            _ => Err(format!("corrupt handshake: {err}")),
        },
    }
}

/// How postcard numbers [`Reply::Ready`], the first variant.
const READY_VARIANT: u32 = 0;

fn version_mismatch(version: u32) -> String {
    format!(
        "it speaks protocol version {version}, this procexec speaks {}; rebuild the worker with the same procexec",
        protocol::PROTOCOL_VERSION
    )
}

/// The call id of an initializer: one the executor never hands out.
const INIT_CALL_ID: u64 = u64::MAX;

/// Runs the initializer on a fresh worker and checks its outcome.
async fn initialize(
    config: &WorkerConfig,
    initializer: &Initializer,
    tasks: &[TaskInfo],
    requests: &mut pipe::Sender,
    replies: &mut Replies,
    output: &mut WorkerOutput,
) -> Result<(), String> {
    let name = initializer.task;
    let Some(index) = tasks.iter().position(|info| info.name == name) else {
        return Err(format!("it has no initializer task named `{name}`"));
    };
    check_types(name, &initializer.signature, &tasks[index]).map_err(|err| format!("initializer: {err}"))?;
    let mut frame = BytesMut::with_capacity(initializer.input.len() + 24);
    let start = protocol::begin_frame(&mut frame);
    let call = Request::Call { id: INIT_CALL_ID, task: index as u32, capture: false, items: Count::new(1) };
    let _ = protocol::encode_into(&mut frame, &call);
    frame.extend_from_slice(&initializer.input);
    protocol::end_frame(&mut frame, start, config.max_frame_len).map_err(|size| {
        format!("the input of initializer `{name}` is {size} bytes, above the frame limit")
    })?;
    let _ = requests.write_all(&frame).await;
    loop {
        let reply = match replies.next().await {
            Some(Ok(reply)) => reply,
            Some(Err(err)) => return Err(format!("corrupt reply to initializer `{name}`: {err}")),
            None => return Err(format!("it died running initializer `{name}`")),
        };
        match protocol::split_header::<Reply>(&reply) {
            Ok((Reply::Done { id: INIT_CALL_ID, .. }, body)) => {
                return (initializer.check)(name, body)
                    .map_err(|err| format!("initializer `{name}` failed: {err}"));
            }
            // What the initializer (or the program, before it became a worker)
            // printed comes ahead of its reply: passed on as no call's.
            Ok((Reply::Output { stderr, .. }, body)) => match protocol::split_output(body, stderr) {
                Some((stderr, stdout)) => output.received(None, None, stderr, stdout),
                None => return Err(format!("corrupt reply to initializer `{name}`: {reply:?}")),
            },
            // So do its events and progress reports, which no caller waits for.
            Ok((Reply::Log { .. } | Reply::Progress { .. }, _)) => {}
            Ok((other, _)) => return Err(format!("unexpected reply to initializer `{name}`: {other:?}")),
            Err(err) => return Err(format!("corrupt reply to initializer `{name}`: {err}")),
        }
    }
}

/// Frames a worker's stdout: skips whatever the program printed before it became a
/// worker (say, libtest's "running 1 test"), up to the preamble, then reads frames.
pub(crate) struct ReplyCodec {
    slot: usize,
    frames: LengthDelimitedCodec,
    synced: bool,
    skipped: usize,
    /// The last frame was mid-sized: more like it are likely to follow.
    streaming: bool,
    /// The buffer of the last large frame, kept to read the next one into once its
    /// receiver let go of it: a fresh allocation of tens of MiB costs a page fault
    /// per 4 KiB (about half the time of a 60 MiB echo).
    spare: Option<BytesMut>,
}

impl ReplyCodec {
    pub(crate) fn new(slot: usize, max_frame_len: usize) -> Self {
        ReplyCodec {
            slot,
            frames: protocol::codec(max_frame_len),
            synced: false,
            skipped: 0,
            streaming: false,
            spare: None,
        }
    }
}

/// Frames of these sizes come in runs (a task putting large items): the buffer
/// then makes room for several at once, so the pipe, which its writer contends
/// for, is read in fewer, longer reads. Smaller frames fit anyway; larger ones
/// are read whole by themselves.
const STREAMED_FRAMES: std::ops::Range<usize> = 16 * 1024..READ_AHEAD / 2;
/// How much room the buffer makes then.
const READ_AHEAD: usize = 256 * 1024;
/// How much may be buffered (and so copied to the new room) when it does.
const COPY_AT_MOST: usize = 4096;

impl Decoder for ReplyCodec {
    type Item = BytesMut;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<BytesMut>> {
        if !self.synced {
            let preamble = protocol::PREAMBLE;
            match find(src, preamble) {
                Some(at) => {
                    self.skipped += at;
                    if self.skipped > 0 {
                        let text = String::from_utf8_lossy(&src[..at]);
                        tracing::debug!(
                            worker = self.slot,
                            skipped = self.skipped,
                            "worker stdout before the handshake: {text}"
                        );
                    }
                    let _ = src.split_to(at + preamble.len());
                    self.synced = true;
                }
                None => {
                    // Keep a tail that may hold the start of a preamble split across reads.
                    let discard = src.len().saturating_sub(preamble.len() - 1);
                    self.skipped += discard;
                    let _ = src.split_to(discard);
                    if self.skipped > protocol::PREAMBLE_SEARCH_LIMIT {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "over 1 MiB of output and no procexec preamble: is it a procexec worker?",
                        ));
                    }
                    return Ok(None);
                }
            }
        }
        self.reuse_spare(src);
        let mut frame = self.frames.decode(src)?;
        match &mut frame {
            Some(frame) if frame.len() >= LARGE_FRAME => {
                self.streaming = false;
                // A handle on the frame's allocation (empty, at its end), to reclaim
                // the whole of it once the frame is dropped. (The codec has already
                // moved `src` to a new buffer, the frame still holding this one.)
                self.spare = Some(frame.split_off(frame.len()));
            }
            Some(frame) => {
                self.streaming = STREAMED_FRAMES.contains(&frame.len());
                self.spare = None;
            }
            None if self.streaming
                && src.len() <= COPY_AT_MOST
                && src.capacity() - src.len() < READ_AHEAD / 4 =>
            {
                src.reserve(READ_AHEAD)
            }
            None => {}
        }
        Ok(frame)
    }
}

/// The parent's filter as the workers' level number (0: nothing wanted): the most
/// verbose level any subscriber of this process enables.
pub(crate) fn wanted_log_level() -> u8 {
    match tracing::level_filters::LevelFilter::current() {
        tracing::level_filters::LevelFilter::OFF => 0,
        tracing::level_filters::LevelFilter::ERROR => 1,
        tracing::level_filters::LevelFilter::WARN => 2,
        tracing::level_filters::LevelFilter::INFO => 3,
        tracing::level_filters::LevelFilter::DEBUG => 4,
        _ => 5,
    }
}

/// Frames from this size on are read into the buffer of the previous one, when free.
const LARGE_FRAME: usize = 1 << 20;

impl ReplyCodec {
    /// A large frame is starting: read it into the spare buffer if its last frame
    /// was dropped (so nothing is allocated), moving the few bytes already read.
    fn reuse_spare(&mut self, src: &mut BytesMut) {
        let Some(prefix) = src.first_chunk::<{ protocol::LENGTH_PREFIX }>() else {
            return;
        };
        let needed = protocol::LENGTH_PREFIX + u32::from_be_bytes(*prefix) as usize;
        if needed < LARGE_FRAME || src.capacity() >= needed {
            return;
        }
        // Never allocates: only succeeds when the spare is the allocation's sole
        // owner (its last frame was dropped). Otherwise it is let go of: its frame
        // is someone else's now.
        if let Some(mut spare) = self.spare.take() {
            if spare.try_reclaim(needed) {
                spare.extend_from_slice(src);
                std::mem::swap(src, &mut spare);
                return;
            }
        }
        // Room for the whole frame with its prefix, so that the next frame of this
        // size fits this allocation when it is reclaimed.
        src.reserve(needed - src.len());
    }
}

/// The child process itself: killing, reaping, and what it printed.
pub(crate) struct ChildProcess {
    child: Handle,
    pub(crate) output: WorkerOutput,
}

/// What runs a worker: a process, or, in-process, a thread of this one.
enum Handle {
    Process(Spawned),
    Thread(WorkerThread),
}

impl ChildProcess {
    async fn start_failed(&mut self, config: &WorkerConfig, message: String) -> WorkerStartError {
        self.kill();
        let exit = self.wait_exit(Duration::from_secs(5)).await;
        let mut err = WorkerStartError::new(&config.program, format!("{message} (it ended with {exit})"));
        err.stderr_tail = self.stderr_tail(None).await;
        err
    }

    /// Kills the worker and anything it started in its process group.
    /// A worker thread cannot be killed: it is abandoned (see [`WorkerThread`]).
    pub(crate) fn kill(&mut self) {
        match &mut self.child {
            Handle::Process(child) => child.kill(),
            Handle::Thread(thread) => thread.kill(),
        }
    }

    /// Waits for the worker to exit, killing it if it takes longer than `grace`.
    pub(crate) async fn wait_exit(&mut self, grace: Duration) -> ExitReason {
        // Never `holder_died` for a thread: its pid is this process's, whose own
        // shared-memory locks it would free.
        let child = match &mut self.child {
            Handle::Process(child) => child,
            Handle::Thread(thread) => return thread.wait(grace).await,
        };
        let status = match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                child.kill();
                child.wait().await
            }
        };
        if status.is_ok() {
            // Dead and reaped just now, its pid not yet reused: the shared-memory
            // locks it held are freed for the next locker, marked poisoned.
            crate::shared::segment::holder_died(child.pid);
        }
        match status {
            Ok(status) => ExitReason::from_status(&status),
            Err(_) => ExitReason::Unknown,
        }
    }

    /// The last lines the worker printed, once it is dead: what it never sent is
    /// passed on as printed by the `running` call. (A pipe is read until it closes,
    /// or for a short while when a grandchild still holds it.)
    pub(crate) async fn stderr_tail(&mut self, running: Option<(CallLabel, Option<&Capture>)>) -> String {
        self.output.tail(running, Duration::from_millis(500)).await
    }

    /// Waits until the worker's last lines are forwarded: after a normal stop, when
    /// its process group is gone and nothing else should hold its pipe, so `patience`
    /// only guards against a process that left the group.
    pub(crate) async fn stderr_forwarded(&mut self, patience: Duration) {
        let _ = self.output.tail(None, patience).await;
    }

    /// How long to read the replies a killed worker left: until its pipe ends,
    /// within `grace`; a worker thread given up may hold it open long after.
    pub(crate) fn drain_patience(&self, grace: Duration) -> Duration {
        match &self.child {
            Handle::Process(_) => grace,
            Handle::Thread(thread) => thread.drain_patience(grace),
        }
    }
}

/// A worker process that this process must reap. Dropped before it was reaped, it
/// is killed with its process group and handed to the spawner thread, which reaps
/// it: whatever fails or is given up once the process exists leaves no zombie.
struct Spawned {
    pid: u32,
    /// `None` once reaped (or handed to the spawner thread).
    child: Option<std::process::Child>,
}

impl Spawned {
    fn kill(&mut self) {
        // Never once reaped: the pid, and so the group id, may be someone else's now.
        if let Some(child) = &mut self.child {
            sys::kill_process_group(self.pid);
            let _ = child.kill();
        }
    }

    /// Waits until the process has exited, and reaps it.
    ///
    /// Woken by `SIGCHLD`, which one listener serves for every child: a pidfd per
    /// worker (as async-process and tokio use) would cost a descriptor each. Without
    /// the signal (a runtime without its IO driver), it polls.
    async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        // Listening before looking: an exit in between still wakes this.
        let mut exits = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok();
        let mut pause = Duration::from_millis(1);
        loop {
            let Some(child) = &mut self.child else {
                return Err(io::Error::other("the worker was reaped already"));
            };
            match child.try_wait() {
                Ok(None) => {}
                done => {
                    // An error (ECHILD) means someone else reaped it: nothing is left to reap.
                    self.child = None;
                    return done.map(|status| status.unwrap_or_default());
                }
            }
            let signalled = match &mut exits {
                Some(signal) => signal.recv().await.is_some(),
                None => false,
            };
            if !signalled {
                exits = None;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
        if let Some(child) = self.child.take() {
            reap_later(child);
        }
    }
}

fn exited_early_hint(config: &WorkerConfig) -> String {
    let mut message = String::from("it exited before the handshake");
    if config.args.iter().any(|arg| arg == TEST_WORKER_NAME) {
        message.push_str("; a test binary needs `procexec::test_worker!(TASKS);` to serve as its own worker");
    } else {
        message.push_str(
            "; a self-executing program must call `procexec::init_worker(&TASKS)` first thing in `main`, \
             and a worker binary must call `procexec::serve_worker(&TASKS)`",
        );
    }
    message
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// Spawns `command` from the spawner thread.
///
/// `PR_SET_PDEATHSIG` fires when the thread that forked the child exits, so forking
/// from a tokio worker or blocking-pool thread (which may retire) could kill a healthy
/// worker. The spawner thread lives as long as the process.
///
/// The process is a [`Spawned`] from the moment it exists, before anything else can
/// fail: a start given up while it spawns kills and reaps it too.
async fn spawn(command: std::process::Command, stdio: [Stdio; 3]) -> io::Result<Spawned> {
    let (reply, spawned) = oneshot::channel();
    if spawner().send(ToSpawner::Spawn(Box::new(SpawnRequest { command, stdio, reply }))).is_err() {
        return Err(io::Error::other("the procexec-spawner thread is gone"));
    }
    spawned.await.map_err(|_| io::Error::other("the procexec-spawner thread is gone"))?
}

/// Hands a killed worker to the spawner thread, which reaps it once it has exited.
fn reap_later(child: std::process::Child) {
    let sent = spawner().send(ToSpawner::Reap(child));
    if let Err(std_mpsc::SendError(ToSpawner::Reap(mut child))) = sent {
        // No spawner thread, which started the process: unreachable in practice. The
        // process was killed, so this wait is short.
        let _ = child.wait();
    }
}

/// What the spawner thread does.
enum ToSpawner {
    Spawn(Box<SpawnRequest>),
    /// Reap this killed process once it has exited.
    Reap(std::process::Child),
}

struct SpawnRequest {
    command: std::process::Command,
    stdio: [Stdio; 3],
    reply: oneshot::Sender<io::Result<Spawned>>,
}

/// How often the spawner thread looks for killed processes that exited. Killed
/// processes exit within this, mostly; each is looked at until it has.
const REAP_EVERY: Duration = Duration::from_millis(10);

/// The spawner thread's inbox, the thread started on first use.
fn spawner() -> std::sync::MutexGuard<'static, std_mpsc::Sender<ToSpawner>> {
    static SPAWNER: OnceLock<Mutex<std_mpsc::Sender<ToSpawner>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (sender, receiver) = std_mpsc::channel();
        let started =
            std::thread::Builder::new().name("procexec-spawner".into()).spawn(move || serve_spawns(receiver));
        if let Err(err) = started {
            tracing::error!("cannot start the procexec-spawner thread: {err}");
        }
        Mutex::new(sender)
    });
    spawner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn serve_spawns(inbox: std_mpsc::Receiver<ToSpawner>) {
    let mut dying: Vec<std::process::Child> = Vec::new();
    loop {
        let next = if dying.is_empty() {
            inbox.recv().map_err(|_| std_mpsc::RecvTimeoutError::Disconnected)
        } else {
            inbox.recv_timeout(REAP_EVERY)
        };
        match next {
            Ok(ToSpawner::Spawn(request)) => {
                let SpawnRequest { mut command, stdio: [stdin, stdout, stderr], reply } = *request;
                let spawned = command.stdin(stdin).stdout(stdout).stderr(stderr).spawn();
                // Closes the parent's copies of the child's ends of its pipes now.
                drop(command);
                // A start given up meanwhile drops what it is sent: `Spawned` then
                // kills the process and sends it back here to be reaped.
                let _ = reply.send(spawned.map(|child| Spawned { pid: child.id(), child: Some(child) }));
            }
            Ok(ToSpawner::Reap(child)) => dying.push(child),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        }
        // Reaped, or not ours to reap (`ECHILD`): done with either way. Its
        // shared-memory locks are freed as `wait_exit` frees them.
        dying.retain_mut(|child| match child.try_wait() {
            Ok(None) => true,
            Ok(Some(_)) => {
                crate::shared::segment::holder_died(child.id());
                false
            }
            // Someone else reaped it: its pid may be another process's already.
            Err(_) => false,
        });
    }
}

/// The name of the test that `test_worker!` defines.
pub(crate) const TEST_WORKER_NAME: &str = "procexec_test_worker";

/// A task every new worker runs before taking calls.
pub(crate) struct Initializer {
    pub(crate) task: &'static str,
    /// Its types, traced once here rather than in every new worker's check.
    pub(crate) signature: Signature,
    /// The encoded input, as a record.
    pub(crate) input: Bytes,
    /// Decodes the reply body: `Ok` if the initializer succeeded.
    pub(crate) check: fn(&str, &[u8]) -> std::result::Result<(), String>,
}

impl fmt::Debug for Initializer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Initializer").field("task", &self.task).finish_non_exhaustive()
    }
}

/// How the task table `theirs` (a worker's) differs from `ours`: the tasks one
/// side lacks and those with other types, a few of each, for a stale-binary error.
pub(crate) fn task_difference(ours: &[TaskInfo], theirs: &[TaskInfo]) -> String {
    const SHOWN: usize = 3;
    let list = |names: Vec<&str>| {
        let mut text =
            names.iter().take(SHOWN).map(|name| format!("`{name}`")).collect::<Vec<_>>().join(", ");
        if names.len() > SHOWN {
            text.push_str(&format!(" and {} more", names.len() - SHOWN));
        }
        text
    };
    let find = |table: &'_ [TaskInfo], name: &str| table.iter().position(|info| info.name == name);
    let lacks: Vec<&str> = ours
        .iter()
        .filter(|info| find(theirs, &info.name).is_none())
        .map(|info| info.name.as_str())
        .collect();
    let extra: Vec<&str> = theirs
        .iter()
        .filter(|info| find(ours, &info.name).is_none())
        .map(|info| info.name.as_str())
        .collect();
    let changed: Vec<&str> = ours
        .iter()
        .filter(|info| find(theirs, &info.name).is_some_and(|at| theirs[at] != **info))
        .map(|info| info.name.as_str())
        .collect();
    let mut parts = Vec::new();
    if !lacks.is_empty() {
        parts.push(format!("it lacks {}", list(lacks)));
    }
    if !extra.is_empty() {
        parts.push(format!("it has {} besides", list(extra)));
    }
    if !changed.is_empty() {
        parts.push(format!("{} take or return other types", list(changed)));
    }
    if parts.is_empty() {
        parts.push("its tasks are in another order".into());
    }
    format!("a stale or different worker binary: {}", parts.join("; "))
}

/// Checks that the worker's `info` has the types this process knows `task` by,
/// and that postcard can carry them.
pub(crate) fn check_types(task: &str, ours: &Signature, info: &TaskInfo) -> Result<()> {
    for (direction, name, shape) in [
        (Direction::Input, ours.input, &ours.input_shape),
        (Direction::Output, ours.output, &ours.output_shape),
    ] {
        if let Shape::Unsupported(feature) = shape {
            let action = if direction == Direction::Input { "encode" } else { "decode" };
            return Err(Error::codec(
                task,
                direction,
                action,
                format!("`{name}` needs {feature}, which postcard cannot carry"),
            ));
        }
    }
    let agree = |name: &str, shape: &Shape, their_name: &str, their_shape: &Shape| match (shape, their_shape)
    {
        (Shape::Fingerprint(ours), Shape::Fingerprint(theirs)) => ours == theirs,
        _ => name == their_name,
    };
    if !agree(ours.input, &ours.input_shape, &info.input, &info.input_shape)
        || !agree(ours.output, &ours.output_shape, &info.output, &info.output_shape)
    {
        let same_names = ours.input == info.input && ours.output == info.output;
        let note = if same_names { " (same names, other shapes)" } else { "" };
        return Err(Error::TaskMismatch {
            task: task.into(),
            parent: format!("{} -> {}{note}", ours.input, ours.output),
            worker: format!("{} -> {}", info.input, info.output),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ready_starts_with_its_variant_and_version() {
        let ready =
            Reply::Ready { version: 7, pid: 300, tasks: Vec::new(), progress: None, reads_stderr: false };
        let bytes = postcard::to_allocvec(&ready).unwrap();
        assert_eq!(postcard::take_from_bytes::<(u32, u32)>(&bytes).unwrap().0, (READY_VARIANT, 7));
    }

    #[test]
    fn frames_start_after_the_preamble_even_when_it_arrives_in_pieces() {
        let mut stream = b"running 1 test\n".to_vec();
        stream.extend_from_slice(protocol::PREAMBLE);
        let mut frame = BytesMut::new();
        protocol::write_message(
            &mut frame,
            &Reply::Done {
                id: 9,
                errors: protocol::Count::new(0),
                busy_ns: protocol::Fixed64::new(1),
                peak_rss_kib: protocol::Fixed64::new(2),
            },
            1024,
        )
        .unwrap();
        stream.extend_from_slice(&frame);

        let mut codec = ReplyCodec::new(0, 1024);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for byte in stream {
            buf.extend_from_slice(&[byte]);
            if let Some(frame) = codec.decode(&mut buf).unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(frames.len(), 1);
        let (reply, _) = protocol::split_header::<Reply>(&frames[0]).unwrap();
        assert_eq!(
            reply,
            Reply::Done {
                id: 9,
                errors: protocol::Count::new(0),
                busy_ns: protocol::Fixed64::new(1),
                peak_rss_kib: protocol::Fixed64::new(2)
            }
        );
    }

    #[test]
    fn endless_output_without_a_preamble_is_an_error() {
        let mut codec = ReplyCodec::new(0, 1024);
        let mut buf = BytesMut::new();
        let result = loop {
            buf.extend_from_slice(&[b'x'; 64 * 1024]);
            match codec.decode(&mut buf) {
                Ok(None) => continue,
                other => break other,
            }
        };
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert!(buf.len() < protocol::PREAMBLE.len());
    }

    #[test]
    fn a_large_frame_is_read_into_the_last_ones_buffer_once_that_was_dropped() {
        let len = 2 * LARGE_FRAME;
        let mut codec = ReplyCodec::new(0, 4 * LARGE_FRAME);
        let mut src = BytesMut::from(&protocol::PREAMBLE[..]);
        let feed = |src: &mut BytesMut, codec: &mut ReplyCodec| {
            // The head and a little of the body, then the rest, as reads would bring them.
            src.extend_from_slice(&(len as u32).to_be_bytes());
            src.extend_from_slice(&[7; 100]);
            assert!(codec.decode(src).unwrap().is_none());
            src.extend_from_slice(&vec![7; len - 100]);
            codec.decode(src).unwrap().expect("the whole frame")
        };
        let first = feed(&mut src, &mut codec);
        let first_at = first.as_ptr() as usize;
        drop(first);
        let second = feed(&mut src, &mut codec);
        // Reclaimed from its start, a few bytes before where the first frame lay.
        let reused = |frame: &BytesMut, at: usize| (at - 64..=at).contains(&(frame.as_ptr() as usize));
        assert!(reused(&second, first_at), "the same allocation, reclaimed");
        // Held by its receiver, a frame's buffer is not reused.
        let third = feed(&mut src, &mut codec);
        assert!(!reused(&third, second.as_ptr() as usize));
        assert!(third.iter().all(|&byte| byte == 7));
    }
}
