//! Descriptors: what a worker costs the parent, a 256-worker pool under the usual
//! soft limit of 1,024, and starts that run out of descriptors at each step, which
//! fail with a typed error and leave no zombie.
//!
//! Each check runs in a helper process (this test binary again) that lowers its own
//! limit, so neither the harness nor the other tests are limited, and the
//! descriptors it counts are its own.
mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use procexec::Error;

procexec::tasks! {
    /// `x * x`.
    pub fn square(x: u64) -> u64 { x * x }

    /// Initializer: while the directory `dir/hold` exists, makes `dir/waiting` and
    /// waits until `hold` is gone.
    pub fn gate(dir: String) {
        let dir = Path::new(&dir);
        if dir.join("hold").exists() {
            let _ = std::fs::create_dir(dir.join("waiting"));
            while dir.join("hold").exists() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

// The workers of `common::builder` are this test binary, serving these tasks.
procexec::test_worker!(TASKS);

/// Sets this process's soft limit on open descriptors, keeping the hard one.
fn set_soft_limit(soft: u64) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    limit.rlim_cur = soft;
    // SAFETY: as above; setrlimit only reads it.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    limit.rlim_max
}

fn soft_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    limit.rlim_cur
}

/// Descriptors this process has open (not counting the one that lists them).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count() - 1
}

fn zombie_children() -> usize {
    children_of(std::process::id()).into_iter().filter(|&pid| matches!(stat(pid), Some((_, 'Z')))).count()
}

/// Opens `/dev/null` until this process is out of descriptors, then closes `spare`.
fn hog_descriptors(spare: usize) -> Vec<File> {
    let mut hog = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(file) => hog.push(file),
            Err(err) if err.raw_os_error() == Some(libc::EMFILE) => break,
            Err(err) => panic!("unexpected: {err}"),
        }
    }
    hog.truncate(hog.len() - spare);
    hog
}

/// The message of `err`, then of each `source()` in turn.
fn chain(err: &Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text.replace('\n', " ")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Runs helper `name` and returns its stdout, checking that it succeeded.
fn run_helper(name: &str) -> String {
    let output = helper_command(name).stderr(std::process::Stdio::inherit()).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "helper {name} failed: {stdout}");
    stdout
}

/// The value after `key ` on the helper's line starting with it.
fn value<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(key).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {key} in: {stdout}"))
}

#[test]
fn descriptors_helper() {
    if !is_helper("descriptors_helper") {
        return;
    }
    runtime().block_on(hang_guard(async {
        // Whatever the first executor of a process sets up once is not a worker's.
        builder(1).build().await.unwrap().shutdown().await;
        let before = open_fds();
        let exec = builder(16).build().await.unwrap();
        assert_eq!(exec.map(square, 0..100u64).await.unwrap().len(), 100);
        let running = open_fds();
        exec.shutdown().await;
        drop(exec);
        eventually("the workers' descriptors are closed", || open_fds() == before).await;
        println!("PER_WORKER {}", (running - before) as f64 / 16.0);
    }));
}

/// What the parent holds for each running worker: its request, reply and stderr
/// pipes and its progress record, nothing more (no pidfd: exits are waited for
/// through `SIGCHLD`).
#[test]
fn a_running_worker_costs_the_parent_four_descriptors() {
    let stdout = run_helper("descriptors_helper");
    let per_worker: f64 = value(&stdout, "PER_WORKER").parse().unwrap();
    assert!(per_worker <= 4.0, "{stdout}");
}

#[test]
fn pool_of_256_helper() {
    if !is_helper("pool_of_256_helper") {
        return;
    }
    // The usual default soft limit of a shell or a service; the hard limit stays.
    let hard = set_soft_limit(1024);
    runtime().block_on(hang_guard(async {
        let refused = builder(256).raise_fd_limit(false).build().await.unwrap_err();
        assert!(refused.is_config(), "{refused:?}");
        println!("REFUSED {refused}");
        assert_eq!(soft_limit(), 1024, "raise_fd_limit(false) leaves the limit alone");

        // The peak during start-up, sampled from another thread.
        let starting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampler = std::thread::spawn({
            let starting = starting.clone();
            move || {
                let mut peak = 0;
                while starting.load(std::sync::atomic::Ordering::Relaxed) {
                    peak = peak.max(open_fds());
                    // Sampling, not waiting: a spinning sampler would slow the start it measures.
                    std::thread::sleep(Duration::from_micros(200));
                }
                peak
            }
        });
        let started = Instant::now();
        let exec = builder(256).build().await;
        let build_time = started.elapsed();
        starting.store(false, std::sync::atomic::Ordering::Relaxed);
        let peak = sampler.join().unwrap();
        let exec = exec.unwrap_or_else(|err| panic!("with a hard limit of {hard}: {err}"));
        println!("BUILD_MS {}", build_time.as_millis());
        println!("PEAK {peak}");
        println!("RUNNING {}", open_fds());
        println!("SOFT {}", soft_limit());

        let started = Instant::now();
        let squares = exec.map(square, 0..5000u64).await.unwrap();
        println!("MAP_MS {}", started.elapsed().as_millis());
        assert_eq!(squares, (0..5000u64).map(|x| x * x).collect::<Vec<_>>());
        assert_eq!(exec.stats().workers, 256);
        exec.shutdown().await;
        assert!(children_of(std::process::id()).is_empty(), "every worker is reaped");
        println!("SERVED");

        // A hard limit too low for the pool: nothing to raise to.
        let limit = libc::rlimit { rlim_cur: 512, rlim_max: 512 };
        // SAFETY: `limit` is a valid rlimit; setrlimit only reads it.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        let capped = builder(256).build().await.unwrap_err();
        assert!(capped.is_config(), "{capped:?}");
        println!("CAPPED {capped}");
    }));
}

/// The default pool of a 256-thread server, under the usual soft limit: `build`
/// raises the soft limit toward the hard one, and refuses with a message naming
/// both the limit and the need when told not to.
#[test]
fn a_256_worker_pool_starts_and_serves_under_a_soft_limit_of_1024_descriptors() {
    let started = Instant::now();
    let stdout = run_helper("pool_of_256_helper");
    assert!(stdout.contains("SERVED"), "{stdout}");
    let refused = value(&stdout, "REFUSED");
    assert!(refused.contains("limit (RLIMIT_NOFILE) is 1024"), "names the limit: {refused}");
    assert!(refused.contains("256 workers need about"), "names the need: {refused}");
    assert!(refused.contains("raise_fd_limit(false)"), "names the switch: {refused}");
    let capped = value(&stdout, "CAPPED");
    assert!(capped.contains("limit (RLIMIT_NOFILE) is 512 (hard limit 512)"), "{capped}");
    assert!(!capped.contains("raise_fd_limit"), "raising was allowed: {capped}");
    let soft: u64 = value(&stdout, "SOFT").parse().unwrap();
    let peak: u64 = value(&stdout, "PEAK").parse().unwrap();
    assert!(soft > 1024 && peak < soft, "{stdout}");
    assert!(started.elapsed() < Duration::from_secs(60), "{stdout}");
}

/// Spare descriptors tried: 0 to 5 run out at one of the three pipes, 6 and more
/// leave enough for the whole start.
const SPARE: std::ops::RangeInclusive<usize> = 0..=8;

#[test]
fn starts_out_of_descriptors_helper() {
    if !is_helper("starts_out_of_descriptors_helper") {
        return;
    }
    set_soft_limit(256);
    runtime().block_on(hang_guard(async {
        builder(1).build().await.unwrap().shutdown().await;
        for spare in SPARE {
            // One worker, stopped once idle: the next call starts one, with exactly
            // `spare` descriptors free.
            let before = open_fds();
            let exec =
                builder(1).min_processes(0).idle_timeout(Duration::from_millis(10)).build().await.unwrap();
            eventually("the idle worker stops", || exec.stats().workers == 0 && open_fds() == before).await;
            let hog = hog_descriptors(spare);
            let result = exec.spawn(square, 7).await;
            drop(hog);
            let outcome = match result {
                Ok(49) => "served".to_string(),
                Err(err) if err.is_worker_start() => chain(&err),
                other => panic!("spare {spare}: {other:?}"),
            };
            exec.shutdown().await;
            println!(
                "SPARE {spare} zombies {} children {}: {outcome}",
                zombie_children(),
                children_of(std::process::id()).len()
            );
        }
    }));
}

/// Replacement workers started with 0 to 8 descriptors to spare fail at the pipe
/// they cannot create, with a typed error naming it, or start; none is left a
/// zombie, and no process at all is left once the executor shut down.
#[test]
fn starts_that_run_out_of_descriptors_fail_with_a_typed_error_and_leave_no_zombie() {
    let stdout = run_helper("starts_out_of_descriptors_helper");
    for spare in SPARE {
        let line = value(&stdout, &format!("SPARE {spare}"));
        assert!(line.starts_with("zombies 0 children 0: "), "{line}");
        if spare < 6 {
            let cannot =
                line.contains("cannot create a pipe") || line.contains("cannot create its output file");
            assert!(cannot && line.contains("os error 24"), "{line}");
        } else {
            assert!(line.ends_with("served") || line.contains("os error 24"), "{line}");
        }
    }
    assert!(value(&stdout, &format!("SPARE {}", SPARE.end())).ends_with("served"), "{stdout}");
}

#[test]
fn progress_record_helper() {
    if !is_helper("progress_record_helper") {
        return;
    }
    set_soft_limit(256);
    let dir: PathBuf = marker("gate");
    std::fs::create_dir(&dir).unwrap();
    std::fs::create_dir(dir.join("hold")).unwrap();
    runtime().block_on(hang_guard(async {
        let build = tokio::spawn(builder(1).initializer(gate, dir.display().to_string()).build());
        // The worker is spawned and in its initializer: its handshake comes next,
        // then the parent opens its progress record.
        eventually("the worker waits at the gate", || dir.join("waiting").exists()).await;
        let hog = hog_descriptors(0);
        // Neither needs a descriptor.
        std::fs::remove_dir(dir.join("hold")).unwrap();
        let result = build.await.unwrap();
        drop(hog);
        let Err(err) = result else { panic!("the build succeeded") };
        assert!(err.is_worker_start(), "{err:?}");
        println!("ERROR {}", chain(&err));
        println!("ZOMBIES {} CHILDREN {}", zombie_children(), children_of(std::process::id()).len());
    }));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A worker already running when the parent cannot open its progress record (the
/// last step of a start) fails the build with a typed error, killed and reaped.
#[test]
fn a_start_out_of_descriptors_at_the_progress_record_fails_the_build_and_reaps_the_worker() {
    let stdout = run_helper("progress_record_helper");
    let error = value(&stdout, "ERROR");
    assert!(error.contains("cannot open its progress record") && error.contains("os error 24"), "{error}");
    assert!(error.contains("SIGKILL"), "it was killed: {error}");
    assert_eq!(value(&stdout, "ZOMBIES"), "0 CHILDREN 0", "{stdout}");
}
