//! The article's section 5: `Value` and `Array` in shared memory, guarded by a lock.
//!
//! Python: `counter = multiprocessing.Value('i', 0)`, `with counter.get_lock():
//! counter.value += 1` in each of 4 processes; `arr = multiprocessing.Array('d', 10)`
//! filled by workers. Here: `exec.shared_value(0)` and `exec.shared_array(10)` make
//! them, their handles go into tasks as input, and tasks lock with `blocking_lock`
//! (the parent with `lock().await`).
//!
//! Then what Python cannot do: a worker killed while it holds the lock. In Python
//! every other process waits on that lock forever; here the next locker is told who
//! died, repairs the value, and everyone goes on.
//!
//! Run: `cargo run --release --example shared`

use std::ops::Range;

use procexec::{PoisonCause, Poisoned, SharedArray, SharedValue};

procexec::tasks! {
    /// Adds 1 to the counter `times` times, each under the lock.
    pub fn add_locked(counter: SharedValue<u64>, times: u32) {
        for _ in 0..times {
            let mut count = counter.blocking_lock().unwrap_or_else(Poisoned::into_inner);
            *count += 1;
        }
    }

    /// The same without the lock: read, add, write back. Another process's update
    /// between the read and the write is lost. (All four start together, so that
    /// they do overlap: each is done in microseconds.)
    pub fn add_unlocked(counter: SharedValue<u64>, times: u32, started: SharedValue<u32>) {
        started.fetch_add(1);
        while started.load() < 4 {
            std::thread::yield_now();
        }
        for _ in 0..times {
            let count = counter.get();
            counter.set(std::hint::black_box(count) + 1);
        }
    }

    /// Atomic: no lock, and nothing lost.
    pub fn add_atomic(counter: SharedValue<u64>, times: u32) {
        for _ in 0..times {
            counter.fetch_add(1);
        }
    }

    /// Writes the squares of its range of indices: each task its own range, no lock.
    pub fn squares(array: SharedArray<f64>, range: Range<usize>) -> u32 {
        let values: Vec<f64> = range.clone().map(|i| (i * i) as f64).collect();
        array.write_from(range.start, &values).expect("the range is inside the array");
        std::process::id()
    }

    /// Takes the lock, starts an update, and dies half way (as by the OOM killer).
    pub fn die_holding(counter: SharedValue<u64>) {
        let mut count = counter.blocking_lock().unwrap_or_else(Poisoned::into_inner);
        *count = u64::MAX; // half way through an update
        std::process::abort();
    }
}

fn main() -> procexec::Result<()> {
    // In a worker process this never returns. Called before any runtime exists,
    // so the workers carry none.
    procexec::init_worker(&TASKS);
    tokio::runtime::Runtime::new().expect("a Tokio runtime").block_on(run())
}

async fn run() -> procexec::Result<()> {
    let exec = procexec::Executor::builder().processes(4).build().await?;

    // 4 processes, 10,000 increments each, under the lock.
    let counter = exec.shared_value(0u64)?;
    exec.map(add_locked, vec![(counter.clone(), 10_000); 4]).await?;
    println!("with the lock:    {}", counter.load());

    let unlocked = exec.shared_value(0u64)?;
    let started = exec.shared_value(0u32)?;
    // More increments than above: each process must run long enough (milliseconds)
    // to overlap the others, even on a busy machine.
    let times = 1_000_000;
    exec.map(add_unlocked, vec![(unlocked.clone(), times, started); 4]).await?;
    let lost = 4 * u64::from(times) - unlocked.load();
    println!("without the lock: {} of {} ({lost} updates lost to races)", unlocked.load(), 4 * times);

    let atomic = exec.shared_value(0u64)?;
    exec.map(add_atomic, vec![(atomic.clone(), 10_000); 4]).await?;
    println!("atomic fetch_add: {}", atomic.load());

    // Workers fill an array; the parent reads it where it lies.
    let array = exec.shared_array::<f64>(10)?;
    let ranges = (0..10).step_by(3).map(|start| (array.clone(), start..(start + 3).min(10)));
    let workers = exec.map(squares, ranges).await?;
    println!("squares from {} processes: {:?}", workers.len(), array.to_vec());

    // A worker dies holding the lock: the next locker is told, repairs, goes on.
    let err = exec.spawn(die_holding, counter.clone()).await.unwrap_err();
    println!("a worker died holding the lock: {err}");
    match counter.lock().await {
        Ok(_) => println!("the lock was not poisoned?"),
        Err(poisoned) => {
            if let PoisonCause::OwnerDied { pid } = poisoned.cause() {
                println!("next locker: process {pid} died holding the lock; repairing");
            }
            let mut count = poisoned.into_inner();
            *count = 40_000;
            count.clear_poison();
        }
    }
    exec.map(add_locked, vec![(counter.clone(), 1); 4]).await?;
    println!("and on it goes:   {}", counter.load());

    exec.shutdown().await;
    println!("all processes done");
    Ok(())
}
