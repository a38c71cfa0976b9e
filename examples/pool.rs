//! The article's second program: a pool of 4 processes maps `worker` over 0..5.
//!
//! Python:
//! ```python
//! with multiprocessing.Pool(processes=4) as pool:
//!     results = pool.map(worker, range(5))
//! ```
//! Here the executor is the pool, `map` keeps input order, and dropping the
//! executor (or `shutdown`) plays the part of the `with` block's exit.
//!
//! Run: `cargo run --example pool`

use std::time::Duration;

procexec::tasks! {
    pub fn worker(num: u64) -> u64 {
        println!("process {num} start");
        std::thread::sleep(Duration::from_secs(2)); // stands in for real work
        println!("process {num} end");
        num * num
    }
}

fn main() -> procexec::Result<()> {
    // In a worker process this never returns. Called before any runtime exists,
    // so the workers carry none.
    procexec::init_worker(&TASKS);
    tokio::runtime::Runtime::new().expect("a Tokio runtime").block_on(run())
}

async fn run() -> procexec::Result<()> {
    let pool = procexec::Executor::builder().processes(4).build().await?;
    let results = pool.map(worker, 0..5).await?;
    pool.shutdown().await;
    println!("all processes done");
    println!("results: {results:?}");
    assert_eq!(results, [0, 1, 4, 9, 16]);
    Ok(())
}
