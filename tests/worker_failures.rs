//! A panicking task fails only its call; a dying worker fails only the call it was
//! running, is replaced, and the calls it had not started run elsewhere.
mod common;

// The workers of `common::builder` are this test binary, serving these tasks.
procexec::test_worker!(procexec_worker::TASKS);

use common::*;
use futures::StreamExt;
use procexec::{Error, ExitReason};
use procexec_worker::*;

#[tokio::test]
async fn a_panic_is_reported_with_its_message_and_location_and_the_worker_lives_on() {
    hang_guard(async {
        let exec = executor(1).await;
        let worker = exec.spawn(pid, ()).await.unwrap();
        let err = exec.spawn(panic_with, "the answer is not 41".into()).await.unwrap_err();
        let panic = err.panic().expect("a panic");
        assert_eq!(panic.task(), "panic_with");
        assert_eq!(panic.message(), "the answer is not 41");
        assert!(panic.location().unwrap().contains("worker-bin/src/lib.rs"), "{panic:?}");
        assert!(err.to_string().starts_with("task `panic_with` panicked at worker-bin/src/lib.rs:"), "{err}");
        assert_eq!(exec.spawn(pid, ()).await.unwrap(), worker, "the same worker serves the next call");
    })
    .await;
}

#[tokio::test]
async fn stats_count_inputs_that_panicked_as_failed() {
    hang_guard(async {
        let exec = executor(1).await;
        let _ = exec.spawn(panic_with, "no".into()).await.unwrap_err();
        let inputs = ["1", "2", "three", "4"].map(String::from);
        let results: Vec<_> =
            exec.map_stream(panic_unless_number, futures::stream::iter(inputs)).collect().await;
        assert_eq!(results.iter().filter(|result| result.is_err()).count(), 1);
        let stats = exec.stats();
        assert_eq!((stats.completed, stats.failed), (3, 2), "{stats:?}");
    })
    .await;
}

#[tokio::test]
async fn stats_count_a_panic_before_a_crash_in_one_chunk_as_failed() {
    hang_guard(async {
        // One worker: the 20 inputs go as few chunks; the one at 5 panics, the one
        // at 10 aborts its worker.
        let exec = executor(1).await;
        let fault = |value: u64| match value {
            5 => Fault::Panic,
            10 => Fault::Abort,
            _ => Fault::None,
        };
        let inputs = (0..20).map(move |value| FaultyInput { value, fault: fault(value) });
        let results: Vec<_> = exec.map_stream(faulty, futures::stream::iter(inputs)).collect().await;
        assert_eq!(results.iter().filter(|result| result.is_err()).count(), 2);
        let stats = exec.stats();
        assert_eq!((stats.completed, stats.failed), (18, 2), "{stats:?}");
    })
    .await;
}

async fn crash(task: impl procexec::IntoTask<Input = (), Output = u64>) -> (Error, u32, u32) {
    let exec = executor(1).await;
    let before = exec.spawn(pid, ()).await.unwrap();
    let err = exec.spawn(task, ()).await.unwrap_err();
    let after = exec.spawn(pid, ()).await.unwrap();
    assert_ne!(before, after, "a fresh worker replaced the dead one");
    assert!(!alive(before));
    (err, before, after)
}

fn crash_report(err: &Error, task: &str, worker_pid: u32) -> ExitReason {
    let crash = err.crash().unwrap_or_else(|| panic!("expected a crash, got {err:?}"));
    assert_eq!(crash.task(), task);
    assert_eq!(crash.pid(), worker_pid);
    assert_eq!(crash.worker(), 0);
    crash.exit()
}

#[tokio::test]
async fn an_abort_is_a_crash_by_sigabrt() {
    hang_guard(async {
        let (err, worker_pid, _) = crash(abort).await;
        assert_eq!(crash_report(&err, "abort", worker_pid), ExitReason::Signal(libc::SIGABRT));
        assert!(err.to_string().contains("signal 6 (SIGABRT) while running task `abort`"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn exit_with_a_code_is_a_crash_with_that_code() {
    hang_guard(async {
        let exec = executor(1).await;
        let before = exec.spawn(pid, ()).await.unwrap();
        let err = exec.spawn(exit_with, 3).await.unwrap_err();
        assert_eq!(crash_report(&err, "exit_with", before), ExitReason::Code(3));
        // Even a clean exit in the middle of a task loses the call.
        let err = exec.spawn(exit_with, 0).await.unwrap_err();
        assert_eq!(err.crash().unwrap().exit(), ExitReason::Code(0));
        assert_eq!(exec.spawn(square, 5).await.unwrap(), 25);
    })
    .await;
}

#[tokio::test]
async fn sigkill_is_a_crash_by_sigkill() {
    hang_guard(async {
        let (err, worker_pid, _) = crash(kill_self).await;
        assert_eq!(crash_report(&err, "kill_self", worker_pid), ExitReason::Signal(libc::SIGKILL));
    })
    .await;
}

#[tokio::test]
async fn a_segfault_is_a_crash_by_sigsegv() {
    hang_guard(async {
        let (err, worker_pid, _) = crash(segfault).await;
        assert_eq!(crash_report(&err, "segfault", worker_pid), ExitReason::Signal(libc::SIGSEGV));
    })
    .await;
}

#[tokio::test]
async fn a_stack_overflow_is_a_crash_that_says_so() {
    hang_guard(async {
        let exec = executor(1).await;
        let err = exec.spawn(overflow_stack, 0).await.unwrap_err();
        let crash = err.crash().unwrap_or_else(|| panic!("expected a crash, got {err:?}"));
        assert_eq!(crash.exit(), ExitReason::Signal(libc::SIGABRT));
        assert!(crash.stderr_tail().contains("overflowed its stack"), "{crash:?}");
        assert_eq!(exec.spawn(square, 3).await.unwrap(), 9);
    })
    .await;
}

#[tokio::test]
async fn a_crash_quotes_the_end_of_the_workers_stderr() {
    hang_guard(async {
        let exec = executor(1).await;
        let err = exec.spawn(complain_and_abort, "last words before the abort".into()).await.unwrap_err();
        let crash = err.crash().expect("a crash");
        assert!(crash.stderr_tail().contains("last words before the abort"), "{crash:?}");
        assert!(err.to_string().contains("its stderr ended with:\nlast words before the abort"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn calls_queued_behind_a_crash_run_on_the_replacement() {
    hang_guard(async {
        let exec = executor(1).await;
        // Many short calls first: the worker's prefetch window opens wide.
        for chunk in 0..10u64 {
            let handles: Vec<_> = (0..100).map(|i| exec.spawn(square, chunk * 100 + i)).collect();
            for handle in handles {
                handle.await.unwrap();
            }
        }
        let first = exec.spawn(pid, ()).await.unwrap();
        // The crash and 200 calls behind it go out together, before any reply.
        let crash = exec.spawn(abort, ());
        let behind: Vec<_> = (0..200).map(|_| exec.spawn(pid, ())).collect();
        assert!(crash.await.unwrap_err().is_worker_crash());
        let mut served_by = std::collections::HashSet::new();
        for handle in behind {
            served_by.insert(handle.await.expect("calls behind the crash are not lost"));
        }
        assert!(!served_by.contains(&first), "nothing ran on the dead worker after the crash");
        assert_eq!(served_by.len(), 1, "the replacement served them all");
    })
    .await;
}

#[tokio::test]
async fn a_crash_affects_no_other_caller() {
    hang_guard(async {
        let exec = executor(2).await;
        let bystanders: Vec<_> = (0..500u64).map(|i| exec.spawn(square, i)).collect();
        let crashes: Vec<_> = (0..5).map(|_| exec.spawn(abort, ())).collect();
        let more: Vec<_> = (500..1000u64).map(|i| exec.spawn(square, i)).collect();
        for crash in crashes {
            assert!(crash.await.unwrap_err().is_worker_crash());
        }
        for (i, handle) in bystanders.into_iter().chain(more).enumerate() {
            assert_eq!(handle.await.unwrap(), (i * i) as u64);
        }
    })
    .await;
}

#[tokio::test]
async fn a_crash_in_a_map_fails_that_map_only() {
    hang_guard(async {
        let exec = executor(2).await;
        let healthy = exec.map(square, 0..50_000u64);
        let doomed = exec.map(exit_with, [0, 1, 2].map(|_| 7));
        let (healthy, doomed) = tokio::join!(healthy, doomed);
        assert_eq!(healthy.unwrap().len(), 50_000);
        assert_eq!(doomed.unwrap_err().crash().unwrap().exit(), ExitReason::Code(7));
    })
    .await;
}
