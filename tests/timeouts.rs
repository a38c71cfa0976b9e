//! A call past its time limit has its worker killed (the pid is gone) and fails
//! with `Error::TimedOut`; the limit counts run time, not queue time.
mod common;

// The workers of `common::builder` are this test binary, serving these tasks.
procexec::test_worker!(procexec_worker::TASKS);

use std::time::Duration;

use common::*;
use futures::{StreamExt, stream};
use procexec::Error;
use procexec_worker::*;

#[tokio::test]
async fn a_spinning_call_past_its_timeout_is_killed_with_its_worker() {
    hang_guard(async {
        let exec = executor(1).await;
        let before = exec.spawn(pid, ()).await.unwrap();
        let err = exec.with_timeout(Duration::from_millis(200)).spawn(spin_forever, ()).await.unwrap_err();
        match &err {
            Error::TimedOut { task, timeout, .. } => {
                assert_eq!(task, "spin_forever");
                assert_eq!(*timeout, Duration::from_millis(200));
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(err.is_timeout());
        assert!(!alive(before), "the spinning worker was killed");
        assert_ne!(exec.spawn(pid, ()).await.unwrap(), before, "a fresh worker serves on");
        assert_eq!(exec.stats().exits.timed_out, 1);
    })
    .await;
}

#[tokio::test]
async fn a_sleeping_call_past_the_default_timeout_is_killed() {
    hang_guard(async {
        let exec = builder(1).timeout(Duration::from_millis(200)).build().await.unwrap();
        let before = exec.spawn(pid, ()).await.unwrap();
        assert!(exec.spawn(sleep_ms, 60_000).await.unwrap_err().is_timeout());
        assert!(!alive(before));
        // A per-call override lifts the limit for one call.
        assert_eq!(exec.with_timeout(Duration::from_secs(60)).spawn(sleep_ms, 300).await.unwrap(), 300);
    })
    .await;
}

#[tokio::test]
async fn time_in_the_queue_does_not_count() {
    hang_guard(async {
        let exec = executor(1).await;
        let first = exec.spawn(sleep_ms, 400);
        // Waits ~400 ms for the only worker, then runs 100 ms: within 300 ms.
        let second = exec.with_timeout(Duration::from_millis(300)).spawn(sleep_ms, 100);
        assert_eq!(first.await.unwrap(), 400);
        assert_eq!(second.await.unwrap(), 100);
    })
    .await;
}

#[tokio::test]
async fn each_input_of_a_map_gets_the_time_limit() {
    hang_guard(async {
        let exec = executor(2).await;
        let limited = exec.with_timeout(Duration::from_millis(500));
        let results: Vec<_> =
            limited.map_stream(sleep_ms, stream::iter([10, 60_000, 10, 20])).collect().await;
        assert_eq!(results[0].as_ref().unwrap(), &10);
        assert!(results[1].as_ref().unwrap_err().is_timeout());
        assert_eq!(results[2].as_ref().unwrap(), &10);
        assert_eq!(results[3].as_ref().unwrap(), &20);
    })
    .await;
}

#[tokio::test]
async fn a_map_past_its_deadline_fails_and_stops_its_calls() {
    hang_guard(async {
        let exec = executor(2).await;
        let pids: Vec<u32> = exec.map(sleep_then_pid, [30; 8]).await.unwrap();
        let err = exec
            .map(spin_ms, [10, 600_000, 600_000, 10])
            .timeout(Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(&err, Error::TimedOut { task, .. } if task == "spin_ms"), "{err:?}");
        // The abandoned spinning calls (one on each worker) are killed with their
        // workers, by the cancel policy: nothing keeps running.
        eventually("the spinning workers are killed", || pids.iter().all(|&p| !alive(p))).await;
        eventually("no call of the map is left running", || exec.stats().running == 0).await;
        // Exits are recorded once the killed workers are reaped.
        eventually("both kills are recorded", || exec.stats().exits.cancelled >= 2).await;
        assert_eq!(exec.map(square, 0..4).await.unwrap(), [0, 1, 4, 9]);
    })
    .await;
}

#[tokio::test]
async fn a_timed_out_call_is_retried_then_reported() {
    hang_guard(async {
        let exec = executor(1).await;
        let limited = exec.with_timeout(Duration::from_millis(100)).with_retries(2);
        assert!(limited.spawn(spin_forever, ()).await.unwrap_err().is_timeout());
        let stats = exec.stats();
        assert_eq!(stats.exits.timed_out, 3, "{stats:?}");
        assert_eq!(stats.retried, 2);
        assert_eq!(stats.failed, 1);
    })
    .await;
}

#[tokio::test]
async fn a_timeout_too_large_to_represent_means_no_limit() {
    hang_guard(async {
        let exec = executor(1).await;
        assert_eq!(exec.with_timeout(Duration::MAX).spawn(square, 3).await.unwrap(), 9);
        assert_eq!(exec.with_timeout(Duration::ZERO).spawn(square, 4).await.unwrap(), 16);
        assert_eq!(exec.spawn(square, 5).await.unwrap(), 25);
    })
    .await;
}
