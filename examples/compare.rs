//! The article's comparison of processes and threads, measured in Rust.
//!
//! In Python, CPU-bound work favours processes (threads hold the GIL) and IO-bound
//! work favours threads. Rust has no GIL, so this measures honestly and prints what
//! each approach costs and where processes still win: a runaway task can be killed,
//! a crash stays contained, and memory comes back when a worker is recycled.
//!
//! Run: `cargo run --release --example compare`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use procexec::{Executor, WorkerStderr};

procexec::tasks! {
    /// CPU-bound: `iterations` steps of a linear congruential generator.
    pub fn compute(iterations: u64) -> u64 { work(iterations) }

    /// IO-bound stand-in: waits `ms` milliseconds.
    pub fn wait_ms(ms: u64) { std::thread::sleep(Duration::from_millis(ms)) }

    /// A runaway task: never returns.
    pub fn runaway() -> u64 { loop { std::hint::spin_loop() } }

    /// A task that crashes its process.
    pub fn crash() -> u64 { std::process::abort() }

    /// Allocates and leaks `mb` MiB, as a leaky library might; returns this
    /// process's resident memory in MiB.
    pub fn leak_mb(mb: u64) -> u64 {
        std::mem::forget(std::hint::black_box(vec![1u8; (mb as usize) << 20]));
        resident_mib()
    }
}

fn work(iterations: u64) -> u64 {
    let mut x = iterations;
    for _ in 0..iterations {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
    }
    std::hint::black_box(x)
}

fn resident_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:")?.trim().strip_suffix(" kB")?.parse().ok())
        .unwrap_or(0);
    kib / 1024
}

fn row(what: &str, how: &str, value: String) {
    println!("  {what:<34} {how:<40} {value}");
}

fn main() -> procexec::Result<()> {
    // In a worker process this never returns. Called before any runtime exists,
    // so the workers carry none.
    procexec::init_worker(&TASKS);
    tokio::runtime::Runtime::new().expect("a Tokio runtime").block_on(run())
}

async fn run() -> procexec::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("abort-in-a-thread") {
        // Run as a child of the crash demonstration below.
        let thread = std::thread::spawn(|| std::process::abort());
        let _ = thread.join();
        return Ok(());
    }
    let cpus = procexec::cpu_count();
    let exec = Executor::builder().stderr(WorkerStderr::Discard).build().await?;
    println!("{cpus} CPUs; procexec with {} worker processes\n", exec.processes());

    // Calibrate one CPU-bound task to about 50 ms.
    let start = Instant::now();
    work(1_000_000);
    let iterations = (1_000_000.0 * 0.050 / start.elapsed().as_secs_f64()) as u64;
    let tasks = 8 * cpus;

    println!("CPU-bound: {tasks} tasks of ~50 ms of pure compute (wall time; speed-up over one thread)");
    let start = Instant::now();
    (0..tasks).for_each(|_| {
        work(iterations);
    });
    let sequential = start.elapsed();
    row("one thread", "a loop", format!("{sequential:>10.2?}   1.00x"));
    let speedup = |d: Duration| format!("{d:>10.2?}   {:.2}x", sequential.as_secs_f64() / d.as_secs_f64());
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..cpus {
            scope.spawn(|| {
                (0..tasks / cpus).for_each(|_| {
                    work(iterations);
                })
            });
        }
    });
    row("threads", "std::thread::scope, one per CPU", speedup(start.elapsed()));
    let start = Instant::now();
    {
        use rayon::prelude::*;
        (0..tasks).into_par_iter().for_each(|_| {
            work(iterations);
        });
    }
    row("rayon", "par_iter", speedup(start.elapsed()));
    let start = Instant::now();
    exec.map(compute, vec![iterations; tasks]).await?;
    row("processes", "procexec map", speedup(start.elapsed()));
    println!(
        "  -> no GIL in Rust: threads, rayon and processes all scale; processes pay a little to cross the pipes.\n"
    );

    let waits = 200;
    println!("IO-bound: {waits} tasks that each wait 20 ms (wall time)");
    let start = Instant::now();
    let sleeps: Vec<_> =
        (0..waits).map(|_| tokio::spawn(tokio::time::sleep(Duration::from_millis(20)))).collect();
    for sleep in sleeps {
        let _ = sleep.await;
    }
    row("async tasks", "tokio::spawn + sleep", format!("{:>10.2?}", start.elapsed()));
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..waits {
            scope.spawn(|| std::thread::sleep(Duration::from_millis(20)));
        }
    });
    row("threads", "one thread per task", format!("{:>10.2?}", start.elapsed()));
    let start = Instant::now();
    exec.map(wait_ms, vec![20; waits]).await?;
    row(
        "processes",
        &format!("procexec map, {} workers", exec.processes()),
        format!("{:>10.2?}", start.elapsed()),
    );
    let wide = Executor::builder().processes(32).stderr(WorkerStderr::Discard).build().await?;
    let start = Instant::now();
    wide.map(wait_ms, vec![20; waits]).await?;
    row("processes", "procexec map, 32 workers", format!("{:>10.2?}", start.elapsed()));
    wide.shutdown().await;
    println!("  -> waiting is what async does best; a process per concurrent wait is the wrong tool.\n");

    println!("Where processes win");
    // A runaway thread cannot be stopped: a timeout only stops waiting for it. A
    // plain thread, because the runtime's shutdown waits for `spawn_blocking` work
    // and this program would never end; `finished` would fire if the thread did.
    let spins = Arc::new(AtomicU64::new(0));
    let counter = spins.clone();
    let (finished, runaway_thread) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _finished = finished;
        loop {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let timed_out = tokio::time::timeout(Duration::from_millis(100), runaway_thread).await.is_err();
    let before = spins.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let still_running = spins.load(Ordering::Relaxed) > before;
    row(
        "runaway task, 100 ms timeout",
        "thread (tokio::time::timeout)",
        format!("timed out: {timed_out}; still burning a CPU afterwards: {still_running}"),
    );
    let err = exec.with_timeout(Duration::from_millis(100)).spawn(runaway, ()).await.unwrap_err();
    row("", "process (procexec with_timeout)", format!("{err}; its worker was killed and replaced"));

    // An abort in a thread takes the whole process down; run it in a child to watch.
    let status = std::process::Command::new(std::env::current_exe().expect("this program"))
        .arg("abort-in-a-thread")
        .stderr(std::process::Stdio::null())
        .status()
        .expect("the child runs");
    row("crash (abort)", "in a thread", format!("the whole process died: {status}"));
    let err = exec.spawn(crash, ()).await.unwrap_err();
    row(
        "",
        "in a process (procexec)",
        format!("one call failed ({}); the executor serves on", err.crash().map_or("", |c| c.task())),
    );
    assert_eq!(exec.spawn(compute, 10).await?, work(10));

    // Memory a leaky task holds stays with the process that ran it.
    let before = resident_mib();
    std::thread::spawn(|| std::mem::forget(std::hint::black_box(vec![1u8; 200 << 20])))
        .join()
        .expect("the thread ran");
    row(
        "a task leaks 200 MiB",
        "in a thread",
        format!("this process grew from {before} to {} MiB, for good", resident_mib()),
    );
    let recycled = Executor::builder()
        .processes(1)
        .max_tasks_per_worker(1)
        .stderr(WorkerStderr::Discard)
        .build()
        .await?;
    let worker_rss = recycled.spawn(leak_mb, 200).await?;
    let fresh = recycled.spawn(leak_mb, 0).await?;
    row(
        "",
        "in a recycled worker (max_tasks_per_worker)",
        format!("the worker reached {worker_rss} MiB; its replacement holds {fresh} MiB"),
    );
    recycled.shutdown().await;
    exec.shutdown().await;

    println!("\nIn short: threads (or rayon) for CPU work you trust, async for waiting, and");
    println!("processes for work you must be able to stop, that may crash, or that leaks.");
    println!(
        "\n(The runaway thread is still spinning: nothing can stop a thread, so it ends only when this \
         process exits, now.)"
    );
    Ok(())
}
