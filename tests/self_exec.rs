//! A test binary serves as its own worker: tasks defined right here, no companion
//! binary (`test_worker!` plus `Builder::test_harness`).
mod common;

use common::hang_guard;
use procexec::{Executor, WorkerStderr};

procexec::tasks! {
    pub fn cube(x: i64) -> i64 { x * x * x }

    pub fn shout(text: String) -> String {
        println!("printed by a task, not a frame");
        text.to_uppercase()
    }

    pub fn worker_pid() -> u32 { std::process::id() }

    pub fn fail(message: String) -> i64 { panic!("{message}") }
}

procexec::test_worker!(TASKS);

async fn executor() -> Executor {
    Executor::builder().test_harness().processes(2).stderr(WorkerStderr::Discard).build().await.unwrap()
}

#[tokio::test]
async fn tasks_defined_in_a_test_run_in_worker_processes() {
    hang_guard(async {
        let exec = executor().await;
        assert_eq!(exec.spawn(cube, 3).await.unwrap(), 27);
        assert_eq!(exec.map(cube, -2..=2).await.unwrap(), [-8, -1, 0, 1, 8]);
        assert_eq!(exec.spawn(shout, "quiet".into()).await.unwrap(), "QUIET");
        assert_ne!(exec.spawn(worker_pid, ()).await.unwrap(), std::process::id());
        let err = exec.spawn(fail, "from the test binary".into()).await.unwrap_err();
        assert_eq!(err.panic().unwrap().message(), "from the test binary");
        assert!(err.panic().unwrap().location().unwrap().contains("tests/self_exec.rs"));
        exec.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn harness_output_before_the_handshake_is_skipped() {
    hang_guard(async {
        // libtest prints "running 1 test" on stdout before the worker takes it over.
        let exec = Executor::builder().test_harness().processes(1).build().await.unwrap();
        assert_eq!(exec.spawn(cube, 2).await.unwrap(), 8);
    })
    .await;
}
