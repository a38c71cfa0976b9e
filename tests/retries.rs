//! Opt-in retries: a call whose worker crashed is sent again, up to a bound; a
//! poison input fails alone once its retries are spent.
mod common;

// The workers of `common::builder` are this test binary, serving these tasks.
procexec::test_worker!(procexec_worker::TASKS);

use common::*;
use futures::{StreamExt, stream};
use procexec_worker::*;

#[tokio::test]
async fn a_crash_is_retried_and_the_call_succeeds() {
    hang_guard(async {
        let exec = executor(1).await;
        let path = marker("crash-once");
        assert_eq!(exec.with_retries(1).spawn(crash_once, path.display().to_string()).await.unwrap(), 1);
        let stats = exec.stats();
        assert_eq!((stats.retried, stats.failed, stats.exits.crashed), (1, 0, 1));
        std::fs::remove_file(path).unwrap();
    })
    .await;
}

#[tokio::test]
async fn without_retries_a_crash_is_reported_at_once() {
    hang_guard(async {
        let exec = executor(1).await;
        let path = marker("no-retry");
        let err = exec.spawn(crash_once, path.display().to_string()).await.unwrap_err();
        assert_eq!(err.crash().unwrap().attempts(), 1);
        std::fs::remove_file(path).unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_poison_call_fails_after_its_retries() {
    hang_guard(async {
        let exec = builder(2).retries(3).build().await.unwrap();
        let err = exec.spawn(abort, ()).await.unwrap_err();
        let crash = err.crash().expect("a crash");
        assert_eq!(crash.attempts(), 4, "one run and three retries");
        assert!(err.to_string().contains("attempt 4; every attempt crashed"), "{err}");
        let stats = exec.stats();
        assert_eq!((stats.exits.crashed, stats.retried, stats.failed), (4, 3, 1));
        assert_eq!(exec.spawn(square, 6).await.unwrap(), 36, "the executor serves on");
    })
    .await;
}

#[tokio::test]
async fn a_poison_input_in_a_chunked_map_fails_alone() {
    hang_guard(async {
        let exec = builder(2).retries(2).build().await.unwrap();
        // Tiny calls: the map sends many inputs per chunk, so the poison input takes
        // a whole chunk down; the retry splits the chunk and only it keeps failing.
        let inputs = (0..5000u64).map(|i| (i, 4321));
        let results: Vec<_> = exec.map_stream(poison_if, stream::iter(inputs)).collect().await;
        assert_eq!(results.len(), 5000);
        for (i, result) in results.iter().enumerate() {
            match result {
                Ok(x) => assert_eq!(*x, i as u64),
                Err(err) => {
                    assert_eq!(i, 4321, "only the poison input fails: {err}");
                    assert_eq!(err.crash().unwrap().attempts(), 3);
                }
            }
        }
        assert!(results[4321].is_err());
        let stats = exec.stats();
        assert_eq!(stats.failed, 1, "{stats:?}");
        assert!(stats.retried > 1, "the chunk's inputs were retried one by one: {stats:?}");
    })
    .await;
}

#[tokio::test]
async fn only_the_input_that_crashed_is_charged_a_retry() {
    hang_guard(async {
        let exec = executor(2).await;
        let paths: Vec<_> = (0..20).map(|i| marker(&format!("crash-once-{i}"))).collect();
        let inputs = stream::iter(paths.iter().map(|path| path.display().to_string()));
        let results: Vec<_> = exec.with_retries(1).map_stream(crash_once, inputs).collect().await;
        // Each input crashes its worker once, then succeeds: chunk-mates that never
        // ran when a worker died are sent again without being charged an attempt.
        assert!(results.iter().all(|result| matches!(result, Ok(1))), "{results:?}");
        let stats = exec.stats();
        assert_eq!(stats.retried, 20, "one re-run per input: {stats:?}");
        assert_eq!(stats.exits.crashed, 20);
        for path in paths {
            std::fs::remove_file(path).unwrap();
        }
    })
    .await;
}
