//! Fault injection and load, with real processes: workers SIGKILLed at random under
//! a 10,000-task map lose nothing and leave nothing behind; a million-item stream
//! runs in flat memory. The tests run one at a time, so process counts are theirs.
mod common;

// The workers of `common::builder` are this test binary, serving these tasks.
procexec::test_worker!(procexec_worker::TASKS);

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use futures::{StreamExt, stream};
use procexec_worker::*;

fn one_at_a_time() -> MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Live workers of this process (the test binary run again, by its absolute path).
fn my_workers() -> Vec<u32> {
    children_of(std::process::id())
        .into_iter()
        .filter(|&pid| alive(pid))
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| cmd.starts_with(b"/")))
        .collect()
}

fn zombies() -> Vec<u32> {
    children_of(std::process::id()).into_iter().filter(|&pid| matches!(stat(pid), Some((_, 'Z')))).collect()
}

/// A kB figure from `/proc/<pid>/status` (`VmHWM`, `VmRSS`).
fn status_kib(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| {
            line.strip_prefix(field)?.trim_start_matches(':').trim().strip_suffix(" kB")?.parse().ok()
        })
        .unwrap_or(0)
}

/// Runs a 10,000-task map while another task SIGKILLs a random worker every ~20 ms.
fn chaos(retries: u32) {
    let _serial = one_at_a_time();
    runtime().block_on(hang_guard(async {
        let exec = builder(2).retries(retries).build().await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        // Distinct victims: a worker already dying can be picked twice.
        let kills = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let killer = tokio::spawn({
            let (stop, kills) = (stop.clone(), kills.clone());
            async move {
                let mut seed = u64::from(std::process::id()) | 1;
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let workers = my_workers();
                    if workers.is_empty() {
                        continue;
                    }
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let victim = workers[(seed % workers.len() as u64) as usize];
                    // SAFETY: kill(2) touches no memory.
                    if unsafe { libc::kill(victim as i32, libc::SIGKILL) } == 0 {
                        kills.lock().unwrap().insert(victim);
                    }
                }
            }
        });
        let started = Instant::now();
        let results: Vec<_> =
            exec.map_stream(spin_us, stream::iter(std::iter::repeat_n(200, 10_000))).collect().await;
        stop.store(true, Ordering::Relaxed);
        killer.await.unwrap();
        let elapsed = started.elapsed();

        assert_eq!(results.len(), 10_000, "no item is lost");
        let mut crashed = 0;
        for result in &results {
            match result {
                Ok(_) => {}
                Err(err) if err.is_worker_crash() => crashed += 1,
                Err(err) => panic!("every item ends Ok or in a crash: {err}"),
            }
        }
        let victims: Vec<u32> = kills.lock().unwrap().iter().copied().collect();
        let kills = victims.len();
        assert!(kills >= 5, "the chaos really happened: {kills} kills");
        if retries > 0 {
            assert_eq!(crashed, 0, "with retries every item ends Ok");
        }
        // A kill costs at most the one input its worker was running: never its
        // chunk-mates, whether they had finished or not yet started.
        assert!(crashed <= kills, "{crashed} items failed for {kills} kills");
        let stats = exec.stats();
        println!(
            "chaos (retries {retries}): 10000 tasks in {elapsed:?}, {kills} workers killed, {crashed} items \
             failed with a crash, {} retried, 0 lost, 0 hangs; worker exits {:?}",
            stats.retried, stats.exits
        );

        // A victim is reaped once its supervisor has handled the death (a few were
        // killed while starting, which is a failed start rather than a crash).
        eventually("every victim is reaped and replaced", || {
            victims.iter().all(|&pid| stat(pid).is_none()) && exec.stats().workers == 2
        })
        .await;
        assert_eq!(exec.map(square, 0..1000u64).await.unwrap()[999], 999 * 999, "a fresh map is served");
        eventually("exactly two live workers", || my_workers().len() == 2).await;
        assert!(zombies().is_empty(), "no zombie: {:?}", zombies());
        drop(exec);
        eventually("no worker is left", || children_of(std::process::id()).is_empty()).await;
    }));
}

#[test]
fn random_sigkills_under_a_map_lose_nothing_without_retries() {
    chaos(0);
}

#[test]
fn random_sigkills_under_a_map_with_retries_lose_nothing_and_fail_nothing() {
    chaos(10);
}

#[test]
fn a_million_item_stream_runs_in_flat_memory() {
    let _serial = one_at_a_time();
    runtime().block_on(hang_guard(async {
        let exec = executor(2).await;
        let parent_before = status_kib("self", "VmHWM");
        let started = Instant::now();
        let (count, sum) = exec
            .map_unordered(square, stream::iter(0..1_000_000u64))
            .fold((0u64, 0u64), |(count, sum), result| async move { (count + 1, sum.wrapping_add(result.unwrap())) })
            .await;
        assert_eq!(count, 1_000_000);
        assert_eq!(sum, (0..1_000_000u64).map(|x| x * x).fold(0, u64::wrapping_add));
        let parent_growth = status_kib("self", "VmHWM").saturating_sub(parent_before);
        let worker_peaks: Vec<u64> = my_workers().iter().map(|pid| status_kib(&pid.to_string(), "VmHWM")).collect();
        println!(
            "load: 1,000,000 items in {:?}; parent peak RSS grew {parent_growth} KiB; worker peak RSS {worker_peaks:?} KiB",
            started.elapsed()
        );
        assert!(parent_growth < 256 * 1024, "the parent's memory stays flat: +{parent_growth} KiB");
        assert!(worker_peaks.iter().all(|&peak| peak < 256 * 1024), "{worker_peaks:?}");
    }));
}

#[test]
fn mid_map_helper() {
    if !is_helper("mid_map_helper") {
        return;
    }
    runtime().block_on(async {
        let exec = executor(2).await;
        let pids: Vec<String> =
            exec.map(sleep_then_pid, [50; 4]).await.unwrap().iter().map(u32::to_string).collect();
        let map = exec.map(spin_ms, [60_000u64; 8]);
        println!("WORKERS {}", pids.join(" "));
        let _ = map.await;
    });
}

#[test]
fn workers_spinning_in_a_map_die_within_a_second_of_a_parent_sigkill() {
    let _serial = one_at_a_time();
    let mut helper = helper_command("mid_map_helper").spawn().unwrap();
    let stdout = std::io::BufReader::new(helper.stdout.take().unwrap());
    let workers = read_pids(&mut std::io::BufRead::lines(stdout).map(Result::unwrap), "WORKERS ");
    std::thread::sleep(Duration::from_millis(300)); // the map is running, both workers spin
    helper.kill().unwrap();
    let killed = Instant::now();
    helper.wait().unwrap();
    while workers.iter().any(|&pid| alive(pid)) {
        assert!(killed.elapsed() < Duration::from_secs(30), "workers outlived their parent");
        std::thread::sleep(Duration::from_millis(2));
    }
    let gone = killed.elapsed();
    println!("workers spinning in a map gone {gone:?} after their parent's SIGKILL");
    assert!(gone < Duration::from_secs(5), "well within a second, bar a badly loaded machine: {gone:?}");
}
