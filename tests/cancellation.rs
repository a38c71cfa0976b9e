//! Dropping a call or a map withdraws what has not started; running calls are
//! killed with their worker (or finished and discarded, by policy); the executor
//! stays healthy through cancellation storms.
mod common;

// The workers of `common::builder` are this test binary, serving these tasks.
procexec::test_worker!(procexec_worker::TASKS);

use std::time::Duration;

use common::*;
use futures::{StreamExt, stream};
use procexec::CancelPolicy;
use procexec_worker::*;

async fn wait_for_file(path: &std::path::Path) {
    eventually("the call has started", || path.exists()).await;
}

#[tokio::test]
async fn dropping_a_running_call_kills_its_worker() {
    hang_guard(async {
        let exec = executor(1).await;
        let before = exec.spawn(pid, ()).await.unwrap();
        let started = marker("drop-running");
        let call = exec.spawn(touch_then_spin, started.display().to_string());
        wait_for_file(&started).await;
        drop(call);
        eventually("the spinning worker is killed", || !alive(before)).await;
        assert_ne!(exec.spawn(pid, ()).await.unwrap(), before);
        assert_eq!(exec.stats().exits.cancelled, 1);
    })
    .await;
}

#[tokio::test]
async fn a_tokio_timeout_around_a_call_stops_the_work_too() {
    hang_guard(async {
        let exec = executor(1).await;
        let before = exec.spawn(pid, ()).await.unwrap();
        let call = exec.spawn(spin_forever, ());
        assert!(tokio::time::timeout(Duration::from_millis(200), call).await.is_err());
        eventually("the abandoned call's worker is killed", || !alive(before)).await;
    })
    .await;
}

#[tokio::test]
async fn under_the_finish_policy_a_dropped_call_runs_to_the_end() {
    hang_guard(async {
        let exec = executor(1).await;
        let before = exec.spawn(pid, ()).await.unwrap();
        let finished = marker("finish-policy");
        let patient = exec.with_cancel_policy(CancelPolicy::Finish);
        let call = patient.spawn(sleep_then_touch, (300, finished.display().to_string()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(call);
        wait_for_file(&finished).await;
        assert_eq!(exec.spawn(pid, ()).await.unwrap(), before, "the worker was not killed");
        assert_eq!(exec.stats().exits.cancelled, 0);
    })
    .await;
}

#[tokio::test]
async fn cancelling_a_thousand_calls_leaves_the_executor_healthy() {
    hang_guard(async {
        let exec = executor(2).await;
        let calls: Vec<_> = (0..1000).map(|_| exec.spawn(sleep_ms, 5)).collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(calls);
        eventually("no call is left queued or running", || {
            let stats = exec.stats();
            stats.queued == 0 && stats.running == 0
        })
        .await;
        let stats = exec.stats();
        assert!(stats.completed < 100, "withdrawn calls did not run: {stats:?}");
        assert_eq!(stats.workers, 2);
        assert_eq!(exec.map(square, 0..100u64).await.unwrap()[99], 99 * 99);
    })
    .await;
}

#[tokio::test]
async fn a_cancellation_storm_of_large_maps_leaves_slots_and_workers_as_they_were() {
    hang_guard(async {
        let exec = executor(2).await;
        for round in 0..20u64 {
            let mut map = exec.map_stream(spin_us, stream::iter(std::iter::repeat_n(300, 100_000)));
            for _ in 0..(round * 7) % 50 {
                map.next().await.unwrap().unwrap();
            }
            drop(map);
            let mut unordered = exec.map_unordered(square, stream::iter(0..1_000_000u64));
            unordered.next().await.unwrap().unwrap();
        }
        eventually("every slot is free", || {
            let stats = exec.stats();
            stats.queued == 0 && stats.running == 0 && stats.workers == 2
        })
        .await;
        let squares = exec.map(square, 0..10_000u64).await.unwrap();
        assert_eq!(squares.len(), 10_000);
        assert_eq!(squares[9_999], 9_999 * 9_999);
    })
    .await;
}

#[tokio::test]
async fn a_drop_is_noticed_even_right_after_a_burst_of_calls() {
    hang_guard(async {
        let exec = executor(1).await;
        for round in 0..3 {
            // Thousands of replies in a row use up the supervisor's scheduling budget.
            let burst: Vec<_> = (0..30_000u64).map(|i| exec.spawn(double, i)).collect();
            let started = marker(&format!("burst-{round}"));
            let long = exec.spawn(touch_then_spin, started.display().to_string());
            for call in burst {
                call.await.unwrap();
            }
            wait_for_file(&started).await;
            let before = exec.stats().exits.cancelled;
            drop(long);
            eventually("the dropped spinning call is killed", || exec.stats().exits.cancelled > before).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_call_sent_ahead_and_then_dropped_is_skipped_not_killed() {
    hang_guard(async {
        let exec = executor(1).await;
        // Short calls first: the worker is then sent calls ahead of the one it runs.
        for i in 0..20 {
            exec.spawn(square, i).await.unwrap();
        }
        let before = exec.spawn(pid, ()).await.unwrap();
        let long = exec.spawn(sleep_then_pid, 400);
        let touched = marker("withdrawn-ahead");
        let ahead = exec.spawn(sleep_then_touch, (50, touched.display().to_string()));
        eventually("both calls are with the worker", || exec.stats().running == 2).await;
        drop(ahead);
        assert_eq!(long.await.unwrap(), before);
        assert_eq!(exec.spawn(pid, ()).await.unwrap(), before, "the worker was not killed");
        assert!(!touched.exists(), "the withdrawn call never ran");
        let stats = exec.stats();
        assert_eq!((stats.exits.cancelled, stats.cancelled), (0, 1), "{stats:?}");
    })
    .await;
}

#[tokio::test]
async fn a_detached_call_runs_to_the_end() {
    hang_guard(async {
        let exec = executor(1).await;
        let touched = marker("detached");
        exec.spawn(sleep_then_touch, (50, touched.display().to_string())).detach();
        eventually("the detached call finished", || touched.exists()).await;
        let stats = exec.stats();
        assert_eq!((stats.cancelled, stats.exits.cancelled), (0, 0), "{stats:?}");
        std::fs::remove_file(touched).unwrap();
    })
    .await;
}
