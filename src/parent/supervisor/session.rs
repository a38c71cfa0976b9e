//! A session: one connected worker, from its first call to the reason it ends.
//! Each poll reads the replies that came, enforces the head call's limits, withdraws
//! abandoned calls sent ahead, pulls work from the queue and writes it.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::io::AsyncWrite;

use super::pull;
use super::replies::{self, Answer, Matched};
use super::timers::{CANCEL_GRACE, HeadTimer, IdleTimer, WITHDRAWN_GRACE};
use super::writer::FrameWriter;
use crate::channel::broker::Attachments;
use crate::parent::dispatch::{CancelPolicy, Completion, Delivery, Job, Room, Took};
use crate::parent::output::WorkerOutput;
use crate::parent::pool::{RunState, Shared};
use crate::parent::process::WorkerProcess;
use crate::parent::stats::{Counters, ExitCause};
use crate::wire::protocol::{self, Request};

/// Why a session ended.
#[derive(Debug)]
pub(super) enum End {
    /// Shutdown asked for, and nothing is left to do.
    Drained,
    /// The executor was dropped or terminated.
    Terminated,
    /// The worker's reply stream ended.
    Died,
    /// The worker sent something that is not a valid reply.
    Protocol(String),
    /// The running call (`id`) timed out or was cancelled: the worker must be killed.
    Kill { cause: ExitCause, id: u64 },
    /// The worker is done for a planned reason, with nothing in flight.
    Retire(ExitCause),
}

/// What a session speaks to: a worker's two pipes, and its withdrawal page. A
/// trait, so a session can be tested against a fake worker in memory.
pub(super) trait Link {
    type Requests: AsyncWrite + Unpin;

    /// The worker's slot.
    fn slot(&self) -> usize;
    /// The worker's process id.
    fn pid(&self) -> u32;
    /// The request pipe, unless closed.
    fn requests(&mut self) -> Option<&mut Self::Requests>;
    /// The next reply frame; `None` once the worker closed its end.
    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<BytesMut>>>;
    /// See [`WorkerProcess::withdraw`].
    fn withdraw(&mut self, id: u64) -> bool;
    /// What the worker printed, as the parent sees it; `None` for a fake.
    fn output(&mut self) -> Option<&mut WorkerOutput>;
}

impl Link for WorkerProcess {
    type Requests = tokio::net::unix::pipe::Sender;

    #[inline]
    fn slot(&self) -> usize {
        self.index
    }

    #[inline]
    fn pid(&self) -> u32 {
        self.pid
    }

    #[inline]
    fn requests(&mut self) -> Option<&mut Self::Requests> {
        self.requests.as_mut()
    }

    #[inline]
    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<BytesMut>>> {
        Pin::new(&mut self.replies).poll_next(cx)
    }

    #[inline]
    fn withdraw(&mut self, id: u64) -> bool {
        WorkerProcess::withdraw(self, id)
    }

    fn output(&mut self) -> Option<&mut WorkerOutput> {
        Some(&mut self.process.output)
    }
}

/// One connected worker: the calls written to it and not yet answered, in order.
pub(super) struct Session<'a, L: Link = WorkerProcess> {
    shared: &'a Shared,
    worker: &'a mut L,
    /// The channels the worker holds, and channel messages waiting to be written.
    channels: &'a mut Attachments,
    control: VecDeque<Bytes>,
    /// The level of `tracing` events the worker forwards, as last told.
    log_level: u8,
    /// The task last shown as running in `stats()`.
    noted_task: &'static str,
    in_flight: VecDeque<Job>,
    /// How far their request frames are written. Once the pipe broke, replies are
    /// read until the stream ends.
    writer: FrameWriter,
    /// Moving average of the worker's time per call.
    pub(super) service_ns: Option<u64>,
    /// The call at the head of `in_flight` is running (its frame is written and
    /// the reply before it arrived).
    head_running: bool,
    /// Its time limit and cancellation grace.
    head_timer: HeadTimer,
    /// Fires when the worker has been idle for `idle_timeout`.
    idle_timer: IdleTimer,
    /// Inputs this worker has served.
    served: u64,
    /// Set when the worker should stop once its calls are done.
    retiring: Option<ExitCause>,
    /// Fires when the worker's group stops taking work (its Slurm allocation ends).
    stop_at: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The worker runs elsewhere: its link's latency is measured (a clock read per
    /// call, which local workers are spared).
    remote: bool,
    /// Average time a call spends on the link beyond its run.
    link_ns: u64,
}

impl<'a, L: Link> Session<'a, L> {
    pub(super) fn new(
        shared: &'a Shared,
        worker: &'a mut L,
        channels: &'a mut Attachments,
        service_ns: Option<u64>,
    ) -> Self {
        let group = shared.config.groups.of(worker.slot());
        let stop_at = group.stop_at().map(|at| Box::pin(tokio::time::sleep_until(at.into())));
        let remote = !group.same_host;
        Session {
            shared,
            worker,
            channels,
            control: VecDeque::new(),
            // What the worker was told at its handshake.
            log_level: crate::parent::process::wanted_log_level(),
            noted_task: "",
            in_flight: VecDeque::new(),
            writer: FrameWriter::default(),
            service_ns,
            head_running: false,
            head_timer: HeadTimer::default(),
            idle_timer: IdleTimer::default(),
            served: 0,
            retiring: None,
            stop_at,
            remote,
            link_ns: 0,
        }
    }

    /// Hands back the calls still in flight, and whether the first had been fully
    /// sent (so the worker may have started it).
    pub(super) fn finish(&mut self) -> (VecDeque<Job>, bool) {
        let head_sent = self.head_written();
        let jobs = std::mem::take(&mut self.in_flight);
        self.shared.counters.running.fetch_sub(jobs.len(), Ordering::AcqRel);
        (jobs, head_sent)
    }

    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        loop {
            if let Poll::Ready(end) = self.poll_replies(cx) {
                return Poll::Ready(end);
            }
            if self.shared.state() == RunState::Terminated {
                return Poll::Ready(End::Terminated);
            }
            if let Some(end) = self.poll_head(cx) {
                return Poll::Ready(end);
            }
            self.withdraw_abandoned(cx);
            if self.stop_at.as_mut().is_some_and(|stop| stop.as_mut().poll(cx).is_ready()) {
                self.stop_at = None;
                // What it holds still finishes; nothing new is taken.
                self.retiring.get_or_insert(ExitCause::AllocationEnding);
            }
            if self.in_flight.is_empty() {
                if let Some(cause) = self.retiring.take() {
                    return Poll::Ready(End::Retire(cause));
                }
                if self.poll_idle(cx) {
                    return Poll::Ready(End::Retire(ExitCause::Idle));
                }
            } else {
                self.idle_timer.stop();
            }
            let pulled = self.pull(cx);
            self.poll_write(cx);
            if !self.head_running && self.head_written() {
                self.head_running = true;
                if self.remote {
                    self.head_timer.ran();
                }
                self.note_running();
                continue; // arm the head's timer
            }
            // Checked after pulling, which drops withdrawn calls: a queue of only
            // withdrawn calls is empty.
            if self.shared.state() == RunState::Draining
                && self.in_flight.is_empty()
                && !self.shared.queue.has_live_jobs()
            {
                return Poll::Ready(End::Drained);
            }
            if !pulled {
                return Poll::Pending;
            }
        }
    }

    /// Handles every reply that has arrived.
    fn poll_replies(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        loop {
            match self.worker.poll_reply(cx) {
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
        let head = self.in_flight.front().map(|job| job.id);
        let Answer { body, busy_ns, peak_rss_kib, errors } =
            match replies::match_reply(frame, head, self.head_written())? {
                Matched::Call(answer) => answer,
                Matched::Channel(message, body) => return self.channels.route(message, &body),
                Matched::Progress { call, done, total } => {
                    if self.in_flight.front().is_some_and(|job| job.id == call) {
                        self.shared.counters.slots[self.worker.slot()].reported(done, total);
                    }
                    return Ok(());
                }
                Matched::Log { records, dropped } => {
                    let worker = (self.worker.slot(), self.worker.pid());
                    super::logs::emit(&self.shared.counters, worker, records, dropped, self.in_flight.iter());
                    return Ok(());
                }
                Matched::Output { call, stderr, stdout } => {
                    if let Some(output) = self.worker.output() {
                        super::logs::printed(output, self.in_flight.iter(), call, &stderr, &stdout);
                    }
                    return Ok(());
                }
            };
        let Some(job) = self.in_flight.pop_front() else {
            return Ok(());
        };
        self.shared.counters.running.fetch_sub(1, Ordering::AcqRel);
        // A call whose caller left while it ran, skipped or finished, was for nobody.
        self.shared.counters.answered(job.items, errors, job.withdrawn || job.signalled);
        // The next call starts as soon as this reply is written: now, if it was sent.
        self.head_running = self.head_written();
        if self.remote {
            self.measure_link(busy_ns);
        }
        self.head_timer.reset();
        if self.remote && self.head_running {
            // The next call's clock starts now, when it can start running.
            self.head_timer.ran();
        }
        self.note_running();

        self.service_ns = Some(match self.service_ns {
            None => busy_ns,
            Some(average) => average.saturating_mul(7).saturating_add(busy_ns) / 8,
        });
        if !job.withdrawn {
            // A skipped call used none of the worker's budget.
            self.served += u64::from(job.items);
            if let Some(index) = job.task_index {
                self.shared.tasks.learn_call(index, busy_ns, job.items);
            }
        }
        let limits = &self.shared.limits;
        let peak_rss = peak_rss_kib.saturating_mul(1024);
        if limits.max_worker_memory.is_some_and(|ceiling| peak_rss > ceiling) {
            tracing::info!(
                worker = self.worker.slot(),
                task = job.task,
                peak_rss,
                "worker passed its memory ceiling"
            );
            self.retiring = Some(ExitCause::Memory { task: job.task.into(), peak_rss });
        } else if limits.max_tasks_per_worker.is_some_and(|max| self.served >= max) {
            self.retiring.get_or_insert(ExitCause::MaxTasks);
        }
        let slot = &self.shared.counters.slots[self.worker.slot()];
        slot.answered(job.items, peak_rss_kib);
        slot.set_busy(!self.in_flight.is_empty());
        job.complete(Completion::Done(Delivery { body, busy_ns }));
        Ok(())
    }

    /// Learns the link's latency from a call that took `busy_ns` in the worker: its
    /// time from when it could start (written, the call before it answered) to its
    /// reply, beyond its run.
    fn measure_link(&mut self, busy_ns: u64) {
        let Some(started) = self.head_timer.started() else {
            return;
        };
        let total = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let link = total.saturating_sub(busy_ns);
        self.link_ns = if self.link_ns == 0 { link } else { (self.link_ns * 7 + link) / 8 };
        self.shared.counters.link_ns[self.worker.slot()].store(self.link_ns, Ordering::Relaxed);
    }

    /// Whether the head call's frame has been fully written (so it may be running).
    fn head_written(&self) -> bool {
        self.writer.head_written(self.in_flight.len())
    }

    /// Enforces the running call's time limit, and its cancellation under
    /// [`CancelPolicy::Kill`].
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Option<End> {
        if !self.head_running {
            return None;
        }
        let head = self.in_flight.front_mut()?;
        let abandoned = head.withdrawn || head.poll_cancelled(cx);
        if abandoned && !head.signalled {
            // The task can see it (`procexec::is_cancelled`) and stop early.
            head.signalled = true;
            self.worker.withdraw(head.id);
        }
        let kill = head.options.cancel == CancelPolicy::Kill;
        let grace = if kill && head.withdrawn {
            Some(WITHDRAWN_GRACE)
        } else if kill && abandoned {
            Some(CANCEL_GRACE)
        } else {
            None
        };
        if head.options.timeout.is_none() && grace.is_none() {
            return None;
        }
        let timed_out = self.head_timer.poll_expired(cx, head.options.timeout, grace)?;
        let task = head.task.to_string();
        let cause = if timed_out { ExitCause::TimedOut { task } } else { ExitCause::Cancelled { task } };
        Some(End::Kill { cause, id: head.id })
    }

    /// Calls sent ahead may lose their callers while an earlier call runs: the
    /// worker is told to skip those rather than start them (and then be killed by the
    /// cancel policy). Registers to be woken when a caller leaves.
    fn withdraw_abandoned(&mut self, cx: &mut Context<'_>) {
        // Only calls fully written, behind the first, can be waiting in the worker.
        let written = self.writer.written(self.in_flight.len());
        if written < 2 {
            return;
        }
        for job in self.in_flight.range_mut(1..written) {
            if !job.withdrawn && job.poll_cancelled(cx) && self.worker.withdraw(job.id) {
                job.withdrawn = true;
            }
        }
    }

    /// With nothing in flight: true once the worker has been idle for
    /// `idle_timeout` and may stop (more than `min_processes` are alive).
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        let limits = &self.shared.limits;
        let Some(timeout) = limits.idle_timeout.filter(|_| limits.min_processes < self.shared.processes)
        else {
            return false;
        };
        if !self.idle_timer.poll_elapsed(cx, timeout) {
            return false;
        }
        if !self.shared.queue.has_live_jobs() && self.shared.claim_idle_exit() {
            return true;
        }
        // Needed, or work is waiting: stay, and look again later.
        self.idle_timer.restart(cx, timeout);
        false
    }

    /// Pulls jobs while the window has room; true if any came.
    fn pull(&mut self, cx: &mut Context<'_>) -> bool {
        let busy = !self.in_flight.is_empty();
        let head_ran = (busy && self.head_running).then(|| self.head_timer.ran());
        let mut room =
            pull::depth(self.service_ns, head_ran, self.link_ns).saturating_sub(self.in_flight.len());
        // A call that talks runs alone (the queue hands it only to an idle worker):
        // it may run until other calls have run, so nothing waits behind it.
        if self.in_flight.front().is_some_and(Job::talks) {
            room = 0;
        }
        if self.writer.is_closed() || self.retiring.is_some() || room == 0 {
            // Still be woken for shutdown and cancellations.
            self.shared.queue.register(cx, self.worker.slot());
            return false;
        }
        let held = self.in_flight.iter().map(|job| job.items);
        let budget = pull::budget(self.shared.limits.max_tasks_per_worker, self.served, held);
        let room = Room { jobs: room, items: budget, busy };
        let (in_flight, mut withdrawn) = (&mut self.in_flight, 0);
        let slot = self.worker.slot();
        // An in-process worker runs each call under its caller's span itself.
        let in_process = self.shared.config.in_process.map(|_| self.shared.config.executor);
        let taken = self.shared.queue.poll_take(cx, slot, room, &mut withdrawn, |job| {
            if let Some(executor) = in_process {
                crate::parent::in_process::sending(executor, job.id, &job.span);
            }
            in_flight.push_back(job)
        });
        Counters::add(&self.shared.counters.cancelled, withdrawn);
        match taken {
            Poll::Ready(Took::Jobs(taken)) => {
                self.shared.counters.slots[slot].set_busy(true);
                self.writer.queued(taken);
                self.shared.counters.running.fetch_add(taken, Ordering::AcqRel);
                self.idle_timer.stop();
                true
            }
            Poll::Ready(Took::OverBudget) => {
                // A fresh worker has the budget for it; this one is done once idle.
                self.retiring.get_or_insert(ExitCause::MaxTasks);
                true
            }
            Poll::Pending => false,
        }
    }

    /// Shows in `stats()` which call the worker runs now, and since when.
    fn note_running(&mut self) {
        let task = self.in_flight.front().filter(|_| self.head_running).map(|job| job.task);
        let same = task.is_some_and(|task| std::ptr::eq(task, self.noted_task));
        if let Some(task) = task {
            self.noted_task = task;
        }
        self.shared.counters.slots[self.worker.slot()].set_running(task, same);
    }

    /// Writes pending frames until the pipe is full or nothing is left.
    fn poll_write(&mut self, cx: &mut Context<'_>) {
        self.channels.port.drain_into(cx, &mut self.control);
        // The parent's filter changed (a subscriber came, went, or was reloaded):
        // the worker follows, from its next call.
        let level = crate::parent::process::wanted_log_level();
        if level != self.log_level {
            self.log_level = level;
            let mut frame = BytesMut::new();
            if protocol::write_message(&mut frame, &Request::LogLevel { level }, usize::MAX).is_ok() {
                self.control.push_back(frame.freeze());
            }
        }
        if let Some(requests) = self.worker.requests() {
            self.writer.poll_write(cx, requests, &self.in_flight, &mut self.control);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parent::dispatch::{CallOptions, ReplyTo};
    use crate::parent::output::WorkerStderr;
    use crate::parent::pool::{Limits, TaskTable};
    use crate::parent::process::WorkerConfig;
    use crate::wire::protocol::{self, Count, Fixed64, Reply, Request};
    use bytes::Bytes;
    use futures::{SinkExt, StreamExt};
    use std::future::poll_fn;
    use tokio::io::DuplexStream;
    use tokio::sync::oneshot;
    use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

    const MAX_FRAME: usize = 1 << 20;

    /// The parent's ends of a fake worker's pipes.
    struct FakeLink {
        requests: Option<DuplexStream>,
        replies: FramedRead<DuplexStream, LengthDelimitedCodec>,
    }

    impl Link for FakeLink {
        type Requests = DuplexStream;

        fn slot(&self) -> usize {
            0
        }

        fn pid(&self) -> u32 {
            0
        }

        fn requests(&mut self) -> Option<&mut DuplexStream> {
            self.requests.as_mut()
        }

        fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<BytesMut>>> {
            Pin::new(&mut self.replies).poll_next(cx)
        }

        fn withdraw(&mut self, _: u64) -> bool {
            false
        }

        fn output(&mut self) -> Option<&mut WorkerOutput> {
            None
        }
    }

    /// A worker in memory: it answers the first `answers` calls it reads, each with
    /// one outcome record holding the call's id; then, if `die_mid_call`, it reads
    /// one more call and dies (drops its pipes), else it answers nothing more. Its
    /// replies say they answer call `reply_id(id)`.
    fn fake_worker(answers: usize, die_mid_call: bool, reply_id: fn(u64) -> u64) -> FakeLink {
        let (parent_requests, worker_requests) = tokio::io::duplex(64 * 1024);
        let (worker_replies, parent_replies) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut calls = FramedRead::new(worker_requests, protocol::codec(MAX_FRAME));
            let mut replies = FramedWrite::new(worker_replies, protocol::codec(MAX_FRAME));
            for _ in 0..answers {
                let Some(Ok(frame)) = calls.next().await else { return };
                let Ok((Request::Call { id, .. }, _)) = protocol::split_header::<Request>(&frame) else {
                    return;
                };
                let mut reply = BytesMut::new();
                let done = Reply::Done {
                    id: reply_id(id),
                    errors: Count::new(0),
                    busy_ns: Fixed64::new(1_000),
                    peak_rss_kib: Fixed64::new(0),
                };
                if protocol::encode_into(&mut reply, &done).is_err() {
                    return;
                }
                reply.extend_from_slice(&record(id));
                if replies.send(reply.freeze()).await.is_err() {
                    return;
                }
            }
            if die_mid_call {
                let _ = calls.next().await;
                return;
            }
            // As a real worker does, it lives until the parent hangs up.
            while let Some(Ok(_)) = calls.next().await {}
        });
        let replies = FramedRead::new(parent_replies, protocol::codec(MAX_FRAME));
        FakeLink { requests: Some(parent_requests), replies }
    }

    fn record(id: u64) -> Vec<u8> {
        let mut body = BytesMut::new();
        body.extend_from_slice(&[protocol::OUTCOME_OK]);
        body.extend_from_slice(&id.to_le_bytes());
        let mut record = BytesMut::new();
        let start = protocol::begin_record(&mut record);
        record.extend_from_slice(&body);
        protocol::end_record(&mut record, start);
        record.to_vec()
    }

    fn shared() -> Shared {
        let config = WorkerConfig {
            program: "fake".into(),
            args: Vec::new(),
            env: Vec::new(),
            max_frame_len: MAX_FRAME,
            handshake_timeout: std::time::Duration::from_secs(1),
            stderr: WorkerStderr::Discard,
            pipe_capacity: 0,
            measure_memory: false,
            initializer: None,
            in_process: None,
            executor: 1,
            groups: std::sync::Arc::new(crate::parent::launch::Groups::local("fake".as_ref())),
        };
        Shared::new(config, Limits::default(), TaskTable::new(Vec::new()), 1, MAX_FRAME)
    }

    /// Queues a call with id `id`; its completion comes on the receiver.
    fn queue_call(shared: &Shared, id: u64) -> oneshot::Receiver<Completion> {
        let mut frame = BytesMut::new();
        let call = Request::Call { id, task: 0, capture: false, items: Count::new(1) };
        protocol::write_message(&mut frame, &call, MAX_FRAME).expect("a call frame encodes");
        let (sender, receiver) = oneshot::channel();
        let job = Job::new(id, "fake", 1, frame.freeze(), ReplyTo::Once(sender), CallOptions::default());
        assert!(shared.queue.push(job).is_ok(), "the queue is open");
        receiver
    }

    fn body_of(completion: Result<Completion, oneshot::error::RecvError>) -> Option<Bytes> {
        match completion {
            Ok(Completion::Done(delivery)) => Some(delivery.body),
            _ => None,
        }
    }

    #[tokio::test]
    async fn queued_calls_are_written_answered_and_completed_in_order() {
        let shared = shared();
        let mut worker = fake_worker(3, false, |id| id);
        let receivers: Vec<_> = (0..3).map(|id| queue_call(&shared, id)).collect();
        let mut channels = Attachments::new(&shared.hub, MAX_FRAME);
        let mut session = Session::new(&shared, &mut worker, &mut channels, None);
        let answered = async {
            let mut bodies = Vec::new();
            for receiver in receivers {
                bodies.push(body_of(receiver.await));
            }
            // Everything answered: shutting down ends the session.
            shared.drain();
            bodies
        };
        let (end, bodies) = tokio::join!(poll_fn(|cx| session.poll(cx)), answered);
        assert!(matches!(end, End::Drained), "{end:?}");
        let expected: Vec<_> = (0..3).map(|id| Some(Bytes::from(record(id)))).collect();
        assert_eq!(bodies, expected);
        let (in_flight, _) = session.finish();
        assert!(in_flight.is_empty());
        assert_eq!(session.service_ns, Some(1_000), "the worker's time per call was learnt");
    }

    #[tokio::test]
    async fn a_worker_dying_mid_call_ends_the_session_with_that_call_started() {
        let shared = shared();
        let mut worker = fake_worker(1, true, |id| id);
        let first = queue_call(&shared, 0);
        let second = queue_call(&shared, 1);
        let mut channels = Attachments::new(&shared.hub, MAX_FRAME);
        let mut session = Session::new(&shared, &mut worker, &mut channels, None);
        let end = poll_fn(|cx| session.poll(cx)).await;
        assert!(matches!(end, End::Died), "{end:?}");
        assert_eq!(body_of(first.await), Some(Bytes::from(record(0))));
        let (in_flight, head_started) = session.finish();
        let ids: Vec<_> = in_flight.iter().map(|job| job.id).collect();
        assert_eq!(ids, [1], "the call it died in is handed back");
        assert!(head_started, "its request was written whole, so it may have run");
        drop(in_flight);
        assert!(second.await.is_err(), "nobody completed it here: the supervisor judges it");
    }

    #[tokio::test]
    async fn a_reply_out_of_order_ends_the_session_as_a_protocol_violation() {
        let shared = shared();
        let mut worker = fake_worker(1, false, |id| id + 9);
        let _call = queue_call(&shared, 0);
        let mut channels = Attachments::new(&shared.hub, MAX_FRAME);
        let mut session = Session::new(&shared, &mut worker, &mut channels, None);
        let end = poll_fn(|cx| session.poll(cx)).await;
        assert!(
            matches!(&end, End::Protocol(message) if message == "reply for call 9 while call 0 was running"),
            "{end:?}"
        );
        let (in_flight, _) = session.finish();
        assert_eq!(in_flight.len(), 1);
    }
}
