//! In-process workers (see [`Builder::in_process`](crate::Builder::in_process)): a
//! thread of the parent runs the worker's serve loop over a pair of real pipes,
//! so the rest of the parent (handshake, session, dispatch, timers, channels)
//! cannot tell it from a process, and every call takes the full encode, frame and
//! decode round trip.
//!
//! What a thread cannot be is killed: a "killed" worker thread is abandoned. The
//! parent closes its ends of the pipes when it drops the worker, so the thread,
//! once its task returns, finds them closed and ends.
//!
//! A task's `tracing` events need no forwarding: the thread runs each call inside a
//! `procexec::worker` span (fields `worker`, `task`, `call`) whose parent is the
//! span current where the call was made, in that span's subscriber. The protocol
//! carries no span, so the session leaves it here, by executor and call id.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::parent::error::ExitReason;
use crate::task::Registry;

/// The spans current where calls sent to in-process workers were made, by executor
/// and call id; the worker thread takes its call's out when it starts it. Only
/// enabled spans are kept: without one, the call's span would go nowhere.
static CALLER_SPANS: LazyLock<Mutex<HashMap<(u64, u64), tracing::Span>>> = LazyLock::new(Mutex::default);

fn caller_spans() -> std::sync::MutexGuard<'static, HashMap<(u64, u64), tracing::Span>> {
    // Nothing user-written runs under the lock.
    CALLER_SPANS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Call `id`, made in `span`, goes to an in-process worker of `executor`: its span
/// goes ahead of it.
pub(crate) fn sending(executor: u64, id: u64, span: &tracing::Span) {
    if !span.is_none() {
        caller_spans().insert((executor, id), span.clone());
    }
}

/// Calls `ids` of `executor` will never start: their spans are let go of.
pub(crate) fn forget(executor: u64, ids: impl Iterator<Item = u64>) {
    let mut spans = caller_spans();
    for id in ids {
        spans.remove(&(executor, id));
    }
}

/// Runs `run` (call `id` of task number `task`, on worker `slot`) inside its
/// `procexec::worker` span, in the subscriber of the span its caller was in.
fn in_call_span(tasks: &Registry, executor: u64, slot: usize, id: u64, task: u32, run: &mut dyn FnMut()) {
    let caller = caller_spans().remove(&(executor, id));
    let Some((caller, dispatch)) =
        caller.and_then(|span| span.with_subscriber(|(_, dispatch)| dispatch.clone()).map(|d| (span, d)))
    else {
        return run();
    };
    let task = tasks.get(task).map_or("?", |task| task.name());
    tracing::dispatcher::with_default(&dispatch, || {
        let span = tracing::info_span!(
            target: "procexec::worker",
            parent: &caller,
            "procexec::worker",
            worker = slot,
            task,
            call = id
        );
        span.in_scope(run)
    })
}

/// A worker thread, as the parent's process handle sees it.
pub(crate) struct WorkerThread {
    /// Answered with how the serve loop ended (closed if the thread panicked).
    ended: Option<oneshot::Receiver<ExitReason>>,
    /// How it ended, once known.
    exit: Option<ExitReason>,
    /// Killed: nobody waits for it any more.
    abandoned: bool,
}

/// How long the replies an abandoned thread wrote before it was given up are read.
/// What is in the pipe is read at once; its thread may still hold the pipe open,
/// so its end never comes.
const ABANDONED_DRAIN: Duration = Duration::from_millis(20);

/// The stack of a worker thread.
const WORKER_STACK: usize = 8 << 20;

impl WorkerThread {
    /// Starts the thread of worker `slot`, serving `tasks` on the read end of the
    /// request pipe and the write end of the reply pipe.
    pub(crate) fn start(
        tasks: &'static Registry,
        executor: u64,
        slot: usize,
        requests: OwnedFd,
        replies: OwnedFd,
    ) -> io::Result<WorkerThread> {
        let (done, ended) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("procexec-worker-{slot}"))
            // A main thread's usual stack, as a worker process has: a task that
            // recurses deeply there must not overflow here, where that aborts
            // the whole process.
            .stack_size(WORKER_STACK)
            .spawn(move || {
                // A reply written after the parent gave the thread up must fail,
                // not end the process.
                crate::sys::block_sigpipe_on_this_thread();
                let around =
                    |id, task, run: &mut dyn FnMut()| in_call_span(tasks, executor, slot, id, task, run);
                let served =
                    crate::worker::serve_thread(tasks, File::from(requests), File::from(replies), &around);
                let exit = match served {
                    Ok(()) => ExitReason::Code(0),
                    // A pipe the parent closed on an abandoned thread, mostly; what a
                    // worker process would print before exiting with code 3.
                    Err(err) => {
                        tracing::debug!(worker = slot, "in-process worker ended: {err}");
                        ExitReason::Code(3)
                    }
                };
                let _ = done.send(exit);
            })?;
        Ok(WorkerThread { ended: Some(ended), exit: None, abandoned: false })
    }

    /// Gives the thread up: it cannot be stopped, so it runs on until its task
    /// returns and it finds its pipes closed.
    pub(crate) fn kill(&mut self) {
        self.abandoned = true;
    }

    /// Waits up to `grace` for the thread to end; at once for an abandoned one.
    pub(crate) async fn wait(&mut self, grace: Duration) -> ExitReason {
        if let Some(exit) = self.exit {
            return exit;
        }
        let Some(ended) = &mut self.ended else {
            return ExitReason::Unknown;
        };
        let patience = if self.abandoned { Duration::ZERO } else { grace };
        // `timeout` looks at the thread's answer before the clock: one that ended
        // already is seen even without patience.
        match tokio::time::timeout(patience, ended).await {
            Ok(Ok(exit)) => {
                self.exit = Some(exit);
                self.ended = None;
                exit
            }
            // The serve loop panicked (a task's panic never gets this far).
            Ok(Err(_)) => {
                self.exit = Some(ExitReason::Unknown);
                self.ended = None;
                ExitReason::Unknown
            }
            Err(_) => ExitReason::Abandoned,
        }
    }

    /// How long to read the replies of a killed worker.
    pub(crate) fn drain_patience(&self, grace: Duration) -> Duration {
        if self.abandoned && self.exit.is_none() { ABANDONED_DRAIN } else { grace }
    }
}
