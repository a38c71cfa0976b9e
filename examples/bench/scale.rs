//! W11: the parent's cost as the pool grows (2 / 16 / 64 / 256 workers on this
//! machine, oversubscribed on purpose: what is measured is the parent's own cost
//! per worker). W12: payload size (1 KiB to 60 MiB, one echo at a time), MB/s and
//! the peak memory each process adds above its resident size before the echo.

use std::time::{Duration, Instant};

use procexec::Blob;

use crate::table::{Better, Kind, Table};
use crate::{Config, double, echo, echo_vec, peers, per_item, runtime, timed_async};

pub const POOLS: [usize; 4] = [2, 16, 64, 256];
const TINY: u64 = 100_000;
const SPAWNS: u64 = 10_000;

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count().saturating_sub(1))
}

pub fn w11(config: &Config, table: &mut Table) {
    // Each figure is one table; the pools are rows, so a ratio to the 2-worker row reads directly.
    let mut builds = Vec::new();
    let mut shutdowns = Vec::new();
    let mut descriptors = Vec::new();
    let mut maps = Vec::new();
    let mut spawns = Vec::new();
    let reps = config.reps;
    runtime(false).block_on(async {
        for &processes in &POOLS {
            let (mut build, mut shutdown, mut fds) = (Vec::new(), Vec::new(), Vec::new());
            let (mut map, mut spawn) = (Vec::new(), Vec::new());
            for rep in 0..reps.min(3) {
                let before = open_descriptors();
                let start = Instant::now();
                let exec = crate::executor_of(processes).await;
                build.push(start.elapsed());
                fds.push((open_descriptors() - before) as f64);
                exec.map(double, 0..10_000u64).await.unwrap();
                if rep == 0 {
                    map = timed_async(reps, || async {
                        let out = exec.map(double, 0..TINY).await.unwrap();
                        assert_eq!(out.len(), TINY as usize);
                    })
                    .await;
                    spawn = timed_async(reps, || async {
                        let handles: Vec<_> = (0..SPAWNS).map(|i| exec.spawn(double, i)).collect();
                        for (i, handle) in handles.into_iter().enumerate() {
                            assert_eq!(handle.await.unwrap(), 2 * i as u64);
                        }
                    })
                    .await;
                }
                let start = Instant::now();
                exec.shutdown().await;
                shutdown.push(start.elapsed());
            }
            builds.push((processes, build));
            shutdowns.push((processes, shutdown));
            descriptors.push((processes, fds));
            maps.push((processes, per_item(&map, TINY)));
            spawns.push((processes, per_item(&spawn, SPAWNS)));
        }
    });
    let ms = |samples: &[Duration]| -> Vec<f64> { samples.iter().map(|d| d.as_secs_f64() * 1e3).collect() };
    let python = if config.wants("Python") {
        let args = [TINY.to_string(), SPAWNS.to_string()];
        peers::python("W11", reps.min(3), &args).unwrap_or_default()
    } else {
        Vec::new()
    };
    let python_rows = |table: &mut Table, what: &str, scale: &dyn Fn(&peers::PythonResult) -> Vec<f64>| {
        for result in python.iter().filter(|r| r.peer.starts_with(what)) {
            table.row(Kind::Peer, &format!("Python {}", result.peer), scale(result));
        }
    };
    table.workload("W11a", "W11 pool size: build (all workers up)", "ms", Better::Lower);
    for (processes, samples) in &builds {
        table.row(Kind::Procexec, &format!("procexec build, {processes} workers"), ms(samples));
    }
    python_rows(table, "build", &|r| ms(&r.samples));
    table.workload("W11b", "W11 pool size: shutdown (all reaped)", "ms", Better::Lower);
    for (processes, samples) in &shutdowns {
        table.row(Kind::Procexec, &format!("procexec shutdown, {processes} workers"), ms(samples));
    }
    python_rows(table, "shutdown", &|r| ms(&r.samples));
    table.workload(
        "W11c",
        "W11 pool size: parent descriptors held by the pool",
        "descriptors",
        Better::Lower,
    );
    for (processes, samples) in descriptors {
        table.row(Kind::Procexec, &format!("procexec, {processes} workers"), samples);
    }
    table.workload(
        "W11d",
        "W11 pool size: map of 100,000 tiny tasks, current-thread",
        "µs/task",
        Better::Lower,
    );
    for (processes, samples) in maps {
        table.row(Kind::Procexec, &format!("procexec map, {processes} workers"), samples);
    }
    python_rows(table, "map", &|r| per_item(&r.samples, r.items));
    table.workload(
        "W11e",
        "W11 pool size: 10,000 spawns, then each awaited, current-thread",
        "µs/call",
        Better::Lower,
    );
    for (processes, samples) in spawns {
        table.row(Kind::Procexec, &format!("procexec spawn each, {processes} workers"), samples);
    }
    python_rows(table, "apply_async", &|r| per_item(&r.samples, r.items));
}

pub const PAYLOADS: [(usize, &str, usize); 4] =
    [(1024, "1 KiB", 2000), (1 << 20, "1 MiB", 200), (16 << 20, "16 MiB", 16), (60 << 20, "60 MiB", 6)];

/// VmRSS and VmHWM of a process, in bytes.
fn memory(pid: &str) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|line| line.starts_with(name))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets a process's peak resident size to its current one; returns that size.
fn reset_peak(pid: &str) -> u64 {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    memory(pid).map_or(0, |(rss, _)| rss)
}

/// How far above `base` a process's resident size peaked.
fn peak_above(pid: &str, base: u64) -> u64 {
    memory(pid).map_or(0, |(_, hwm)| hwm.saturating_sub(base))
}

pub fn w12(config: &Config, table: &mut Table) {
    let mut rates: Vec<(String, Vec<f64>)> = Vec::new();
    let mut peaks: Vec<(String, Vec<f64>)> = Vec::new();
    runtime(false).block_on(async {
        // One worker: every echo goes to it, so its peak is the one measured.
        let exec = crate::executor_of(1).await;
        exec.spawn(double, 1).await.unwrap();
        let worker = exec.stats().live[0].pid.to_string();
        for (size, name, calls) in PAYLOADS {
            for vec in [false, true] {
                let kind = if vec { "Vec<u8>" } else { "Blob" };
                let label = format!("{name}, {kind}");
                if !config.wants(&label) {
                    continue;
                }
                let calls = if vec && size >= 16 << 20 { calls / 2 } else { calls }.max(2);
                let (mut rate, mut parent_peak, mut worker_peak) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..config.reps.min(5) {
                    let data = vec![7u8; size];
                    let blob = Blob::from(data.clone());
                    // Warm: the first call at a size grows buffers.
                    if vec {
                        exec.spawn(echo_vec, data.clone()).await.unwrap();
                    } else {
                        exec.spawn(echo, blob.clone()).await.unwrap();
                    }
                    // Peak memory over one call, its input already made: what the call
                    // itself adds in each process, beyond the caller's input.
                    let input = vec.then(|| data.clone());
                    let parent_base = reset_peak("self");
                    let worker_base = reset_peak(&worker);
                    match input {
                        Some(input) => drop(exec.spawn(echo_vec, input).await.unwrap()),
                        None => drop(exec.spawn(echo, blob.clone()).await.unwrap()),
                    }
                    parent_peak.push(peak_above("self", parent_base) as f64 / size as f64);
                    worker_peak.push(peak_above(&worker, worker_base) as f64 / size as f64);
                    let mut took = Duration::ZERO;
                    for _ in 0..calls {
                        if vec {
                            let input = data.clone();
                            let start = Instant::now();
                            let out = exec.spawn(echo_vec, input).await.unwrap();
                            took += start.elapsed();
                            assert_eq!(out.len(), size);
                            drop(out);
                        } else {
                            let start = Instant::now();
                            let out = exec.spawn(echo, blob.clone()).await.unwrap();
                            took += start.elapsed();
                            assert_eq!(out.len(), size);
                        }
                    }
                    rate.push(2.0 * (size * calls) as f64 / took.as_secs_f64() / 1e6);
                }
                rates.push((format!("procexec echo {label}"), rate));
                peaks.push((format!("procexec echo {label}: parent"), parent_peak));
                peaks.push((format!("procexec echo {label}: worker"), worker_peak));
            }
        }
        exec.shutdown().await;
    });
    let python = if config.wants("Python") {
        let args: Vec<String> =
            PAYLOADS.iter().flat_map(|(size, _, calls)| [size.to_string(), calls.to_string()]).collect();
        peers::python("W12", config.reps.min(3), &args).unwrap_or_default()
    } else {
        Vec::new()
    };
    table.workload("W12", "W12 payload: one echo at a time, 1 worker", "MB/s both ways", Better::Higher);
    for (label, samples) in rates {
        table.row(Kind::Procexec, &label, samples);
    }
    for result in &python {
        let bytes = 2.0 * result.items as f64;
        let samples = result.samples.iter().map(|d| bytes / d.as_secs_f64() / 1e6).collect();
        table.row(Kind::Peer, &format!("Python {}", result.peer), samples);
    }
    table.workload(
        "W12m",
        "W12 payload: peak resident memory one echo adds, per process (input made before)",
        "x payload",
        Better::Lower,
    );
    for (label, samples) in peaks {
        table.row(Kind::Procexec, &label, samples);
    }
}
