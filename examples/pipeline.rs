//! A mixed IO/CPU pipeline: async reading, CPU work in worker processes, async writing.
//!
//! The shape of many real jobs (log digesting, record enrichment, checksumming):
//! an async stage reads records with tokio, a CPU stage spends about a millisecond
//! on each, and an async sink writes the results, in input order, to a file. The
//! example writes 4,000 records of a few KB to a temporary file, then runs the same
//! pipeline four ways and checks that all four output files are identical:
//!
//! 1. **sequential**: read, compute inline, write, on one thread: the baseline;
//! 2. **spawn_blocking**: the CPU stage on tokio's blocking pool, at most one job
//!    per CPU in flight (`StreamExt::buffered` over `spawn_blocking` futures);
//! 3. **procexec map_stream**: the CPU stage in worker processes, through
//!    [`Executor::map_stream`] over the stream of lines;
//! 4. **procexec queue+channel**: long-running worker tasks, one per process,
//!    fed through a bounded [`Queue`] and answering through a bounded channel
//!    ([`Sender`]); the parent puts results back in order before writing.
//!
//! Why `map_stream` is the one to reach for: the stage is "one input, one output,
//! in order", which is exactly what it does, and it does it with bounded memory.
//! It pulls the line stream lazily (only a window of about three chunks per worker
//! is ever in flight or waiting to be written), so backpressure reaches the reader:
//! when the workers or the sink lag, no more lines are read. It batches inputs into
//! chunks sized from measured task times, keeps input order, and retries the inputs
//! of a crashed worker. The channel version shows what to write when the stage is
//! *not* one-in-one-out (a worker that keeps state across records, filters, or
//! emits several results per record): the queue and channel are bounded too, so the
//! reader's `put` waits while the workers are busy, but ordering is the parent's job,
//! and the worker tasks must all run at once, each holding a process until the
//! queue closes: start no more of them than the executor has workers. (procexec
//! never queues a call that carries channel handles behind another call on one
//! worker, so they do run at once.)
//!
//! `buffered(n)` keeps order by waiting for the oldest job: while it runs, at most
//! `n - 1` younger ones can start, so with `n` = CPUs a core idles whenever the
//! oldest job is the slowest. `map_stream` keeps a deeper window for the same reason.
//!
//! On a machine with N idle cores, the three parallel variants should approach N
//! times the sequential speed; the processes pay for encoding each record and its
//! result, and a few milliseconds to start their workers (timed separately).
//!
//! Run: `cargo run --release --example pipeline`
//!
//! [`Executor::map_stream`]: procexec::Executor::map_stream
//! [`Queue`]: procexec::Queue
//! [`Sender`]: procexec::Sender

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt, TryStreamExt};
use procexec::{Executor, Queue, Sender};
use tokio::fs::File;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};

/// Records in the input file.
const RECORDS: usize = 4_000;
/// CPU time the work on one record aims at.
const WORK_PER_RECORD: Duration = Duration::from_micros(800);
/// Items the queue and the channel of the explicit-worker variant hold.
const CHANNEL_CAPACITY: usize = 64;

procexec::tasks! {
    /// The CPU stage for `map_stream`: one line in, one result line out.
    pub fn digest_line(line: String, rounds: u32) -> String {
        digest(&line, rounds)
    }

    /// A long-running worker: digests numbered lines from `inputs` until the queue
    /// is closed and empty, sending each result with its number to `out`. Returns
    /// how many it did.
    pub fn digest_worker(rounds: u32, inputs: Queue<(u64, String)>, out: Sender<(u64, String)>) -> u64 {
        let mut done = 0;
        for item in &inputs {
            let (number, line) = item.expect("the input queue failed");
            out.blocking_send((number, digest(&line, rounds))).expect("the parent stopped listening");
            done += 1;
        }
        done
    }
}

/// The CPU work: `rounds` rounds of a 64-bit FNV-1a over the line, each seeded with
/// the last; the result line is the record's id, its length and the final hash.
fn digest(line: &str, rounds: u32) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for round in 0..rounds {
        hash ^= u64::from(round);
        for &byte in line.as_bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    let id = line.split(' ').next().unwrap_or("");
    format!("{id} {} {hash:016x}\n", line.len())
}

/// The number of digest rounds that takes about [`WORK_PER_RECORD`] on a typical
/// record of this machine.
fn calibrate(sample: &str) -> u32 {
    let probe = 50;
    let start = Instant::now();
    std::hint::black_box(digest(std::hint::black_box(sample), probe));
    let per_round = start.elapsed().as_secs_f64() / f64::from(probe);
    ((WORK_PER_RECORD.as_secs_f64() / per_round).round() as u32).max(1)
}

/// One record of pseudo-random words, 1.5 to 3.5 KB long.
fn record(number: usize, seed: &mut u64) -> String {
    let mut next = || {
        *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        *seed >> 33
    };
    let target = 1_500 + (next() % 2_000) as usize;
    let mut line = format!("rec{number:05}");
    while line.len() < target {
        line.push(' ');
        for _ in 0..2 + next() % 8 {
            line.push((b'a' + (next() % 26) as u8) as char);
        }
    }
    line
}

/// Writes the input file with tokio; returns a sample record for calibration.
async fn write_input(path: &Path) -> std::io::Result<String> {
    let mut out = BufWriter::new(File::create(path).await?);
    let mut seed = 42;
    let mut sample = String::new();
    for number in 0..RECORDS {
        let line = record(number, &mut seed);
        out.write_all(line.as_bytes()).await?;
        out.write_all(b"\n").await?;
        if number == 0 {
            sample = line;
        }
    }
    out.flush().await?;
    Ok(sample)
}

/// The async source: the input file's lines, read with tokio as they are pulled.
async fn lines(path: &Path) -> std::io::Result<impl Stream<Item = std::io::Result<String>> + Send + 'static> {
    let reader = BufReader::with_capacity(64 * 1024, File::open(path).await?).lines();
    Ok(futures::stream::unfold(reader, |mut reader| async move {
        reader.next_line().await.transpose().map(|line| (line, reader))
    }))
}

/// The async sink: result lines, written with tokio in the order given.
struct Sink(BufWriter<File>);

impl Sink {
    async fn create(path: &Path) -> std::io::Result<Sink> {
        Ok(Sink(BufWriter::with_capacity(64 * 1024, File::create(path).await?)))
    }

    async fn write(&mut self, result: &str) -> std::io::Result<()> {
        self.0.write_all(result.as_bytes()).await
    }

    async fn finish(mut self) -> std::io::Result<()> {
        self.0.flush().await?;
        self.0.into_inner().sync_all().await
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// 1. Read, compute inline, write: one thread.
async fn sequential(input: &Path, output: &Path, rounds: u32) -> Result<(), BoxError> {
    let mut sink = Sink::create(output).await?;
    let mut lines = std::pin::pin!(lines(input).await?);
    while let Some(line) = lines.try_next().await? {
        sink.write(&digest(&line, rounds)).await?;
    }
    Ok(sink.finish().await?)
}

/// 2. The CPU stage on tokio's blocking pool, `jobs` at a time, in order.
async fn blocking_pool(input: &Path, output: &Path, rounds: u32, jobs: usize) -> Result<(), BoxError> {
    let mut sink = Sink::create(output).await?;
    let results = lines(input)
        .await?
        .map_ok(|line| async move {
            tokio::task::spawn_blocking(move || digest(&line, rounds)).await.map_err(std::io::Error::other)
        })
        .try_buffered(jobs);
    let mut results = std::pin::pin!(results);
    while let Some(result) = results.try_next().await? {
        sink.write(&result).await?;
    }
    Ok(sink.finish().await?)
}

/// 3. The CPU stage in worker processes: `map_stream` over the lines.
async fn map_stream(exec: &Executor, input: &Path, output: &Path, rounds: u32) -> Result<(), BoxError> {
    let mut sink = Sink::create(output).await?;
    // `map_stream` takes a stream of inputs, not of results: a read error ends the
    // input here and is reported after the map.
    let mut read_error = None;
    let inputs = lines(input).await?.map(|line| line.map(|line| (line, rounds)));
    let inputs = inputs.take_while(|line| {
        let ok = line.is_ok();
        if let Err(err) = line {
            read_error = Some(err.to_string());
        }
        std::future::ready(ok)
    });
    let inputs = inputs.map(|line| line.expect("only lines read get through"));
    let mut results = exec.map_stream(digest_line, inputs);
    while let Some(result) = results.try_next().await? {
        sink.write(&result).await?;
    }
    drop(results);
    if let Some(err) = read_error {
        return Err(format!("reading {}: {err}", input.display()).into());
    }
    Ok(sink.finish().await?)
}

/// 4. Long-running worker tasks fed through a bounded queue, answering through a
///    bounded channel; the parent restores input order.
///    Returns how many records each worker task digested.
async fn queue_and_channel(
    exec: &Executor,
    input: &Path,
    output: &Path,
    rounds: u32,
) -> Result<Vec<u64>, BoxError> {
    let mut sink = Sink::create(output).await?;
    let inputs = exec.queue::<(u64, String)>(CHANNEL_CAPACITY);
    let (results_tx, results) = exec.channel::<(u64, String)>(CHANNEL_CAPACITY);
    let workers: Vec<_> = (0..exec.processes())
        .map(|_| exec.spawn(digest_worker, (rounds, inputs.clone(), results_tx.clone())))
        .collect();
    drop(results_tx); // the results end when every worker's sender is gone

    // The reader: its `put` waits while the queue is full.
    let lines = lines(input).await?;
    let reader = tokio::spawn(async move {
        let mut lines = std::pin::pin!(lines);
        let mut number = 0u64;
        let outcome: Result<u64, BoxError> = async {
            while let Some(line) = lines.try_next().await? {
                inputs.put((number, line)).await?;
                number += 1;
            }
            Ok(number)
        }
        .await;
        inputs.close(); // the workers finish what is left, then return
        outcome
    });

    // The sink: results arrive in completion order; write them in input order.
    let mut next = 0u64;
    let mut early = BTreeMap::new();
    while let Some((number, result)) = results.recv().await? {
        early.insert(number, result);
        while let Some(result) = early.remove(&next) {
            sink.write(&result).await?;
            next += 1;
        }
    }
    let read = reader.await??;
    let mut per_worker = Vec::new();
    for worker in workers {
        per_worker.push(worker.await?);
    }
    assert!(early.is_empty() && next == read && per_worker.iter().sum::<u64>() == read, "lost records");
    sink.finish().await?;
    Ok(per_worker)
}

fn main() -> Result<(), BoxError> {
    // In a worker process this never returns. Called before any runtime exists,
    // so the workers carry none.
    procexec::init_worker(&TASKS);
    tokio::runtime::Runtime::new().expect("a Tokio runtime").block_on(run())
}

async fn run() -> Result<(), BoxError> {
    let cpus = procexec::cpu_count();

    let dir = TempDir::new()?;
    let input = dir.0.join("input.txt");
    let sample = write_input(&input).await?;
    let size = tokio::fs::metadata(&input).await?.len();
    let rounds = calibrate(&sample);
    println!(
        "{RECORDS} records, {:.1} MB, in {}; {rounds} digest rounds per record (~{} µs of CPU each); {cpus} CPUs",
        size as f64 / 1e6,
        input.display(),
        WORK_PER_RECORD.as_micros()
    );

    let start = Instant::now();
    let exec = Executor::builder().build().await?;
    let startup = start.elapsed();

    let mut rows: Vec<(&str, Duration, PathBuf)> = Vec::new();
    let mut run = |name, output: PathBuf, took: Duration| rows.push((name, took, output));

    let output = dir.0.join("sequential.txt");
    let start = Instant::now();
    sequential(&input, &output, rounds).await?;
    run("sequential (one thread)", output, start.elapsed());

    let output = dir.0.join("spawn_blocking.txt");
    let start = Instant::now();
    blocking_pool(&input, &output, rounds, cpus).await?;
    run("spawn_blocking, buffered(cpus)", output, start.elapsed());

    let output = dir.0.join("map_stream.txt");
    let start = Instant::now();
    map_stream(&exec, &input, &output, rounds).await?;
    run("procexec map_stream", output, start.elapsed());

    let output = dir.0.join("queue_channel.txt");
    let start = Instant::now();
    let per_worker = queue_and_channel(&exec, &input, &output, rounds).await?;
    run("procexec queue + channel", output, start.elapsed());
    exec.shutdown().await;

    println!("\n  {:<32} {:>9} {:>9}", "variant", "seconds", "speed-up");
    let baseline = rows[0].1.as_secs_f64();
    for (name, took, _) in &rows {
        println!("  {name:<32} {:>9.3} {:>8.2}x", took.as_secs_f64(), baseline / took.as_secs_f64());
    }
    println!(
        "  (starting {} worker processes took {:.3} s, not counted above)",
        exec.processes(),
        startup.as_secs_f64()
    );

    let expected = tokio::fs::read(&rows[0].2).await?;
    assert_eq!(expected.iter().filter(|&&b| b == b'\n').count(), RECORDS);
    for (name, _, output) in &rows[1..] {
        assert!(tokio::fs::read(output).await? == expected, "{name} wrote a different output");
    }
    println!("  (records per worker task in the queue + channel run: {per_worker:?})");
    println!("\nall {} outputs are identical ({} bytes)", rows.len(), expected.len());
    Ok(())
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        let path = std::env::temp_dir().join(format!("procexec-pipeline-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
