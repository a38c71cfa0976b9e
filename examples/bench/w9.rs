//! W9: shared memory. Lock/unlock pairs and atomic adds across 2 worker processes
//! (against Python's `Value.get_lock()` and threads in one process), and a task
//! reading a 256 MiB buffer where it lies against the same bytes sent as input.

use std::process::{Command, Stdio};
use std::time::SystemTime;

use procexec::{Blob, Executor, Poisoned, SharedBytes, SharedValue, WorkerStderr};

use crate::table::{Better, Kind, Table};
use crate::{Config, runtime, timed_async};

const PAIRS: u64 = 2_000_000;
const BUFFER: usize = 256 << 20;

/// Seconds since the epoch: comparable across processes, unlike `Instant`.
fn now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Waits until `parties` processes have arrived, so they start together.
fn barrier(arrived: &SharedValue<u32>, parties: u32) {
    arrived.fetch_add(1);
    while arrived.load() < parties {
        std::thread::yield_now();
    }
}

pub fn lock_pairs(value: SharedValue<u64>, arrived: SharedValue<u32>, pairs: u64) -> (f64, f64) {
    barrier(&arrived, 2);
    let start = now();
    for _ in 0..pairs {
        *value.blocking_lock().unwrap_or_else(Poisoned::into_inner) += 1;
    }
    (start, now())
}

pub fn atomic_adds(value: SharedValue<u64>, arrived: SharedValue<u32>, adds: u64) -> (f64, f64) {
    barrier(&arrived, 2);
    let start = now();
    for _ in 0..adds {
        value.fetch_add(1);
    }
    (start, now())
}

/// The sum of `data`'s bytes, and this process's private memory then (RssAnon,
/// KiB) and its peak resident memory (VmHWM, KiB).
pub fn sum_bytes(data: &[u8]) -> (u64, u64, u64) {
    let sum = data.chunks(8).map(|c| c.iter().map(|&b| u64::from(b)).sum::<u64>()).sum();
    (sum, status_kib("RssAnon:"), status_kib("VmHWM:"))
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with(field))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

pub fn sum_shared(data: SharedBytes) -> (u64, u64, u64) {
    sum_bytes(&data)
}

pub fn sum_blob(data: Blob) -> (u64, u64, u64) {
    sum_bytes(&data)
}

/// Operations per second of 2 processes doing `per_process` each: all of them over
/// the span from the first start to the last end.
fn rate(spans: &[(f64, f64)], per_process: u64) -> f64 {
    let start = spans.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
    let end = spans.iter().map(|s| s.1).fold(0.0, f64::max);
    // How much the processes really ran at once (on a busy machine they may take
    // turns, and then contend less).
    let last_start = spans.iter().map(|s| s.0).fold(0.0, f64::max);
    let first_end = spans.iter().map(|s| s.1).fold(f64::INFINITY, f64::min);
    eprintln!(
        "    overlap of the 2 processes: {:.0}%",
        100.0 * ((first_end - last_start) / (end - start)).max(0.0)
    );
    (spans.len() as u64 * per_process) as f64 / (end - start)
}

/// Python's lock pairs per second, from bench/shared.py.
fn python_lock_pairs(quick: bool) -> Vec<f64> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/bench/shared.py");
    let mut command = Command::new("python3");
    command.arg(script).stderr(Stdio::inherit());
    if quick {
        command.arg("--quick");
    }
    match command.output() {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .nth(1)
            .map(|samples| samples.split(',').filter_map(|s| s.parse().ok()).collect())
            .unwrap_or_default(),
        _ => {
            eprintln!("note: python3 examples/bench/shared.py did not run; the Python peer is skipped");
            Vec::new()
        }
    }
}

pub fn w9(config: &Config, table: &mut Table) {
    let quick = config.reps < 5;
    let pairs = if quick { PAIRS / 10 } else { PAIRS };

    table.workload(
        "W9a",
        "W9 shared lock: lock, add 1, unlock, in 2 processes at once",
        "pairs/s",
        Better::Higher,
    );
    let label = "procexec SharedValue blocking_lock, 2 workers";
    if config.wants(label) {
        table.row(Kind::Procexec, label, in_two_workers(config.reps, pairs, false));
    }
    let label = "Python Value.get_lock(), 2 processes";
    if config.wants(label) {
        let samples = python_lock_pairs(quick);
        if !samples.is_empty() {
            table.row(Kind::Peer, label, samples);
        }
    }
    let label = "std Mutex, 2 threads of one process";
    if config.wants(label) {
        let samples =
            (0..config.reps).map(|_| threads(pairs, |m: &std::sync::Mutex<u64>| *m.lock().unwrap() += 1));
        table.row(Kind::InProcess, label, samples.collect());
    }

    table.workload("W9b", "W9 shared atomic: fetch_add(1) in 2 processes at once", "adds/s", Better::Higher);
    let label = "procexec SharedValue fetch_add, 2 workers";
    if config.wants(label) {
        table.row(Kind::Procexec, label, in_two_workers(config.reps, pairs, true));
    }
    let label = "AtomicU64 fetch_add, 2 threads of one process";
    if config.wants(label) {
        let samples = (0..config.reps).map(|_| {
            threads(pairs, |a: &std::sync::atomic::AtomicU64| {
                a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        });
        table.row(Kind::InProcess, label, samples.collect());
    }

    table.workload(
        "W9c",
        "W9 256 MiB read by a task: shared where it lies, or sent as input",
        "ms/call",
        Better::Lower,
    );
    let mut memory = Vec::new();
    for (label, shared) in
        [("procexec SharedBytes (zero copy)", true), ("procexec Blob input (through the pipe)", false)]
    {
        if !config.wants(label) {
            continue;
        }
        let (samples, kib) = runtime(false).block_on(async {
            // A fresh worker for each path, so its peak memory is this path's.
            let exec = Executor::builder()
                .processes(1)
                .stderr(WorkerStderr::Discard)
                .max_frame_len(BUFFER + (1 << 20))
                .build()
                .await
                .expect("the executor starts");
            let data = exec
                .shared_bytes_with(BUFFER, |buf| buf.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8))
                .unwrap();
            let blob = Blob::from(data.to_vec());
            let expected: u64 = (0..BUFFER).map(|i| u64::from(i as u8)).sum();
            let kib = std::cell::Cell::new((0, 0));
            let samples = timed_async(config.reps, || async {
                let (sum, anon, hwm) = if shared {
                    exec.spawn(crate::sum_shared, data.clone()).await.unwrap()
                } else {
                    exec.spawn(crate::sum_blob, blob.clone()).await.unwrap()
                };
                assert_eq!(sum, expected);
                let (peak_anon, peak_hwm) = kib.get();
                kib.set((peak_anon.max(anon), peak_hwm.max(hwm)));
            })
            .await;
            exec.shutdown().await;
            (samples, kib.get())
        });
        table.row(Kind::Procexec, label, samples.iter().map(|d| d.as_secs_f64() * 1e3).collect());
        memory.push((label, kib));
    }
    table.workload("W9d", "W9 256 MiB read: the worker's memory during the call", "MiB", Better::Lower);
    for (label, (anon, hwm)) in memory {
        table.row(Kind::Procexec, &format!("{label}: private (RssAnon)"), vec![anon as f64 / 1024.0]);
        table.row(Kind::Procexec, &format!("{label}: peak resident (VmHWM)"), vec![hwm as f64 / 1024.0]);
    }
}

/// Operations per second of 2 workers each doing `per_worker` lock pairs (or atomic
/// adds) on one shared value, `reps` times.
fn in_two_workers(reps: usize, per_worker: u64, atomic: bool) -> Vec<f64> {
    runtime(false).block_on(async {
        let exec = crate::executor_of(2).await;
        let mut samples = Vec::new();
        for _ in 0..reps {
            let value = exec.shared_value(0u64).unwrap();
            let arrived = exec.shared_value(0u32).unwrap();
            let inputs = vec![(value.clone(), arrived, per_worker); 2];
            let spans = if atomic {
                exec.map(crate::atomic_adds, inputs).await.unwrap()
            } else {
                exec.map(crate::lock_pairs, inputs).await.unwrap()
            };
            assert_eq!(value.load(), 2 * per_worker);
            samples.push(rate(&spans, per_worker));
        }
        exec.shutdown().await;
        samples
    })
}

/// Operations per second of 2 threads doing `per_thread` operations each on one
/// shared `T`.
fn threads<T: Default + Sync>(per_thread: u64, op: impl Fn(&T) + Sync) -> f64 {
    let shared = T::default();
    let start = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| (0..per_thread).for_each(|_| op(&shared)));
        }
    });
    (2 * per_thread) as f64 / start.elapsed().as_secs_f64()
}
