//! The cross-process lock every segment carries: taking it (async in the parent,
//! blocking in a task), its guards, and poisoning.
//!
//! The lock word in the segment's header records the holder's pid. A process that
//! dies holding it cannot release it, so two things free it for the others:
//! - the parent, when it reaps a worker, frees every lock of its segments that the
//!   worker held ([`super::segment::holder_died`]), right away;
//! - a waiter that has waited [`PATIENCE`] asks whether the holder still lives, and
//!   frees the lock itself if not (for a holder whose executor is gone).
//!
//! Either way the segment is marked poisoned with the dead holder's pid, and the next
//! locker gets [`Poisoned`], with the guard inside so it can repair the data, as
//! `std::sync::Mutex` does after a panic. Unlike robust POSIX mutexes, this needs no
//! per-thread registration (glibc owns the robust list) and works for holders that
//! are whole processes.

use std::sync::atomic::Ordering;

use super::PoisonCause;
use super::memory::{Held, Mapping, POISON_PANICKED};

/// How long a waiter waits before it asks whether the holder still lives.
const PATIENCE: std::time::Duration = std::time::Duration::from_millis(100);

/// This process's pid, the id it holds locks under.
pub(crate) fn me() -> u32 {
    static ME: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ME.get_or_init(std::process::id)
}

/// The lock was taken, but its last holder died or panicked holding it: the data
/// may be half updated. Holds the guard: [`Poisoned::into_inner`] to repair the data,
/// then clear the mark with the guard's `clear_poison`.
///
/// Converts into [`SharedError::Poisoned`](crate::SharedError::Poisoned) (and so
/// into `procexec::Error`) for `?`, which drops the guard.
pub struct Poisoned<G> {
    guard: G,
    cause: PoisonCause,
}

impl<G> Poisoned<G> {
    /// The guard: the lock is held.
    pub fn into_inner(self) -> G {
        self.guard
    }

    /// The guard, borrowed.
    pub fn get_ref(&self) -> &G {
        &self.guard
    }

    /// The guard, borrowed mutably.
    pub fn get_mut(&mut self) -> &mut G {
        &mut self.guard
    }

    /// Why the lock is poisoned.
    pub fn cause(&self) -> PoisonCause {
        self.cause
    }
}

impl<G> std::fmt::Debug for Poisoned<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poisoned").field("cause", &self.cause).finish_non_exhaustive()
    }
}

impl<G> std::fmt::Display for Poisoned<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the shared-memory lock is poisoned: {}", self.cause)
    }
}

impl<G> std::error::Error for Poisoned<G> {}

impl<G> From<Poisoned<G>> for super::SharedError {
    fn from(poisoned: Poisoned<G>) -> Self {
        super::SharedError::Poisoned(poisoned.cause)
    }
}

/// What a lock call returns: the guard, or the guard inside [`Poisoned`].
pub type LockResult<G> = Result<G, Poisoned<G>>;

/// The lock, held: releases it when dropped, and poisons it if dropped by a panic.
pub(crate) struct Locked<'a> {
    held: Held<'a>,
    /// The parent's turn among its own tasks waiting for this segment's lock.
    #[cfg(feature = "executor")]
    _turn: Option<tokio::sync::MutexGuard<'a, ()>>,
}

impl<'a> Locked<'a> {
    fn new(held: Held<'a>) -> Self {
        Locked {
            held,
            #[cfg(feature = "executor")]
            _turn: None,
        }
    }

    pub(crate) fn map(&self) -> &'a Mapping {
        self.held.map()
    }

    /// Ends the poison: the holder repaired the data.
    pub(crate) fn clear_poison(&self) {
        clear_poison(self.map());
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.held.map().header().poison.store(POISON_PANICKED, Ordering::Release);
        }
    }
}

/// Wraps a fresh hold in `make`'s guard, poisoned or not.
fn result<'a, G>(locked: Locked<'a>, make: impl FnOnce(Locked<'a>) -> G) -> LockResult<G> {
    let cause = poison_cause(locked.map());
    let guard = make(locked);
    match cause {
        None => Ok(guard),
        Some(cause) => Err(Poisoned { guard, cause }),
    }
}

pub(crate) fn poison_cause(map: &Mapping) -> Option<PoisonCause> {
    match map.header().poison.load(Ordering::Acquire) {
        0 => None,
        POISON_PANICKED => Some(PoisonCause::Panicked),
        pid => Some(PoisonCause::OwnerDied { pid }),
    }
}

fn clear_poison(map: &Mapping) {
    if map.is_writable() {
        map.header().poison.store(0, Ordering::Release);
    }
}

/// Frees the lock if `holder` is a process that no longer exists.
fn free_if_dead(map: &Mapping, holder: u32) {
    if holder != me() && !process_lives(holder) {
        map.release_dead_holder(holder);
    }
}

fn process_lives(pid: u32) -> bool {
    let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else {
        return false;
    };
    // EPERM: it exists, as another user's process.
    !matches!(rustix::process::test_kill_process(pid), Err(rustix::io::Errno::SRCH))
}

/// Takes the lock, blocking this thread. (In async code, that blocks the
/// runtime's thread: documented, not refused, since a blocking-pool thread, where
/// it is right, looks the same to Tokio's public API.)
pub(crate) fn blocking<'a, G>(map: &'a Mapping, make: impl FnOnce(Locked<'a>) -> G) -> LockResult<G> {
    let held = match map.try_lock(me()) {
        Some(held) => held,
        None => loop {
            match map.lock_for(me(), PATIENCE) {
                Ok(held) => break held,
                Err(holder) => free_if_dead(map, holder),
            }
        },
    };
    result(Locked::new(held), make)
}

/// Takes the lock if it is free right now; `None` when another holds it.
pub(crate) fn try_now<'a, G>(map: &'a Mapping, make: impl FnOnce(Locked<'a>) -> G) -> Option<LockResult<G>> {
    map.try_lock(me()).map(|held| result(Locked::new(held), make))
}

/// Takes the lock without blocking the runtime: a blocking thread waits on the
/// futex for it, and hands it over, or releases it again if this future was dropped
/// meanwhile. The parent's own tasks first wait their turn in-process, so one
/// blocking thread at most waits per segment, however many tasks want the lock.
#[cfg(feature = "executor")]
pub(crate) async fn acquire<'a, G>(
    segment: &'a std::sync::Arc<super::segment::Segment>,
    make: impl FnOnce(Locked<'a>) -> G,
) -> LockResult<G> {
    let map = &segment.map;
    let mut turn = Some(segment.turn.lock().await);
    let mut locked = |held: Held<'a>| Locked { held, _turn: turn.take() };
    if let Some(held) = map.try_lock(me()) {
        return result(locked(held), make);
    }
    loop {
        let (send, receive) = tokio::sync::oneshot::channel::<()>();
        let waiter = segment.clone();
        // Detached: it ends once it took the lock, or soon after this future is gone.
        drop(tokio::task::spawn_blocking(move || {
            let map = &waiter.map;
            loop {
                match map.lock_for(me(), PATIENCE) {
                    Ok(held) => {
                        held.keep();
                        if send.send(()).is_err() {
                            // Nobody waits any more: let go of it again.
                            drop(map.adopt(me()));
                        }
                        return;
                    }
                    Err(_) if send.is_closed() => return,
                    Err(holder) => free_if_dead(map, holder),
                }
            }
        }));
        let mut handover = Handover { receive, map, armed: true };
        if handover.wait().await {
            if let Some(held) = map.adopt(me()) {
                return result(locked(held), make);
            }
        }
    }
}

/// A lock being handed over from a blocking thread; a future dropped before it
/// took the lock releases what was handed over.
#[cfg(feature = "executor")]
struct Handover<'a> {
    receive: tokio::sync::oneshot::Receiver<()>,
    map: &'a Mapping,
    /// Until the caller has taken what was handed over.
    armed: bool,
}

#[cfg(feature = "executor")]
impl Handover<'_> {
    async fn wait(&mut self) -> bool {
        let taken = (&mut self.receive).await.is_ok();
        self.armed = false;
        taken
    }
}

#[cfg(feature = "executor")]
impl Drop for Handover<'_> {
    fn drop(&mut self) {
        // Closed first: a hand-over then either came before (and is released here)
        // or fails (and the waiting thread releases it).
        self.receive.close();
        if self.armed && self.receive.try_recv().is_ok() {
            drop(self.map.adopt(me()));
        }
    }
}
