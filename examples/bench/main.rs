//! procexec's benchmark: every workload against every peer in one run, one table.
//!
//! Run: `cargo run --release --example bench` (`-- --quick` for fewer repetitions,
//! `-- W1 W5` for some workloads only; in W1, W3 and W6, `-- --row=raw` for the
//! rows whose label contains "raw" only, the Python rows being selected as
//! "Python"). The peers: Python's multiprocessing
//! (bench/peers.py, skipped with a note if python3 is absent), the procspawn crate,
//! rayon and tokio's blocking pool (in-process bounds), and the limit: a minimal
//! parent/child pair over raw pipes (raw.rs). W7 measures channels (w7.rs) against
//! Python's `Queue` and `Pipe` (bench/channels.py) and raw pipes carrying framed
//! messages (chan_raw.rs). W9 measures shared memory (w9.rs) against Python's
//! `Value.get_lock()` (bench/shared.py) and threads; W10 the cost of forwarding the
//! workers' `tracing` events (w10.rs); W11 and W12 (scale.rs) measure pool sizes 2 to
//! 256 and payloads 1 KiB to 60 MiB. `-- W8`, only when named, load-tests examples/service.rs
//! with `wrk` (scripts/service-load). `-- WC`, only when named, runs W1, W3 and W5
//! through ssh and srun against local workers (cluster.rs, the daemons of
//! scripts/test-cluster). Every figure is the median of several repetitions;
//! ratios compare figures measured in this same run.

mod chan_raw;
mod cluster;
mod peers;
mod pin;
mod raw;
mod scale;
mod table;
mod w10;
mod w7;
mod w9;

use std::time::{Duration, Instant};

use futures::StreamExt;
use procexec::{Executor, WorkerStderr};
use table::{Better, Kind, Table};

procexec::tasks! {
    /// W1, W5: the tiniest task.
    pub fn double(x: u64) -> u64 { 2 * x }

    /// W2: pure compute, `iterations` steps of a linear congruential generator.
    pub fn compute(iterations: u64) -> u64 { work(iterations) }

    /// W3: sends the payload back (a Blob: written once, shared on arrival).
    pub fn echo(data: procexec::Blob) -> procexec::Blob { data }

    /// W10: a plain byte vector back (through serde, unlike a Blob: what the
    /// `Vec<u8>` warning is about, measured).
    #[allow(deprecated)]
    pub fn echo_vec(data: Vec<u8>) -> Vec<u8> { data }

    /// The worker's process id.
    pub fn worker_pid() -> u32 { std::process::id() }

    /// W7: puts `count` copies of a `size`-byte item.
    pub fn produce(queue: procexec::Queue<procexec::Blob>, count: u64, size: usize) {
        w7::produce(queue, count, size)
    }

    /// W7: takes items until the queue is closed and empty; how many bytes came.
    pub fn consume(queue: procexec::Queue<procexec::Blob>) -> u64 { w7::consume(queue) }

    /// W7: streams `2 * i` for every `i` below `count`.
    pub fn doubles(count: u64, out: procexec::Sender<u64>) { w7::doubles(count, out) }

    /// W7: streams `count` results of `iterations` steps of work.
    pub fn works(count: u64, iterations: u64, out: procexec::Sender<u64>) { w7::works(count, iterations, out) }

    /// W9: `pairs` lock, add, unlock; when it started and ended.
    pub fn lock_pairs(value: procexec::SharedValue<u64>, arrived: procexec::SharedValue<u32>, pairs: u64) -> (f64, f64) {
        w9::lock_pairs(value, arrived, pairs)
    }

    /// W9: `adds` atomic adds; when it started and ended.
    pub fn atomic_adds(value: procexec::SharedValue<u64>, arrived: procexec::SharedValue<u32>, adds: u64) -> (f64, f64) {
        w9::atomic_adds(value, arrived, adds)
    }

    /// W9: sums a shared buffer; with the worker's memory.
    pub fn sum_shared(data: procexec::SharedBytes) -> (u64, u64, u64) { w9::sum_shared(data) }

    /// W10: `double` with one `debug!` event.
    pub fn double_logged(x: u64) -> u64 { w10::double_logged(x) }

    /// W10: `double`, printing one line.
    pub fn double_printed(x: u64) -> u64 { w10::double_printed(x) }

    /// W9: sums the same bytes sent as input.
    pub fn sum_blob(data: procexec::Blob) -> (u64, u64, u64) { w9::sum_blob(data) }
}

/// Pure compute the optimizer cannot remove.
pub fn work(iterations: u64) -> u64 {
    let mut x = iterations;
    for _ in 0..iterations {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
    }
    std::hint::black_box(x)
}

const W1_CALLS: u64 = 100_000;
const W1_SLOW_CALLS: u64 = 10_000;
const W2_TASKS: usize = 64;
const W2_TASK: Duration = Duration::from_millis(20);
const W3_TASKS: usize = 2_000;
const W3_SIZE: usize = 256 * 1024;
const W5_CALLS: usize = 2_000;
const W6_FEW: u64 = 10_000;
const W6_MANY: u64 = 100_000;

struct Config {
    reps: usize,
    only: Vec<String>,
    /// Lower-case texts; a row runs when its label contains one (or none are given).
    rows: Vec<String>,
}

impl Config {
    fn runs(&self, workload: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|w| w.eq_ignore_ascii_case(workload))
    }

    fn wants(&self, label: &str) -> bool {
        let label = label.to_lowercase();
        self.rows.is_empty() || self.rows.iter().any(|text| label.contains(text.as_str()))
    }
}

fn main() {
    procexec::init_worker(&TASKS);
    procspawn::init();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("raw-child") {
        raw::child(&args[2]);
        return;
    }
    if args.get(1).map(String::as_str) == Some("chan-child") {
        chan_raw::child(&args[2..]);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let config = Config {
        reps: if quick { 3 } else { 7 },
        only: args[1..].iter().filter(|a| !a.starts_with("--")).cloned().collect(),
        rows: args.iter().filter_map(|a| a.strip_prefix("--row=")).map(str::to_lowercase).collect(),
    };
    let mut table = Table::default();
    // Hidden: the channels benchmark's limit and Python peers alone.
    if config.rows.iter().any(|row| row == "chanpeers") {
        chan_raw::smoke(quick, &mut table);
        table.print();
        return;
    }
    println!("procexec benchmark: {} repetitions per figure, medians; 2 workers unless noted\n", config.reps);
    // Start-up first, in a fresh process, as a service starts its executor at
    // boot; then latency, the most sensitive to noise.
    if config.runs("W4") {
        w4(&config, &mut table);
    }
    if config.runs("W5") {
        w5(&config, &mut table);
    }
    if config.runs("W1") {
        w1(&config, &mut table);
    }
    if config.runs("W2") {
        w2(&config, &mut table);
    }
    if config.runs("W3") {
        w3(&config, &mut table);
    }
    if config.runs("W6") {
        w6(&config, &mut table);
    }
    if config.runs("W7") {
        w7::w7(&config, &mut table);
    }
    if config.runs("W9") {
        w9::w9(&config, &mut table);
    }
    if config.runs("W11") {
        scale::w11(&config, &mut table);
    }
    if config.runs("W12") {
        scale::w12(&config, &mut table);
    }
    // Only when named: it needs the daemons of scripts/test-cluster.
    if config.only.iter().any(|workload| workload.eq_ignore_ascii_case("WC")) {
        cluster::wc(&config, &mut table);
    }
    // Last: it installs a global subscriber.
    if config.runs("W10") {
        w10::w10(&config, &mut table);
    }
    // Only when named: it installs `wrk` (from Debian) if missing, and builds and
    // loads the service example.
    if config.only.iter().any(|workload| workload.eq_ignore_ascii_case("W8")) {
        service_load(quick);
    }
    table.print();
}

/// W8: examples/service.rs under `wrk`, against the same handler on `spawn_blocking`
/// and inline (`scripts/service-load`, which prints its own table).
fn service_load(quick: bool) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/service-load");
    let mut command = std::process::Command::new(script);
    if quick {
        command.arg("--quick");
    }
    match command.status() {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!("W8: {script} ended with {status}"),
        Err(err) => eprintln!("W8: cannot run {script}: {err}"),
    }
}

fn runtime(multi: bool) -> tokio::runtime::Runtime {
    let mut builder = if multi {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().build().expect("a runtime")
}

fn flavor(multi: bool) -> &'static str {
    if multi { "multi-thread" } else { "current-thread" }
}

async fn executor() -> Executor {
    executor_of(2).await
}

/// An executor of `processes` workers, their stderr discarded.
async fn executor_of(processes: usize) -> Executor {
    Executor::builder()
        .processes(processes)
        .stderr(WorkerStderr::Discard)
        .build()
        .await
        .expect("the executor starts")
}

fn per_item(samples: &[Duration], items: u64) -> Vec<f64> {
    samples.iter().map(|d| d.as_secs_f64() * 1e6 / items as f64).collect()
}

fn timed<F: FnMut()>(reps: usize, mut run: F) -> Vec<Duration> {
    (0..reps)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed()
        })
        .collect()
}

async fn timed_async<F, Fut>(reps: usize, mut run: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        run().await;
        samples.push(start.elapsed());
    }
    samples
}

fn w1(config: &Config, table: &mut Table) {
    let name = "W1 tiny tasks: 100,000 calls of i -> 2*i, outputs in input order";
    table.workload("W1", name, "µs/task", Better::Lower);
    for multi in [true, false] {
        let map_label = format!("(a) procexec map, {}", flavor(multi));
        let spawn_label = format!("(b) procexec spawn each, {}", flavor(multi));
        if !config.wants(&map_label) && !config.wants(&spawn_label) {
            continue;
        }
        runtime(multi).block_on(async {
            let exec = executor().await;
            exec.map(double, 0..10_000u64).await.unwrap();
            if config.wants(&map_label) {
                let maps = timed_async(config.reps, || async {
                    let out = exec.map(double, 0..W1_CALLS).await.unwrap();
                    assert_eq!(out[W1_CALLS as usize - 1], 2 * (W1_CALLS - 1));
                })
                .await;
                table.row(Kind::Procexec, &map_label, per_item(&maps, W1_CALLS));
            }
            if config.wants(&spawn_label) {
                let spawns = timed_async(config.reps, || async {
                    let handles: Vec<_> = (0..W1_CALLS).map(|i| exec.spawn(double, i)).collect();
                    for (i, handle) in handles.into_iter().enumerate() {
                        assert_eq!(handle.await.unwrap(), 2 * i as u64);
                    }
                })
                .await;
                table.row(Kind::Procexec, &spawn_label, per_item(&spawns, W1_CALLS));
            }
            exec.shutdown().await;
        });
    }
    let args = [W1_CALLS.to_string(), W1_SLOW_CALLS.to_string()];
    let python = if config.wants("Python") { peers::python("W1", config.reps, &args) } else { None };
    for result in python.unwrap_or_default() {
        table.row(Kind::Peer, &format!("Python {}", result.peer), per_item(&result.samples, result.items));
    }
    let label = "procspawn Pool::spawn + join";
    if config.wants(label) {
        let procspawn = peers::procspawn_tiny(config.reps.min(3), W1_SLOW_CALLS);
        table.row(Kind::Peer, label, per_item(&procspawn, W1_SLOW_CALLS));
    }
    let label = "rayon par_iter (2 threads, in-process)";
    if config.wants(label) {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let rayon = timed(config.reps, || {
            use rayon::prelude::*;
            let out: Vec<u64> = pool.install(|| (0..W1_CALLS).into_par_iter().map(peers::double).collect());
            assert_eq!(out.len(), W1_CALLS as usize);
        });
        table.row(Kind::InProcess, label, per_item(&rayon, W1_CALLS));
    }
    let label = "tokio spawn_blocking (2 threads, in-process)";
    if config.wants(label) {
        let blocking =
            tokio::runtime::Builder::new_multi_thread().max_blocking_threads(2).enable_all().build().unwrap();
        let spawn_blocking = blocking.block_on(timed_async(config.reps, || async {
            let handles: Vec<_> =
                (0..W1_CALLS).map(|i| tokio::task::spawn_blocking(move || peers::double(i))).collect();
            for handle in handles {
                handle.await.unwrap();
            }
        }));
        table.row(Kind::InProcess, label, per_item(&spawn_blocking, W1_CALLS));
    }
    // Timed inside, from the moment both children run.
    let label = "raw pipes, batched 8-byte items";
    if config.wants(label) {
        let limit: Vec<Duration> = (0..config.reps).map(|_| raw::batched_items(W1_CALLS as usize)).collect();
        table.row(Kind::Limit, label, per_item(&limit, W1_CALLS));
    }
}

fn w2(config: &Config, table: &mut Table) {
    // One task of about 20 ms of compute on this machine.
    let mut iterations = 1_000_000;
    let start = Instant::now();
    work(iterations);
    iterations = (iterations as f64 * W2_TASK.as_secs_f64() / start.elapsed().as_secs_f64()) as u64;
    let name = format!("W2 CPU-bound: {W2_TASKS} tasks of ~20 ms; efficiency = sequential / (parallel x 2)");
    table.workload("W2", &name, "efficiency", Better::Higher);
    let sequential = median(&timed(config.reps.min(5), || {
        for _ in 0..W2_TASKS {
            work(iterations);
        }
    }));
    let efficiency = |samples: Vec<Duration>| -> Vec<f64> {
        samples.iter().map(|d| sequential.as_secs_f64() / (d.as_secs_f64() * 2.0)).collect()
    };
    runtime(true).block_on(async {
        let exec = executor().await;
        exec.map(compute, [iterations / 10; 4]).await.unwrap();
        let maps = timed_async(config.reps.min(5), || async {
            exec.map(compute, vec![iterations; W2_TASKS]).await.unwrap();
        })
        .await;
        table.row(Kind::Procexec, "procexec map", efficiency(maps));
        let spawns = timed_async(config.reps.min(5), || async {
            let handles: Vec<_> = (0..W2_TASKS).map(|_| exec.spawn(compute, iterations)).collect();
            for handle in handles {
                handle.await.unwrap();
            }
        })
        .await;
        table.row(Kind::Procexec, "procexec spawn each", efficiency(spawns));
        exec.shutdown().await;
    });
    let target = W2_TASK.as_secs_f64().to_string();
    if let Some(results) = peers::python("W2", config.reps.min(3), &[W2_TASKS.to_string(), target]) {
        let sequential =
            results.iter().find(|r| r.peer.starts_with("sequential")).map(|r| median(&r.samples));
        for result in results.iter().filter(|r| !r.peer.starts_with("sequential")) {
            if let Some(sequential) = sequential {
                let values = result
                    .samples
                    .iter()
                    .map(|d| sequential.as_secs_f64() / (d.as_secs_f64() * 2.0))
                    .collect();
                table.row(Kind::Peer, &format!("Python {} (its own 20 ms tasks)", result.peer), values);
            }
        }
    }
    table.row(
        Kind::Peer,
        "procspawn Pool::spawn + join",
        efficiency(peers::procspawn_work(config.reps.min(3), W2_TASKS, iterations)),
    );
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let rayon = timed(config.reps.min(5), || {
        use rayon::prelude::*;
        pool.install(|| {
            (0..W2_TASKS).into_par_iter().for_each(|_| {
                work(iterations);
            })
        });
    });
    table.row(Kind::InProcess, "rayon par_iter (2 threads, in-process)", efficiency(rayon));
    let blocking =
        tokio::runtime::Builder::new_multi_thread().max_blocking_threads(2).enable_all().build().unwrap();
    let spawn_blocking = blocking.block_on(timed_async(config.reps.min(5), || async {
        let handles: Vec<_> =
            (0..W2_TASKS).map(|_| tokio::task::spawn_blocking(move || work(iterations))).collect();
        for handle in handles {
            handle.await.unwrap();
        }
    }));
    table.row(Kind::InProcess, "tokio spawn_blocking (2 threads, in-process)", efficiency(spawn_blocking));
    table.row(Kind::Limit, "perfect scaling", vec![1.0]);
}

fn w3(config: &Config, table: &mut Table) {
    let name = format!("W3 payload: {W3_TASKS} tasks, each sends 256 KiB and gets it back");
    table.workload("W3", &name, "MB/s both ways", Better::Higher);
    let bytes = 2.0 * (W3_TASKS * W3_SIZE) as f64;
    let throughput = |samples: Vec<Duration>| -> Vec<f64> {
        samples.iter().map(|d| bytes / d.as_secs_f64() / 1e6).collect()
    };
    let label = "procexec map_unordered";
    if config.wants(label) {
        runtime(true).block_on(async {
            let exec = executor().await;
            let payload = procexec::Blob::from(vec![7u8; W3_SIZE]);
            let maps = timed_async(config.reps.min(5), || async {
                let inputs = std::iter::repeat_n(payload.clone(), W3_TASKS);
                let mut outputs = exec.map_unordered(echo, futures::stream::iter(inputs));
                while let Some(output) = outputs.next().await {
                    assert_eq!(output.unwrap().len(), W3_SIZE);
                }
            })
            .await;
            table.row(Kind::Procexec, label, throughput(maps));
            exec.shutdown().await;
        });
    }
    let args = [W3_TASKS.to_string(), W3_SIZE.to_string()];
    let python = if config.wants("Python") { peers::python("W3", config.reps.min(3), &args) } else { None };
    for result in python.unwrap_or_default() {
        table.row(Kind::Peer, &format!("Python {}", result.peer), throughput(result.samples));
    }
    let label = "procspawn Pool::spawn + join";
    if config.wants(label) {
        table.row(
            Kind::Peer,
            label,
            throughput(peers::procspawn_echo(config.reps.min(3), W3_TASKS, W3_SIZE)),
        );
    }
    // Timed inside, from the moment both children run.
    let label = "raw pipes, echo (same 1 MiB pipes)";
    if config.wants(label) {
        let limit = (0..config.reps.min(5)).map(|_| raw::echo(W3_TASKS, W3_SIZE)).collect();
        table.row(Kind::Limit, label, throughput(limit));
    }
}

fn w4(config: &Config, table: &mut Table) {
    let reps = config.reps * 2;
    let (mut startups, mut teardowns) = (Vec::new(), Vec::new());
    runtime(true).block_on(async {
        executor().await.shutdown().await; // warm the page cache
        for _ in 0..reps {
            let start = Instant::now();
            let exec = executor().await;
            exec.spawn(double, 1).await.unwrap();
            startups.push(start.elapsed());
            let start = Instant::now();
            exec.shutdown().await;
            teardowns.push(start.elapsed());
        }
    });
    let ms = |samples: &[Duration]| -> Vec<f64> { samples.iter().map(|d| d.as_secs_f64() * 1e3).collect() };
    let python = peers::python("W4", reps, &[]).unwrap_or_default();
    let procspawn: Vec<_> = (0..reps).map(|_| peers::procspawn_startup()).collect();
    let bare: Vec<_> = (0..reps).map(|_| raw::bare_spawn()).collect();
    for (phase, id, name) in
        [(0, "W4", "W4 start-up: 2 workers up and a first task done"), (1, "W4b", "W4 teardown")]
    {
        table.workload(id, name, "ms", Better::Lower);
        let (ours, label) = if phase == 0 {
            (&startups, "procexec build + first spawn")
        } else {
            (&teardowns, "procexec shutdown (all reaped)")
        };
        table.row(Kind::Procexec, label, ms(ours));
        if let Some(result) = python.get(phase) {
            table.row(Kind::Peer, &format!("Python {}", result.peer), ms(&result.samples));
        }
        let label = if phase == 0 { "procspawn Pool::new(2) + first call" } else { "procspawn shutdown" };
        let pick = |p: &(Duration, Duration)| if phase == 0 { p.0 } else { p.1 };
        table.row(Kind::Peer, label, ms(&procspawn.iter().map(pick).collect::<Vec<_>>()));
        let label = if phase == 0 {
            "bare spawn of 2 children, both running"
        } else {
            "bare teardown (close stdin, wait)"
        };
        table.row(Kind::Limit, label, ms(&bare.iter().map(pick).collect::<Vec<_>>()));
    }
}

fn w5(config: &Config, table: &mut Table) {
    let micros =
        |samples: &[Duration]| -> Vec<f64> { samples.iter().map(|d| d.as_secs_f64() * 1e6).collect() };
    let calls = (W5_CALLS * config.reps / 3).max(W5_CALLS);
    for placement in [pin::Placement::CrossCpu, pin::Placement::SameCpu] {
        let id = if matches!(placement, pin::Placement::CrossCpu) { "W5" } else { "W5s" };
        let name = format!("W5 latency: one trivial call at a time, round trip, {}", placement.label());
        table.workload(id, &name, "µs", Better::Lower);
        for multi in [true, false] {
            runtime(multi).block_on(async {
                let exec = executor().await;
                // Both workers on the workers' CPU (calls go to either).
                let pids: std::collections::HashSet<u32> =
                    exec.map(worker_pid, [(); 64]).await.unwrap().into_iter().collect();
                pids.iter().for_each(|&pid| placement.pin_child(pid));
                placement.pin_parent();
                for i in 0..200 {
                    exec.spawn(double, i).await.unwrap();
                }
                let mut rtts = Vec::with_capacity(calls);
                for i in 0..calls as u64 {
                    let start = Instant::now();
                    exec.spawn(double, i).await.unwrap();
                    rtts.push(start.elapsed());
                }
                table.row(
                    Kind::Procexec,
                    &format!("procexec spawn().await, {}", flavor(multi)),
                    micros(&rtts),
                );
                exec.shutdown().await;
            });
            pin::unpin_parent();
        }
        table.row(Kind::Limit, "raw pipes, 8-byte ping-pong", micros(&raw::ping_pong(calls, placement)));
        pin::unpin_parent();
    }
    // The peers, left to the scheduler, with procexec beside them the same way.
    table.workload("W5p", "W5 latency, placement left to the scheduler", "µs", Better::Lower);
    for multi in [true, false] {
        runtime(multi).block_on(async {
            let exec = executor().await;
            let mut rtts = Vec::with_capacity(calls);
            for i in 0..calls as u64 {
                let start = Instant::now();
                exec.spawn(double, i).await.unwrap();
                rtts.push(start.elapsed());
            }
            table.row(Kind::Procexec, &format!("procexec spawn().await, {}", flavor(multi)), micros(&rtts));
            exec.shutdown().await;
        });
    }
    if let Some(results) = peers::python("W5", 1, &[W5_CALLS.to_string()]) {
        for result in results {
            table.row(Kind::Peer, &format!("Python {}", result.peer), micros(&result.samples));
        }
    }
    table.row(Kind::Peer, "procspawn Pool::spawn + join", micros(&peers::procspawn_latency(W5_CALLS)));
    table.row(
        Kind::Limit,
        "raw pipes, 8-byte ping-pong",
        micros(&raw::ping_pong(calls, pin::Placement::Free)),
    );
}

fn w6(config: &Config, table: &mut Table) {
    let name = "W6 many calls: spawns awaited together with join_all, current-thread runtime";
    table.workload("W6", name, "ms", Better::Lower);
    let few_label = "procexec 10,000 spawns + join_all";
    let many_label = "procexec 100,000 spawns + join_all";
    // The point is the ratio of the two, so both run, interleaved, or neither.
    if !config.wants(few_label) && !config.wants(many_label) {
        return;
    }
    let (mut few, mut many) = (Vec::new(), Vec::new());
    runtime(false).block_on(async {
        let exec = executor().await;
        exec.map(double, 0..10_000u64).await.unwrap();
        let join_all = |calls: u64| {
            let exec = &exec;
            async move {
                let start = Instant::now();
                let handles: Vec<_> = (0..calls).map(|i| exec.spawn(double, i)).collect();
                let outputs = futures::future::join_all(handles).await;
                let took = start.elapsed();
                assert_eq!(*outputs[calls as usize - 1].as_ref().unwrap(), 2 * (calls - 1));
                took
            }
        };
        for _ in 0..config.reps {
            few.push(join_all(W6_FEW).await);
            many.push(join_all(W6_MANY).await);
        }
        exec.shutdown().await;
    });
    let ms = |samples: &[Duration]| -> Vec<f64> { samples.iter().map(|d| d.as_secs_f64() * 1e3).collect() };
    table.row(Kind::Procexec, few_label, ms(&few));
    table.row(Kind::Procexec, many_label, ms(&many));
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}
