//! procexec in one screen: spawn, map, streams, and what happens when a task
//! panics or its worker process dies.
//!
//! Run: `cargo run --release --example quickstart`

use futures::StreamExt;

procexec::tasks! {
    /// A CPU-bound task: counts the primes below `n`.
    pub fn count_primes(n: u64) -> u64 {
        (2..n).filter(|&k| (2..).take_while(|d| d * d <= k).all(|d| k % d != 0)).count() as u64
    }

    /// A task that panics.
    pub fn divide(a: u64, b: u64) -> u64 { a / b }

    /// A task that takes its whole process down.
    pub fn crash() -> u64 { std::process::abort() }
}

fn main() -> procexec::Result<()> {
    // In a worker process this never returns. Called before any runtime exists,
    // so the workers carry none.
    procexec::init_worker(&TASKS);
    tokio::runtime::Runtime::new().expect("a Tokio runtime").block_on(run())
}

async fn run() -> procexec::Result<()> {
    let exec = procexec::Executor::builder().build().await?;
    println!("{} worker processes (procexec::cpu_count() = {})", exec.processes(), procexec::cpu_count());

    // One task: a future of its output.
    println!("primes below 100,000: {}", exec.spawn(count_primes, 100_000).await?);

    // Many: outputs in input order, chunked and spread over every worker.
    let counts = exec.map(count_primes, (1..=8).map(|i| i * 25_000)).await?;
    println!("primes below 25k, 50k, ... 200k: {counts:?}");

    // A stream, in completion order.
    let mut stream = exec.map_unordered(count_primes, futures::stream::iter([300_000, 10, 1_000]));
    while let Some(count) = stream.next().await {
        println!("finished: {}", count?);
    }

    // A panic is an error for its caller only; the worker serves on.
    let err = exec.spawn(divide, (1, 0)).await.unwrap_err();
    println!("divide(1, 0): {err}");

    // A crash too: the worker is replaced and nobody else notices.
    let err = exec.spawn(crash, ()).await.unwrap_err();
    println!("crash(): {err}");
    println!("still serving: {}", exec.spawn(divide, (84, 2)).await?);

    exec.shutdown().await;
    Ok(())
}
