//! The companion binary, started by an executor as `Builder::program`: the
//! production path (`serve_worker`), which procexec's own integration tests skip by
//! serving from their test binaries.
use std::time::Duration;

use procexec::{Error, Executor, WorkerStderr};
use procexec_worker::*;

/// Tasks as this process knows them, disagreeing with the companion binary.
mod stale {
    procexec::tasks! {
        /// The binary has no such task.
        pub fn not_in_the_worker(x: u64) -> u64 { x }
        /// The binary's `typed` is `u32 -> u32`.
        pub fn typed(x: u64) -> u64 { x }
    }
}

async fn companion(processes: usize) -> Executor {
    Executor::builder()
        .program(env!("CARGO_BIN_EXE_procexec-worker"))
        .processes(processes)
        .stderr(WorkerStderr::Discard)
        .build()
        .await
        .expect("the companion binary starts")
}

/// Fails the test instead of hanging it; generous, so load never trips it.
async fn hang_guard<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), future).await.expect("the test hung")
}

#[tokio::test]
async fn the_companion_binary_serves_its_tasks_to_an_executor() {
    hang_guard(async {
        let exec = companion(2).await;
        assert_eq!(exec.spawn(square, 7).await.unwrap(), 49);
        assert_eq!(exec.map(double, 0..5).await.unwrap(), [0, 2, 4, 6, 8]);
        assert_eq!(exec.spawn(print, "not a frame".into()).await.unwrap(), 11);
        assert_ne!(exec.spawn(pid, ()).await.unwrap(), std::process::id());
        let err = exec.spawn(panic_with, "from the companion".into()).await.unwrap_err();
        assert_eq!(err.panic().unwrap().message(), "from the companion");
        assert!(err.panic().unwrap().location().unwrap().contains("src/lib.rs"), "{err:?}");
        exec.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn tasks_the_companion_binary_lacks_or_types_differently_are_refused() {
    hang_guard(async {
        let exec = companion(1).await;
        let err = exec.spawn(stale::not_in_the_worker, 1).await.unwrap_err();
        assert!(matches!(&err, Error::UnknownTask { task, .. } if task == "not_in_the_worker"), "{err:?}");
        let err = exec.spawn(stale::typed, 1).await.unwrap_err();
        assert!(matches!(&err, Error::TaskMismatch { task, .. } if task == "typed"), "{err:?}");
        assert_eq!(exec.spawn(typed, 5).await.unwrap(), 5);
    })
    .await;
}

#[tokio::test]
async fn the_companion_binary_started_by_a_task_is_not_a_worker() {
    hang_guard(async {
        let exec = companion(1).await;
        assert_eq!(exec.spawn(env_var, "PROCEXEC_WORKER".into()).await.unwrap(), None);
        // Run without the marker, the companion explains itself and exits 2.
        let (code, stdout) = exec.spawn(run_own_program, Vec::new()).await.unwrap();
        assert_eq!(code, Some(2), "{stdout:?}");
    })
    .await;
}
