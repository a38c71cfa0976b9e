//! The peers procexec is measured against, in the same run: procspawn, rayon and
//! tokio's blocking pool in Rust, and Python's multiprocessing (bench/peers.py).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_bytes::ByteBuf;

pub fn double(x: u64) -> u64 {
    2 * x
}

pub fn echo(data: ByteBuf) -> ByteBuf {
    data
}

/// procspawn's pool of 2, `Pool::spawn` + `join` per call, `calls` calls with up to
/// 64 in flight (each pending call holds four descriptors); the samples are whole runs.
pub fn procspawn_tiny(reps: usize, calls: u64) -> Vec<Duration> {
    let pool = procspawn::Pool::new(2).unwrap();
    pool.spawn(1, double).join().unwrap();
    let samples = (0..reps)
        .map(|_| {
            let start = Instant::now();
            let mut handles = std::collections::VecDeque::new();
            for i in 0..calls {
                if handles.len() == 64 {
                    let (j, handle): (u64, procspawn::JoinHandle<u64>) = handles.pop_front().unwrap();
                    assert_eq!(handle.join().unwrap(), 2 * j);
                }
                handles.push_back((i, pool.spawn(i, double)));
            }
            for (j, handle) in handles {
                assert_eq!(handle.join().unwrap(), 2 * j);
            }
            start.elapsed()
        })
        .collect();
    pool.shutdown();
    samples
}

pub fn procspawn_work(reps: usize, tasks: usize, iterations: u64) -> Vec<Duration> {
    let pool = procspawn::Pool::new(2).unwrap();
    let samples = (0..reps)
        .map(|_| {
            let start = Instant::now();
            let handles: Vec<_> = (0..tasks).map(|_| pool.spawn(iterations, crate::work)).collect();
            for handle in handles {
                handle.join().unwrap();
            }
            start.elapsed()
        })
        .collect();
    pool.shutdown();
    samples
}

pub fn procspawn_echo(reps: usize, tasks: usize, size: usize) -> Vec<Duration> {
    let pool = procspawn::Pool::new(2).unwrap();
    let payload = ByteBuf::from(vec![7u8; size]);
    let samples = (0..reps)
        .map(|_| {
            let start = Instant::now();
            // Two calls in flight per worker, so neither side waits for the other.
            let mut handles = std::collections::VecDeque::new();
            for _ in 0..tasks {
                if handles.len() == 4 {
                    let handle: procspawn::JoinHandle<ByteBuf> = handles.pop_front().unwrap();
                    assert_eq!(handle.join().unwrap().len(), size);
                }
                handles.push_back(pool.spawn(payload.clone(), echo));
            }
            for handle in handles {
                assert_eq!(handle.join().unwrap().len(), size);
            }
            start.elapsed()
        })
        .collect();
    pool.shutdown();
    samples
}

/// (start-up + first call, teardown) of a procspawn pool of 2.
pub fn procspawn_startup() -> (Duration, Duration) {
    let start = Instant::now();
    let pool = procspawn::Pool::new(2).unwrap();
    pool.spawn(1, double).join().unwrap();
    let started = start.elapsed();
    let start = Instant::now();
    pool.shutdown();
    drop(pool);
    (started, start.elapsed())
}

pub fn procspawn_latency(calls: usize) -> Vec<Duration> {
    let pool = procspawn::Pool::new(2).unwrap();
    for i in 0..100 {
        pool.spawn(i, double).join().unwrap();
    }
    let rtts = (0..calls as u64)
        .map(|i| {
            let start = Instant::now();
            pool.spawn(i, double).join().unwrap();
            start.elapsed()
        })
        .collect();
    pool.shutdown();
    rtts
}

/// One line of `bench/peers.py`: a peer, its item count, and its samples.
pub struct PythonResult {
    pub peer: String,
    pub items: u64,
    pub samples: Vec<Duration>,
}

/// Runs a workload of `bench/peers.py`; `None` (with a note) if python3 is absent.
pub fn python(workload: &str, reps: usize, args: &[String]) -> Option<Vec<PythonResult>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/peers.py");
    let output =
        match Command::new("python3").arg(script).arg(workload).arg(reps.to_string()).args(args).output() {
            Ok(output) if output.status.success() => output,
            Ok(output) => {
                eprintln!("note: python3 failed on {workload}: {}", String::from_utf8_lossy(&output.stderr));
                return None;
            }
            Err(err) => {
                eprintln!("note: python3 is not available ({err}); the Python peers are skipped");
                return None;
            }
        };
    let text = String::from_utf8_lossy(&output.stdout);
    Some(
        text.lines()
            .filter_map(|line| {
                let mut fields = line.split('|');
                let peer = fields.next()?.to_string();
                let items = fields.next()?.parse().ok()?;
                let samples = fields
                    .next()?
                    .split(',')
                    .filter_map(|s| s.parse::<f64>().ok())
                    .map(Duration::from_secs_f64)
                    .collect();
                Some(PythonResult { peer, items, samples })
            })
            .collect(),
    )
}
