//! `shutdown` drains, `shutdown_now` kills, and a terminal's Ctrl-C reaches the
//! parent only: the parent decides.
mod common;

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
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap());
    helper
        .args(["ctrl_c_helper", "--exact", "--nocapture", "--test-threads=1", "-q"])
        .env(HELPER_ENV, "ctrl_c_helper")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0); // its own group, like a job in a terminal
    let mut helper = helper.spawn().unwrap();
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines().map(Result::unwrap);
    let workers: Vec<u32> = lines
        .by_ref()
        .find_map(|line| {
            line.strip_prefix("READY ").map(|list| list.split(' ').map(|p| p.parse().unwrap()).collect())
        })
        .expect("the helper is ready");
    // What a terminal does on Ctrl-C: SIGINT to the whole foreground group.
    // SAFETY: kill(2) touches no memory.
    assert_eq!(unsafe { libc::kill(-(helper.id() as i32), libc::SIGINT) }, 0);
    // The harness adds its own lines ("test result: ..."); keep the helper's.
    let rest: Vec<String> = lines.filter(|line| line.starts_with(char::is_uppercase)).collect();
    assert!(helper.wait().unwrap().success(), "{rest:?}");
    assert_eq!(rest, ["INTERRUPTED", "RESULT 500"], "the call in flight finished after the Ctrl-C");
    assert!(workers.iter().all(|&pid| !alive(pid)), "the workers exited with the shutdown");
}
