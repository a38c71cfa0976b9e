//! Every worker is reaped, and none outlives its executor or its parent process,
//! counted under `/proc`. The tests run one at a time, so the counts are theirs.
mod common;

// The workers of `common::builder` are this test binary, serving these tasks.
procexec::test_worker!(procexec_worker::TASKS);

use std::collections::HashSet;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use procexec::Error;
use procexec_worker::*;

fn one_at_a_time() -> MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn serial<F: Future>(test: F) -> F::Output {
    let _guard = one_at_a_time();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(hang_guard(test))
}

fn my_children() -> Vec<u32> {
    children_of(std::process::id())
}

fn zombies_among_my_children() -> Vec<u32> {
    my_children().into_iter().filter(|&pid| matches!(stat(pid), Some((_, 'Z')))).collect()
}

/// The pids of all `processes` workers, found by keeping each busy at once.
async fn worker_pids(exec: &procexec::Executor) -> HashSet<u32> {
    let pids: HashSet<u32> =
        exec.map(sleep_then_pid, vec![50; 4 * exec.processes()]).await.unwrap().into_iter().collect();
    assert_eq!(pids.len(), exec.processes());
    pids
}

#[test]
fn dropping_the_executor_ends_and_reaps_every_worker() {
    serial(async {
        let exec = executor(3).await;
        let pids = worker_pids(&exec).await;
        assert!(pids.iter().all(|pid| my_children().contains(pid)));
        drop(exec);
        eventually("every worker is gone and reaped", || pids.iter().all(|pid| stat(*pid).is_none())).await;
        assert!(zombies_among_my_children().is_empty());
    });
}

#[test]
fn a_build_given_up_midway_reaps_every_worker_it_started() {
    serial(async {
        // Every handshake times out and the first failure ends the build: the starts
        // still under way (waiting to spawn, spawning, in their handshake) are dropped,
        // and their processes killed and reaped.
        let result = builder(64).handshake_timeout(Duration::from_micros(1)).build().await;
        assert!(result.is_err_and(|err| err.is_worker_start()));
        eventually("every worker is gone and reaped", || my_children().is_empty()).await;
    });
}

#[test]
fn dropping_the_executor_kills_workers_deep_in_a_cpu_loop() {
    serial(async {
        let exec = executor(2).await;
        let pids = worker_pids(&exec).await;
        let spinning: Vec<_> = (0..2).map(|_| exec.spawn(spin_forever, ())).collect();
        tokio::time::sleep(Duration::from_millis(100)).await; // let them get going
        drop(spinning);
        drop(exec);
        eventually("every spinning worker is gone and reaped", || {
            pids.iter().all(|pid| stat(*pid).is_none())
        })
        .await;
    });
}

#[test]
fn shutdown_finishes_queued_calls_then_reaps_every_worker() {
    serial(async {
        let exec = executor(2).await;
        let pids = worker_pids(&exec).await;
        let queued: Vec<_> = (0..20).map(|_| exec.spawn(sleep_ms, 10)).collect();
        exec.shutdown().await;
        for handle in queued {
            assert_eq!(handle.await.unwrap(), 10, "queued calls finish before shutdown returns");
        }
        assert!(pids.iter().all(|pid| stat(*pid).is_none()), "shutdown returns after the workers are reaped");
        assert!(matches!(exec.spawn(square, 2).await, Err(Error::Shutdown)));
        assert!(matches!(exec.map(square, 0..3).await, Err(Error::Shutdown)));
        exec.shutdown().await; // again: a no-op
    });
}

#[test]
fn calls_pending_when_the_executor_is_dropped_fail_with_shutdown() {
    serial(async {
        let exec = executor(1).await;
        let running = exec.spawn(sleep_ms, 60_000);
        let queued = exec.spawn(square, 3);
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(exec);
        assert!(matches!(running.await, Err(Error::Shutdown)));
        assert!(matches!(queued.await, Err(Error::Shutdown)));
    });
}

#[test]
fn crashed_workers_are_reaped_and_replaced() {
    serial(async {
        let exec = executor(2).await;
        for _ in 0..6 {
            assert!(exec.spawn(abort, ()).await.unwrap_err().is_worker_crash());
        }
        let pids = worker_pids(&exec).await;
        let children = my_children();
        assert_eq!(children.len(), 2, "exactly the two live workers: {children:?}");
        assert!(children.iter().all(|pid| pids.contains(pid) && alive(*pid)));
        drop(exec);
        eventually("no child left", || my_children().is_empty()).await;
    });
}

#[test]
fn a_withdrawn_call_never_runs() {
    serial(async {
        let exec = executor(1).await;
        let marker = std::env::temp_dir().join(format!("procexec-withdrawn-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        // One worker, busy: the next call waits in the parent's queue.
        let busy = exec.spawn(sleep_ms, 200);
        drop(exec.spawn(touch, marker.display().to_string()));
        assert_eq!(busy.await.unwrap(), 200);
        assert_eq!(exec.spawn(square, 9).await.unwrap(), 81, "the slot is free again");
        assert!(!marker.exists(), "the dropped call was withdrawn, not run");
    });
}

#[test]
fn orphan_helper() {
    if !is_helper("orphan_helper") {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let exec = executor(2).await;
        let pids = worker_pids(&exec).await;
        let spin = std::env::var("ORPHAN_SPIN").is_ok();
        let _spinning: Vec<_> = (0..2).filter(|_| spin).map(|_| exec.spawn(spin_forever, ())).collect();
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        println!("WORKERS {}", list.join(" "));
        std::future::pending::<()>().await;
    });
}

fn kill_parent_and_time_the_workers(spin: bool) {
    let _guard = one_at_a_time();
    let mut command = helper_command("orphan_helper");
    if spin {
        command.env("ORPHAN_SPIN", "1");
    }
    let mut helper = command.spawn().unwrap();
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines().map(Result::unwrap);
    let workers = read_pids(&mut lines, "WORKERS ");
    assert_eq!(workers.len(), 2);
    if spin {
        std::thread::sleep(Duration::from_millis(200)); // deep in the CPU loop
    }
    assert!(workers.iter().all(|&pid| alive(pid)));
    helper.kill().unwrap(); // SIGKILL: no destructor, no cleanup in the parent
    let killed = Instant::now();
    helper.wait().unwrap();
    while workers.iter().any(|&pid| alive(pid)) {
        assert!(killed.elapsed() < Duration::from_secs(30), "workers outlived their parent");
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("workers gone {:?} after their parent's SIGKILL (spinning: {spin})", killed.elapsed());
}

#[test]
fn workers_die_with_a_parent_killed_by_sigkill() {
    kill_parent_and_time_the_workers(false);
}

#[test]
fn spinning_workers_die_with_a_parent_killed_by_sigkill() {
    kill_parent_and_time_the_workers(true);
}

#[test]
fn shutdown_and_recycling_kill_what_tasks_started() {
    serial(async {
        let exec = builder(1).max_tasks_per_worker(2).build().await.unwrap();
        let recycled = exec.spawn(start_grandchild, 600).await.unwrap();
        exec.spawn(square, 2).await.unwrap(); // the second task: the worker is recycled
        eventually("a recycled worker's grandchild is killed", || !alive(recycled)).await;
        let at_shutdown = exec.spawn(start_grandchild, 600).await.unwrap();
        exec.shutdown().await;
        eventually("a grandchild is killed at shutdown", || !alive(at_shutdown)).await;
    });
}
