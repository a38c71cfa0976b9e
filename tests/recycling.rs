//! Workers are recycled after N inputs or past a memory ceiling, the pool grows on
//! demand and shrinks when idle, and an initializer builds per-worker state.
mod common;

// The workers of `common::builder` are this test binary, serving these tasks.
procexec::test_worker!(procexec_worker::TASKS);

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use procexec::{Error, ExitCause};
use procexec_worker::*;

#[tokio::test]
async fn a_worker_is_recycled_after_max_tasks() {
    hang_guard(async {
        let exec = builder(1).max_tasks_per_worker(10).build().await.unwrap();
        let mut pids = Vec::new();
        for _ in 0..35 {
            pids.push(exec.spawn(pid, ()).await.unwrap());
        }
        let distinct: Vec<u32> = pids.iter().fold(Vec::new(), |mut seen, &p| {
            if seen.last() != Some(&p) {
                seen.push(p);
            }
            seen
        });
        assert_eq!(distinct.len(), 4, "10 + 10 + 10 + 5 calls: {distinct:?}");
        assert!(pids.chunks(10).all(|chunk| chunk.iter().all(|&p| p == chunk[0])));
        assert_eq!(exec.stats().exits.max_tasks, 3);
        assert!(distinct[..3].iter().all(|&p| !alive(p)), "recycled workers exited");
    })
    .await;
}

#[tokio::test]
async fn a_worker_past_its_memory_ceiling_is_recycled_and_the_task_named() {
    hang_guard(async {
        let exec = builder(1).max_worker_memory(150 << 20).build().await.unwrap();
        let before = exec.spawn(pid, ()).await.unwrap();
        assert_eq!(exec.spawn(allocate_mb, 10).await.unwrap(), 10);
        assert_eq!(exec.spawn(pid, ()).await.unwrap(), before, "10 MiB is under the ceiling");
        assert_eq!(exec.spawn(allocate_mb, 300).await.unwrap(), 300, "the call itself succeeds");
        let after = exec.spawn(pid, ()).await.unwrap();
        assert_ne!(after, before, "the worker was recycled");
        let stats = exec.stats();
        assert_eq!(stats.exits.memory, 1);
        let exit = stats.recent_exits.last().unwrap();
        assert_eq!(exit.pid, before);
        match &exit.cause {
            ExitCause::Memory { task, peak_rss } => {
                assert_eq!(task, "allocate_mb");
                assert!(*peak_rss >= 300 << 20, "{peak_rss}");
            }
            other => panic!("expected a memory exit, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn the_pool_grows_under_load_and_shrinks_when_idle() {
    hang_guard(async {
        let exec =
            builder(3).min_processes(1).idle_timeout(Duration::from_millis(200)).build().await.unwrap();
        assert_eq!(exec.stats().workers, 1);
        let pids: HashSet<u32> = exec.map(sleep_then_pid, [100; 12]).await.unwrap().into_iter().collect();
        assert!(pids.len() > 1, "more workers started under load: {pids:?}");
        eventually("idle workers stop, down to the minimum", || exec.stats().workers == 1).await;
        // An exit is recorded once the worker is reaped, after it stopped being counted.
        eventually("the idle exits are recorded", || exec.stats().exits.idle >= 1).await;
        eventually("the stopped workers are gone", || pids.iter().filter(|&&p| alive(p)).count() <= 1).await;
        let again: HashSet<u32> = exec.map(sleep_then_pid, [100; 12]).await.unwrap().into_iter().collect();
        assert!(again.len() > 1, "and it grows again: {again:?}");
    })
    .await;
}

#[tokio::test]
async fn with_min_processes_zero_the_pool_stops_every_idle_worker_and_starts_one_on_the_next_call() {
    hang_guard(async {
        let exec =
            builder(2).min_processes(0).idle_timeout(Duration::from_millis(100)).build().await.unwrap();
        let first = exec.spawn(pid, ()).await.unwrap();
        eventually("the idle pool scales to zero", || exec.stats().workers == 0).await;
        eventually("the stopped worker is gone", || !alive(first)).await;
        // Recorded once the worker is reaped, a little after it is no longer counted.
        eventually("its exit is recorded as idle", || exec.stats().exits.idle == 1).await;
        let second = exec.spawn(pid, ()).await.unwrap();
        assert_ne!(second, first, "a new worker serves the next call");
        assert_eq!(exec.map(square, 0..4).await.unwrap(), [0, 1, 4, 9]);
        eventually("and scales to zero again", || exec.stats().workers == 0).await;
    })
    .await;
}

#[tokio::test]
async fn min_processes_zero_still_starts_one_worker_at_build() {
    hang_guard(async {
        let exec = builder(2).min_processes(0).build().await.unwrap();
        assert_eq!(exec.stats().workers, 1, "build starts one worker for the handshake");
        let first = exec.spawn(pid, ()).await.unwrap();
        assert_eq!(exec.spawn(pid, ()).await.unwrap(), first);
        assert_eq!(exec.stats().workers, 1);
    })
    .await;
}

#[tokio::test]
async fn an_initializer_builds_state_once_per_worker() {
    hang_guard(async {
        let exec = builder(2).initializer(set_greeting, "Hello".to_string()).build().await.unwrap();
        let names = ["Ada", "Grace", "Linus"].map(String::from);
        assert_eq!(exec.map(greet, names).await.unwrap(), ["Hello, Ada!", "Hello, Grace!", "Hello, Linus!"]);
        // A replacement worker runs the initializer too.
        assert!(exec.spawn(abort, ()).await.unwrap_err().is_worker_crash());
        assert!(exec.spawn(abort, ()).await.unwrap_err().is_worker_crash());
        assert_eq!(exec.spawn(greet, "again".into()).await.unwrap(), "Hello, again!");
    })
    .await;
}

#[tokio::test]
async fn without_the_initializer_a_task_reading_state_says_why() {
    hang_guard(async {
        let exec = executor(1).await;
        let err = exec.spawn(greet, "nobody".into()).await.unwrap_err();
        assert!(err.panic().unwrap().message().contains("give the executor an initializer"), "{err}");
    })
    .await;
}

fn start_message(result: procexec::Result<procexec::Executor>) -> String {
    match result {
        Err(Error::WorkerStart(err)) => err.to_string(),
        other => panic!("expected a start error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_failing_initializer_fails_the_build_with_its_reason() {
    hang_guard(async {
        let panics = start_message(builder(2).initializer(init_panics, "no model file".into()).build().await);
        assert!(
            panics.contains("initializer `init_panics` failed") && panics.contains("no model file"),
            "{panics}"
        );
        let errs = start_message(builder(1).initializer(init_fails, "bad config".into()).build().await);
        assert!(errs.contains("initializer `init_fails` failed: bad config"), "{errs}");
        let aborts = start_message(builder(1).initializer(init_aborts, ()).build().await);
        assert!(aborts.contains("died running initializer `init_aborts`"), "{aborts}");
        assert!(aborts.contains("SIGABRT"), "{aborts}");
    })
    .await;
}

#[tokio::test]
async fn an_initializer_failing_on_restart_is_retried_then_reported() {
    hang_guard(async {
        let poisoned = marker("initializer-fails-later");
        let exec =
            builder(1).initializer(init_unless_exists, poisoned.display().to_string()).build().await.unwrap();
        assert_eq!(exec.spawn(square, 3).await.unwrap(), 9);
        std::fs::write(&poisoned, b"").unwrap();
        assert!(exec.spawn(abort, ()).await.unwrap_err().is_worker_crash());
        // Replacements fail their initializer; after a few tries, backing off, the
        // executor reports it instead of looping.
        let err = exec.spawn(square, 4).await.unwrap_err();
        assert!(matches!(&err, Error::WorkerStart(start) if start.message().contains("exists")), "{err}");
        assert!(exec.spawn(square, 5).await.unwrap_err().to_string().contains("initializer"));
        std::fs::remove_file(&poisoned).unwrap();
    })
    .await;
}

#[tokio::test]
async fn max_tasks_per_worker_holds_for_calls_sent_at_once() {
    hang_guard(async {
        let exec = builder(2).max_tasks_per_worker(5).build().await.unwrap();
        let calls: Vec<_> = (0..50).map(|_| exec.spawn(pid, ())).collect();
        let mut served = std::collections::HashMap::<u32, usize>::new();
        for call in calls {
            *served.entry(call.await.unwrap()).or_default() += 1;
        }
        assert!(served.values().all(|&calls| calls <= 5), "no worker serves more than 5: {served:?}");
        assert!(served.len() >= 10, "{served:?}");
    })
    .await;
}

#[tokio::test]
async fn a_burst_of_spawns_grows_the_pool_every_time() {
    hang_guard(async {
        for _ in 0..3 {
            let exec = builder(3).min_processes(1).build().await.unwrap();
            // Settled: one worker idle, two slots waiting for demand.
            exec.spawn(pid, ()).await.unwrap();
            let calls: Vec<_> = (0..30).map(|_| exec.spawn(sleep_then_pid, 30)).collect();
            let mut pids = HashSet::new();
            for call in calls {
                pids.insert(call.await.unwrap());
            }
            assert_eq!(pids.len(), 3, "the burst was served by every worker the pool may have");
        }
    })
    .await;
}

#[tokio::test]
async fn work_is_not_stranded_when_the_slot_woken_for_it_cannot_start_a_worker() {
    hang_guard(async {
        let poisoned = marker("initializer-fails-elastic");
        let exec = builder(3)
            .min_processes(1)
            .initializer(init_unless_exists, poisoned.display().to_string())
            .build()
            .await
            .unwrap();
        std::fs::write(&poisoned, b"").unwrap();
        assert!(exec.spawn(abort, ()).await.unwrap_err().is_worker_crash());
        // Every slot now fails to start a worker. Each one woken for this call gives
        // up after its tries and passes the call on; the last one fails it.
        let err = exec.spawn(square, 4).await.unwrap_err();
        assert!(err.is_worker_start(), "{err}");
        std::fs::remove_file(&poisoned).unwrap();
    })
    .await;
}

#[tokio::test]
async fn stats_list_each_live_worker_with_its_pid_and_what_it_served() {
    hang_guard(async {
        let exec = executor(2).await;
        exec.map(square, 0..100).await.unwrap();
        let live = exec.stats().live;
        assert_eq!(live.iter().map(|worker| worker.slot).collect::<Vec<_>>(), [0, 1]);
        assert!(live.iter().all(|worker| alive(worker.pid) && !worker.busy), "{live:?}");
        assert_eq!(live.iter().map(|worker| worker.inputs).sum::<u64>(), 100);
        let before: HashSet<u32> = live.iter().map(|worker| worker.pid).collect();
        let crash = exec.spawn(abort, ()).await.unwrap_err();
        let crashed = crash.crash().unwrap().pid();
        assert!(before.contains(&crashed));
        eventually("the replacement is listed", || {
            let live = exec.stats().live;
            let now: HashSet<u32> = live.iter().map(|worker| worker.pid).collect();
            now.len() == 2 && !now.contains(&crashed) && now.iter().all(|&pid| alive(pid))
        })
        .await;
    })
    .await;
}
