//! One supervisor per worker slot: it owns the worker process, writes the jobs it
//! pulls from the queue, matches replies to them, and when the worker dies fails
//! exactly the call it was running, re-queues the calls it never started, and starts
//! a replacement.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::io::AsyncWrite;

use crate::dispatch::{Delivery, Job};
use crate::error::{Error, ProtocolViolation, WorkerCrash, WorkerStartError};
use crate::executor::{RunState, Shared};
use crate::process::WorkerProcess;
use crate::protocol::{self, Reply};

/// Queued work a worker may hold beyond its current call, in expected run time:
/// enough to cover a pipe round trip, so the worker never waits for the parent.
const PREFETCH_NS: u64 = 300_000;
/// Calls at least this long are not prefetched: the round trip is noise next to
/// them, and a call queued behind a long one could have run on a worker that is idle.
const LONG_CALL_NS: u64 = 2_000_000;
/// Upper bound on calls in flight to one worker.
const MAX_DEPTH: usize = 256;
/// IO slices per vectored write.
const MAX_SLICES: usize = 64;
/// Consecutive failed starts after which a slot gives up.
const MAX_START_FAILURES: u32 = 5;
/// How long a worker told to exit may take before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Runs slot `worker.index` until the executor shuts down or the slot gives up.
pub(crate) async fn supervise(shared: Arc<Shared>, mut worker: WorkerProcess) {
    let _running = shared.supervisor_guard();
    let slot = worker.index;
    let mut service_ns = None;
    loop {
        let mut session = Session {
            shared: &shared,
            worker: &mut worker,
            in_flight: VecDeque::new(),
            out: VecDeque::new(),
            written: 0,
            write_closed: false,
            service_ns,
        };
        let end = poll_fn(|cx| session.poll(cx)).await;
        let in_flight = std::mem::take(&mut session.in_flight);
        service_ns = session.service_ns;
        match end {
            End::Drained => {
                worker.close_requests();
                let exit = worker.process.wait_exit(EXIT_GRACE).await;
                tracing::debug!(worker = slot, pid = worker.pid, %exit, "worker exited");
                return;
            }
            End::Terminated => {
                worker.process.kill();
                in_flight.into_iter().for_each(|job| job.complete(Err(Error::Shutdown)));
                return;
            }
            End::Died => died(&shared, &mut worker, in_flight).await,
            End::Protocol(message) => {
                tracing::warn!(worker = slot, pid = worker.pid, "protocol violation: {message}");
                worker.process.kill();
                let _ = worker.process.wait_exit(EXIT_GRACE).await;
                let violation = Arc::new(ProtocolViolation { worker: slot, pid: worker.pid, message });
                in_flight.into_iter().for_each(|job| job.complete(Err(Error::Protocol(violation.clone()))));
            }
        }
        match restart(&shared, slot).await {
            Some(replacement) => worker = replacement,
            None => return,
        }
    }
}

/// The worker's reply stream ended: it died. The oldest call without a reply is the
/// one it was running; the others were never started (a worker flushes each reply
/// before starting the next call) and go back to the queue.
async fn died(shared: &Shared, worker: &mut WorkerProcess, in_flight: VecDeque<Job>) {
    // Also takes down a worker that merely closed stdout, and its grandchildren.
    worker.process.kill();
    let exit = worker.process.wait_exit(EXIT_GRACE).await;
    let stderr_tail = worker.process.stderr_tail().await;
    let mut jobs = in_flight.into_iter();
    match jobs.next() {
        Some(running) => {
            tracing::warn!(worker = worker.index, pid = worker.pid, %exit, task = running.task, "worker died");
            let crash = WorkerCrash {
                task: running.task.into(),
                worker: worker.index,
                pid: worker.pid,
                exit,
                stderr_tail,
            };
            running.complete(Err(Error::WorkerCrashed(Arc::new(crash))));
        }
        None => tracing::warn!(worker = worker.index, pid = worker.pid, %exit, "idle worker died"),
    }
    shared.queue.requeue(jobs);
}

/// Starts a replacement worker, backing off on failure. `None` when the executor is
/// shutting down, or when the slot gave up after repeated failures.
async fn restart(shared: &Shared, slot: usize) -> Option<WorkerProcess> {
    let mut delay = Duration::from_millis(10);
    let mut failures = 0;
    loop {
        match shared.state() {
            RunState::Terminated => return None,
            RunState::Draining if shared.queue.is_empty() => return None,
            _ => {}
        }
        let failure = match WorkerProcess::start(&shared.config, slot).await {
            Ok(worker) if worker.tasks == shared.tasks.infos() => return Some(worker),
            Ok(_) => WorkerStartError::new(
                &shared.config.program,
                "its tasks differ from the other workers' (was the binary rebuilt while running?)",
            ),
            Err(err) => err,
        };
        failures += 1;
        tracing::error!(worker = slot, failures, "{failure}");
        if failures >= MAX_START_FAILURES {
            shared.slot_gave_up(Error::WorkerStart(Arc::new(failure)));
            return None;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// Why a session ended.
enum End {
    /// Shutdown asked for, and nothing is left to do.
    Drained,
    /// The executor was dropped or terminated.
    Terminated,
    /// The worker's reply stream ended.
    Died,
    /// The worker sent something that is not a valid reply.
    Protocol(String),
}

/// One connected worker: the calls written to it and not yet answered, in order.
struct Session<'a> {
    shared: &'a Shared,
    worker: &'a mut WorkerProcess,
    in_flight: VecDeque<Job>,
    /// Frames pulled but not yet fully written.
    out: VecDeque<Bytes>,
    /// Bytes of `out[0]` already written.
    written: usize,
    /// The request pipe broke; replies are read until the stream ends.
    write_closed: bool,
    /// Moving average of the worker's time per call.
    service_ns: Option<u64>,
}

impl Session<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        loop {
            if let Poll::Ready(end) = self.poll_replies(cx) {
                return Poll::Ready(end);
            }
            match self.shared.state() {
                RunState::Terminated => return Poll::Ready(End::Terminated),
                RunState::Draining if self.in_flight.is_empty() && self.shared.queue.is_empty() => {
                    return Poll::Ready(End::Drained);
                }
                _ => {}
            }
            let pulled = self.pull(cx);
            self.poll_write(cx);
            if !pulled {
                return Poll::Pending;
            }
        }
    }

    /// Handles every reply that has arrived.
    fn poll_replies(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        loop {
            match Pin::new(&mut self.worker.replies).poll_next(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Err(message) = self.on_reply(frame) {
                        return Poll::Ready(End::Protocol(message));
                    }
                }
                Poll::Ready(Some(Err(err))) if err.kind() == io::ErrorKind::InvalidData => {
                    return Poll::Ready(End::Protocol(format!("unreadable frame: {err}")));
                }
                Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(End::Died),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn on_reply(&mut self, frame: BytesMut) -> Result<(), String> {
        let frame = frame.freeze();
        let (reply, body) =
            protocol::split_header::<Reply>(&frame).map_err(|e| format!("undecodable reply: {e}"))?;
        let Reply::Done { id, busy_ns, peak_rss_kib: _ } = reply else {
            return Err(format!("unexpected message {reply:?}"));
        };
        match self.in_flight.front() {
            Some(job) if job.id == id => {}
            Some(job) => return Err(format!("reply for call {id} while call {} was running", job.id)),
            None => return Err(format!("reply for call {id}, but no call was in flight")),
        }
        let body = frame.slice(frame.len() - body.len()..);
        let busy_ns = busy_ns.get();
        self.service_ns = Some(match self.service_ns {
            None => busy_ns,
            Some(average) => (average * 7 + busy_ns) / 8,
        });
        if let Some(job) = self.in_flight.pop_front() {
            job.complete(Ok(Delivery { body, busy_ns }));
        }
        Ok(())
    }

    /// How many calls this worker should hold: one, plus enough queued work to
    /// cover a round trip when calls are short.
    fn depth(&self) -> usize {
        match self.service_ns {
            None => 1,
            Some(ns) if ns >= LONG_CALL_NS => 1,
            Some(ns) => (1 + PREFETCH_NS.div_ceil(ns.max(1)) as usize).min(MAX_DEPTH),
        }
    }

    /// Pulls jobs while the window has room; true if any came.
    fn pull(&mut self, cx: &mut Context<'_>) -> bool {
        let room = self.depth().saturating_sub(self.in_flight.len());
        if self.write_closed || room == 0 {
            // Still be woken for shutdown.
            self.shared.queue.register(cx, self.worker.index);
            return false;
        }
        let (out, in_flight) = (&mut self.out, &mut self.in_flight);
        let taken = self.shared.queue.poll_take(cx, self.worker.index, room, |job| {
            out.push_back(job.frame.clone());
            in_flight.push_back(job);
        });
        taken.is_ready()
    }

    /// Writes pending frames until the pipe is full or nothing is left.
    fn poll_write(&mut self, cx: &mut Context<'_>) {
        let Some(requests) = self.worker.requests.as_mut() else {
            return;
        };
        while !self.out.is_empty() && !self.write_closed {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut count = 0;
            for (i, frame) in self.out.iter().take(MAX_SLICES).enumerate() {
                slices[i] = IoSlice::new(if i == 0 { &frame[self.written..] } else { frame });
                count += 1;
            }
            match Pin::new(&mut *requests).poll_write_vectored(cx, &slices[..count]) {
                Poll::Ready(Ok(0)) => self.write_closed = true,
                Poll::Ready(Ok(mut n)) => {
                    while n > 0 {
                        let left = self.out[0].len() - self.written;
                        if n >= left {
                            n -= left;
                            self.written = 0;
                            self.out.pop_front();
                        } else {
                            self.written += n;
                            n = 0;
                        }
                    }
                }
                Poll::Ready(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
                // The worker is gone; its replies are still read to the end.
                Poll::Ready(Err(_)) => self.write_closed = true,
                Poll::Pending => return,
            }
        }
    }
}
