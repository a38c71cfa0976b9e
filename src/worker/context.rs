//! What a task asks of the worker it runs in ([`is_cancelled`](crate::is_cancelled),
//! [`report_progress`](crate::report_progress)): the call running, the page where the
//! parent marks cancelled calls, and the link progress goes out on.
//!
//! A worker process has one worker, whose context is a `static`. In-process (see
//! `Builder::in_process`), each worker thread has its own, found through a
//! thread-local that is consulted first: one lookup on a worker process's path.

use std::cell::OnceCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;

use crate::channel::link::{Link, LinkRef};
use crate::sys;
use crate::wire::protocol::{self, Reply};

/// One worker's context.
pub(crate) struct Context {
    /// The call running, plus one (0: none).
    running: AtomicU64,
    /// The page of the progress record where the parent marks cancelled calls.
    cancels: OnceLock<sys::ForeignPage>,
    /// When the running call last sent its progress, in milliseconds since `START`.
    progress_sent: AtomicU64,
    link: LinkRef,
}

/// The context of this worker process.
static PROCESS: Context = Context::new(LinkRef::Process);

thread_local! {
    /// The context of the in-process worker this thread runs, if it runs one.
    static THREAD: OnceCell<Arc<Context>> = const { OnceCell::new() };
}

/// How often a call's progress is sent at most.
const PROGRESS_EVERY_MS: u64 = 50;

impl Context {
    const fn new(link: LinkRef) -> Self {
        Context {
            running: AtomicU64::new(0),
            cancels: OnceLock::new(),
            progress_sent: AtomicU64::new(0),
            link,
        }
    }

    /// Makes this thread an in-process worker whose link is `link`; returns its
    /// context. `None` if the thread is a worker already.
    pub(crate) fn new_thread(link: LinkRef) -> Option<Arc<Context>> {
        let context = Arc::new(Context::new(link));
        THREAD.try_with(|cell| cell.set(context.clone()).ok()).ok().flatten()?;
        Some(context)
    }

    /// The context of this worker process.
    pub(crate) fn process() -> &'static Context {
        &PROCESS
    }

    /// Runs `run` on the context of the worker running on this thread: its own
    /// in-process, else the process's.
    fn with<R>(run: impl FnOnce(&Context) -> R) -> R {
        match THREAD.try_with(|cell| cell.get().cloned()) {
            Ok(Some(context)) => run(&context),
            _ => run(&PROCESS),
        }
    }

    /// The link of this worker.
    pub(crate) fn link(&self) -> &LinkRef {
        &self.link
    }

    /// Where the parent marks cancelled calls, once the worker has its record.
    pub(crate) fn set_cancels(&self, page: sys::ForeignPage) {
        let _ = self.cancels.set(page);
    }

    /// Marks call `id` as running (`None` between calls).
    pub(crate) fn set_running(&self, id: Option<u64>) {
        self.running.store(id.map_or(0, |id| id.wrapping_add(1)), Ordering::Release);
        // A new call's first report goes out at once.
        self.progress_sent.store(0, Ordering::Relaxed);
    }

    /// The call running, if one is.
    pub(crate) fn running_call(&self) -> Option<u64> {
        self.running.load(Ordering::Acquire).checked_sub(1)
    }

    /// See [`crate::is_cancelled`].
    pub(crate) fn is_cancelled() -> bool {
        Context::with(|context| {
            let running = context.running.load(Ordering::Acquire);
            let Some(page) = context.cancels.get().filter(|_| running != 0) else {
                return false;
            };
            (0..protocol::Progress::CANCEL_SLOTS)
                .any(|slot| page.load(protocol::Progress::CANCEL_AT + 8 * slot) == running)
        })
    }

    /// The running call says how far it is: sent now if the last report is older
    /// than [`PROGRESS_EVERY_MS`] or the call says it is done, else dropped (the
    /// next one carries the news). Never waits for the link.
    pub(crate) fn report_progress(done: u64, total: u64) {
        Context::with(|context| {
            let Some(call) = context.running.load(Ordering::Acquire).checked_sub(1) else {
                return;
            };
            let now = since_start_ms().saturating_add(PROGRESS_EVERY_MS);
            let last = context.progress_sent.load(Ordering::Relaxed);
            if done < total && now.saturating_sub(last) < PROGRESS_EVERY_MS {
                return;
            }
            let mut frame = BytesMut::new();
            if protocol::write_message(&mut frame, &Reply::Progress { call, done, total }, usize::MAX).is_ok()
                && matches!(Link::write_frame(&context.link, &frame, false), Ok(true))
            {
                context.progress_sent.store(now, Ordering::Relaxed);
            }
        })
    }
}

fn since_start_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(std::time::Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}
