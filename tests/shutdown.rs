//! `shutdown` drains, `shutdown_now` kills, and a terminal's Ctrl-C reaches the
//! parent only: the parent decides.
mod common;

// The workers of `common::builder` are this test binary, serving these tasks.
procexec::test_worker!(procexec_worker::TASKS);

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;

use common::*;
use procexec::Error;
use procexec_worker::*;

#[tokio::test]
async fn shutdown_now_fails_waiting_calls_and_reaps_every_worker() {
    hang_guard(async {
        let exec = executor(1).await;
        let worker = exec.spawn(pid, ()).await.unwrap();
        let running = exec.spawn(sleep_ms, 60_000);
        let queued = exec.spawn(square, 2);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        exec.shutdown_now().await;
        assert!(stat(worker).is_none(), "the worker is killed and reaped when shutdown_now returns");
        assert!(matches!(running.await, Err(Error::Shutdown)));
        assert!(matches!(queued.await, Err(Error::Shutdown)));
        assert!(matches!(exec.spawn(square, 3).await, Err(Error::Shutdown)));
    })
    .await;
}

#[test]
fn ctrl_c_helper() {
    if !is_helper("ctrl_c_helper") {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        // Registered before anyone can send the signal.
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).unwrap();
        let exec = executor(2).await;
        let pids: Vec<String> =
            exec.map(sleep_then_pid, [50; 4]).await.unwrap().iter().map(u32::to_string).collect();
        let call = exec.spawn(sleep_ms, 500);
        println!("READY {}", pids.join(" "));
        interrupt.recv().await;
        println!("INTERRUPTED");
        // The graceful path a service would take: finish what was accepted, then exit.
        exec.shutdown().await;
        println!("RESULT {}", call.await.unwrap());
    });
}

#[test]
fn ctrl_c_reaches_the_parent_only_and_it_shuts_down_gracefully() {
    // Its own process group, like a job in a terminal.
    let mut helper = helper_command("ctrl_c_helper").process_group(0).spawn().unwrap();
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines().map(Result::unwrap);
    let workers = read_pids(&mut lines, "READY ");
    // What a terminal does on Ctrl-C: SIGINT to the whole foreground group.
    // SAFETY: kill(2) touches no memory.
    assert_eq!(unsafe { libc::kill(-(helper.id() as i32), libc::SIGINT) }, 0);
    // The harness adds its own lines ("test result: ..."); keep the helper's.
    let rest: Vec<String> = lines.filter(|line| line.starts_with(char::is_uppercase)).collect();
    assert!(helper.wait().unwrap().success(), "{rest:?}");
    assert_eq!(rest, ["INTERRUPTED", "RESULT 500"], "the call in flight finished after the Ctrl-C");
    assert!(workers.iter().all(|&pid| !alive(pid)), "the workers exited with the shutdown");
}

#[tokio::test]
async fn shutdown_returns_even_when_a_withdrawn_call_is_queued() {
    hang_guard(async {
        let exec = executor(1).await;
        let kept = exec.spawn(sleep_ms, 300);
        let withdrawn = exec.spawn(sleep_ms, 10);
        drop(withdrawn);
        exec.shutdown().await;
        assert_eq!(kept.await.unwrap(), 300);
        assert_eq!(exec.stats().cancelled, 1);
    })
    .await;
}

#[tokio::test]
async fn calls_handed_back_by_a_dying_worker_after_shutdown_now_fail_with_shutdown() {
    hang_guard(async {
        let exec = executor(1).await;
        exec.map(double, 0..20_000u64).await.unwrap(); // a wide prefetch window
        let worker = exec.spawn(pid, ()).await.unwrap();
        let running = exec.spawn(sleep_ms, 60_000);
        let prefetched = exec.spawn(square, 4);
        eventually("both calls are with the worker", || exec.stats().running == 2).await;
        // Hold the worker's stderr open, as a grandchild in another group would: the
        // supervisor then lingers over the crash while shutdown_now runs.
        let _stderr = std::fs::OpenOptions::new().write(true).open(format!("/proc/{worker}/fd/2")).unwrap();
        // SAFETY: kill(2) touches no memory.
        unsafe { libc::kill(worker as i32, libc::SIGKILL) };
        eventually("the death is noticed", || exec.stats().workers == 0).await;
        exec.shutdown_now().await;
        assert!(running.await.unwrap_err().is_worker_crash());
        assert!(matches!(prefetched.await, Err(Error::Shutdown)));
    })
    .await;
}
