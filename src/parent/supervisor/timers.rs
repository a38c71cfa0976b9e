//! The session's two timers: the head call's (its time limit, and the grace after
//! its cancellation) and the idle worker's. Each reads the clock and allocates its
//! `Sleep` only once a limit applies, so calls without one cost nothing.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// How long a cancelled call may still run before its worker is killed: cancelling
/// a tiny call should not cost a worker restart.
pub(super) const CANCEL_GRACE: Duration = Duration::from_millis(10);

/// The grace of a cancelled call the worker was told to skip: it answers at once if
/// it had not started the call, so a kill is due only if it had (and then runs it),
/// and a short grace could kill it just as it moved on to the next call.
pub(super) const WITHDRAWN_GRACE: Duration = Duration::from_millis(200);

/// The running call's clock: when it started, when its caller was seen gone, and
/// the timer for whichever limit comes first.
#[derive(Default)]
pub(super) struct HeadTimer {
    /// When it started, read from the clock only when a limit needs it.
    since: Option<Instant>,
    /// When its caller was seen gone.
    cancelled_at: Option<Instant>,
    /// Fires at the time limit (or cancellation grace).
    sleep: Option<Pin<Box<Sleep>>>,
}

impl HeadTimer {
    /// A new call is at the head (or none is): its clock starts when first asked.
    #[inline]
    pub(super) fn reset(&mut self) {
        *self = HeadTimer::default();
    }

    /// When the head call's clock started, if it did.
    #[inline]
    pub(super) fn started(&self) -> Option<Instant> {
        self.since
    }

    /// How long the head call has run, starting its clock if nothing did yet.
    #[inline]
    pub(super) fn ran(&mut self) -> Duration {
        self.since.get_or_insert_with(Instant::now).elapsed()
    }

    /// Whether the head call, running with `timeout` and, when cancelled, allowed
    /// `grace` more, must be stopped: `Some(true)` at its time limit, `Some(false)`
    /// at the end of the grace after its cancellation. Otherwise registers `cx` to be
    /// woken then.
    pub(super) fn poll_expired(
        &mut self,
        cx: &mut Context<'_>,
        timeout: Option<Duration>,
        grace: Option<Duration>,
    ) -> Option<bool> {
        if timeout.is_none() && grace.is_none() {
            return None;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        let cancelled = grace.map(|grace| (*self.cancelled_at.get_or_insert_with(Instant::now), grace));
        let (at, timed_out) = head_deadline(since, timeout, cancelled)?;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if sleep.deadline() != at {
            sleep.as_mut().reset(at);
        }
        if Instant::now() >= at || sleep.as_mut().poll(cx).is_ready() {
            return Some(timed_out);
        }
        None
    }
}

/// When the running call must be stopped, and whether that is its time limit
/// (`true`) or the grace after its cancellation (`false`): whichever comes first. A
/// limit too far away to represent is no limit.
fn head_deadline(
    started: Instant,
    timeout: Option<Duration>,
    cancelled: Option<(Instant, Duration)>,
) -> Option<(Instant, bool)> {
    let limit = timeout.and_then(|timeout| Some((started.checked_add(timeout)?, true)));
    // The grace counts from the cancellation: a call cancelled late in a long run
    // still gets it.
    let grace = cancelled.and_then(|(at, grace)| Some((at.checked_add(grace)?, false)));
    match (limit, grace) {
        (Some(limit), Some(grace)) => Some(if grace.0 < limit.0 { grace } else { limit }),
        (limit, grace) => limit.or(grace),
    }
}

/// How long a worker has had nothing to do.
#[derive(Default)]
pub(super) struct IdleTimer {
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimer {
    /// The worker has work: the next idle spell starts from zero.
    #[inline]
    pub(super) fn stop(&mut self) {
        self.sleep = None;
    }

    /// Starts the timer if it is stopped; true once it has run `timeout`, else
    /// registers `cx` to be woken then.
    pub(super) fn poll_elapsed(&mut self, cx: &mut Context<'_>, timeout: Duration) -> bool {
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        sleep.as_mut().poll(cx).is_ready()
    }

    /// Starts it over from now, registering `cx` to be woken when it fires.
    pub(super) fn restart(&mut self, cx: &mut Context<'_>, timeout: Duration) {
        let at = Instant::now() + timeout;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        sleep.as_mut().reset(at);
        let _ = sleep.as_mut().poll(cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::task::{Poll, Waker};

    fn poll_once(timer: &mut HeadTimer, timeout: Option<Duration>, cancelled: bool) -> Option<bool> {
        let grace = cancelled.then_some(CANCEL_GRACE);
        timer.poll_expired(&mut Context::from_waker(Waker::noop()), timeout, grace)
    }

    /// Waits until the head timer fires (paused time jumps to it), saying which limit.
    async fn expiry(timer: &mut HeadTimer, timeout: Option<Duration>, cancelled: bool) -> bool {
        let grace = cancelled.then_some(CANCEL_GRACE);
        poll_fn(|cx| match timer.poll_expired(cx, timeout, grace) {
            Some(timed_out) => Poll::Ready(timed_out),
            None => Poll::Pending,
        })
        .await
    }

    const LIMIT: Duration = Duration::from_millis(100);

    #[tokio::test(start_paused = true)]
    async fn the_head_timer_fires_at_the_time_limit() {
        let start = Instant::now();
        let mut timer = HeadTimer::default();
        assert_eq!(poll_once(&mut timer, Some(LIMIT), false), None);
        assert!(expiry(&mut timer, Some(LIMIT), false).await, "it is the time limit");
        assert_eq!(start.elapsed(), LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_without_limit_or_cancellation_has_no_timer() {
        let mut timer = HeadTimer::default();
        assert_eq!(poll_once(&mut timer, None, false), None);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(poll_once(&mut timer, None, false), None);
        assert!(timer.since.is_none() && timer.sleep.is_none(), "the clock was not even read");
    }

    #[tokio::test(start_paused = true)]
    async fn the_cancel_grace_counts_from_the_cancellation() {
        let start = Instant::now();
        let mut timer = HeadTimer::default();
        assert_eq!(poll_once(&mut timer, Some(Duration::from_secs(1)), false), None);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(!expiry(&mut timer, Some(Duration::from_secs(1)), true).await, "it is the grace");
        assert_eq!(start.elapsed(), Duration::from_millis(500) + CANCEL_GRACE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_head_starts_its_own_clock() {
        let start = Instant::now();
        let mut timer = HeadTimer::default();
        assert_eq!(poll_once(&mut timer, Some(LIMIT), true), None);
        tokio::time::advance(Duration::from_millis(60)).await;
        timer.reset();
        assert!(expiry(&mut timer, Some(LIMIT), false).await);
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(60) + LIMIT,
            "neither the old start nor its cancellation count"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn how_long_the_head_ran_counts_from_when_first_asked() {
        let mut timer = HeadTimer::default();
        assert_eq!(timer.ran(), Duration::ZERO);
        tokio::time::advance(Duration::from_millis(3)).await;
        assert_eq!(timer.ran(), Duration::from_millis(3));
    }

    #[test]
    fn the_cancel_grace_counts_from_the_cancellation_not_the_start() {
        let start = Instant::now();
        let cancelled = start + Duration::from_millis(500);
        assert_eq!(
            head_deadline(start, None, Some((cancelled, CANCEL_GRACE))),
            Some((cancelled + CANCEL_GRACE, false))
        );
    }

    #[test]
    fn the_earlier_of_limit_and_grace_applies() {
        let start = Instant::now();
        let limit = Duration::from_millis(100);
        let late = start + Duration::from_millis(95);
        assert_eq!(
            head_deadline(start, Some(limit), Some((late, CANCEL_GRACE))),
            Some((start + limit, true))
        );
        let early = start + Duration::from_millis(20);
        assert_eq!(
            head_deadline(start, Some(limit), Some((early, CANCEL_GRACE))),
            Some((early + CANCEL_GRACE, false))
        );
        assert_eq!(head_deadline(start, None, None), None);
        assert_eq!(head_deadline(start, Some(Duration::MAX), None), None, "too far away is no limit");
    }

    async fn idle_for(timer: &mut IdleTimer, timeout: Duration) {
        poll_fn(|cx| if timer.poll_elapsed(cx, timeout) { Poll::Ready(()) } else { Poll::Pending }).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timer_fires_after_the_idle_timeout() {
        let start = Instant::now();
        let mut timer = IdleTimer::default();
        idle_for(&mut timer, LIMIT).await;
        assert_eq!(start.elapsed(), LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn work_starts_the_idle_spell_over() {
        let start = Instant::now();
        let mut timer = IdleTimer::default();
        assert!(!timer.poll_elapsed(&mut Context::from_waker(Waker::noop()), LIMIT));
        tokio::time::advance(Duration::from_millis(60)).await;
        timer.stop();
        idle_for(&mut timer, LIMIT).await;
        assert_eq!(start.elapsed(), Duration::from_millis(60) + LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_idle_timer_counts_from_the_restart() {
        let start = Instant::now();
        let mut timer = IdleTimer::default();
        idle_for(&mut timer, LIMIT).await;
        poll_fn(|cx| {
            timer.restart(cx, LIMIT);
            Poll::Ready(())
        })
        .await;
        idle_for(&mut timer, LIMIT).await;
        assert_eq!(start.elapsed(), 2 * LIMIT);
    }

    #[test]
    fn a_withdrawn_call_still_running_is_killed_only_after_the_longer_grace() {
        let start = Instant::now();
        let seen = start + Duration::from_millis(5);
        assert_eq!(
            head_deadline(start, None, Some((seen, WITHDRAWN_GRACE))),
            Some((seen + WITHDRAWN_GRACE, false))
        );
        assert!(WITHDRAWN_GRACE > CANCEL_GRACE);
    }
}
