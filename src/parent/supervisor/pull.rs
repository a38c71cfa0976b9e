//! How much a worker takes from the queue: its prefetch depth, adapted to how
//! long its calls take, and what is left of its `max_tasks_per_worker` budget.

use std::time::Duration;

/// Queued work a worker may hold beyond its current call, in expected run time:
/// enough to cover a pipe round trip, so the worker never waits for the parent.
const PREFETCH_NS: u64 = 300_000;
/// Calls at least this long are not prefetched: the round trip is noise next to
/// them, and a call queued behind a long one could have run on a worker that is idle.
const LONG_CALL_NS: u64 = 2_000_000;
/// Upper bound on calls in flight to one worker.
const MAX_DEPTH: usize = 256;

/// How many calls a worker should hold: one, plus enough queued work to cover a
/// round trip when calls are short (`service_ns`, its average, when known).
/// `head_ran` is how long its current call has run, if one is running.
#[inline]
///
/// `link_ns` is the time a call spends on the way there and back beyond its run
/// (0 for a local worker, milliseconds through srun): the queued work covers it too,
/// so a worker behind a slow link is not left waiting on it between calls.
pub(super) fn depth(service_ns: Option<u64>, head_ran: Option<Duration>, link_ns: u64) -> usize {
    if head_ran.is_some_and(|ran| ran >= Duration::from_nanos(LONG_CALL_NS)) {
        // The averages may say calls are short, but this one has run long: what
        // would queue behind it can run elsewhere, or here once it is done.
        return 1;
    }
    match service_ns {
        None => 1,
        Some(ns) if ns >= LONG_CALL_NS => 1,
        Some(ns) => (1 + (PREFETCH_NS + link_ns).div_ceil(ns.max(1)) as usize).min(MAX_DEPTH),
    }
}

/// How many more inputs a worker may be handed: `max_tasks_per_worker` is a promise
/// per worker, so never more than it may still serve, counting the inputs of the
/// calls it holds (`held`, read only when there is a limit).
#[inline]
pub(super) fn budget(max_tasks: Option<u64>, served: u64, held: impl Iterator<Item = u32>) -> u64 {
    max_tasks.map_or(u64::MAX, |max| {
        let held: u64 = held.map(u64::from).sum();
        max.saturating_sub(served + held)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_whose_call_time_is_unknown_holds_one_call() {
        assert_eq!(depth(None, None, 0), 1);
    }

    #[test]
    fn a_worker_with_long_calls_holds_one_call() {
        assert_eq!(depth(Some(LONG_CALL_NS), None, 0), 1);
        assert_eq!(depth(Some(u64::MAX), None, 0), 1);
    }

    #[test]
    fn a_worker_with_short_calls_holds_enough_to_cover_a_round_trip() {
        assert_eq!(depth(Some(PREFETCH_NS), None, 0), 2);
        assert_eq!(depth(Some(100_000), None, 0), 4);
        assert_eq!(depth(Some(1_000_000), None, 0), 2);
    }

    #[test]
    fn a_slow_link_is_covered_by_queued_work() {
        // 1 ms calls behind a 44 ms link (srun with a stall): enough to cover it.
        assert_eq!(depth(Some(1_000_000), None, 44_000_000), 1 + 45);
        assert_eq!(depth(Some(LONG_CALL_NS), None, 44_000_000), 1);
    }

    #[test]
    fn the_depth_is_capped() {
        assert_eq!(depth(Some(1), None, 0), MAX_DEPTH);
        assert_eq!(depth(Some(0), None, 0), MAX_DEPTH);
    }

    #[test]
    fn a_call_that_has_run_long_stops_prefetch_behind_it() {
        assert_eq!(depth(Some(1_000), Some(Duration::from_millis(1)), 0), depth(Some(1_000), None, 0));
        assert_eq!(depth(Some(1_000), Some(Duration::from_nanos(LONG_CALL_NS)), 0), 1);
    }

    #[test]
    fn without_a_task_limit_the_budget_is_unbounded() {
        assert_eq!(budget(None, 1_000, [5, 6].into_iter()), u64::MAX);
    }

    #[test]
    fn the_budget_counts_inputs_served_and_held() {
        assert_eq!(budget(Some(10), 3, [2, 4].into_iter()), 1);
        assert_eq!(budget(Some(10), 3, std::iter::empty()), 7);
    }

    #[test]
    fn a_worker_past_its_limit_has_no_budget() {
        assert_eq!(budget(Some(10), 10, [1].into_iter()), 0);
        assert_eq!(budget(Some(10), 12, std::iter::empty()), 0);
    }
}
