//! `spawn` and the `map` family, against real worker processes.
mod common;

// The workers of `common::builder` are this test binary, serving these tasks.
procexec::test_worker!(procexec_worker::TASKS);

use std::cell::Cell;
use std::collections::HashSet;
use std::pin::Pin;
use std::task::{Context, Poll};

use common::*;
use futures::{StreamExt, stream};
use procexec_worker::*;

#[tokio::test]
async fn spawn_returns_the_output_of_the_task() {
    hang_guard(async {
        let exec = executor(2).await;
        assert_eq!(exec.spawn(square, 7).await.unwrap(), 49);
        assert_eq!(exec.spawn(add, (40, 2)).await.unwrap(), 42);
        assert_ne!(exec.spawn(pid, ()).await.unwrap(), std::process::id(), "it ran in another process");
        exec.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn spawned_handles_can_be_awaited_in_any_order() {
    hang_guard(async {
        let exec = executor(2).await;
        let handles: Vec<_> = (0..200u64).map(|i| exec.spawn(square, i)).collect();
        for (i, handle) in handles.into_iter().enumerate().rev() {
            assert_eq!(handle.await.unwrap(), (i * i) as u64);
        }
    })
    .await;
}

#[tokio::test]
async fn map_returns_outputs_in_input_order() {
    hang_guard(async {
        let exec = executor(4).await;
        assert_eq!(exec.map(square, 0..5).await.unwrap(), [0, 1, 4, 9, 16]);
    })
    .await;
}

#[tokio::test]
async fn map_over_an_empty_input_is_empty() {
    hang_guard(async {
        let exec = executor(2).await;
        assert!(exec.map(square, Vec::<u64>::new()).await.unwrap().is_empty());
        assert_eq!(exec.map_stream(square, stream::empty()).count().await, 0);
    })
    .await;
}

#[tokio::test]
async fn a_large_map_is_chunked_and_complete() {
    hang_guard(async {
        let exec = executor(2).await;
        let outputs = exec.map(double, 0..300_000u64).await.unwrap();
        assert_eq!(outputs.len(), 300_000);
        assert!(outputs.iter().enumerate().all(|(i, &out)| out == 2 * i as u64));
    })
    .await;
}

#[tokio::test]
async fn map_borrows_its_input() {
    hang_guard(async {
        let exec = executor(2).await;
        let inputs: Vec<u64> = (0..1000).collect();
        let outputs = exec.map(square, inputs.iter().copied()).await.unwrap();
        assert_eq!(outputs, inputs.iter().map(|x| x * x).collect::<Vec<_>>());
    })
    .await;
}

#[tokio::test]
async fn map_spreads_work_over_every_worker() {
    hang_guard(async {
        let exec = executor(3).await;
        // Long enough calls that none is chunked with another or prefetched.
        let pids: HashSet<u32> = exec.map(sleep_then_pid, [20u64; 12]).await.unwrap().into_iter().collect();
        assert_eq!(pids.len(), 3, "{pids:?}");
    })
    .await;
}

#[tokio::test]
async fn map_stream_yields_in_input_order_as_results_arrive() {
    hang_guard(async {
        let exec = executor(2).await;
        // Early items are slow, late ones fast: completion order differs from input order.
        let delays = [60u64, 40, 20, 0, 0, 0];
        let ordered: Vec<u64> =
            exec.map_stream(sleep_ms, stream::iter(delays)).map(Result::unwrap).collect().await;
        assert_eq!(ordered, delays);
    })
    .await;
}

#[tokio::test]
async fn map_unordered_yields_every_result_once() {
    hang_guard(async {
        let exec = executor(2).await;
        let mut outputs: Vec<u64> =
            exec.map_unordered(square, stream::iter(0..10_000u64)).map(Result::unwrap).collect().await;
        outputs.sort_unstable();
        assert_eq!(outputs, (0..10_000u64).map(|x| x * x).collect::<Vec<_>>());
    })
    .await;
}

#[tokio::test]
async fn a_map_pulls_its_input_lazily() {
    hang_guard(async {
        let exec = executor(2).await;
        let pulled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = pulled.clone();
        let endless = (0u64..).inspect(move |_| {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        let first: Vec<u64> =
            exec.map_stream(square, stream::iter(endless)).take(1000).map(Result::unwrap).collect().await;
        assert_eq!(first[999], 999 * 999);
        let pulled = pulled.load(std::sync::atomic::Ordering::Relaxed);
        // Bounded read-ahead: a window of chunks, not the endless input.
        assert!(pulled < 2_000_000, "pulled {pulled} items for 1000 outputs");
    })
    .await;
}

#[tokio::test]
async fn a_map_fails_with_the_first_error_and_the_executor_serves_on() {
    hang_guard(async {
        let exec = executor(2).await;
        let messages = (0..50).map(|i| if i == 30 { "item 30 fails".to_string() } else { i.to_string() });
        let results: Vec<_> = exec.map_stream(panic_unless_number, stream::iter(messages)).collect().await;
        assert_eq!(results.len(), 50);
        for (i, result) in results.iter().enumerate() {
            match result {
                Ok(n) => assert_eq!(*n, i as u64),
                Err(err) => {
                    assert_eq!(i, 30);
                    assert_eq!(err.panic().unwrap().message(), "item 30 fails");
                }
            }
        }
        let err = exec.map(panic_with, ["boom".to_string()]).await.unwrap_err();
        assert!(err.is_panic());
        assert_eq!(exec.map(square, 0..3).await.unwrap(), [0, 1, 4]);
    })
    .await;
}

#[tokio::test]
async fn many_concurrent_callers_share_one_executor() {
    hang_guard(async {
        let exec = executor(2).await;
        let callers: Vec<_> = (0..50u64)
            .map(|caller| {
                let exec = exec.clone();
                tokio::spawn(async move {
                    for i in 0..20u64 {
                        let x = caller * 1000 + i;
                        assert_eq!(exec.spawn(square, x).await.unwrap(), x * x);
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.await.unwrap();
        }
    })
    .await;
}

#[test]
fn many_callers_on_a_multi_threaded_runtime() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    runtime.block_on(hang_guard(async {
        let exec = executor(2).await;
        let callers: Vec<_> = (0..50u64)
            .map(|caller| {
                let exec = exec.clone();
                tokio::spawn(async move {
                    let handles: Vec<_> =
                        (0..20u64).map(|i| exec.spawn(add, (caller as i64, i as i64))).collect();
                    for (i, handle) in handles.into_iter().enumerate() {
                        assert_eq!(handle.await.unwrap(), caller as i64 + i as i64);
                    }
                    let squares = exec.map(square, 0..100u64).await.unwrap();
                    assert_eq!(squares[99], 99 * 99);
                })
            })
            .collect();
        for caller in callers {
            caller.await.unwrap();
        }
    }));
}

#[tokio::test]
async fn a_call_goes_to_an_idle_worker_not_behind_a_long_call() {
    hang_guard(async {
        let exec = executor(2).await;
        exec.map(double, 0..20_000u64).await.unwrap(); // both windows wide open
        // One worker is now busy for a long time; the other is idle.
        let blocker = exec.spawn(sleep_ms, 60_000);
        eventually("the long call runs", || exec.stats().running == 1).await;
        let quick = std::time::Instant::now();
        assert_eq!(exec.spawn(square, 3).await.unwrap(), 9);
        assert!(quick.elapsed() < std::time::Duration::from_secs(30), "it did not wait for the long call");
        drop(blocker);
    })
    .await;
}

#[tokio::test]
async fn map_outputs_that_fit_one_by_one_never_fail_for_their_chunk() {
    hang_guard(async {
        let exec = builder(2).max_frame_len(1 << 20).build().await.unwrap();
        let outputs: Vec<_> =
            exec.map_stream(make_bytes, stream::iter(vec![50_000u64; 2_000])).collect().await;
        assert_eq!(outputs.len(), 2_000);
        for output in outputs {
            assert_eq!(output.expect("each output is under the frame limit").len(), 50_000);
        }
    })
    .await;
}

#[tokio::test]
async fn long_calls_never_queue_behind_each_other_while_a_worker_can_take_one() {
    hang_guard(async {
        let exec = executor(2).await;
        exec.map(sleep_then_pid, [30; 8]).await.unwrap(); // calls are known to be long
        let pids = exec.map(sleep_then_pid, [10, 1500, 1500, 10]).await.unwrap();
        assert_ne!(pids[1], pids[2], "the two long calls ran side by side: {pids:?}");
    })
    .await;
}

#[tokio::test]
async fn a_slow_consumer_keeps_the_workers_busy_without_unbounded_read_ahead() {
    hang_guard(async {
        let exec = executor(2).await;
        let pulled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = pulled.clone();
        let inputs = stream::iter(0..40u64).map(move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            10u64
        });
        let mut results = exec.map_unordered(sleep_ms, inputs);
        let mut received = 0;
        while let Some(result) = results.next().await {
            result.unwrap();
            received += 1;
            let stats = exec.stats();
            let taken = pulled.load(std::sync::atomic::Ordering::SeqCst);
            if taken < 40 {
                // Inputs remain: the map keeps work with the workers while the
                // consumer works through what is ready.
                assert!(stats.queued + stats.running > 0, "workers idle at result {received}: {stats:?}");
            }
            // Read-ahead stays bounded by the window, not by the consumer's lag.
            assert!(taken - received <= 4 * 3 * 2, "{taken} inputs pulled, {received} consumed");
            // The consumer is slower than the workers.
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert_eq!(received, 40);
    })
    .await;
}

/// Counts how often the wrapped future is polled.
struct CountPolls<'a, F> {
    inner: F,
    polls: &'a Cell<u64>,
}

impl<F: Future + Unpin> Future for CountPolls<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.set(self.polls.get() + 1);
        Pin::new(&mut self.inner).poll(cx)
    }
}

// Finished calls whose handles wait in a `FuturesUnordered` once cost O(n) polls per
// 128 results on a current-thread runtime (tokio's budget yield was invisible to it).
#[tokio::test(flavor = "current_thread")]
async fn a_backlog_of_finished_handles_is_collected_in_linear_polls() {
    hang_guard(async {
        const CALLS: u64 = 20_000;
        let exec = executor(2).await;
        let handles: Vec<_> = (0..CALLS).map(|i| exec.spawn(double, i)).collect();
        // Every call finishes before any handle is polled: the worst backlog.
        eventually("every call to finish", || exec.stats().completed >= CALLS).await;
        let polls = Cell::new(0);
        let mut all: stream::FuturesUnordered<_> =
            handles.into_iter().map(|inner| CountPolls { inner, polls: &polls }).collect();
        let mut outputs = 0;
        while let Some(output) = all.next().await {
            output.unwrap();
            outputs += 1;
        }
        assert_eq!(outputs, CALLS);
        assert!(polls.get() <= 2 * CALLS, "{} polls for {CALLS} finished calls", polls.get());
        exec.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_process_a_task_starts_does_not_inherit_the_worker_marker() {
    hang_guard(async {
        let exec = builder(1).env("PROCEXEC_TEST_PASSED_ON", "yes").build().await.unwrap();
        // What the builder sets does reach the task's environment; the marker does not.
        let passed_on = exec.spawn(env_var, "PROCEXEC_TEST_PASSED_ON".into()).await.unwrap();
        assert_eq!(passed_on.as_deref(), Some("yes"));
        assert_eq!(exec.spawn(env_var, "PROCEXEC_WORKER".into()).await.unwrap(), None);
        // The worker's own command line again: without the marker its worker test
        // passes at once, where a worker would write the preamble and serve.
        let args = ["procexec_test_worker", "--test-threads=1"].map(String::from).to_vec();
        let (code, stdout) = exec.spawn(run_own_program, args).await.unwrap();
        assert_eq!(code, Some(0), "{stdout:?}");
        assert!(stdout.contains("1 passed") && !stdout.contains("PRCXC"), "{stdout:?}");
    })
    .await;
}

#[tokio::test]
async fn the_spawn_queue_is_bounded_and_calls_past_it_wait_in_their_handles() {
    hang_guard(async {
        let exec = builder(1).max_queued_bytes(4 << 20).build().await.unwrap();
        let busy = exec.spawn(sleep_ms, 300);
        eventually("the worker is busy", || exec.stats().running == 1).await;
        let payload = || serde_bytes::ByteBuf::from(vec![7u8; 1 << 20]);
        let calls: Vec<_> = (0..50).map(|_| exec.spawn(echo, payload())).collect();
        // 50 MiB asked for, 4 MiB of room: the rest waits in the callers' handles.
        let queued = exec.stats().queued;
        assert!((1..=4).contains(&queued), "{queued} calls of 1 MiB queued");
        let refused = exec.try_spawn(echo, payload()).unwrap_err();
        assert_eq!(refused.into_input().len(), 1 << 20, "the input comes back");
        assert_eq!(busy.await.unwrap(), 300);
        for call in calls {
            assert_eq!(call.await.unwrap().len(), 1 << 20);
        }
        assert!(exec.try_spawn(square, 3).unwrap().await.unwrap() == 9, "room again");
    })
    .await;
}
